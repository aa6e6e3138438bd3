"""Sketch side branches (gmtext/sketch.py): forward unchanged, ∂L/∂G is the projected weight
gradient, the hook path equals vmap/loop per example, double backward works, names carry k/seed."""

import pytest
import torch

from gmtext import sketch as S
from gmtext.gradients import MatchedParams, class_target_gradients, last_token_loss
from gmtext.matching.objective import MatchingObjective
from gmtext.models import load_model
from gmtext.privacy import mechanism as M
from gmtext.privacy.release import release_fingerprint

# different lengths: the batched hook path must mask padding correctly
TEXTS = ["A dull film.", "so so so so so so", "x", "The acting is wooden, the plot is worse and it is long."]
SPEC = r"sketch:6x5:3:layers\.[01]\.(self_attn\.(q|v|o)_proj|mlp\.down_proj)$"


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.fixture
def fresh(tiny):
    """A model of its own (branches are attached in place), plus the shared task."""
    return load_model("tiny-llama").model, tiny[1]


def test_forward_unchanged_and_names_carry_settings(fresh):
    model, task = fresh
    ids, mask, last = task.batch(TEXTS)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    mp = MatchedParams(model, [SPEC])
    assert len(mp.names) == 8 and all(n.endswith(".gm_sketch.G_v1_6x5_s3") for n in mp.names)
    assert mp.shapes() == [(5, 6)] * 8 and mp.numel() == 240
    with torch.enable_grad():  # branch actually runs (not the no-grad shortcut)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    # the other specs never pick up G, even though it now lives inside block 1
    assert not any(S.is_sketch_name(n) for n in MatchedParams(model, ["last_blocks:1"]).names)
    # another k or seed → other names → another release fingerprint (a release is never reused across projections)
    other = MatchedParams(model, [SPEC.replace(":3:", ":4:")])
    fp = lambda names: release_fingerprint("m", "d", task, names)
    assert fp(other.names) != fp(mp.names)


def test_grad_of_G_is_projected_weight_gradient(fresh):
    """∂L/∂G = P_outᵀ (∂L/∂W) P_in: a wrong side of the projection or a transpose fails this."""
    model, task = fresh
    mp = MatchedParams(model, [SPEC])
    brs = S.sketch_branches_for(mp)
    linears = {n: m for n, m in model.named_modules()}
    ws = [linears[b.module_name].weight for b in brs]
    for w in ws:
        w.requires_grad_(True)
    ids, mask, last = task.batch(TEXTS[:2])
    loss = last_token_loss(model, ids, mask, last, torch.tensor([task.label_token_ids[0]] * 2)).sum()
    gG = torch.autograd.grad(loss, mp.params, retain_graph=True)
    gW = torch.autograd.grad(loss, ws)
    for g, w, b in zip(gG, gW, brs):
        assert rel_err(g, b.p_out.T @ w @ b.p_in) < 1e-5
        assert g.abs().sum() > 0


@pytest.mark.parametrize("match_loss", ["full_vocab", "verbalizer"])
def test_hooks_equal_vmap_and_loop_per_example(fresh, match_loss):
    model, task = fresh
    mp = MatchedParams(model, [SPEC, "sketch:6x5:3:^lm_head$"])  # the head runs on one position per row
    vocab = torch.tensor(task.label_token_ids) if match_loss == "verbalizer" else None
    lab = 1 if vocab is not None else task.label_token_ids[1]
    h = S.per_example_grads_hooks(model, task, mp, TEXTS, lab, vocab=vocab)
    v = M.per_example_grads_vmap(model, task, mp, TEXTS, lab, vocab=vocab)
    lp = M.per_example_grads_loop(model, task, mp, TEXTS, lab, vocab=vocab)
    assert [tuple(g.shape) for g in h] == [(len(TEXTS), *p.shape) for p in mp.params]
    for a, b, c in zip(h, v, lp):
        for i in range(len(TEXTS)):
            assert rel_err(a[i], c[i]) < 1e-4 and rel_err(b[i], c[i]) < 1e-4
    assert M._check_method("auto", mp) == "sketch_hooks"
    fast = M.clipped_sum(model, task, mp, TEXTS, lab, 1e-3, chunk=3, vocab=vocab)  # auto → hooks; every row clipped
    slow = M.clipped_sum(model, task, mp, TEXTS, lab, 1e-3, method="loop", vocab=vocab)
    assert torch.allclose(fast.norms, slow.norms, rtol=1e-4)
    for a, b in zip(fast.sums, slow.sums):
        assert rel_err(a, b) < 1e-4


