"""The reported recipes are the configuration: docs/results.md's recipe table, the experiment
configs, the committed run dirs that produced the rows, and the scripts cannot drift apart."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from gmtext.artifacts import LEGACY_DEFAULTS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def _get(cfg, key):
    node = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _value(text: str):
    """A value as Hydra reads it (YAML, with 1e-05 a float as in OmegaConf)."""
    from omegaconf._utils import get_yaml_loader

    return yaml.load(text, Loader=get_yaml_loader())


def _recipe_rows():
    """(command cell, [key=value, ...]) for each row of the recipe table."""
    text = RESULTS.read_text()
    table = text.split("## Recipes: one command per row", 1)[1].split("\n\n")[2]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        settings = re.findall(r"`([\w.]+=[^`]*)`", cells[2])
        assert settings, line
        rows.append((cells[1], settings))
    return rows


RECIPES = _recipe_rows()


def _command_overrides(cell: str) -> tuple[str, list[str]]:
    """The first command of a cell: its stage config and overrides (placeholders kept out)."""
    cmd = re.findall(r"`(gmtext-[^`]*)`", cell)[0]
    words = shlex.split(cmd)
    stage = words[0].removeprefix("gmtext-")
    overrides = [
        w for w in words[1:] if w != "-m" and not w.startswith("seed=") and w not in ("dataset=X", "dataset.path=DIR")
    ]
    return stage, overrides


@pytest.mark.parametrize("cell,settings", RECIPES, ids=[r[0][:60] for r in RECIPES])
def test_recipe_table_matches_the_composed_config(compose, cell, settings):
    stage, overrides = _command_overrides(cell)
    cfg = compose(overrides, config_name=stage)
    for kv in settings:
        key, value = kv.split("=", 1)
        assert _get(cfg, key) == _value(value), f"{cell}: {key}"


def test_every_experiment_named_in_docs_and_scripts_exists():
    named = set()
    for f in [
        *ROOT.glob("docs/*.md"),
        ROOT / "README.md",
        *ROOT.glob("experiments/*.sh"),
        *ROOT.glob("experiments/*.md"),
        *ROOT.glob("conf/experiment/*.yaml"),
    ]:
        named |= set(re.findall(r"experiment=(\w+)", f.read_text()))
    named -= {"NAME", "X"}  # placeholders in prose
    missing = sorted(
        n for n in named if n not in EXPERIMENTS and not any((ROOT / "experiments" / f).exists() for f in (f"{n}.sh",))
    )
    assert not missing, missing


def test_defaults_are_the_measured_recipe(compose):
    cfg = compose(config_name="pipeline")
    assert list(cfg.matched_params) == ["final_norm", "last_blocks:1"] and cfg.match_loss == "verbalizer"
    assert cfg.matcher.objective == "sequence" and cfg.matcher.init_candidates == 8
    assert cfg.projector.sim_weight == 5.0 and cfg.selector._target_.endswith("LabelMarginSelector")
    assert cfg.selector.release is None and list(cfg.probe.matched_params) == ["middle_blocks"]
    assert (cfg.num_per_class, cfg.selector.per_class, cfg.real_per_class) == (20, 10, 50)
    assert (cfg.finetuner.lr, cfg.finetuner.batch_size, cfg.finetuner.epochs) == (1e-5, 8, 10)
    assert cfg.matcher.max_perplexity_ratio == 1.0  # the readability guard


def test_admm_unguarded_is_the_recipe_without_the_readability_guard(compose):
    """The rows recorded before the guard became the default compose matcher=admm_unguarded: the
    recipe's matcher with the guard off and nothing else changed; the paper's matcher has none."""
    guarded, unguarded = (OmegaConf.to_container(compose([f"matcher={m}"]).matcher) for m in ("admm", "admm_unguarded"))
    assert {k for k in guarded if guarded[k] != unguarded[k]} == {"max_perplexity_ratio"}
    assert (guarded["max_perplexity_ratio"], unguarded["max_perplexity_ratio"]) == (1.0, 0.0)
    assert compose(["matcher=admm_paper"]).matcher.max_perplexity_ratio == 0.0


def test_a_choice_specialises_keys_outside_its_group(compose):
    # privacy=dp reads the whole split (a per-class sample is refused under DP)
    assert compose(["privacy=dp"]).real_per_class is None
    assert compose(["experiment=eps_sweep"]).real_per_class is None  # an experiment's `override /privacy: dp` too
    # the command line still wins (and the release then refuses it with one line)
    assert compose(["privacy=dp", "real_per_class=5"]).real_per_class == 5
    # privacy=dp reads the data in sketched spaces: the generator's, and the probe's when selector=margin (a pair)
    dp = compose(["privacy=dp"])
    assert list(dp.matched_params) == ["sketch:last_blocks:1"] and list(dp.probe.matched_params) == [
        "sketch:middle_blocks"
    ]
    assert list(compose(["privacy=dp", "selector=best"]).probe.matched_params) == []
    assert list(compose(["privacy=dp", "matched_params=[final_norm]"]).matched_params) == ["final_norm"]
    # no margin selector: no probe release spending budget
    assert list(compose(["selector=best"]).probe.matched_params) == []
    assert list(compose(["selector=best", "probe.matched_params=[final_norm]"]).probe.matched_params) == ["final_norm"]


def test_debug_tiny_is_the_fast_base_and_overrides_win(compose):
    cfg = compose(["debug=tiny"])
    assert (
        cfg.model.name == "tiny-llama"
        and cfg.logger._target_ == "gmtext.tracking.Tracker"
        and cfg.matched_params == ["lm_head"]
    )
    assert cfg.selector._target_.endswith("BestMatchSelector") and list(cfg.probe.matched_params) == []
    cfg = compose(["debug=tiny", "selector=margin", "matched_params=[final_norm]"])
    assert cfg.selector._target_.endswith("LabelMarginSelector") and cfg.matched_params == ["final_norm"]
    assert list(cfg.probe.matched_params) == ["middle_blocks"]


def test_middle_blocks_is_layers_10_to_19_of_smollm2():
    """The probe the reported margin rows used was `re:layers\\.(1[0-9])\\.` on SmolLM2's 30 blocks."""
    from gmtext.gradients import middle_third

    blocks = [f"model.layers.{i}." for i in range(30)]
    assert middle_third(blocks) == [b for b in blocks if re.search(r"layers\.(1[0-9])\.", b)]
    assert middle_third(blocks[:2]) == blocks[:1] and middle_third(blocks[:1]) == blocks[:1]


