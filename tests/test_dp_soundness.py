"""The DP promise checked like an auditor would (one test per finding of the soundness review):
record-stable inclusion, the sensitivity of the sums, one ledger composed by the accountant,
real dev sets charged, nothing computed from private data in the job log."""

import json
import logging
import math
import random

import pytest
import torch

from gmtext.data import Example, LabeledSplit, is_dev, load_split, release_records
from gmtext.gradients import MatchedParams
from gmtext.models import load_model
from gmtext.privacy import mechanism as M
from gmtext.privacy.accountant import calibrate_noise_multiplier, composed_epsilon, sum_sensitivity
from gmtext.privacy.ledger import Ledger, LedgerEntry, compose_records
from gmtext.privacy import release as P
from gmtext.stages import release as R

from conftest import rt_path


# --------------------------------------------------------------------------- which records enter
def _neighbours(examples: list[Example], rng: random.Random):
    """The changes that moved every sampled example under the old seeded random.sample."""
    used = [i for i, e in enumerate(examples) if not is_dev(e.text)]
    i = rng.choice(used)
    dev_text = next(f"dev-bucket text {k}" for k in range(1000) if is_dev(f"dev-bucket text {k}"))
    other = 1 - examples[i].label
    yield "add one at the top", [Example("a brand new review", 0)] + examples
    unused = next(j for j, e in enumerate(examples) if is_dev(e.text))
    yield "remove one unused", examples[:unused] + examples[unused + 1 :]
    yield (
        "replace a used one by a dev-bucket text",
        examples[:i] + [Example(dev_text, examples[i].label)] + examples[i + 1 :],
    )
    yield (
        "replace a used one by one of the other label",
        examples[:i] + [Example("another text entirely", other)] + examples[i + 1 :],
    )
    yield "remove a used one", examples[:i] + examples[i + 1 :]


def _multiset(by_class):
    from collections import Counter

    return Counter((c, t) for c, ts in enumerate(by_class) for t in ts)


def _check_record_stable(examples, sample_rate):
    base = _multiset(release_records(LabeledSplit(examples), 2, sample_rate, key=3))
    for what, nb in _neighbours(examples, random.Random(0)):
        other = _multiset(release_records(LabeledSplit(nb), 2, sample_rate, key=3))
        changed = sum(((base - other) + (other - base)).values())
        assert changed <= 2, f"{what}: {changed} records changed"  # replace = one out, one in
        assert len(base - other) <= 1 and len(other - base) <= 1, what


@pytest.mark.parametrize("rate", [1.0, 0.3])
def test_inclusion_is_record_stable_synthetic(rate):
    examples = [Example(f"review number {i} with some words", i % 2) for i in range(300)]
    _check_record_stable(examples, rate)


@pytest.mark.parametrize("rate", [1.0, 0.05])
def test_inclusion_is_record_stable_rotten_tomatoes(rate):
    split = load_split("train", ["neg", "pos"], path=str(rt_path()))
    _check_record_stable(split.examples, rate)


def test_sample_rate_keeps_about_that_share_decided_per_record():
    examples = [Example(f"text {i}", i % 2) for i in range(4000)]
    kept = sum(map(len, release_records(LabeledSplit(examples), 2, 0.25, key=0)))
    eligible = sum(not is_dev(e.text) for e in examples)
    assert abs(kept / eligible - 0.25) < 0.03
    assert release_records(LabeledSplit(examples), 2, 0.25, key=0) != release_records(
        LabeledSplit(examples), 2, 0.25, key=1
    )


# --------------------------------------------------------------------------- sensitivity
TEXTS = [
    "A dull film.",
    "so so so so so so",
    "x",
    "The acting is wooden, the plot is worse and it is long.",
    "Great fun!",
]


def _joint_sums(lm, task, mp, by_class, clip, precision="float32"):
    out = []
    for c, texts in enumerate(by_class):
        out += M.clipped_sum(lm.model, task, mp, texts, task.label_token_ids[c], clip, precision=precision).sums
    return torch.cat([t.flatten().double() for t in out])


