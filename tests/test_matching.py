"""Gradients, objective, vocabulary, projection and ADMM on a tiny random Llama."""

import itertools
import math

import pytest
import torch

from gmtext.gradients import MatchedParams, class_target_gradients, class_target_gradients_loop
from gmtext.matching.admm import ADMMMatcher, EmbeddingMatcher
from gmtext.matching.objective import MatchingObjective
from gmtext.matching.projectors import (
    LMTopKProjector,
    NearestProjector,
    ProjectionContext,
    candidate_cosines,
    candidate_ids,
    lm_topk_reference,
)
from gmtext.matching.vocab import allowed_token_ids

TEXTS = [
    ["a dull and boring film", "awful acting, a mess", "meh", "I want my money back"],
    ["a great film!", "I loved every minute of it", "wonderful cast", "smart and funny"],
]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-20)).item()


@pytest.mark.parametrize(
    "specs,match_loss",
    [
        (["lm_head"], "full_vocab"),
        (["final_norm", "last_blocks:1"], "full_vocab"),
        (["re:layers\\.0\\.mlp"], "full_vocab"),
        (["lm_head"], "verbalizer"),
        (["final_norm"], "verbalizer"),
    ],
)
def test_batched_targets_equal_loop(tiny, specs, match_loss):
    lm, task = tiny
    mp = MatchedParams(lm.model, specs)
    a = class_target_gradients(lm.model, task, mp, TEXTS, batch_size=3, match_loss=match_loss)
    b = class_target_gradients_loop(lm.model, task, mp, TEXTS, match_loss=match_loss)
    assert a.names == b.names and a.counts == [4, 4]
    for ga, gb in zip(a.grads, b.grads):
        for x, y in zip(ga, gb):
            assert _rel(x, y) < 1e-5


def test_verbalizer_loss_gradient_lives_on_label_rows(tiny):
    lm, task = tiny
    mp = MatchedParams(lm.model, ["lm_head"])
    g = class_target_gradients(lm.model, task, mp, TEXTS, match_loss="verbalizer").grads[0][0]
    rows = g.abs().sum(1).nonzero().flatten().tolist()
    assert rows == sorted(task.label_token_ids)
    with pytest.raises(ValueError, match="match_loss='vocab'"):
        class_target_gradients(lm.model, task, mp, TEXTS, match_loss="vocab")


def test_tied_head_is_untied_for_gradients(tiny):
    from gmtext.models import load_model

    lm = load_model("tiny-llama")
    m = lm.model
    assert m.get_output_embeddings().weight is m.get_input_embeddings().weight
    mp = MatchedParams(m, ["lm_head"])
    head, emb = m.get_output_embeddings().weight, m.get_input_embeddings().weight
    assert head is not emb and head.data_ptr() == emb.data_ptr()  # same storage, separate autograd leaf
    assert mp.head_only and mp.names == ["lm_head.weight"]


def test_bad_param_spec(tiny):
    lm, _ = tiny
    with pytest.raises(ValueError, match="unknown"):
        MatchedParams(lm.model, ["lm_hed"])
    with pytest.raises(ValueError, match="blocks"):
        MatchedParams(lm.model, ["last_blocks:99"])


def _objective(lm, task, closed_form, distance="cos", specs=("lm_head",), match_loss="full_vocab"):
    mp = MatchedParams(lm.model, list(specs))
    tg = class_target_gradients(lm.model, task, mp, TEXTS, match_loss=match_loss).grads
    return MatchingObjective(
        lm.model,
        mp,
        tg,
        task.label_token_ids,
        task.prefix_ids,
        task.suffix_ids,
        distance=distance,
        closed_form=closed_form,
        match_loss=match_loss,
    )