def _recorded(run: Path) -> dict:
    return yaml.safe_load((run / ".hydra" / "config.yaml").read_text())


def _flat(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


GEN_KEYS = [
    "seed",
    "num_per_class",
    "batch_size",
    "real_per_class",
    "match_loss",
    "matched_params",
    "target_batch_size",
    "dataset.name",
    "dataset.length",
    "dataset.template",
    "dataset.lm_context",
    "model.name",
]
GEN_PREFIXES = ("matcher.", "projector.")
FT_KEYS = [
    "finetune.eval_limit",
    "finetune.dev_size",
    "finetune.eval_batch_size",
    "finetuner._target_",
    "finetuner.lr",
    "finetuner.batch_size",
    "finetuner.epochs",
    "finetuner.max_steps",
    "finetuner.weight_decay",
    "finetuner.warmup_ratio",
    "finetuner.grad_clip",
    "finetuner.max_text_tokens",
]


@pytest.mark.parametrize(
    "experiment,out,pool,select,ft",
    [
        ("rt_main_cpu_n100", "rt_main_cpu_n100_pool100", "gen_epsinf", "select_margin", "gradmm100_margin_s0"),
        ("rt_main_cpu", "rt_main_cpu", "gen_epsinf", "select_margin", "gradmm20_margin_s0"),
        ("rt_main_cpu_best", "rt_main_cpu", "gen_epsinf", "select_epsinf", "gradmm20_epsinf_s0"),
    ],
)
def test_experiment_composes_the_settings_that_made_its_row(compose, experiment, out, pool, select, ft):
    """The committed run dirs of the reported rows (made by separate stage commands) and the one
    pipeline command that now stands for them agree on every generation, selection and fine-tuning
    setting (seed 0)."""
    base = ROOT / "experiments" / "results" / out
    if not (base / pool / ".hydra").exists():
        pytest.skip(f"{base / pool} not in this checkout")
    cfg = OmegaConf.to_container(compose([f"experiment={experiment}", "seed=0"], config_name="pipeline"), resolve=True)
    now = _flat(cfg)
    gen = _flat(_recorded(base / pool))
    gen_keys = GEN_KEYS + [k for k in gen if k.startswith(GEN_PREFIXES) and k in now]
    assert {k: now[k] for k in gen_keys} == {k: gen[k] for k in gen_keys}
    _assert_later_keys_as_legacy(now, gen)
    sel = _flat(_recorded(base / select))
    for k in ("selector._target_", "selector.per_class", "selector.dedupe", "selector.balance"):
        assert now[k] == sel[k], k
    fin = _flat(_recorded(base / ft))
    assert {k: now[k] for k in FT_KEYS} == {k: fin[k] for k in FT_KEYS}
    if sel.get("selector.release"):  # the separate probe release the row was scored against
        probe = _flat(_recorded(ROOT / Path(sel["selector.release"]).parent))
        assert (probe["real_per_class"], probe["seed"], probe["match_loss"]) == (
            now["real_per_class"],
            0,
            now["match_loss"],
        )
        assert probe["matched_params"] == ["re:layers\\.(1[0-9])\\."] and now["probe.matched_params"] == [
            "middle_blocks"
        ]
    else:
        assert now["probe.matched_params"] == []


def _composed_as_recorded(compose, command: str, run: str, skip=()) -> dict:
    """Today's `gmtext-pipeline <command>` composition, flat, after checking that it equals the
    run dir's recorded config on every recorded key but bookkeeping (and `skip`); skips the
    test where the run dir is not in this checkout."""
    d = ROOT / "experiments" / "results" / run
    if not (d / "metrics.json").exists():
        pytest.skip(f"{d} not in this checkout (or unfinished)")
    now = _flat(OmegaConf.to_container(compose(command.split(), config_name="pipeline"), resolve=True))
    rec = _flat(OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "config.yaml"), resolve=True))
    keys = [k for k in rec if not k.startswith(("logger.", "threads", "progress", "hydra.", *skip))]
    assert {k: now.get(k) for k in keys} == {k: rec[k] for k in keys}
    _assert_later_keys_as_legacy(now, rec)
    return now


