"""DP-SGD baseline (gmtext/finetune/dpsgd.py) on the tiny random Llama and the builtin demo set."""

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gmtext.data import Example, LabeledSplit, is_dev, load_split
from gmtext.finetune.dpsgd import (
    SecureDPOptimizer,
    SecurePoissonSampler,
    dpsgd_fit,
    keyed_uniform,
    private_records,
    public_record_count,
    record_subsample,
)
from gmtext.finetune.prefix import (
    PUBLIC_CHECK_TEXTS,
    SuffixClassifier,
    frozen_prefix_depth,
    pad_states,
    prefix_states,
    suffix_reproduces_model,
)
from gmtext.finetune.trainer import (
    FullFineTuner,
    LastLayersFineTuner,
    LoRAFineTuner,
    VerbalizerClassifier,
    classification_loss,
)
from gmtext.privacy import noise

NAMES = ["negative", "positive"]
FINETUNERS = {
    "full": lambda **kw: FullFineTuner(**kw),
    "lora": lambda **kw: LoRAFineTuner(r=2, alpha=4, **kw),
    "last_layers": lambda **kw: LastLayersFineTuner(num_layers=1, **kw),
}


@pytest.fixture(scope="module")
def demo():
    return load_split("train", NAMES, builtin="demo")


def _per_example_grads(module, params, labels, *inputs):
    from opacus.grad_sample import GradSampleModule

    gsm = GradSampleModule(module, loss_reduction="sum")
    F.cross_entropy(gsm(*inputs), labels, reduction="sum").backward()
    out = [p.grad_sample.clone() for p in params]
    gsm._close()
    for p in params:
        p.grad = None
    return out


@pytest.mark.parametrize("kind", sorted(FINETUNERS))
def test_opacus_per_example_gradients_equal_autograd(tiny, demo, kind):
    """opacus' hooks (Linear, Embedding incl. the tied lm_head, functorch fallback for
    LlamaRMSNorm, peft's LoRA Linear) give each example's own gradient of the verbalizer loss."""
    lm, task = tiny
    model = FINETUNERS[kind]().prepare(copy.deepcopy(lm.model))
    if kind == "lora":  # lora_B starts at 0, which would hide errors in lora_A's per-example gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    exs = demo.examples[:4]
    model.train()
    y = torch.tensor([e.label for e in exs])
    ids, mask, last = task.batch([e.text for e in exs], None)
    per_example = _per_example_grads(VerbalizerClassifier(model, task.label_token_ids), params, y, ids, mask, last)
    for i, e in enumerate(exs):
        model.zero_grad()
        classification_loss(model, task, [e], None).backward()
        for p, g in zip(params, per_example):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-9)


