"""Config composition: every group option composes, typos fail at start-up."""

from pathlib import Path

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

CONF = Path(__file__).resolve().parents[1] / "conf"
# groups whose options fill a key of their own name (experiment, debug and specialize are global packages)
GROUPS = sorted(
    p.name
    for p in CONF.iterdir()
    if p.is_dir() and p.name not in ("experiment", "hydra", "debug", "specialize", "__pycache__")
)


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
        if "\n# gmtext-audit " in p.read_text() and primary != "audit":
            continue  # an audit experiment (canaries.*): only gmtext-audit's schema has its keys
        cfg = compose([f"experiment={p.stem}"], config_name=primary)
        assert cfg.stage


@pytest.mark.parametrize("primary", PRIMARY)
def test_debug_presets_compose_with_every_option(compose, primary):
    """debug=tiny and debug=fast are the tests' base: each must compose under every entry point and
    with every option of the groups they do not set (a preset that sets a key of one projector
    used to break projector=nearest)."""
    for debug in sorted(p.stem for p in (CONF / "debug").glob("*.yaml")):
        assert compose([f"debug={debug}"], config_name=primary).model.name
        for group in ("projector", "privacy", "matcher", "selector"):
            for opt in sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.endswith("_schema")):
                compose([f"debug={debug}", f"{group}={opt}"], config_name=primary)
    fast = compose(["debug=fast"], config_name=primary)
    assert fast.matcher.init_candidates == 1 and fast.finetuner.max_steps == 2 and fast.model.name == "tiny-llama"


def test_defaults(compose):
    cfg = compose()
    assert cfg.model.name == "embedded:smollm2-135m"
    assert cfg.dataset.name == "demo" and cfg.dataset.builtin == "demo"
    assert cfg.projector._target_.endswith("LMTopKProjector") and cfg.projector.topk == 200
    assert cfg.matcher._target_.endswith("ADMMMatcher")
    assert (
        cfg.logger._target_ == "gmtext.tracking.WandbTracker" and cfg.logger.mode is None and cfg.logger.project is None
    )  # W&B's env decides
    assert cfg.model.device == "cpu" and "experiment" not in cfg


def test_user_facing_override_names(compose):
    cfg = compose(
        [
            "matcher.outer_steps=3",
            "matcher.inner_steps=2",
            "projector=nearest",
            "logger=none",
            "dataset=rotten_tomatoes",
            "dataset.path=/some/where",
            "num_per_class=20",
            "matcher.rho=1.0",
            "seed=0",
        ]
    )
    assert (cfg.matcher.outer_steps, cfg.matcher.inner_steps) == (3, 2)
    assert cfg.projector._target_.endswith("NearestProjector")
    assert cfg.logger._target_ == "gmtext.tracking.Tracker"


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


# ---------------------------------------------------------------- experiments, job names, help
def test_misspelled_experiment_fails(compose):
    """experiment=NAME must name a file of conf/experiment (it was `optional`: a typo composed
    the defaults and the run went ahead without the experiment)."""
    with pytest.raises(MissingConfigException, match="rt_main_cpuu"):
        compose(["experiment=rt_main_cpuu"])
    assert compose(["experiment=rt_main_cpu"], config_name="pipeline").dataset.name == "rotten_tomatoes"


def test_misspelled_experiment_cli_one_line_exit_2():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from gmtext.cli import generate_main; generate_main()",
            "experiment=rt_main_cpuu",
            "--cfg",
            "job",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert line.startswith("gmtext-generate: error: ") and "experiment/rt_main_cpuu" in line and "rt_main_cpu," in line


@pytest.mark.parametrize("primary", PRIMARY)
def test_job_named_after_its_stage(primary):
    """Job log <stage>.log, sbatch job <stage>, --help about the stage (Hydra's default is the
    module name: every stage was `cli`)."""
    from hydra import compose as _compose, initialize_config_module

    from gmtext.config import register_configs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
        hc = _compose(
            config_name=primary, overrides=["synthetic=x"] if primary == "audit" else [], return_hydra_config=True
        ).hydra
    assert hc.job.name == primary and hc.help.app_name == f"gmtext-{primary}"
    assert hc.help.header.startswith(f"gmtext-{primary}: ") and len(hc.help.header) > 60