def _assert_later_keys_as_legacy(now: dict, rec: dict) -> None:
    """A key added after a run reads as what that run did (LEGACY_DEFAULTS): a later change of its
    default (the readability guard's) must not change what the row's command composes to."""
    later = {k: v for k, v in LEGACY_DEFAULTS.items() if "." in k and k in now and k not in rec}
    assert {k: now[k] for k in later} == later


PRIVATE_RUNS = [  # (the command's overrides, run dir under experiments/results)
    *[(f"experiment=rt_private_n100 seed={s}", f"rt_private_n100/eps1_s{s}") for s in (0, 1, 2)],
    *[(f"experiment=rt_private_n100_eps4 seed={s}", f"rt_private_n100/eps4_s{s}") for s in (0, 1, 2)],
    *[(f"experiment=rt_private_n100_epsinf seed={s}", f"rt_private_n100/epsinf_s{s}") for s in (0, 1, 2)],
    ("experiment=eps_sweep privacy.epsilon=0.5 seed=0", "rt_private_n100/eps0.5_s0_h200"),
    *[(f"experiment=eps_sweep privacy.epsilon={e} seed=0", f"rt_private_n100/eps{e}_s0") for e in (2, 8)],
    *[(f"experiment=rt_private_n100_twin seed={s}", f"rt_private_n100/twin_s{s}") for s in (0, 2)],
    *[
        (f"experiment=budget_share_sweep probe.budget_share={b} seed={s}", f"rt_private_n100/share{b}_s{s}")
        for b, s in ((0.25, 0), (0.75, 0), (0.25, 1))
    ],
    *[
        (f"experiment=rt_private_n100_twin target_precision=bfloat16 seed={s}", f"rt_private_n100/twin_bf16_s{s}")
        for s in (0, 1, 2)
    ],
    *[(f"experiment=rt_private_n100_readable seed={s}", f"rt_private_n100/readable_s{s}") for s in (0, 1, 2)],
    ("experiment=rt_pe100 seed=0", "rt_pe100/eps1_s0"),
    ("experiment=rt_pe100_eps4 seed=0", "rt_pe100/eps4_s0"),
]