@pytest.mark.parametrize(
    "specs,precision",
    [
        (["lm_head"], "float32"),
        (["final_norm", "last_blocks:1"], "float32"),
        ([r"sketch:6x5:3:layers\.1\."], "bfloat16"),  # target_precision=bfloat16: only the passes change
    ],
)
def test_neighbouring_datasets_move_the_sums_by_at_most_the_charged_sensitivity(tiny, specs, precision):
    lm, task = tiny
    if precision != "float32":  # sketch branches attach in place: a model of its own
        lm = load_model("tiny-llama")
    mp = MatchedParams(lm.model, specs)
    clip = 0.05  # below every per-example norm on this model: the bound is tight
    base = [TEXTS[:3], TEXTS[3:]]
    s0 = _joint_sums(lm, task, mp, base, clip, precision)
    cases = {
        "replace_one": [
            [TEXTS[:2] + ["Completely different words here."], TEXTS[3:]],  # same class
            [TEXTS[:2], TEXTS[3:] + ["x"]],
        ],  # the record changes class
        "add_remove": [[TEXTS[:3] + ["one more"], TEXTS[3:]], [TEXTS[:2], TEXTS[3:]]],
    }
    for adjacency, neighbours in cases.items():
        bound = sum_sensitivity(clip, adjacency)
        for nb in neighbours:
            d = float((s0 - _joint_sums(lm, task, mp, nb, clip, precision)).norm())
            assert 0 < d <= bound * (1 + 1e-5), (adjacency, d, bound)
    assert sum_sensitivity(1.0, "replace_one") == 2.0 and sum_sensitivity(1.0, "add_remove") == 1.0


def _mates(plan):
    return {j: frozenset(c) - {j} for c in plan for j in c}


@pytest.mark.parametrize("min_width", [0, M.BF16_MIN_WIDTH])
def test_a_records_chunk_does_not_depend_on_other_widths(tiny, min_width):
    """Rounding may tie a record's computed gradient to its batch, so the batch must not follow
    from the whole split: every chunk is as wide as each member's own row (or min_width), and
    replacing one record changes the chunk-mates only of records of its old or new width. The
    old plan (one length-sorted list cut every 16) fails this: one record shifts every chunk after it."""
    _, task = tiny
    rng = random.Random(0)
    words = "good bad film plot actor scene long dull great fun".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(1, 30))) for _ in range(300)]
    width = lambda t: max(len(task.encode(t, 20)), min_width)  # max_text_tokens truncates: 20 + template
    plan = M.chunk_plan(task, texts, 20, 16, min_width)
    assert sorted(j for c in plan for j in c) == list(range(len(texts))) and max(map(len, plan)) <= 16
    for c in plan:
        assert len({width(texts[j]) for j in c}) == 1
        ids, _, _ = task.batch([texts[j] for j in c], 20, min_width=min_width)
        assert ids.shape[1] == width(texts[c[0]])  # padded to no one else's length
    for r in rng.sample(range(len(texts)), 10):
        nb = texts[:r] + [" ".join(rng.choices(words, k=rng.randint(1, 30)))] + texts[r + 1 :]
        touched = {width(texts[r]), width(nb[r])}
        a, b = _mates(plan), _mates(M.chunk_plan(task, nb, 20, 16, min_width))
        moved = [j for j in a if j != r and a[j] != b[j]]
        assert all(width(texts[j]) in touched for j in moved), (r, touched)

    def old(ts):
        order = sorted(range(len(ts)), key=lambda j: len(task.encode_text(ts[j])))
        return [order[i : i + 16] for i in range(0, len(ts), 16)]

    shortest = min(range(len(texts)), key=lambda j: len(task.encode(texts[j], 20)))
    nb = texts[:shortest] + [" ".join(words * 3)] + texts[shortest + 1 :]
    a, b = _mates(old(texts)), _mates(old(nb))
    assert sum(a[j] != b[j] for j in a if j != shortest) > 100  # the old plan: most records regrouped