@pytest.mark.parametrize(
    "distance,match_loss", [("cos", "full_vocab"), ("l2", "full_vocab"), ("cos", "verbalizer"), ("l2", "verbalizer")]
)
def test_closed_form_equals_double_backward(tiny, distance, match_loss):
    lm, task = tiny
    fast, slow = (
        _objective(lm, task, True, distance, match_loss=match_loss),
        _objective(lm, task, False, distance, match_loss=match_loss),
    )
    assert fast.closed_form and not slow.closed_form
    x = torch.randn(
        2, 3, 5, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True
    )
    d1, _, s1 = fast.losses(x, per_sequence=True)
    d2, _, s2 = slow.losses(x, per_sequence=True)
    assert torch.allclose(d1, d2, atol=1e-5) and torch.allclose(s1, s2, atol=1e-5)
    g1 = torch.autograd.grad(d1.sum(), x)[0]
    g2 = torch.autograd.grad(d2.sum(), x)[0]
    assert _rel(g1, g2) < 1e-3


@pytest.mark.parametrize("specs", [("lm_head",), ("final_norm", "last_blocks:1")])
def test_sequence_objective_is_mean_of_per_sequence_distances(tiny, specs):
    """The `sequence` objective equals the mean of the (non-differentiable) per-sequence scores,
    and its x-gradient equals the sum of per-row gradients computed one row at a time."""
    lm, task = tiny
    obj = _objective(lm, task, True, specs=specs, match_loss="verbalizer")
    x = torch.randn(
        2, 3, 5, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(1), requires_grad=True
    )
    d_seq_obj, _, s = obj.losses(x, objective="sequence")
    _, _, s_ref = obj.losses(x.detach(), per_sequence=True, create_graph=False)
    assert torch.allclose(d_seq_obj, s_ref.mean(1), atol=1e-6) and torch.allclose(s, s_ref, atol=1e-6)
    d_batch, _, _ = obj.losses(x.detach(), create_graph=False)
    assert not torch.allclose(d_seq_obj, d_batch, atol=1e-4)  # a different objective, not a renamed one
    g = torch.autograd.grad(d_seq_obj.sum(), x)[0]
    # row (k, i) alone: a batch of one sequence per class, with the same targets
    for i in range(3):
        xi = x.detach()[:, i : i + 1].clone().requires_grad_(True)
        di, _, _ = obj.losses(xi, objective="batch")
        gi = torch.autograd.grad(di.sum() / 3, xi)[0]
        assert _rel(g[:, i : i + 1], gi) < 1e-3
    with pytest.raises(ValueError, match="matcher.objective='mean'"):
        obj.losses(x, objective="mean")