@pytest.mark.parametrize("command,run", PRIVATE_RUNS)
def test_private_row_is_one_pipeline_command(compose, command, run):
    """The private rows were made by `gmtext-pipeline <command>` itself (the loop of
    experiments/rt_private.sh, or -m seed=...): today's composition equals the recorded config
    on every key but bookkeeping. The ε = ∞ row reads the same whole split without noise."""
    now = _composed_as_recorded(compose, command, run)
    release = "NoPrivacy" if "epsinf" in command else "GaussianRelease"
    assert now["privacy._target_"].endswith(release) and now["real_per_class"] is None


PIPELINE_RUNS = [  # non-private rows: (the command's overrides, run dir under experiments/results)
    *[
        (f"experiment={d}_n20{e} seed={s}", f"n20_transfer/{d}/{row}20_s{s}")
        for d in ("imdb", "tweet_emotion")
        for e, row in (("", "gradmm"), ("_twin", "twin"), ("_readable", "readable"))
        for s in (0, 1, 2)
    ],
    *[(f"experiment=rt_main_cpu_n100 seed={s}", f"rt_main_cpu_recipes_n100/rt_main_cpu_n100_s{s}") for s in (0, 1, 2)],
    *[
        (f"experiment=tweet_emotion_n20{e} seed={s}", f"n20_transfer/tweet_emotion/{row}20_s{s}")
        for e, row in (("_contrastive", "contrastive"), ("_contrastive_twin", "ctwin"))
        for s in (0, 1, 2)
    ],
    *[(f"experiment=imdb_n20_contrastive_twin seed={s}", f"n20_transfer/imdb/ctwin20_s{s}") for s in (0, 1, 2)],
    *[
        (f"experiment={d}_n20_classprompt_twin seed={s}", f"n20_transfer/{d}/cptwin20_s{s}")
        for d in ("tweet_emotion", "imdb")
        for s in (0, 1, 2)
    ],
    *[
        (f"experiment={d}_n20{e} seed={s}", f"n20_transfer/{d}/{row}20_s{s}")
        for d in ("tweet_emotion", "imdb")
        for e, row in (("_beam", "beam"), ("_beam_readable", "beamread"))
        for s in (0, 1, 2)
    ],
]


@pytest.mark.parametrize("command,run", PIPELINE_RUNS)
def test_pipeline_row_is_one_command(compose, command, run):
    """The N = 20 transfer rows (GRADMM, its twin, the readability-guarded GRADMM, the contrastive
    pair) and the GRADMM-100 reproduction were made by `gmtext-pipeline <command>`: today's composition equals
    the recorded config on every key but bookkeeping (a key added later is absent from older
    records and not compared; gmtext-report reads it as its legacy value)."""
    now = _composed_as_recorded(compose, command, run, skip=("selector.release",))
    assert now["privacy._target_"].endswith("NoPrivacy")