def test_bf16_autocast_sums_stay_close_and_every_clipped_row_within_C(fresh):
    """target_precision=bfloat16: the clipped sums match float32's to bf16 rounding, and each
    record's clipped contribution (what the sensitivity 2C rests on) is still at most C."""
    model, task = fresh
    mp = MatchedParams(model, [SPEC, "sketch:6x5:3:^lm_head$"])
    vocab = torch.tensor(task.label_token_ids)
    lo = S.per_example_grads_hooks(model, task, mp, TEXTS, 1, vocab=vocab, precision="bfloat16")
    hi = S.per_example_grads_hooks(model, task, mp, TEXTS, 1, vocab=vocab)
    assert all(g.dtype == torch.float32 for g in lo)  # the per-example products are float32
    assert 0 < max(rel_err(a, b) for a, b in zip(lo, hi)) < 0.05  # bf16 did run, and stayed close
    clip = 1e-3  # below every per-example norm: every row is scaled
    cs, norms = M._clip_materialised(lo, clip)
    flat = torch.cat([g.reshape(len(TEXTS), -1) for g in lo], 1) * M.clip_factors(norms, clip)[:, None]
    assert (flat.norm(dim=1) <= clip * (1 + 1e-6)).all()
    fast = M.clipped_sum(model, task, mp, TEXTS, 1, clip, chunk=3, vocab=vocab, precision="bfloat16")
    ref = M.clipped_sum(model, task, mp, TEXTS, 1, clip, chunk=3, vocab=vocab)
    for a, b in zip(fast.sums, ref.sums):
        assert rel_err(a, b) < 0.05
    parts = M.clipped_sums_parts(model, task, [mp], TEXTS, 1, clip, chunk=3, vocab=vocab, precision="bfloat16")
    for a, b in zip(parts[0].sums, fast.sums):
        assert rel_err(a, b) < 1e-5  # one pass or per set: the same bf16 computation


def test_bf16_needs_the_hook_path(fresh):
    model, task = fresh
    mp = MatchedParams(model, [SPEC])
    with pytest.raises(ValueError, match="target_precision='bfloat16' needs every matched tensor sketched"):
        M.clipped_sum(model, task, mp, TEXTS, 0, 1.0, method="vmap", precision="bfloat16")
    with pytest.raises(ValueError, match="target_precision='float16' is not valid; accepted: float32, bfloat16"):
        M.clipped_sum(model, task, mp, TEXTS, 0, 1.0, precision="float16")


def test_hooks_refuse_raw_params(fresh):
    model, task = fresh
    mp = MatchedParams(model, [SPEC, "final_norm"])
    with pytest.raises(ValueError, match="sketch"):
        M.clipped_sum(model, task, mp, TEXTS, 0, 1.0, method="sketch_hooks")


def test_double_backward_x_step_equals_projected_raw_gradient(fresh):
    """The matcher's x-gradient with sketch params equals the x-gradient of the same cosine
    distance built by hand from the raw weight gradients projected by P (double backward
    through W instead of through the branch)."""
    model, task = fresh
    mp = MatchedParams(model, [SPEC])
    brs = S.sketch_branches_for(mp)
    tg = class_target_gradients(model, task, mp, [TEXTS[:2], TEXTS[2:]], match_loss="verbalizer").grads
    obj = MatchingObjective(
        model,
        mp,
        tg,
        task.label_token_ids,
        task.prefix_ids,
        task.suffix_ids,
        closed_form=False,
        match_loss="verbalizer",
    )
    torch.manual_seed(0)
    x = (0.05 * torch.randn(2, 3, 4, model.config.hidden_size)).requires_grad_(True)
    d, _, _ = obj.losses(x)
    (gx,) = torch.autograd.grad(d.sum(), x)

    mods = dict(model.named_modules())
    ws = [mods[b.module_name].weight for b in brs]
    for w in ws:
        w.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    h = obj._hidden(x2.reshape(6, 4, -1))[:, -1]
    logits = obj.head(h).float()[:, obj.vocab]
    ce = torch.nn.functional.cross_entropy(logits, torch.arange(2).repeat_interleave(3), reduction="none").view(2, 3)
    total = 0
    for k in range(2):
        gw = torch.autograd.grad(ce[k].mean(), ws, create_graph=True)
        proj = [b.p_out.T @ g @ b.p_in for g, b in zip(gw, brs)]
        total = total + obj._tensor_dist(proj, tg[k])
    (gx2,) = torch.autograd.grad(total, x2)
    for w in ws:
        w.requires_grad_(False)
    assert torch.allclose(d.sum(), total, atol=1e-5)
    assert gx.abs().sum() > 0 and rel_err(gx, gx2) < 1e-3