@pytest.mark.parametrize("primary", PRIMARY)
@pytest.mark.parametrize("stamp", [None, "2030-01-01_00-00-00"])
def test_run_and_sweep_dirs_per_stage(primary, stamp, monkeypatch):
    """Every stage: outputs/<stage>/<dataset>/<time> and multirun/<stage>/<dataset>/<time>/<n>, no
    chdir; GMTEXT_RUN_STAMP (accelerate ranks of gmtext-finetune) replaces the time."""
    import re

    from hydra import compose as _compose, initialize_config_module
    from omegaconf import OmegaConf

    from gmtext.config import register_configs

    if stamp:
        monkeypatch.setenv("GMTEXT_RUN_STAMP", stamp)
    else:
        monkeypatch.delenv("GMTEXT_RUN_STAMP", raising=False)
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="gmtext.conf"):
        cfg = _compose(
            config_name=primary, overrides=["synthetic=x"] if primary == "audit" else [], return_hydra_config=True
        )
    hc = cfg.hydra
    OmegaConf.update(cfg, "hydra.job.num", 3, force_add=True)
    when = re.escape(stamp) if stamp else r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d"
    assert re.fullmatch(rf"outputs/{primary}/demo/{when}", hc.run.dir)
    assert re.fullmatch(rf"multirun/{primary}/demo/{when}", hc.sweep.dir) and str(hc.sweep.subdir) == "3"
    assert hc.job.chdir is False


def test_help_describes_the_stage():
    r = subprocess.run(
        [sys.executable, "-c", "from gmtext.cli import select_main; select_main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert (
        r.stdout.startswith("gmtext-select: Pick the final synthetic set") and "cli is powered by Hydra" not in r.stdout
    )
    assert "== Configuration groups ==" in r.stdout


# ---------------------------------------------------------------- closed choices
BAD_CHOICES = [
    ("matcher.distance=cosine", "generate"),
    ("matcher.objective=batches", "generate"),
    ("matcher.init=zeros", "generate"),
    ("projector.metric=dot", "generate"),
    ("match_loss=verb", "generate"),
    ("model.dtype=fp8", "generate"),
    ("logger.mode=onlin", "generate"),
    ("privacy=dp privacy.accountant=prvv", "release"),
    ("privacy=dp privacy.adjacency=add", "release"),
    ("train=dpsgd train.accountant=analytic", "finetune"),
    ("matcher=embedding_only matcher.distance=L2", "generate"),
]


@pytest.mark.parametrize("overrides,primary", BAD_CHOICES)
def test_closed_choice_rejected_at_compose(compose, overrides, primary):
    *rest, bad = overrides.split()
    with pytest.raises(ConfigCompositionException) as e:
        compose([*rest, bad], config_name=primary)
    assert "expected one of" in str(e.value.__cause__) and bad.split("=")[1] in str(e.value.__cause__)


def test_choices_behave_as_strings(compose):
    """Enum members from the schema compare, format and serialise as their plain value, so
    the code comparing with "cos" and the stored configs (json) are unchanged."""
    import json

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = compose(["matcher.distance=l2", "match_loss=verbalizer", "privacy=dp", "privacy.accountant=rdp"])
    assert cfg.matcher.distance == "l2" and f"{cfg.match_loss}" == "verbalizer" and str(cfg.privacy.accountant) == "rdp"
    assert {"rdp": 1}[cfg.privacy.accountant] == 1
    d = OmegaConf.to_container(cfg, resolve=True)
    assert json.loads(json.dumps(d))["matcher"]["distance"] == "l2"
    assert instantiate(cfg.matcher).outer_steps >= 1
    assert instantiate(compose(["projector.metric=l2"]).projector) is not None


# ---------------------------------------------------------------- CLI: one line for user errors, tracebacks for bugs
def test_user_errors_versus_bugs():
    import errno

    from gmtext.artifacts import RunDirLocked
    from gmtext.cli import is_user_error
    from gmtext.data import DataError
    from gmtext.errors import UserError

    for e in (
        ValueError("x"),
        DataError("x"),
        FileNotFoundError(errno.ENOENT, "no", "f"),
        PermissionError(errno.EACCES, "no", "f"),
        OSError(errno.ENOSPC, "full", "f"),
        UserError("launch"),
        RunDirLocked("busy"),
    ):
        assert is_user_error(e), e
    for e in (
        RuntimeError("CUDA error: an illegal memory access"),
        OSError(errno.EIO, "I/O error"),
        KeyError("k"),
        TypeError("t"),
    ):
        assert not is_user_error(e), e


def test_cli_shows_a_traceback_for_a_bug(monkeypatch, capsys):
    """A RuntimeError out of a stage (a torch bug) propagates with its traceback; a
    ValueError ends as one line and exit 2."""
    import types

    import gmtext.cli as cli

    monkeypatch.setattr(
        cli,
        "HydraConfig",
        types.SimpleNamespace(get=lambda: types.SimpleNamespace(runtime=types.SimpleNamespace(output_dir="."))),
    )

    def bug(cfg, run_dir):
        raise RuntimeError("expected scalar type Float but found Half")

    from omegaconf import OmegaConf

    cfg = OmegaConf.create({})
    with pytest.raises(RuntimeError, match="scalar type"):
        cli._run("generate", bug, cfg)

    def bad_value(cfg, run_dir):
        raise ValueError("num_per_class=0 must be >= 1")

    with pytest.raises(SystemExit) as e:
        cli._run("generate", bad_value, cfg)
    assert e.value.code == 2 and capsys.readouterr().err == "gmtext-generate: error: num_per_class=0 must be >= 1\n"
