"""gradients.last_token_logits, the one place where logits are taken at each row's last real
token (release, matching, DP clipping, fine-tuning and evaluation all go through it)."""

import pytest
import torch

from gmtext.gradients import last_token_logits, last_token_loss, last_token_loss_fast

TEXTS = ["a", "the film was long and the plot was thin", "fine", "an utterly joyless two hours in the dark"]


def _reference(model, ids, mask, last, vocab):
    """Row by row: the model's own logits at position last[b], verbalizer columns, float32."""
    rows = []
    for b in range(ids.shape[0]):
        logits = model(input_ids=ids[b : b + 1], attention_mask=mask[b : b + 1]).logits[0, int(last[b])]
        rows.append(logits if vocab is None else logits[list(vocab)])
    return torch.stack(rows).float()


def _left_padded(ids, mask, last, pad):
    """The same rows with the padding moved to the left: every row's last real token at L-1."""
    out, m = torch.full_like(ids, pad), torch.zeros_like(mask)
    for b in range(ids.shape[0]):
        n = int(last[b]) + 1
        out[b, -n:], m[b, -n:] = ids[b, :n], 1
    return out, m, torch.full_like(last, ids.shape[1] - 1)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("verbalizer", [True, False])
def test_last_token_logits_equal_row_by_row_reference(tiny, padding, verbalizer):
    lm, task = tiny
    ids, mask, last = task.batch(TEXTS)
    assert len(set(last.tolist())) > 1  # rows of different lengths: the padding matters
    if padding == "left":
        ids, mask, last = _left_padded(ids, mask, last, task.tokenizer.pad_token_id or 0)
    vocab = task.label_token_ids if verbalizer else None
    with torch.no_grad():
        ref = _reference(lm.model, ids, mask, last, vocab)
        full = last_token_logits(lm.model, ids, mask, last, vocab, full_forward=True)
        fast = last_token_logits(lm.model, ids, mask, last, vocab)
    assert fast.dtype == full.dtype == torch.float32
    assert fast.shape == ref.shape == (len(TEXTS), len(vocab) if verbalizer else lm.model.config.vocab_size)
    torch.testing.assert_close(
        full, ref, rtol=0, atol=1e-5
    )  # batched vs one row: matmul blocking may differ in the last bit
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)  # the head on the B last states only
    if padding == "right":  # causal: right padding cannot reach the last real token, so a row alone gives the same
        alone = torch.cat(
            [
                last_token_logits(
                    lm.model,
                    ids[b : b + 1, : int(last[b]) + 1],
                    mask[b : b + 1, : int(last[b]) + 1],
                    last[b : b + 1],
                    vocab,
                )
                for b in range(len(TEXTS))
            ]
        )
        torch.testing.assert_close(fast, alone, rtol=0, atol=1e-5)


def test_losses_are_cross_entropy_of_last_token_logits(tiny):
    lm, task = tiny
    ids, mask, last = task.batch(TEXTS)
    y = torch.tensor([0, 1, 1, 0])
    vocab = torch.tensor(task.label_token_ids)
    with torch.no_grad():
        for fn, full in ((last_token_loss, True), (last_token_loss_fast, False)):
            ce = torch.nn.functional.cross_entropy(
                last_token_logits(lm.model, ids, mask, last, vocab, full), y, reduction="none"
            )
            assert torch.equal(fn(lm.model, ids, mask, last, y, vocab), ce)


def test_logit_transform_takes_the_full_forward(tiny, monkeypatch):
    """With logits that are not head(hidden) (Gemma-2's softcapping), the head-only shortcut
    would be wrong: the model's own forward is used."""
    lm, task = tiny
    ids, mask, last = task.batch(TEXTS)
    monkeypatch.setattr(lm.model.config, "final_logit_softcapping", 30.0, raising=False)
    calls = []
    monkeypatch.setattr(lm.model, "get_decoder", lambda: calls.append(1) or lm.model.model)
    with torch.no_grad():
        out = last_token_logits(lm.model, ids, mask, last, task.label_token_ids)
        full = last_token_logits(lm.model, ids, mask, last, task.label_token_ids, full_forward=True)
    assert torch.equal(out, full) and calls == []