@pytest.mark.parametrize("kind", sorted(FINETUNERS))
def test_dpsgd_fit_each_finetuner(tiny, demo, kind, monkeypatch):
    lm, task = tiny
    drawn = []
    real_normal = noise.standard_normal
    monkeypatch.setattr(noise, "standard_normal", lambda n, entropy=None: drawn.append(n) or real_normal(n, entropy))
    ft = FINETUNERS[kind](lr=1e-2, epochs=1, batch_size=16)
    model = ft.prepare(copy.deepcopy(lm.model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    exs = private_records(demo, None, 0)
    steps = []
    fit = dpsgd_fit(ft, model, task, exs, epsilon=4.0, delta=1e-3, clip_norm=0.5, microbatch=5, on_step=steps.append)
    x = fit.extra
    per_epoch = -(-len(exs) // 16)
    assert fit.steps == x["steps"] == per_epoch and [s["step"] for s in steps] == list(range(per_epoch))
    assert all(set(s) == {"step", "lr"} for s in steps) and fit.losses == []  # nothing computed from a private batch
    assert 0 < x["epsilon"] <= x["epsilon_target"] + 0.01 and x["epsilon_target"] == 4.0 and x["noise_multiplier"] > 0
    assert x["sample_rate"] == pytest.approx(1 / per_epoch) and x["delta"] == 1e-3 and x["clip_norm"] == 0.5
    # calibrated under replace-one (the default), read back by the ledger's PLD; the same steps
    # read under add/remove by opacus' accountant spend less
    assert x["relation"] == "replace_one" and x["accountant"] == "dp_accounting PLD (replace_one)"
    assert 0 < x["epsilon_add_remove"] < x["epsilon"]
    assert x["adjacency"] == "add_remove" and x["noise_source"] == noise.SOURCE  # σ is stated per record clip
    assert "public" in x["num_records_public_note"]
    # every coordinate of every trainable tensor got fresh gmtext noise at every step
    assert sum(drawn) == per_epoch * fit.trainable_params
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    # opacus is detached: no per-sample state left, no hooks, a plain forward still works
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    assert torch.isfinite(classification_loss(model, task, exs[:3], None))


def test_add_remove_dpsgd_is_calibrated_by_opacus_with_less_noise(tiny, demo):
    """train.adjacency=add_remove: opacus' accountant calibrates σ and reports ε, as in standard
    DP-SGD; the same budget under replace-one (the default) needs a larger multiplier."""
    lm, task = tiny
    exs = private_records(demo, None, 0)
    fits = {}
    for adj in ("add_remove", "replace_one"):
        ft = FINETUNERS["last_layers"](lr=1e-2, epochs=1, batch_size=16)
        model = ft.prepare(copy.deepcopy(lm.model))
        fits[adj] = dpsgd_fit(ft, model, task, exs, 2.0, 1e-3, 0.5, microbatch=8, adjacency=adj).extra
    ar, ro = fits["add_remove"], fits["replace_one"]
    assert ar["relation"] == "add_remove" and ar["accountant"] == "prv"
    assert ar["epsilon"] == ar["epsilon_add_remove"] <= 2.0 + 0.01 and ro["epsilon"] <= 2.0
    assert ro["noise_multiplier"] > ar["noise_multiplier"] and ro["epsilon_add_remove"] < ar["epsilon_add_remove"]
    with pytest.raises(ValueError, match="^train.adjacency='swap': accepted: replace_one, add_remove$"):
        dpsgd_fit(ft, model, task, exs, 2.0, 1e-3, 0.5, adjacency="swap")


def test_add_remove_multiplier_is_raised_until_the_ledger_agrees(tiny, demo, monkeypatch):
    """opacus' accountant calibrates under add/remove, the ledger's PLD reports: a multiplier
    opacus certifies but the ledger reads as over budget is raised before any step."""
    import opacus.accountants.utils as U

    real = U.get_noise_multiplier
    monkeypatch.setattr(U, "get_noise_multiplier", lambda **kw: 0.8 * real(**kw))
    lm, task = tiny
    ft = FINETUNERS["last_layers"](lr=1e-2, epochs=1, batch_size=16)
    model = ft.prepare(copy.deepcopy(lm.model))
    x = dpsgd_fit(ft, model, task, private_records(demo, None, 0), 2.0, 1e-3, 0.5, adjacency="add_remove").extra
    from gmtext.privacy.ledger import subsampled_epsilon

    led = subsampled_epsilon(x["noise_multiplier"], 1e-3, x["sample_rate"], x["steps"], "add_remove")
    assert led <= 2.0 and x["noise_multiplier"] > 0.8 * real(
        target_epsilon=2.0, target_delta=1e-3, sample_rate=x["sample_rate"], steps=x["steps"], accountant="prv"
    )


def test_optimizer_noise_is_gmtext_noise_not_torch_rng(monkeypatch):
    """The noise SecureDPOptimizer adds is exactly what gmtext.privacy.noise returns, and
    torch's seed does not reproduce it."""

    def step(std_normal=None):
        lin = torch.nn.Linear(3, 2)
        with torch.no_grad():
            lin.weight.zero_(), lin.bias.zero_()
        opt = SecureDPOptimizer(
            torch.optim.SGD(lin.parameters(), lr=1.0), noise_multiplier=2.0, max_grad_norm=0.5, expected_batch_size=4
        )
        for p in lin.parameters():  # an empty batch: the released gradient is pure noise
            p.grad_sample = torch.zeros((0, *p.shape))
        if std_normal is not None:
            monkeypatch.setattr(noise, "standard_normal", std_normal)
        opt.step()
        monkeypatch.undo()
        return torch.cat([p.detach().flatten() for p in lin.parameters()])

    fixed = step(lambda n, entropy=None: np.arange(n, dtype=np.float64))
    torch.testing.assert_close(
        fixed, -torch.cat([torch.arange(6.0), torch.arange(2.0)]) * (2.0 * 0.5) / 4
    )  # one draw per tensor
    torch.manual_seed(0)
    a = step()
    torch.manual_seed(0)
    b = step()
    assert not torch.equal(a, b) and a.abs().sum() > 0


def test_poisson_sampling_uses_secure_uniforms_not_torch_seed(monkeypatch):
    s = SecurePoissonSampler(num_samples=2000, sample_rate=0.25, steps=3)
    torch.manual_seed(0)
    first = list(s)
    torch.manual_seed(0)
    second = list(s)
    assert len(first) == 3 and first != second
    assert all(380 < len(b) < 620 for b in first)  # Binomial(2000, 0.25): mean 500, sd ~19
    u = np.linspace(0.001, 1.0, 2000)
    monkeypatch.setattr(noise, "uniform", lambda n, entropy=None: u[:n])
    assert list(s) == [np.nonzero(u < 0.25)[0].tolist()] * 3


def test_empty_poisson_batches_still_release_noisy_steps(tiny, demo, monkeypatch):
    lm, task = tiny
    monkeypatch.setattr(noise, "uniform", lambda n, entropy=None: np.ones(n))  # nobody is ever sampled
    ft = LoRAFineTuner(r=2, alpha=4, lr=1e-2, epochs=2, batch_size=16)
    model = ft.prepare(copy.deepcopy(lm.model))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    fit = dpsgd_fit(ft, model, task, private_records(demo, None, 0), epsilon=2.0, delta=1e-3, clip_norm=1.0)
    assert fit.steps == 6 and 0 < fit.extra["epsilon"] <= 2.01
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_frozen_prefix_depth_is_the_first_trainable_block(tiny):
    lm, _ = tiny
    n = lm.model.config.num_hidden_layers
    assert frozen_prefix_depth(LastLayersFineTuner(num_layers=1).prepare(copy.deepcopy(lm.model))) == n - 1
    # LoRA on every block and full fine-tuning (trainable, tied embeddings) leave nothing to cache
    assert frozen_prefix_depth(LoRAFineTuner(r=2, alpha=4).prepare(copy.deepcopy(lm.model))) == 0
    assert frozen_prefix_depth(FullFineTuner().prepare(copy.deepcopy(lm.model))) == 0


def test_cached_prefix_gives_each_example_the_uncached_gradient(tiny, demo):
    """The suffix on cached states (different lengths, right-padded) yields the same per-example
    gradients, through opacus' hooks, as the whole model on the token ids."""
    lm, task = tiny
    model = LastLayersFineTuner(num_layers=1).prepare(copy.deepcopy(lm.model))
    start = frozen_prefix_depth(model)
    params = [p for p in model.parameters() if p.requires_grad]
    exs = demo.examples[:5]
    assert len({len(task.encode(e.text, None)) for e in exs}) > 1  # padding is exercised
    y = torch.tensor([e.label for e in exs])
    model.train()
    full = _per_example_grads(
        VerbalizerClassifier(model, task.label_token_ids), params, y, *task.batch([e.text for e in exs], None)
    )
    states = prefix_states(model, task, [e.text for e in exs], start, None, progress=False)
    cached = _per_example_grads(SuffixClassifier(model, start, task.label_token_ids), params, y, *pad_states(states))
    for a, b in zip(full, cached):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6 * float(a.abs().max()) + 1e-9)


def test_cached_path_is_refused_for_a_decoder_that_transforms_its_inputs(tiny):
    """A decoder that rescales inputs_embeds (as Gemma's does) cannot take cached states; the
    public-string check sees it, and DP-SGD then runs the whole model."""
    lm, task = tiny
    model = LastLayersFineTuner(num_layers=1).prepare(copy.deepcopy(lm.model))
    start = frozen_prefix_depth(model)
    assert suffix_reproduces_model(model, task, start, None)

    def scale(_mod, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:
            kwargs["inputs_embeds"] = kwargs["inputs_embeds"] * 2.0
        return args, kwargs

    model.get_decoder().register_forward_pre_hook(scale, with_kwargs=True)
    assert not suffix_reproduces_model(model, task, start, None)


@pytest.mark.parametrize("cache", [True, False])
def test_dpsgd_runs_the_frozen_prefix_once_per_record(tiny, demo, cache):
    lm, task = tiny
    ft = LastLayersFineTuner(num_layers=1, lr=1e-2, epochs=3, batch_size=8)
    model = ft.prepare(copy.deepcopy(lm.model))
    rows = {"first": 0, "last": 0}
    layers = model.get_decoder().layers
    layers[0].register_forward_hook(lambda m, a, o: rows.__setitem__("first", rows["first"] + a[0].shape[0]))
    layers[-1].register_forward_hook(lambda m, a, o: rows.__setitem__("last", rows["last"] + a[0].shape[0]))
    exs = private_records(demo, None, 0)
    fit = dpsgd_fit(ft, model, task, exs, epsilon=4.0, delta=1e-3, clip_norm=0.5, microbatch=5, cache_prefix=cache)
    assert fit.extra["frozen_prefix_blocks"] == (len(layers) - 1 if cache else 0)
    if cache:  # each record once, plus the public-string check (2 texts through the model, 2 through the prefix)
        assert rows["first"] == len(exs) + 2 * len(PUBLIC_CHECK_TEXTS)
        assert rows["last"] > 2 * len(exs)  # 3 epochs of Poisson batches through the trainable block
    else:
        assert rows["first"] == rows["last"] > 2 * len(exs)


def test_subsample_is_record_stable():
    exs = [Example(f"review number {i}", i % 2) for i in range(400)]
    base = record_subsample(exs, 0.3, seed=1)
    assert 80 < len(base) < 160 and base == [e for e in exs if keyed_uniform(1, e.text) < 0.3]
    for extra in ("an unrelated new review", "another one"):
        grown = record_subsample(exs[:200] + [Example(extra, 0)] + exs[200:], 0.3, seed=1)
        assert [e for e in grown if e.text != extra] == base  # the others' membership did not move
    shrunk = record_subsample(exs[1:], 0.3, seed=1)
    assert shrunk == [e for e in base if e is not exs[0]]
    assert record_subsample(exs, 0.3, seed=2) != base


def _replace_one(split, i: int, text: str):
    """The split with record i replaced by (text, same label): a replace-one neighbour."""
    exs = list(split.examples)
    exs[i] = Example(text, exs[i].label)
    return LabeledSplit(exs, split.skipped_empty)


def test_replace_one_neighbours_get_the_same_schedule_and_divisor(demo, tiny, monkeypatch):
    """The auditor's attack on the old code: swap one training record for a text in the dev
    hash bucket. The number of records that train drops by one, and q, the step count and the
    divisor derived from it moved with it. Now they derive from the row count: identical."""
    i = next(k for k, e in enumerate(demo.examples) if not is_dev(e.text))
    dev_text = next(f"a dev-bucket review {k}" for k in range(1000) if is_dev(f"a dev-bucket review {k}"))
    nb = _replace_one(demo, i, dev_text)
    assert len(private_records(nb, None, 0)) == len(private_records(demo, None, 0)) - 1
    assert public_record_count(nb) == public_record_count(demo) == len(demo.examples) + demo.skipped_empty
    lm, task = tiny
    seen = {}
    for name, split in (("d", demo), ("d'", nb)):
        ft = FINETUNERS["last_layers"](lr=1e-2, epochs=1, batch_size=16)
        model = ft.prepare(copy.deepcopy(lm.model))
        divisors = []
        real = SecureDPOptimizer.add_noise
        spy = lambda self: divisors.append(self.expected_batch_size) or real(self)  # noqa: E731
        monkeypatch.setattr(SecureDPOptimizer, "add_noise", spy)
        recs = private_records(split, None, 0)
        x = dpsgd_fit(ft, model, task, recs, 2.0, 1e-3, 0.5, num_records=public_record_count(split)).extra
        monkeypatch.undo()
        seen[name] = (x["sample_rate"], x["steps"], x["expected_batch_size"], x["noise_multiplier"], set(divisors))
    assert seen["d"] == seen["d'"]
    rows = public_record_count(demo)
    q = 1 / -(-rows // 16)
    assert seen["d"][:3] == (q, -(-rows // 16), q * rows)
    assert seen["d"][4] == {q * rows}  # the optimizer divides by q·num_records, not by q·len(records)
    with pytest.raises(ValueError, match="^dpsgd: num_records=3: accepted: an int >= 1 and >= the number"):
        dpsgd_fit(ft, model, task, private_records(demo, None, 0), 2.0, 1e-3, 0.5, num_records=3)


def test_subsample_rate_does_not_move_with_other_records(demo):
    """train.size: the rate is size / row count, so replacing one record leaves every other
    record's membership as it was."""
    nb = _replace_one(demo, 0, "an entirely different review text")
    a, b = private_records(demo, 10, 3), private_records(nb, 10, 3)
    others = {e.text for e in demo.examples[1:]}
    assert [e for e in a if e.text in others] == [e for e in b if e.text in others]
    rows = public_record_count(demo)
    assert a == record_subsample([e for e in demo.examples if not is_dev(e.text)], 10 / rows, 3)


def test_private_records_defaults_to_the_whole_split(demo):
    pool = [e for e in demo.examples if not is_dev(e.text)]
    assert private_records(demo, None, 0) == pool and private_records(demo, 10**6, 0) == pool
    sub = private_records(demo, 10, 0)
    assert set(e.text for e in sub) <= set(e.text for e in pool) and sub == private_records(demo, 10, 0)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match=rf"^train.size={bad!r}: accepted: null"):
            private_records(demo, bad, 0)


def _walk_keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _walk_keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_keys(v)


def test_run_finetune_dpsgd_logs_nothing_from_private_batches(compose, tmp_path):
    from gmtext.stages.finetune import run_finetune

    cfg = compose(
        [
            "debug=tiny",
            "train=dpsgd",
            "finetuner=lora",
            "finetuner.batch_size=16",
            "finetuner.epochs=1",
            "finetune.eval_limit=8",
            "finetune.dev_size=0",
            "train.epsilon=3",
        ],
        config_name="finetune",
    )
    assert cfg.finetuner.lr == 5e-4 and cfg.train.size is None  # the DP recipe from conf/train/dpsgd.yaml
    m = run_finetune(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for blob in [{k: v for k, v in saved.items() if k != "config"}, *recs]:
        assert not [k for k in _walk_keys(blob) if "loss" in k.lower()], blob
    steps = [r for r in recs if r["kind"] == "step"]
    assert len(steps) == saved["steps"] == saved["dp"]["steps"] > 0
    assert all(set(r) == {"kind", "step", "train/lr", "lr_run", "lr_value"} for r in steps)  # no batch size either
    # opacus' accountant and the ledger (dp_accounting PLD, re-accounting the same steps) both certify <= the target
    assert 0 < saved["dp"]["epsilon"] <= 3.01 and 0 < saved["epsilon"] == m["epsilon"] <= 3.01
    assert saved["privacy"]["adjacency"] == "replace_one" == saved["dp"]["relation"]  # the default promise
    assert saved["privacy"]["epsilon"] == pytest.approx(saved["dp"]["epsilon"], rel=1e-9)
    [entry] = saved["privacy"]["entries"]
    assert (
        entry["kind"] == "subsampled_gaussian"
        and entry["count"] == saved["steps"]
        and entry["sample_rate"] == saved["dp"]["sample_rate"]
    )
    # the ledger that travels with the artifact names the noise source, the inclusion rule and
    # the public row count, as the release's entries do
    assert entry["noise_source"] == noise.SOURCE and entry["num_records"] == saved["dp"]["num_records"]
    assert "outside the dev hash bucket" in entry["records"] and "Poisson" in entry["records"]
    assert saved["delta"] == 1e-5 and saved["train_per_class"] is None and saved["dp"]["noise_source"] == noise.SOURCE
    assert "train_seconds" not in saved and "wall_seconds" not in saved  # run time depends on the Poisson batch sizes
    from gmtext.cli import finetune_line  # the console summary of such a run (it raised KeyError 'wall_seconds')

    assert finetune_line(saved, "RUN").endswith("| wall time withheld (DP-SGD) → RUN/metrics.json")
    # how many records trained is private (the dev bucket depends on the texts); the schedule
    # derives from the split's row count, which every replace-one neighbour shares
    demo = load_split("train", NAMES, builtin="demo")
    assert saved["n_train"] is None and "(n=withheld)" in finetune_line(saved, "RUN")
    rows = len(demo.examples) + demo.skipped_empty
    assert saved["dp"]["num_records"] == rows > len(private_records(demo, None, 0))
    assert saved["dp"]["sample_rate"] == pytest.approx(1 / -(-rows // 16)) and saved["steps"] == -(-rows // 16)


@pytest.mark.parametrize("override", ["train.accountant=gdp", "train.adjacency=swap"])
def test_unknown_dpsgd_choice_is_refused_when_composing(compose, override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=override):
        compose(["debug=tiny", "train=dpsgd", override], config_name="finetune")


@pytest.mark.parametrize(
    "override, msg",
    [
        ("train.epsilon=-1", r"train.epsilon=-1.0: accepted: a finite number > 0"),
        ("train.delta=1", r"train.delta=1.0: accepted"),
        ("train.microbatch=0", r"train.microbatch=0: accepted"),
    ],
)
def test_bad_dpsgd_values_are_one_line_errors(compose, tmp_path, override, msg):
    from gmtext.stages.finetune import run_finetune

    cfg = compose(["debug=tiny", "train=dpsgd", override], config_name="finetune")
    with pytest.raises(ValueError, match="^" + msg) as e:
        run_finetune(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # refused before loading anything