# --------------------------------------------------------------------------- the ledger
def _gauss_ledger(eps, name, split="rt/train@x#1", release_id=None):
    m = calibrate_noise_multiplier(eps, 1e-5, 1, "analytic")
    return Ledger(
        1e-5,
        [
            LedgerEntry(
                name,
                "gaussian",
                split,
                noise_multiplier=m,
                sensitivity=2.0,
                sigma=2.0 * m,
                adjacency="replace_one",
                release_id=release_id,
            )
        ],
    )


def test_two_releases_compose_by_the_accountant_not_by_addition():
    gen, probe = _gauss_ledger(1.0, "generator"), _gauss_ledger(2.0, "probe")
    merged = gen.merged(probe)
    eps = merged.epsilon()
    ms = [e.noise_multiplier for e in merged.entries]
    exact = composed_epsilon([(m, 1) for m in ms], 2e-5, "analytic")
    assert eps == pytest.approx(exact, rel=1e-3)  # PLD accountant = exact Gaussian composition
    assert 2.0 < eps < 2.6  # was reported as 1 + 2 = 3.0
    rec = compose_records(
        [{"epsilon": 1.0, "delta": 1e-5, "ledger": gen}, {"epsilon": 2.0, "delta": 1e-5, "ledger": probe}]
    )
    assert rec["epsilon"] == pytest.approx(eps) and rec["protected_splits"] == ["rt/train@x#1"]
    assert len(rec["entries"]) == 2


def test_the_same_release_reached_twice_counts_once():
    a = _gauss_ledger(1.0, "generator", release_id="abc")
    assert a.merged(_gauss_ledger(1.0, "generator", release_id="abc")).epsilon() == pytest.approx(a.epsilon())
    assert a.merged(_gauss_ledger(1.0, "other", release_id="def")).epsilon() > 1.3


def test_non_private_use_makes_epsilon_infinite():
    led = _gauss_ledger(1.0, "generator").merged(
        Ledger(0.0, [LedgerEntry("real_dev_set", "non_private", "rt/train@x#1")])
    )
    assert led.epsilon() == math.inf and Ledger().epsilon() == 0.0


def test_subsampled_entry_matches_opacus():
    from opacus.accountants import RDPAccountant

    e = LedgerEntry("dpsgd", "subsampled_gaussian", "s", noise_multiplier=1.1, sample_rate=0.01, count=500)
    ours = Ledger(1e-5, [e]).epsilon()
    acc = RDPAccountant()
    acc.history = [(1.1, 0.01, 500)]
    rdp = acc.get_epsilon(1e-5)
    assert 0.5 * rdp < ours <= rdp * 1.001  # PLD is tighter than RDP, never looser


def _write(path, obj):
    path.write_text(json.dumps(obj))


