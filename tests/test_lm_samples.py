"""matcher=none, the no-matching twin: GRADMM's own LM starts, written unmatched."""

import pytest
import torch

from gmtext.matching.admm import ADMMMatcher
from gmtext.matching.lm_samples import LMSampleMatcher
from gmtext.matching.projectors import LMTopKProjector
from tests.test_matching import _ctx, _objective


def test_twin_is_gradmms_start_and_matching_never_does_worse_per_sequence(tiny):
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    twin = LMSampleMatcher(init_candidates=3, objective="sequence")
    gradmm = ADMMMatcher(outer_steps=2, inner_steps=3, init_candidates=3, objective="sequence")
    steps = []
    t = twin.run(obj, LMTopKProjector(topk=20), ctx, 2, 3, 6, torch.Generator().manual_seed(5), steps.append)
    start = gradmm.initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(5))
    assert torch.equal(t.tokens, start)  # the same stream: the pair differs only by the matching
    c, s = obj.discrete(t.tokens, per_sequence=True)
    assert torch.allclose(t.seq_loss, s) and torch.allclose(t.class_loss, c)
    assert [r["outer_step"] for r in steps] == [0] and twin.outer_steps == 0
    # its step record measures what GRADMM's do (the per-sequence loss under objective=sequence,
    # not the class-batch loss), so both sit on one curve in gmtext-report's ADMM plot
    assert steps[0]["best_discrete_loss"] == pytest.approx(s.mean().item()) != pytest.approx(c.mean().item())
    assert steps[0]["perplexity"] == pytest.approx(t.perplexity.mean().item())
    g_steps = []
    g = gradmm.run(obj, LMTopKProjector(topk=20), ctx, 2, 3, 6, torch.Generator().manual_seed(5), g_steps.append)
    assert (g.seq_loss <= t.seq_loss + 1e-6).all()  # GRADMM keeps each sequence's best, its start included
    assert g_steps[-1]["best_discrete_loss"] <= steps[0]["best_discrete_loss"] + 1e-6


def test_matcher_none_composes_and_builds(compose):
    from gmtext.config import build

    cfg = compose(["matcher=none"], config_name="pipeline")
    m = build(cfg.matcher)
    assert isinstance(m, LMSampleMatcher) and m.init_candidates == 8 and m.objective == "sequence"
    # the twin keeps the default recipe's starts: the same as matcher=admm's
    assert cfg.matcher.init_candidates == compose([], config_name="pipeline").matcher.init_candidates
    # a contrastive GRADMM's twin picks its starts by the same distance: it takes the same β
    twin = build(compose(["matcher=none", "matcher.contrastive=0.5"], config_name="pipeline").matcher)
    assert twin.contrastive == 0.5 and build(cfg.matcher).contrastive == 0.0


def test_class_prompt_starts_are_written_after_each_class_prompt(tiny):
    """matcher.init=class_prompt: class c's candidates are LM samples after class c's prompt, and
    the twin draws exactly GRADMM's starts under it too."""
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    other = task.lm_context_ids("Review: a positive movie review:")
    ctx.class_prefix_ids = [list(ctx.prefix_ids), other]  # class 0's prompt is the shared context
    m = ADMMMatcher(init="class_prompt", init_candidates=1, objective="sequence")
    start = m.initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(7))
    plain = ADMMMatcher(init_candidates=1, objective="sequence")
    gen = torch.Generator().manual_seed(7)
    assert torch.equal(start[0], plain.sample_tokens(ctx, 3, 6, gen))  # class 0 first, after its prompt
    assert torch.equal(start[1], plain.sample_tokens(ctx, 3, 6, gen, other))  # then class 1, after its own
    # (the tiny random model barely conditions on its prefix, so which prompt went in is checked here)
    calls = []
    sample = m.sample_tokens
    m.sample_tokens = lambda ctx, n, length, gen, prefix_ids=None: (
        calls.append((n, prefix_ids)) or sample(ctx, n, length, gen, prefix_ids)
    )
    m.init_candidates = 2
    m.initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(7))
    assert calls == [(6, list(ctx.prefix_ids)), (6, other)]
    twin = LMSampleMatcher(init="class_prompt", init_candidates=3, objective="sequence")
    t = twin.run(obj, None, ctx, 2, 3, 6, torch.Generator().manual_seed(5))
    g = ADMMMatcher(init="class_prompt", init_candidates=3, objective="sequence")
    assert torch.equal(t.tokens, g.initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(5)))


def test_class_prompt_needs_its_prompts(tiny):
    lm, task = tiny
    obj, ctx = _objective(lm, task, True), _ctx(lm, task)
    with pytest.raises(ValueError, match="one class prompt per class"):
        ADMMMatcher(init="class_prompt").initial_tokens(obj, ctx, 2, 3, 6, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="matcher.init_prompt='Review:' has no \\{description\\}"):
        ADMMMatcher(init="class_prompt", init_prompt="Review:")
    with pytest.raises(ValueError, match="matcher.init='prompt' unknown; accepted: lm_sample, class_prompt, random"):
        ADMMMatcher(init="prompt")


def test_class_prompt_ids_format_the_public_descriptions(tiny):
    _, task = tiny
    ids = task.class_prompt_ids("{context} {description}:", "Movie review:", ["a negative movie review", "a good one"])
    assert ids[0] == task.lm_context_ids("Movie review: a negative movie review:")
    assert ids[1] == task.lm_context_ids("Movie review: a good one:")
    assert task.class_prompt_ids("{description}:", "", []) == [task.lm_context_ids(n + ":") for n in ("neg", "pos")]
    with pytest.raises(ValueError, match="class prompt '\\{label\\}: \\{description\\}' does not format"):
        task.class_prompt_ids("{label}: {description}", "", [])
    with pytest.raises(ValueError, match="has 1 entries for 2 classes"):
        task.class_prompt_ids("{description}:", "", ["only one"])