def test_vocab_filter(tiny):
    lm, _ = tiny
    tok = lm.tokenizer
    allowed = allowed_token_ids(tok, lm.model.get_input_embeddings().weight.shape[0])
    ids = set(allowed.tolist())
    assert not ids & set(tok.all_special_ids)
    assert max(ids) < len(tok)
    for i in allowed[:: max(1, len(allowed) // 500)].tolist():
        s = tok.decode([i])
        assert s.strip() and s.isascii() and "\n" not in s and "\ufffd" not in s
    # restricting the embedding matrix restricts the ids
    assert allowed_token_ids(tok, 1000).max() < 1000


def _ctx(lm, task):
    emb = lm.model.get_input_embeddings().weight
    return ProjectionContext(lm.model, emb, allowed_token_ids(lm.tokenizer, emb.shape[0]), task.prefix_ids)


@pytest.mark.parametrize(
    "topk,sim_weight,lm_candidates", [(1, 0.0, 0), (7, 0.0, 0), (50, 0.0, 0), (50, 3.0, 0), (7, 0.0, 5), (50, 3.0, 10)]
)
def test_cached_projection_equals_reference(tiny, topk, sim_weight, lm_candidates):
    lm, task = tiny
    ctx = _ctx(lm, task)
    x = torch.randn(5, 8, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(topk))
    fast = LMTopKProjector(topk=topk, sim_weight=sim_weight, lm_candidates=lm_candidates)(x, ctx)
    assert torch.equal(fast, lm_topk_reference(x, ctx, topk, sim_weight=sim_weight, lm_candidates=lm_candidates))
    if topk == 1 and not lm_candidates:  # with one candidate the LM has no choice: nearest token
        assert torch.equal(fast, NearestProjector("cos")(x, ctx))


def test_all_lm_candidates_without_closeness_is_greedy_decoding(tiny):
    """With every allowed token offered by the LM and no closeness bonus, x no longer matters:
    the projection is greedy decoding over the allowed vocabulary."""
    lm, task = tiny
    ctx = _ctx(lm, task)
    proj = LMTopKProjector(topk=3, lm_candidates=len(ctx.allowed_ids))
    gen = torch.Generator().manual_seed(0)
    a, b = (proj(torch.randn(2, 6, lm.model.config.hidden_size, generator=gen), ctx) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(a[0], a[1])
    seq = list(ctx.prefix_ids)
    for _ in range(6):
        logits = lm.model(input_ids=torch.tensor([seq])).logits[0, -1]
        seq.append(int(ctx.allowed_ids[logits[ctx.allowed_ids].argmax()]))
    assert a[0].tolist() == seq[len(ctx.prefix_ids) :]
    with pytest.raises(ValueError, match="lm_candidates"):
        LMTopKProjector(topk=3, lm_candidates=len(ctx.allowed_ids) + 1)(
            torch.zeros(1, 2, lm.model.config.hidden_size), ctx
        )


def test_similarity_weight_keeps_exact_tokens(tiny):
    lm, task = tiny
    ctx = _ctx(lm, task)
    ids = ctx.allowed_ids[torch.randint(len(ctx.allowed_ids), (3, 6), generator=torch.Generator().manual_seed(2))]
    x = lm.model.get_input_embeddings()(ids)
    # a large closeness bonus makes the projection of exact token embeddings the identity
    assert torch.equal(LMTopKProjector(topk=20, sim_weight=1e4)(x, ctx), ids)


def test_projection_rejects_bad_topk(tiny):
    lm, task = tiny
    with pytest.raises(ValueError, match="topk=0"):
        LMTopKProjector(topk=0)
    with pytest.raises(ValueError, match="exceeds"):
        LMTopKProjector(topk=10**7)(torch.randn(1, 2, lm.model.config.hidden_size), _ctx(lm, task))


def test_nearest_projection_recovers_embeddings(tiny):
    lm, task = tiny
    ctx = _ctx(lm, task)
    ids = ctx.allowed_ids[torch.randint(len(ctx.allowed_ids), (3, 6), generator=torch.Generator().manual_seed(1))]
    x = lm.model.get_input_embeddings()(ids)
    assert torch.equal(NearestProjector("cos")(x, ctx), ids)
    assert torch.equal(NearestProjector("l2")(x, ctx), ids)


@pytest.mark.parametrize("closed_form", [True, False])
def test_admm_decreases_matching_loss(tiny, closed_form):
    lm, task = tiny
    obj = _objective(lm, task, closed_form)
    ctx = _ctx(lm, task)
    m = ADMMMatcher(outer_steps=3, inner_steps=4, init_candidates=1, init="random", closed_form=closed_form)
    gen = torch.Generator().manual_seed(0)
    init = m.initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(0))
    d0 = obj.discrete(init)[0]
    res = m.run(obj, LMTopKProjector(topk=20), ctx, 2, 3, 6, gen)
    assert res.tokens.shape == (2, 3, 6)
    assert (res.class_loss <= d0 + 1e-6).all() and res.class_loss.sum() < d0.sum()
    cont = [h["continuous_loss"] for h in res.history if "continuous_loss" in h]
    assert cont[-1] < cont[0]
    # the kept iterate's reported loss is its own discrete loss
    assert torch.allclose(obj.discrete(res.tokens)[0], res.class_loss, atol=1e-6)
    assert set(res.tokens.flatten().tolist()) <= set(ctx.allowed_ids.tolist())


@pytest.mark.parametrize("closed_form", [True, False])
def test_sequence_objective_keeps_each_sequences_best(tiny, closed_form):
    lm, task = tiny
    obj = _objective(lm, task, closed_form)
    ctx = _ctx(lm, task)
    m = ADMMMatcher(outer_steps=3, inner_steps=4, init_candidates=3, closed_form=closed_form, objective="sequence")
    init = m.initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(0))
    # init picks, per sequence slot, the candidate with the lowest own distance
    cand = m.sample_tokens(ctx, 3 * 2 * 3, 6, torch.Generator().manual_seed(0)).view(3, 2, 3, 6)
    per = torch.stack([obj.discrete(cand[j], per_sequence=True)[1] for j in range(3)])
    assert torch.allclose(obj.discrete(init, per_sequence=True)[1], per.min(0).values, atol=1e-6)
    res = m.run(obj, LMTopKProjector(topk=20), ctx, 2, 3, 6, torch.Generator().manual_seed(0))
    s0 = per.min(0).values
    assert (res.seq_loss <= s0 + 1e-6).all() and res.seq_loss.sum() < s0.sum()
    assert torch.allclose(obj.discrete(res.tokens, per_sequence=True)[1], res.seq_loss, atol=1e-6)


def _three_class_objective(lm, task, closed_form, order=(0, 1, 2), contrastive=0.0):
    """A 3-class objective (the tiny task's two targets and a made-up third; a third label token),
    with classes listed in `order`: rolling the order puts every row under another label and
    against that label's target, which is the rival the contrastive distance subtracts."""
    mp = MatchedParams(lm.model, ["final_norm", "last_blocks:1"] if not closed_form else ["lm_head"])
    tg = class_target_gradients(lm.model, task, mp, TEXTS, match_loss="full_vocab").grads
    g = torch.Generator().manual_seed(5)
    noisy = [t + 0.7 * t.norm() * torch.randn(t.shape, generator=g) / t.numel() ** 0.5 for t in tg[0]]
    tg = [list(tg[0]), list(tg[1]), noisy]
    labels = list(task.label_token_ids) + [lm.tokenizer.encode(" fine")[0]]
    return MatchingObjective(
        lm.model,
        mp,
        [tg[k] for k in order],
        [labels[k] for k in order],
        task.prefix_ids,
        task.suffix_ids,
        closed_form=closed_form,
        contrastive=contrastive,
    )


@pytest.mark.parametrize("closed_form", [True, False])
@pytest.mark.parametrize("objective", ["batch", "sequence"])
def test_contrastive_distance_is_own_minus_beta_times_closest_rival(tiny, closed_form, objective):
    """matcher.contrastive = β: D = own-target distance − β × min over the other labels j of (the
    text under label j against class j's target), per class batch and per sequence, with the
    x-gradient of that difference. The reference rolls the classes of a plain objective."""
    lm, task = tiny
    beta = 0.6
    obj = _three_class_objective(lm, task, closed_form, contrastive=beta)
    own = _three_class_objective(lm, task, closed_form)
    x = torch.randn(
        3, 2, 4, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(2), requires_grad=True
    )
    d, _, s = obj.losses(x, per_sequence=True, objective=objective)
    d_own, _, s_own = own.losses(x, per_sequence=True, objective=objective)
    # roll r: class k's rows go under label (k + r) mod 3; a plain objective with the classes in
    # that order scores exactly those rows, so un-roll its rows back to class k
    rivals = []
    for r in (1, 2):
        rolled = _three_class_objective(lm, task, closed_form, order=[(k + r) % 3 for k in range(3)])
        xr = x[[(k - r) % 3 for k in range(3)]]  # row slot k' of the rolled objective holds class k' − r's text
        dr, _, sr = rolled.losses(xr, per_sequence=True, objective=objective)
        back = [(k + r) % 3 for k in range(3)]
        rivals.append((dr[back], sr[back]))
    s_ref = s_own - beta * torch.stack([r[1] for r in rivals]).amin(0)
    # the closest rival is taken per sequence: the sequence objective is the mean of those
    d_ref = s_ref.mean(1) if objective == "sequence" else d_own - beta * torch.stack([r[0] for r in rivals]).amin(0)
    assert torch.allclose(d, d_ref, atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)
    assert (s < s_own).all()  # distances are positive: the rival term always lowers D
    g = torch.autograd.grad(d.sum(), x)[0]
    g_ref = torch.autograd.grad(d_ref.sum(), x)[0]
    assert _rel(g, g_ref) < 1e-3


def test_contrastive_verbalizer_binary_is_the_label_fit_margin(tiny):
    """Binary verbalizer loss at β = 1: D = own distance − the other label's distance, i.e. minus
    the label-fit margin that selector=margin keeps the largest of (docs/selection.md)."""
    lm, task = tiny
    obj = _objective(lm, task, False, specs=("final_norm",), match_loss="verbalizer")
    contr = MatchingObjective(
        lm.model, obj.matched, obj.targets, task.label_token_ids, task.prefix_ids, task.suffix_ids,
        closed_form=False, match_loss="verbalizer", contrastive=1.0,
    )  # fmt: skip
    tokens = torch.tensor(task.encode_text("a great film and a dull one"))[None, None].expand(2, 1, -1)
    fit = obj.text_losses([tokens[0, 0].tolist()] * 2, [0, 1])  # the same text under label 0 and 1
    _, s = contr.discrete(tokens, per_sequence=True)
    assert torch.allclose(s[:, 0], torch.stack([fit[0] - fit[1], fit[1] - fit[0]]), atol=1e-5)
    with pytest.raises(ValueError, match="matcher.contrastive=-0.5"):
        MatchingObjective(
            lm.model, obj.matched, obj.targets, task.label_token_ids, task.prefix_ids, task.suffix_ids,
            contrastive=-0.5,
        )  # fmt: skip
    with pytest.raises(ValueError, match="matcher.contrastive=-1"):
        ADMMMatcher(contrastive=-1.0)


@pytest.mark.parametrize("closed_form", [True, False])
def test_sequence_chunks_give_the_unchunked_numbers(tiny, closed_form):
    """matcher.seq_chunk = k takes per-sequence gradients k sequences per class at a time (cost linear
    in the batch size instead of quadratic): the same distances, LM term and x-gradients as one
    pass, for both objectives, with the contrastive rival, and for the written text's losses."""
    lm, task = tiny
    whole = _three_class_objective(lm, task, closed_form, contrastive=0.5)
    chunked = _three_class_objective(lm, task, closed_form, contrastive=0.5)
    chunked.seq_chunk = 2  # 5 sequences: chunks of 2, 2, 1
    x = torch.randn(
        3, 5, 4, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(4), requires_grad=True
    )
    z = torch.randint(0, 500, (3, 5, 4), generator=torch.Generator().manual_seed(4))
    for objective in ("sequence", "batch"):
        a = whole.losses(x, lm_tokens=z, per_sequence=True, objective=objective)
        b = chunked.losses(x, lm_tokens=z, per_sequence=True, objective=objective)
        for u, v in zip(a, b):
            assert torch.allclose(u, v, atol=1e-5)
        ga = torch.autograd.grad((a[0] + a[1]).sum(), x)[0]
        gb = torch.autograd.grad((b[0] + b[1]).sum(), x)[0]
        assert _rel(gb, ga) < 1e-4
    texts = [task.encode_text(t) for t in ("a great film", "dull", "a dull and boring film", "fun", "ok then", "wow")]
    labels = [0, 1, 2, 0, 1, 2]
    assert torch.allclose(whole.text_losses(texts, labels), chunked.text_losses(texts, labels), atol=1e-5)
    with pytest.raises(ValueError, match="matcher.seq_chunk=-1"):
        ADMMMatcher(seq_chunk=-1)


def test_admm_is_deterministic(tiny):
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    m = ADMMMatcher(outer_steps=2, inner_steps=2, init_candidates=2)
    a = m.run(obj, LMTopKProjector(topk=10), ctx, 2, 2, 5, torch.Generator().manual_seed(3))
    b = m.run(obj, LMTopKProjector(topk=10), ctx, 2, 2, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens)


def test_embedding_only_ablation_runs(tiny):
    """The ablation optimises x on D alone (no ADMM penalty, no projection in between), projects
    the final x once, and keeps per class that projection or, when it matches worse, its LM
    start. A broken ablation (x never moving, a penalty, several projections, the wrong
    fallback) hides behind the fallback unless each piece is checked."""
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    m = EmbeddingMatcher(outer_steps=2, inner_steps=2, init_candidates=1)
    tok0 = m.initial_tokens(obj, ctx, 2, 2, 5, torch.Generator().manual_seed(0))
    seen = []

    def projector(x, c):
        seen.append(x.clone())
        return NearestProjector()(x, c)

    res = m.run(obj, projector, ctx, 2, 2, 5, torch.Generator().manual_seed(0))
    assert res.tokens.shape == (2, 2, 5) and torch.isfinite(res.perplexity).all()
    assert [h["outer_step"] for h in res.history] == [0, 1]
    first = res.history[0]
    assert (
        first["admm_penalty"] == 0.0 and "perplexity" not in first and first["discrete_loss"] != first["discrete_loss"]
    )  # NaN: no z
    assert len(seen) == 1  # one projection, at the end
    x_final = seen[0].view(2, 2, 5, -1)
    assert not torch.allclose(x_final, obj.tokens_to_x(tok0).float())  # x moved away from the start
    z = NearestProjector()(seen[0], ctx).view(2, 2, 5)
    start, proj = obj.discrete(tok0)[0], obj.discrete(z)[0]
    for k in range(2):
        assert torch.equal(res.tokens[k], z[k] if proj[k] < start[k] else tok0[k])
    assert res.history[1]["discrete_loss"] == pytest.approx(proj.mean().item())
    assert res.history[1]["best_discrete_loss"] == pytest.approx(torch.minimum(start, proj).mean().item())
    assert res.class_loss.tolist() == pytest.approx(torch.minimum(start, proj).tolist())


def test_lm_context_only_changes_what_the_lm_conditions_on(tiny):
    lm, task = tiny
    ctx = task.lm_context_ids("Movie review:")
    words = lm.tokenizer("Movie review:", add_special_tokens=False).input_ids
    assert task.start_ids and ctx == task.start_ids + words + task.prefix_ids[len(task.start_ids) :]
    assert len(ctx) > len(task.prefix_ids) and task.lm_context_ids("") == task.prefix_ids
    assert (
        task.encode("x") == task.prefix_ids + task.encode_text("x") + task.suffix_ids
    )  # classification input unchanged


def test_admm_logs_primal_and_dual_residuals(tiny):
    """Each outer step records ‖x − z‖, ρ‖z − z_prev‖ (per token) and the share of tokens that
    changed. An x that cannot move (lr ≈ 0) keeps its nearest tokens: nothing changes and both
    residuals are 0; a large lr moves tokens and leaves a gap between x and its projection."""
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    still = ADMMMatcher(outer_steps=3, inner_steps=2, init_candidates=1, init="random", lr=1e-12, rho=2.0)
    res = still.run(obj, NearestProjector("l2"), ctx, 2, 2, 5, torch.Generator().manual_seed(0))
    steps = [h for h in res.history if "continuous_loss" in h]
    assert len(steps) == 3 and all(h["tokens_changed"] == 0 and h["primal_residual"] < 1e-6 for h in steps)
    assert math.isnan(steps[0]["dual_residual"]) and all(h["dual_residual"] < 1e-6 for h in steps[1:])
    moving = ADMMMatcher(outer_steps=3, inner_steps=4, init_candidates=1, init="random", lr=0.5, rho=2.0)
    steps = [
        h
        for h in moving.run(obj, NearestProjector("l2"), ctx, 2, 2, 5, torch.Generator().manual_seed(0)).history
        if "continuous_loss" in h
    ]
    assert steps[0]["primal_residual"] > 1e-3 and any(h["tokens_changed"] > 0 for h in steps[1:])
    assert all(0 <= h["tokens_changed"] <= 1 for h in steps)
    changed = [h for h in steps[1:] if h["tokens_changed"] > 0]
    assert all(h["dual_residual"] > 0 for h in changed)


def test_residual_balancing_adapts_rho_by_the_recorded_residuals(tiny):
    """rho_balance = μ: after each outer step ρ grows ×τ when primal > μ·dual, shrinks ÷τ when
    dual > μ·primal, else stays (no change at the first step, whose dual residual is NaN); the
    ρ recorded per step is the one that step used, and off (0) keeps it fixed."""
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    kw = dict(outer_steps=5, inner_steps=4, init_candidates=1, init="random", lr=0.5, rho=2.0)

    def steps(m):
        hist = m.run(obj, NearestProjector("l2"), ctx, 2, 2, 5, torch.Generator().manual_seed(0)).history
        return [h for h in hist if "continuous_loss" in h]

    fixed = steps(ADMMMatcher(**kw))
    assert [h["rho"] for h in fixed] == [2.0] * 5
    mu, tau = 1.5, 3.0
    bal = steps(ADMMMatcher(**kw, rho_balance=mu, rho_factor=tau))
    assert bal[0]["rho"] == 2.0 and bal[1]["rho"] == 2.0  # step 0's dual residual is undefined
    for h, nxt in zip(bal[1:], bal[2:]):
        r, s = h["primal_residual"], h["dual_residual"]
        want = h["rho"] * tau if r > mu * s else h["rho"] / tau if s > mu * r else h["rho"]
        assert nxt["rho"] == pytest.approx(want)
    assert len({h["rho"] for h in bal}) > 1, "the test must exercise a change of ρ"
    first = next(i for i, h in enumerate(bal) if h["rho"] != 2.0)
    assert bal[first]["continuous_loss"] != fixed[first]["continuous_loss"]  # the new ρ is used
    for bad in (dict(rho_balance=-1.0), dict(rho_balance=10.0, rho_factor=1.0)):
        with pytest.raises(ValueError, match="rho_balance"):
            ADMMMatcher(**kw, **bad)


@pytest.mark.parametrize("objective", ["sequence", "batch"])
def test_readability_guard_never_keeps_text_less_readable_than_its_start(tiny, objective):
    """max_perplexity_ratio = r: every kept sequence (class batch, by geometric-mean perplexity,
    under `batch`) is at most r × as perplex as the LM start it came from. A random tiny LM finds
    all text equally unreadable, so perplexity here is exp(share of positions changed from the
    start). The guard only withholds iterates (x, z and λ move as without it): at r = e it
    admits everything (the unguarded result), at r = 1 nothing (the start), and in between the
    kept distance lies between the unguarded run's and the start's."""
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    kw = dict(outer_steps=4, inner_steps=3, init_candidates=1, objective=objective, lr=0.5)
    start = ADMMMatcher(**kw).initial_tokens(obj, ctx, 2, 3, 5, torch.Generator().manual_seed(0))
    obj.perplexity = lambda t: (t != start).float().mean(-1).exp()
    run = lambda r: ADMMMatcher(**kw, max_perplexity_ratio=r).run(  # noqa: E731
        obj, LMTopKProjector(topk=50), ctx, 2, 3, 5, torch.Generator().manual_seed(0)
    )
    per = (lambda p: p.log()) if objective == "sequence" else (lambda p: p.log().mean(1))  # noqa: E731
    free = run(0.0)
    bar = per(free.perplexity).max().item() - 0.05
    assert bar > 0, "the unguarded run must keep a changed text"
    assert torch.equal(run(math.e).tokens, free.tokens) and torch.equal(run(1.0).tokens, start)
    assert "guard_refused" not in free.history[0]
    assert all(h["guard_refused"] == 0 for h in run(math.e).history)
    assert any(h["guard_refused"] > 0 for h in run(1.0).history)  # the share of better iterates it withheld
    guarded = run(math.exp(bar))
    assert (per(guarded.perplexity) <= bar + 1e-5).all() and not torch.equal(guarded.tokens, free.tokens)
    score = (lambda r: r.seq_loss) if objective == "sequence" else (lambda r: r.class_loss)  # noqa: E731
    d0 = obj.discrete(start, per_sequence=True)[1 if objective == "sequence" else 0]
    assert (score(free) - 1e-6 <= score(guarded)).all() and (score(guarded) <= d0 + 1e-6).all()
    with pytest.raises(ValueError, match="max_perplexity_ratio=-1"):
        ADMMMatcher(**kw, max_perplexity_ratio=-1.0)


def _joint_score(lm, ctx, x, row, seq, sim_weight):
    """What beam search maximises: summed LM log-probability (whole vocabulary) + sim_weight x cosine."""
    ids = torch.tensor([list(ctx.prefix_ids) + list(seq)])
    logp = lm.model(input_ids=ids).logits[0, len(ctx.prefix_ids) - 1 : -1].float().log_softmax(-1)
    tok = torch.tensor(seq)
    cos = torch.nn.functional.cosine_similarity(x[row].float(), ctx.embeddings[tok].float(), dim=-1)
    return (logp.gather(1, tok[:, None])[:, 0] + sim_weight * cos).sum().item()


@pytest.mark.parametrize("sim_weight,lm_candidates", [(0.0, 0), (3.0, 0), (3.0, 6)])
def test_beam_of_one_is_the_one_token_projection(tiny, sim_weight, lm_candidates):
    lm, task = tiny
    ctx = _ctx(lm, task)
    x = torch.randn(4, 7, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    proj = LMTopKProjector(topk=20, sim_weight=sim_weight, lm_candidates=lm_candidates)
    with torch.inference_mode():
        cand = candidate_ids(x, ctx, 20)
        beam_one = proj._beam_search(x, ctx, cand, candidate_cosines(x, ctx, cand) if sim_weight else None)
    assert torch.equal(beam_one, proj(x, ctx))


def test_wide_beam_finds_the_best_sequence_of_candidates(tiny):
    """With as many beams as there are prefixes of length L-1, beam search is exhaustive: it must
    return the best of all topk^L candidate sequences, and never score below one token at a time."""
    lm, task = tiny
    ctx = _ctx(lm, task)
    k, length, sw = 3, 3, 2.0
    x = torch.randn(3, length, lm.model.config.hidden_size, generator=torch.Generator().manual_seed(11))
    beam = LMTopKProjector(topk=k, sim_weight=sw, beam=k ** (length - 1))(x, ctx)
    greedy = LMTopKProjector(topk=k, sim_weight=sw)(x, ctx)
    cand = candidate_ids(x, ctx, k)
    with torch.no_grad():
        for r in range(3):
            scores = {
                seq: _joint_score(lm, ctx, x, r, seq, sw)
                for seq in itertools.product(*(cand[r, i].tolist() for i in range(length)))
            }
            best = max(scores, key=scores.get)
            assert beam[r].tolist() == list(best)
            assert scores[tuple(beam[r].tolist())] >= scores[tuple(greedy[r].tolist())] - 1e-5
    with pytest.raises(ValueError, match="beam=0"):
        LMTopKProjector(beam=0)
