"""Config composition: every group option composes, typos fail at start-up."""
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("experiment", "hydra", "__pycache__"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(compose, group):
    options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    assert options, group
    for opt in options:
        cfg = compose([f"{group}={opt}"])
        assert cfg[group] is not None


PRIMARY = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "base")


def test_groups_discovered():
    assert {"model", "dataset", "matcher", "projector", "privacy", "logger", "selector"} <= set(GROUPS)


@pytest.mark.parametrize("primary", PRIMARY)
def test_every_experiment_composes_under_every_entry_point(compose, primary):
    for p in sorted((CONF / "experiment").glob("*.yaml")):
        cfg = compose([f"experiment={p.stem}"], config_name=primary)
        assert cfg.stage


def test_defaults(compose):
    cfg = compose()
    assert cfg.model.name == "embedded:smollm2-135m"
    assert cfg.dataset.name == "demo" and cfg.dataset.builtin == "demo"
    assert cfg.projector._target_.endswith("LMTopKProjector") and cfg.projector.topk == 200
    assert cfg.matcher._target_.endswith("ADMMMatcher")
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"


def test_user_facing_override_names(compose):
    cfg = compose(["matcher.outer_steps=3", "matcher.inner_steps=2", "projector=nearest", "logger=none",
                   "dataset=rotten_tomatoes", "dataset.path=/some/where", "num_per_class=20", "matcher.rho=1.0", "seed=0"])
    assert (cfg.matcher.outer_steps, cfg.matcher.inner_steps) == (3, 2)
    assert cfg.projector._target_.endswith("NearestProjector")
    assert cfg.logger.name == "none"


def test_misspelled_key_fails(compose):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose(["matcher.rhoo=1.0"])


def test_wrong_type_fails(compose):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose(["matcher.outer_steps=many"])


def test_unknown_option_fails(compose):
    with pytest.raises(ConfigCompositionException):
        compose(["projector=fancy"])


def test_matcher_instantiates_with_typed_args(compose):
    from hydra.utils import instantiate

    for opt in ("admm", "admm_paper", "embedding_only"):
        m = instantiate(compose([f"matcher={opt}"]).matcher)
        assert m.outer_steps >= 1 and m.lr > 0
    for opt in ("lm_topk", "nearest"):
        assert instantiate(compose([f"projector={opt}"]).projector) is not None