@pytest.mark.parametrize(
    "experiment,finetuner,epsilon",
    [
        ("rt_dpsgd_lora", "LoRAFineTuner", 1),
        ("rt_dpsgd_lora_eps4", "LoRAFineTuner", 4),
        ("rt_dpsgd_last_layers", "LastLayersFineTuner", 1),
        ("rt_dpsgd_last_layers_eps4", "LastLayersFineTuner", 4),
    ],
)
def test_dpsgd_rows_train_on_the_whole_split_with_the_fixed_recipe(compose, experiment, finetuner, epsilon):
    """The DP-SGD baseline rows: every non-dev train record (train.size null), the literature
    recipe of conf/train/dpsgd.yaml (expected batch 256, 3 epochs, lr 5e-4, C = 0.1), the
    N = 100 table's evaluation, and only the finetuner and ε differ between them."""
    cfg = compose([f"experiment={experiment}"], config_name="finetune")
    assert cfg.train._target_.endswith("DPSGDSource") and cfg.train.size is None
    assert (cfg.train.epsilon, cfg.train.delta, cfg.train.clip_norm) == (epsilon, 1e-5, 0.1)
    assert cfg.train.adjacency == "replace_one"  # the promise of the GRADMM and PE rows they sit beside
    assert cfg.finetuner._target_.endswith(finetuner)
    assert (cfg.finetuner.batch_size, cfg.finetuner.epochs, cfg.finetuner.lr) == (256, 3, 5e-4)
    assert (cfg.dataset.name, cfg.finetune.eval_limit) == ("rotten_tomatoes", 500)


DPSGD_RUNS = [  # (the command's overrides, run dir under experiments/results)
    *(
        (f"experiment=rt_dpsgd_{row} seed={s}", f"rt_dpsgd/{row}_s{s}")
        for row in ("lora", "lora_eps4", "last_layers", "last_layers_eps4")
        for s in (0, 1, 2)
    ),
]


@pytest.mark.parametrize("command,run", DPSGD_RUNS)
def test_dpsgd_row_is_one_finetune_command(compose, command, run):
    """The replace-one DP-SGD rows were made by `gmtext-finetune <command>` (experiments/rt_dpsgd.sh)
    with today's composition, and on the schedule of the row count (8,530 rows: q = 1/34, 102
    steps), not of the non-dev records that trained."""
    d = ROOT / "experiments" / "results" / run
    if not (d / "metrics.json").exists():
        pytest.skip(f"{d} not in this checkout (or unfinished)")
    now = _flat(OmegaConf.to_container(compose(command.split(), config_name="finetune"), resolve=True))
    rec = _flat(OmegaConf.to_container(OmegaConf.load(d / ".hydra" / "config.yaml"), resolve=True))
    keys = [k for k in rec if not k.startswith(("logger.", "threads", "progress", "hydra."))]
    assert {k: now.get(k) for k in keys} == {k: rec[k] for k in keys}
    m = json.loads((d / "metrics.json").read_text())
    dp = m["dp"]
    assert (dp["num_records"], dp["steps"], dp["relation"]) == (8530, 102, "replace_one") and m["n_train"] is None
    assert dp["sample_rate"] == pytest.approx(1 / 34) and m["epsilon"] <= now["train.epsilon"]


SCRIPT_KEYS = {"experiment", "seed", "logger", "threads", "hydra.run.dir", "hydra.sweep.dir", "synthetic"}


@pytest.mark.parametrize(
    "script", ["n20_transfer.sh", "rt_main_cpu.sh", "rt_canaries.sh", "rt_private.sh", "rt_dpsgd.sh"]
)
def test_scripts_only_loop(script):
    """A script passes an experiment, a seed and where to write: no generator or fine-tuning setting."""
    text = (ROOT / "experiments" / script).read_text()
    calls = re.findall(r"gmtext-(?:pipeline|generate|release|select|finetune|audit)\s+([^\n]*)", text)
    assert calls
    for args in calls:
        keys = {w.split("=", 1)[0] for w in args.split() if "=" in w and not w.startswith(("$", "\"$"))}
        assert keys <= SCRIPT_KEYS, (script, keys - SCRIPT_KEYS)