def test_selected_set_in_the_pool_dir_carries_the_probe(tmp_path):
    """gmtext-pipeline selects into the pool's own run dir: selected.jsonl must be read with
    select.json (pool + probe), not generate.json (the pool alone)."""
    from gmtext.data.synthetic import synthetic_privacy

    gen, probe = _gauss_ledger(1.0, "generator"), _gauss_ledger(2.0, "probe")
    (tmp_path / "synthetic.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "selected.jsonl").write_text('{"text": "a", "label": 0}\n')
    _write(
        tmp_path / "generate.json", {"summary": {"epsilon": 1.0, "delta": 1e-5}, "privacy": {"ledger": gen.to_dict()}}
    )
    both = gen.merged(probe)
    _write(tmp_path / "select.json", {"epsilon": both.epsilon(), "delta": both.delta, "privacy": both.to_dict()})
    rec = synthetic_privacy(tmp_path)
    assert rec["epsilon"] == pytest.approx(both.epsilon()) and len(rec["ledger"].entries) == 2
    assert synthetic_privacy(tmp_path / "synthetic.jsonl")["epsilon"] == 1.0


# --------------------------------------------------------------------------- fine-tuning
def _ft(compose, tmp_path, *extra):
    return compose(
        [
            "debug=tiny",
            "finetuner.epochs=1",
            "finetuner.batch_size=4",
            "progress=false",
            "finetune.eval_limit=8",
            *extra,
        ],
        config_name="finetune",
    )


def test_real_dev_set_is_charged_as_non_private(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune

    syn = tmp_path / "pool"
    syn.mkdir()
    (syn / "synthetic.jsonl").write_text(
        "".join(json.dumps({"text": t, "label": k}) + "\n" for t, k in [("awful", 0), ("superb", 1)])
    )
    led = _gauss_ledger(1.0, "generator")
    _write(
        syn / "generate.json",
        {"summary": {"epsilon": led.epsilon(), "delta": 1e-5}, "privacy": {"ledger": led.to_dict()}},
    )
    m = run_finetune(_ft(compose, tmp_path, "train=synthetic", f"train.path={syn}"), tmp_path / "a")
    assert m["epsilon"] == pytest.approx(led.epsilon()) and [e["name"] for e in m["privacy"]["entries"]] == [
        "generator"
    ]
    m = run_finetune(
        _ft(compose, tmp_path, "train=synthetic", f"train.path={syn}", "finetune.dev_size=4"), tmp_path / "b"
    )
    assert m["epsilon"] == math.inf and [e["name"] for e in m["privacy"]["entries"]] == ["generator", "real_dev_set"]
    z = run_finetune(_ft(compose, tmp_path, "train=none"), tmp_path / "z")
    assert z["epsilon"] == 0.0 and z["privacy"]["entries"] == []
    r = run_finetune(_ft(compose, tmp_path, "train=real", "train.size=4"), tmp_path / "r")
    assert r["epsilon"] == math.inf
    with pytest.raises(ValueError, match="finetune.lrs"):
        run_finetune(_ft(compose, tmp_path, "train=none", "finetune.lrs=[1e-5,2e-5]"), tmp_path / "c")


# --------------------------------------------------------------------------- nothing else leaves
def test_job_log_has_no_counts_of_the_private_file(tmp_path, caplog):
    (tmp_path / "train.jsonl").write_text(
        '{"text": "good", "label": 1}\n{"text": "  ", "label": 0}\n{"text": "bad", "label": 0}\n'
    )
    with caplog.at_level(logging.DEBUG):
        split = load_split("train", ["neg", "pos"], path=str(tmp_path))
    assert split.skipped_empty == 1 and len(split.examples) == 2
    assert not caplog.records


def test_a_private_split_without_a_class_runs_like_its_neighbour(compose, tmp_path):
    """The auditor's case: a class with one record, replaced by a record of the other class.
    The loader used to stop on the empty class while the neighbour ran: a perfect
    distinguisher. A DP reader now goes on (a zero sum for that class); the release's public
    figures are the same for both, and a non-private reader still gets the one-line error."""
    from gmtext.data import DataError

    rows = [{"text": f"a private review number {i}", "label": 0} for i in range(11)]
    outs = {}
    for name, last in (("one_pos", 1), ("no_pos", 0)):
        d = tmp_path / name
        d.mkdir()
        (d / "train.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in [*rows, {"text": "the one", "label": last}])
        )
        (d / "validation.jsonl").write_text('{"text": "ok", "label": 0}\n{"text": "fine", "label": 1}\n')
        cfg = compose(
            [
                "debug=tiny",
                "privacy=dp",
                "privacy.epsilon=1",
                "dataset=rotten_tomatoes",
                f"dataset.path={d}",
                "progress=false",
            ],
            config_name="release",
        )
        R.run_release(cfg, tmp_path / f"run_{name}")
        p = json.loads((tmp_path / f"run_{name}" / "release" / "privacy.json").read_text())
        outs[name] = {k: p[k] for k in ("num_records", "divisor", "epsilon", "noise_multiplier")}
    assert outs["one_pos"] == outs["no_pos"] and outs["no_pos"]["num_records"] == 12
    with pytest.raises(DataError, match=r"class\(es\) \['pos'\] have zero examples"):
        load_split("train", ["neg", "pos"], path=str(tmp_path / "no_pos"))
    assert len(load_split("train", ["neg", "pos"], path=str(tmp_path / "no_pos"), every_class=False).examples) == 12


@pytest.mark.slow
def test_whole_rotten_tomatoes_split_release_ledger(compose, tmp_path):
    """gmtext-release privacy=dp on the whole train split: the ledger names the split, the
    records rule, the row count (public under replace-one) and the noise source."""
    cfg = compose(
        [
            "debug=tiny",
            "privacy=dp",
            "privacy.epsilon=1",
            "dataset=rotten_tomatoes",
            f"dataset.path={rt_path()}",
            "progress=false",
            "target_batch_size=64",
        ],
        config_name="release",
    )
    s = R.run_release(cfg, tmp_path)
    p = json.loads((tmp_path / "release" / "privacy.json").read_text())
    assert p["num_records"] == 8530 and p["divisor"] == pytest.approx(8530 / 2) and s["epsilon"] <= 1.0
    (entry,) = p["ledger"]["entries"]
    assert entry["split"].startswith("rotten_tomatoes/train@") and "every non-empty record" in entry["records"]
    assert entry["num_records"] == 8530 and "os.urandom" in entry["noise_source"]
    assert p["ledger"]["protected_splits"] == [entry["split"]] and "os.urandom" in p["noise_source"]


def test_a_release_being_made_is_not_made_twice(compose, tmp_path):
    """Two stages on one run dir (gmtext-release and gmtext-generate started together) must not
    both compute a noisy release: while one holds the release lock the other is refused."""
    from gmtext.artifacts import RunDirLocked, run_lock
    from gmtext.stages.generate import run_generate

    cfg = compose(
        [
            "debug=tiny",
            "privacy=dp",
            "progress=false",
            "num_per_class=2",
            "batch_size=2",
            "matcher.outer_steps=1",
            "matcher.inner_steps=1",
            "projector.topk=1",
            "matcher.init=random",
        ]
    )
    with run_lock(tmp_path, "release-making"):  # what the other stage holds while it computes
        with pytest.raises(RunDirLocked, match="release-making"):
            run_generate(cfg, tmp_path)
        with pytest.raises(RunDirLocked, match="release-making"):
            R.run_release(compose(["debug=tiny", "privacy=dp", "progress=false"], config_name="release"), tmp_path)
    assert not (tmp_path / "release").exists()
    run_generate(cfg, tmp_path)  # the lock gone: made once, then reused by the next stage
    assert R.run_release(compose(["debug=tiny", "privacy=dp", "progress=false"], config_name="release"), tmp_path)[
        "reused"
    ]


# --------------------------------------------------------------------------- one budget, two releases
def test_split_multipliers_spend_exactly_one_budget():
    m = calibrate_noise_multiplier(2.0, 1e-5, 1, "analytic")
    for share in (0.2, 0.5, 0.8):
        mg, mp = P.split_multipliers(m, share)
        assert composed_epsilon([(mg, 1), (mp, 1)], 1e-5, "analytic") == pytest.approx(
            composed_epsilon([(m, 1)], 1e-5, "analytic"), rel=1e-9
        )
        assert mp / mg == pytest.approx(math.sqrt((1 - share) / share))
    with pytest.raises(ValueError, match="probe.budget_share=1.0"):
        P.split_multipliers(m, 1.0)


@pytest.mark.slow
def test_private_pipeline_with_probe_in_one_run_dir(compose, tmp_path):
    """gmtext-pipeline privacy=dp selector=margin probe.matched_params=[...]: generator and
    probe releases from one (ε, δ), the margin selection scores against the probe, and every
    artifact down to metrics.json reports that one ε (not ε_gen + ε_probe)."""
    from gmtext.workflows.pipeline import run_pipeline

    cfg = compose(
        [
            "debug=tiny",
            "privacy=dp",
            "privacy.epsilon=2",
            "progress=false",
            "num_per_class=4",
            "batch_size=2",
            "matcher.outer_steps=1",
            "matcher.inner_steps=1",
            "projector.topk=1",
            "matcher.init=random",
            "selector=margin",
            "selector.per_class=1",
            "probe.matched_params=[final_norm]",
            "probe.budget_share=0.3",
            "finetuner.epochs=1",
            "finetune.eval_limit=8",
        ],
        config_name="pipeline",
    )
    m = run_pipeline(cfg, tmp_path)
    gen = json.loads((tmp_path / "release" / "privacy.json").read_text())
    probe = json.loads((tmp_path / "probe" / "privacy.json").read_text())
    assert [e["name"] for e in gen["ledger"]["entries"]] == ["release", "probe"] and gen["ledger"] == probe["ledger"]
    mg, mp = (e["noise_multiplier"] for e in gen["ledger"]["entries"])
    assert mp / mg == pytest.approx(math.sqrt(0.7 / 0.3), rel=1e-6)
    sel = json.loads((tmp_path / "select.json").read_text())
    assert sel["probe_release"]["release"] == str(tmp_path / "probe") and len(sel["privacy"]["entries"]) == 2
    assert 1.98 <= gen["epsilon"] <= 2.0 and sel["epsilon"] == pytest.approx(gen["epsilon"]) == pytest.approx(
        m["epsilon"]
    )
    assert sel["delta"] == 1e-5 and m["delta"] == 1e-5
    with pytest.raises(ValueError, match="probe.matched_params"):
        # selector=margin brings probe.matched_params=[middle_blocks]
        # (conf/specialize/selector/margin.yaml): emptied here
        run_pipeline(
            compose(["debug=tiny", "selector=margin", "probe.matched_params=[]"], config_name="pipeline"),
            tmp_path / "x",
        )


def test_non_private_release_with_probe(compose, tmp_path):
    s = R.run_release(
        compose(["debug=tiny", "progress=false", "probe.matched_params=[final_norm]"], config_name="release"), tmp_path
    )
    probe = P.Release.load(tmp_path / "probe")
    gen = P.Release.load(tmp_path / "release")
    assert s["probe_dir"] == str(tmp_path / "probe") and probe.epsilon == gen.epsilon == math.inf
    assert probe.param_names != gen.param_names and all(len(t) for t in probe.targets)
    with pytest.raises(ValueError, match="probe.budget_share=0"):
        R.run_release(
            compose(["debug=tiny", "probe.matched_params=[final_norm]", "probe.budget_share=0"], config_name="release"),
            tmp_path / "b",
        )


def test_probe_in_a_sketch_space(compose, tmp_path):
    """The probe may match a low-dimensional sketch (short spec expanded with cfg.sketch) while
    the generator matches raw parameters; both come from one DP budget."""
    s = R.run_release(
        compose(
            [
                "debug=tiny",
                "progress=false",
                "privacy=dp",
                "sketch.k_in=4",
                "sketch.k_out=2",
                "probe.matched_params=[sketch:layers\\.1\\.]",
            ],
            config_name="release",
        ),
        tmp_path,
    )
    probe = P.Release.load(tmp_path / "probe")
    assert all("gm_sketch.G_v1_4x2_s0" in n for n in probe.param_names)
    assert sum(t.numel() for t in probe.targets[0]) == 8 * len(probe.param_names)
    assert probe.privacy["per_example_gradients"] == "sketch_hooks" and probe.epsilon == pytest.approx(s["epsilon"])


def test_sketched_generator_and_probe_in_one_pass(compose, tmp_path, monkeypatch):
    """Both parts sketched: the joint release reads every record once (one hook pass per chunk,
    not one per part), and its clipped targets equal the ones two separate releases make."""
    calls = []
    real = M.per_example_grads_hooks  # the name the mechanism calls (patching gmtext.sketch's would count nothing)
    monkeypatch.setattr(M, "per_example_grads_hooks", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    common = ["debug=tiny", "progress=false", "privacy.clip_norm=1e-3", "sketch.k_in=4", "sketch.k_out=2"]
    gen_spec, probe_spec = "matched_params=[sketch:last_blocks:1]", "sketch:middle_blocks"
    R.run_release(
        compose(common + [gen_spec, f"probe.matched_params=[{probe_spec}]"], config_name="release"), tmp_path / "joint"
    )
    one_pass = sum(calls)
    assert one_pass > 0
    R.run_release(compose(common + [gen_spec], config_name="release"), tmp_path / "gen")
    R.run_release(compose(common + [f"matched_params=[{probe_spec}]"], config_name="release"), tmp_path / "probe")
    assert sum(calls) - one_pass == 2 * one_pass  # two separate releases read every record twice, the joint one once
    for joint, alone in (
        (tmp_path / "joint" / "release", tmp_path / "gen" / "release"),
        (tmp_path / "joint" / "probe", tmp_path / "probe" / "release"),
    ):
        a, b = P.Release.load(joint), P.Release.load(alone)
        assert a.param_names == b.param_names
        for ta, tb in zip(sum(a.targets, []), sum(b.targets, [])):
            assert torch.allclose(ta, tb, rtol=1e-4, atol=1e-9)
    calls.clear()
    R.run_release(
        compose(
            common[:2]
            + ["privacy=dp", "sketch.k_in=4", "sketch.k_out=2", gen_spec, f"probe.matched_params=[{probe_spec}]"],
            config_name="release",
        ),
        tmp_path / "dp",
    )
    assert sum(calls) == one_pass and P.Release.load(tmp_path / "dp" / "probe").privacy["probe_budget_share"] == 0.5


def test_bf16_release_runs_the_passes_in_bf16_and_changes_nothing_else(compose, tmp_path, monkeypatch):
    """target_precision=bfloat16 reaches the hook passes of both parts; the ledger is the float32
    run's; raw (unsketched) parameters are refused before any record is read, leaving no release."""
    seen = []
    real = M.per_example_grads_hooks
    monkeypatch.setattr(M, "per_example_grads_hooks", lambda *a, **k: seen.append(a[7:] or k) or real(*a, **k))
    common = ["debug=tiny", "progress=false", "privacy=dp", "sketch.k_in=4", "sketch.k_out=2"]
    parts = ["matched_params=[sketch:last_blocks:1]", "probe.matched_params=[sketch:middle_blocks]"]
    bf = R.run_release(compose(common + parts + ["target_precision=bfloat16"], config_name="release"), tmp_path / "bf")
    assert seen and all(s == ("bfloat16", M.BF16_MIN_WIDTH) for s in seen)  # and chunks at least 24 wide
    fp = R.run_release(compose(common + parts, config_name="release"), tmp_path / "fp")
    assert bf["epsilon"] == fp["epsilon"]
    a, b = (P.Release.load(tmp_path / d / "probe") for d in ("bf", "fp"))
    keep = ("name", "kind", "noise_multiplier", "sigma", "sensitivity", "num_records", "records")
    entries = [[{k: e.get(k) for k in keep} for e in r.privacy["ledger"]["entries"]] for r in (a, b)]
    assert entries[0] == entries[1] and len(entries[0]) == 2 and a.param_names == b.param_names
    assert a.privacy["gradient_precision"] == "bfloat16" and "gradient_precision" not in b.privacy

    import gmtext.runtime as RT

    monkeypatch.setattr(RT, "select_real_examples", lambda *a, **k: pytest.fail("read the data"))
    with pytest.raises(ValueError, match=r"target_precision=bfloat16: every matched tensor must be sketched"):
        R.run_release(compose(common + ["target_precision=bfloat16"], config_name="release"), tmp_path / "raw")
    assert not (tmp_path / "raw" / "release").exists()
    with pytest.raises(ValueError, match=r"target_precision=bfloat16: only clipped per-example passes run in bf16"):
        R.run_release(
            compose(["debug=tiny", "progress=false", *parts, "target_precision=bfloat16"], config_name="release"),
            tmp_path / "unclipped",
        )