def test_specs_round_trip_and_expand(fresh):
    from types import SimpleNamespace

    model, _ = fresh
    mp = MatchedParams(model, [SPEC, "final_norm"])
    again = MatchedParams(load_model("tiny-llama").model, S.specs_for_names(mp.names))  # what select does
    assert again.names == mp.names
    cfg = SimpleNamespace(k_in=8, k_out=4, seed=7)
    assert S.expand_specs(["sketch:mlp", SPEC, "lm_head"], cfg) == ["sketch:8x4:7:mlp", SPEC, "lm_head"]
    with pytest.raises(ValueError, match="short form"):
        MatchedParams(model, ["sketch:mlp"])
    with pytest.raises(ValueError, match="matches no parameter"):
        MatchedParams(model, ["sketch:4x4:0:nonexistent"])


def test_config_sketch_block_expands(compose):
    from gmtext.cli import _expand_sketch_specs

    cfg = compose(["matched_params=[sketch:mlp,final_norm]", "sketch.k_in=32", "sketch.seed=5"], "release")
    _expand_sketch_specs(cfg)
    assert list(cfg.matched_params) == ["sketch:32x16:5:mlp", "final_norm"]


def test_sketch_block_names_are_depth_relative():
    """sketch:..:middle_blocks / last_blocks:K pick the same blocks as the raw specs, on any depth."""
    model = load_model("tiny-llama", tiny_layers=6).model
    mid = MatchedParams(model, ["sketch:4x4:0:middle_blocks"])
    assert {n.split(".")[2] for n in mid.names} == {"2", "3"}  # blocks [6//3, 2*6//3)
    assert len(mid.names) == 2 * 7  # every Linear of those blocks (q, k, v, o, gate, up, down)
    last = MatchedParams(model, ["sketch:4x4:0:last_blocks:1"])
    assert {n.split(".")[2] for n in last.names} == {"5"} and len(last.names) == 7
    with pytest.raises(ValueError, match="last_blocks:1..6"):
        MatchedParams(model, ["sketch:4x4:0:last_blocks:7"])


@pytest.mark.parametrize("match_loss", ["full_vocab", "verbalizer"])
def test_one_pass_over_parts_equals_one_pass_per_part(fresh, match_loss):
    """The joint release's single pass clips each part on its own, exactly as separate passes do
    (parts may share tensors: here both read block 1's down_proj)."""
    from gmtext.gradients import label_and_vocab

    model, task = fresh
    gen = MatchedParams(model, [r"sketch:6x5:3:layers\.1\."])
    probe = MatchedParams(model, [r"sketch:6x5:3:layers\.0\.", r"sketch:6x5:3:layers\.1\.mlp\.down_proj$"])
    label, vocab = label_and_vocab(task, 1, match_loss, "cpu")
    clip = 1e-3  # below every norm: every example is clipped, so a wrong per-part norm shows
    joint = M.clipped_sums_parts(model, task, [gen, probe], TEXTS * 2, label, clip, chunk=3, vocab=vocab)
    for mp, got in zip([gen, probe], joint):
        want = M.clipped_sum(
            model, task, mp.activate(), TEXTS * 2, label, clip, chunk=3, method="sketch_hooks", vocab=vocab
        )
        assert torch.allclose(got.norms, want.norms, rtol=1e-4) and (want.norms > clip).all()
        for g, w in zip(got.sums, want.sums):
            assert rel_err(g, w) < 1e-4
    with pytest.raises(ValueError, match="sketch_hooks"):
        M.clipped_sums_parts(model, task, [gen, MatchedParams(model, ["final_norm"])], TEXTS, label, clip)