@pytest.mark.parametrize("script,stage,per_seed", [("rt_private.sh", "pipeline", 4), ("rt_dpsgd.sh", "finetune", 4)])
def test_scripts_default_to_three_seeds(tmp_path, script, stage, per_seed):
    """With no argument a loop runs seeds 0, 1 and 2, each as its own job. (`"${@:-0 1 2}"`
    expanded to the one word "0 1 2" and handed Hydra `seed=0 1 2`.) The gmtext commands are
    stand-ins that record their arguments."""
    import os
    import subprocess

    if not (ROOT.parent / "shared" / "data" / "rotten_tomatoes").exists():
        pytest.skip("../shared/data/rotten_tomatoes not beside the checkout (the script refuses to start)")
    log, bindir = tmp_path / "calls.txt", tmp_path / "bin"
    bindir.mkdir()
    for name in (f"gmtext-{stage}", "gmtext-report"):
        (bindir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
        (bindir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    subprocess.run(["bash", str(ROOT / "experiments" / script)], env=env, check=True, capture_output=True)
    calls = [line.split() for line in log.read_text().splitlines() if line.startswith(f"gmtext-{stage}")]
    seeds = [w for c in calls for w in c if w.startswith("seed=")]
    assert len(calls) == 3 * per_seed and sorted(set(seeds)) == ["seed=0", "seed=1", "seed=2"]
    assert all(sum(w.startswith("seed=") for w in c) == 1 for c in calls)


def test_no_script_packs_its_default_seeds_into_one_word():
    for script in (ROOT / "experiments").glob("*.sh"):
        assert not re.search(r'"\$\{@:-[^}]* [^}]*\}"', script.read_text()), script.name


def test_eps_sweep_is_the_private_row_at_five_budgets(compose):
    """experiment=eps_sweep -m gives the accuracy-vs-ε plot of the private N = 100 row: the same
    composed run as rt_private_n100 at each ε, nothing else changed."""
    sweep = compose(["experiment=eps_sweep"], config_name="pipeline", return_hydra_config=True)
    row = compose(["experiment=rt_private_n100"], config_name="pipeline")
    assert sweep.hydra.sweeper.params == {"privacy.epsilon": "0.5,1,2,4,8"}
    plain = OmegaConf.to_container(sweep, resolve=False)
    plain.pop("hydra")
    assert plain == OmegaConf.to_container(row, resolve=False)


def test_budget_share_sweep_changes_only_the_split(compose):
    """experiment=budget_share_sweep -m: the private twin row at three probe shares of one budget."""
    sweep = compose(["experiment=budget_share_sweep"], config_name="pipeline", return_hydra_config=True)
    row = compose(["experiment=rt_private_n100_twin"], config_name="pipeline")
    assert sweep.hydra.sweeper.params == {"probe.budget_share": "0.25,0.5,0.75"}
    plain = OmegaConf.to_container(sweep, resolve=False)
    plain.pop("hydra")
    assert plain == OmegaConf.to_container(row, resolve=False) and row.probe.budget_share == 0.5


def test_every_committed_ledger_re_accounts_to_its_recorded_epsilon():
    """An auditor's check on the shipped artifacts: each ledger under experiments/results,
    composed again by today's code, gives the ε the artifact states (to 1e-12), so a change to
    the accountant cannot silently re-price published rows."""
    from gmtext.privacy.ledger import ledger_of

    names = ("metrics.json", "release_summary.json", "generate.json", "select.json")
    files = [f for n in names for f in (ROOT / "experiments" / "results").rglob(n)]
    checked = 0
    for f in files:
        priv = json.loads(f.read_text()).get("privacy")
        led = ledger_of(priv) if isinstance(priv, dict) else None
        if led is None or not led.entries or not led.private:
            continue
        assert led.epsilon() == pytest.approx(priv["epsilon"], rel=1e-12, abs=1e-12), f
        checked += 1
    if not checked:
        pytest.skip("no private artifact under experiments/results in this checkout")
