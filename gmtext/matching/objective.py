"""The gradient-matching distance D between synthetic-batch gradients and released targets.

Synthetic rows of all classes run through the model in one forward; each class is then
compared with its own target. Two implementations give the same numbers:
- closed form, when only the LM head is matched: grad_W = mean_i e_i h_i^T with
  e_i = softmax error and h_i = last hidden state, so cosines reduce to small Gram
  products and the x-gradient needs one ordinary backward (no double backward, and the
  V x d gradient is never materialised);
- autograd, for any parameter subset: torch.autograd.grad with create_graph=True.

Two objectives: `batch` (the paper's: the batch-mean gradient matches the class target, so
sequences may compensate for each other) and `sequence` (each sequence's own gradient
matches the target: every synthetic example is a class-representative training example
on its own, which is what selection and per-example scores look at).

`contrastive` = β > 0 subtracts β × the best *other* label's distance: under label j the same
text's gradient is compared with class j's target, as the label-fit margin of `selector=margin`
does (docs/selection.md). Own-target distance alone rewards the component every class target
shares; the margin term rewards what tells the text's class from the others.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..gradients import MatchedParams, check_match_loss

EPS = 1e-12
OBJECTIVES = ("batch", "sequence")


def check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"matcher.objective={objective!r} unknown; accepted: {', '.join(OBJECTIVES)}")


def check_matching_options(contrastive: float, seq_chunk: int) -> None:
    """The matcher checks these when it is built (before any release is made); the objective,
    which uses them, again for callers that build it directly."""
    if not contrastive >= 0:
        raise ValueError(f"matcher.contrastive={contrastive} must be >= 0 (0: own target only)")
    if seq_chunk < 0:
        raise ValueError(f"matcher.seq_chunk={seq_chunk} must be >= 0 (0: every sequence of a batch at once)")


class MatchingObjective:
    def __init__(
        self,
        model,
        matched: MatchedParams,
        targets: Sequence[Sequence[torch.Tensor]],
        label_token_ids: Sequence[int],
        prefix_ids: Sequence[int],
        suffix_ids: Sequence[int],
        distance: str = "cos",
        closed_form: bool = True,
        context_ids: Sequence[int] | None = None,
        match_loss: str = "full_vocab",
        contrastive: float = 0.0,
        seq_chunk: int = 0,
    ):
        if distance not in ("cos", "l2"):
            raise ValueError(f"matcher.distance={distance!r} unknown; accepted: cos, l2")
        check_matching_options(contrastive, seq_chunk)
        self.model, self.matched, self.distance = model, matched, distance
        self.contrastive, self.seq_chunk = float(contrastive), int(seq_chunk)
        self.device = next(model.parameters()).device
        self.targets = [[t.to(self.device) for t in tc] for tc in targets]
        self.labels = torch.tensor(list(label_token_ids), device=self.device)
        check_match_loss(match_loss)
        # verbalizer: the loss is a softmax over the C label tokens only, so the head gradient
        # lives on those C rows and the class index is the target
        self.vocab = self.labels if match_loss == "verbalizer" else None
        emb = model.get_input_embeddings()
        with torch.no_grad():
            self.prefix_emb = emb(torch.tensor(list(prefix_ids), device=self.device))
            self.suffix_emb = emb(torch.tensor(list(suffix_ids), device=self.device))
        self.embed = emb
        self.n_prefix = len(prefix_ids)
        # perplexity is measured under what the generator LM conditions on (template prefix,
        # or a public task description before it: dataset.lm_context)
        self.context_ids = list(context_ids) if context_ids else list(prefix_ids)
        self.head = model.get_output_embeddings()
        self.decoder = model.get_decoder()
        self.closed_form = closed_form and matched.head_only
        if self.closed_form:
            order = {id(p): i for i, p in enumerate(matched.params)}
            self.w_idx = order[id(self.head.weight)]
            self.b_idx = order.get(id(self.head.bias)) if getattr(self.head, "bias", None) is not None else None

    # ---- forward ----
    def _hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, L, d] free-slot embeddings → last-layer hidden states [N, P+L+S, d]."""
        n = x.shape[0]
        # x is kept in float32 by the matcher; run the decoder in the model's own dtype (bf16/fp16 models)
        inp = torch.cat(
            [self.prefix_emb.expand(n, -1, -1), x.to(self.prefix_emb.dtype), self.suffix_emb.expand(n, -1, -1)], dim=1
        )
        return self.decoder(inputs_embeds=inp).last_hidden_state

    def tokens_to_x(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def losses(
        self,
        x: torch.Tensor,
        lm_tokens: torch.Tensor | None = None,
        per_sequence: bool = False,
        create_graph: bool = True,
        objective: str = "batch",
    ):
        """x: [C, B, L, d]. Returns (objective per class [C]: the batch-gradient distance, or with
        objective="sequence" the mean of per-sequence distances, differentiable; LM cross-entropy
        of x predicting lm_tokens per class [C] or None; per-sequence D [C, B] when asked)."""
        check_objective(objective)
        if objective == "sequence":
            per_sequence = True
        c, b, length, d = x.shape
        if per_sequence and 0 < self.seq_chunk < b:
            return self._chunked(x, lm_tokens, create_graph, objective)
        hid = self._hidden(x.reshape(c * b, length, d))
        h_last = hid[:, -1]
        lm = None
        if lm_tokens is not None:
            logits = self.head(hid[:, self.n_prefix - 1 : self.n_prefix - 1 + length]).float()
            lm = (
                F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lm_tokens.reshape(-1), reduction="none")
                .view(c, b * length)
                .mean(1)
            )
        h_last = h_last.view(c, b, d)
        d_cls, d_seq = self._distances(h_last, per_sequence, create_graph, objective, shift=0)
        if self.contrastive > 0 and c > 1:
            # the rival: under every other label j, the text's gradient against class j's target;
            # the closest one is what the label-fit margin subtracts
            rivals = [self._distances(h_last, per_sequence, create_graph, objective, shift=s) for s in range(1, c)]
            if d_cls is not None:
                d_cls = d_cls - self.contrastive * torch.stack([r[0] for r in rivals]).amin(0)
            if d_seq is not None:
                d_seq = d_seq - self.contrastive * torch.stack([r[1] for r in rivals]).amin(0)
        if objective == "sequence":
            d_cls = d_seq.mean(1)
        return d_cls, lm, d_seq

    def _chunked(self, x: torch.Tensor, lm_tokens, create_graph: bool, objective: str):
        """`losses` with the per-sequence distances taken `seq_chunk` sequences per class at a time.
        Autograd gets a batch's B per-sequence gradients as B backward passes through the whole
        batch's graph: B² row-passes, and B full-size gradients in memory at once (matching the
        middle blocks at B = 10 did not fit in 15 GiB). Rows never attend to each other, so
        chunks give the same numbers at a cost linear in B."""
        b, ch, seq = x.shape[1], self.seq_chunk, objective == "sequence"
        graph = create_graph and seq  # the batch objective reports per-sequence D, never differentiates it
        parts = [
            self.losses(
                x[:, i : i + ch],
                lm_tokens=None if lm_tokens is None else lm_tokens[:, i : i + ch],
                create_graph=graph,
                objective="sequence",
            )
            for i in range(0, b, ch)
        ]
        d_seq = torch.cat([p[2] if seq else p[2].detach() for p in parts], 1)
        lm = None if lm_tokens is None else sum(p[1] * p[2].shape[1] for p in parts) / b
        if objective == "sequence":
            return d_seq.mean(1), lm, d_seq
        # the batch distance needs the whole batch's mean gradient: one more pass, without per-row gradients
        d_cls, lm_all, _ = self.losses(x, lm_tokens=lm_tokens, create_graph=create_graph, objective="batch")
        return d_cls, lm_all, d_seq

    def _distances(self, h: torch.Tensor, per_sequence: bool, create_graph: bool, objective: str, shift: int):
        """(class distances [C] or None, per-sequence [C, B] or None) with class k's rows under label
        (k + shift) mod C, against that label's target (shift 0: every row under its own label)."""
        if self.closed_form:
            return self._closed_form(h, per_sequence, shift)
        return self._autograd(h, per_sequence, create_graph, seq_graph=objective == "sequence", shift=shift)

    def _closed_form(self, h: torch.Tensor, per_sequence: bool, shift: int = 0):
        c, b, _ = h.shape
        lab = [(k + shift) % c for k in range(c)]  # the label (and target) of class k's rows
        h = h.float()
        # detached: D is differentiated w.r.t. x only; a live W would make every backward build
        # an unused V x d weight gradient
        rows = self.vocab  # None: all V rows; else the C verbalizer rows (all others are zero)
        w = self.head.weight.detach().float()
        w = w if rows is None else w[rows]
        logits = h @ w.T
        if self.b_idx is not None:
            bias = self.head.bias.detach().float()
            logits = logits + (bias if rows is None else bias[rows])
        e = logits.softmax(-1)
        target = (self.labels if rows is None else torch.arange(c, device=h.device))[lab]
        e = e - F.one_hot(target, e.shape[-1]).float()[:, None, :]  # [C, B, V or C]
        d_cls, d_seq = [], []
        for k in range(c):
            gw = self.targets[lab[k]][self.w_idx].float()
            gw = gw if rows is None else gw[rows]
            g_norm2 = (gw * gw).sum()
            gh = h[k] @ gw.T  # [B, V]: g h_i for every row
            row_dot = (e[k] * gh).sum(-1)  # e_i^T g h_i
            dot = row_dot.sum() / b
            gram = (e[k] @ e[k].T) * (h[k] @ h[k].T)
            norm2 = gram.sum() / b**2
            parts = [self._dist(dot, norm2, g_norm2)]
            seq_parts = [self._dist(row_dot, gram.diagonal(), g_norm2)] if per_sequence else []
            if self.b_idx is not None:
                gb = self.targets[lab[k]][self.b_idx].float()
                gb = gb if rows is None else gb[rows]
                eb = e[k].mean(0)
                parts.append(self._dist((eb * gb).sum(), (eb * eb).sum(), (gb * gb).sum()))
                if per_sequence:
                    seq_parts.append(self._dist(e[k] @ gb, (e[k] ** 2).sum(-1), (gb * gb).sum()))
            d_cls.append(torch.stack(parts).mean())
            if per_sequence:
                d_seq.append(torch.stack(seq_parts).mean(0))
        return torch.stack(d_cls), (torch.stack(d_seq) if per_sequence else None)

    def _dist(self, dot, norm2, g_norm2):
        """Distance from inner product and squared norms (works elementwise)."""
        if self.distance == "cos":
            return 1 - dot / (norm2.clamp_min(EPS).sqrt() * g_norm2.clamp_min(EPS).sqrt())
        return (norm2 - 2 * dot + g_norm2) / g_norm2.clamp_min(EPS)

    def _tensor_dist(self, gs, ts):
        return torch.stack(
            [
                self._dist((g.float() * t.float()).sum(), (g.float() ** 2).sum(), (t.float() ** 2).sum())
                for g, t in zip(gs, ts)
            ]
        ).mean()

    def _row_dist(self, gs, ts):
        """[B] distances of B stacked gradients (each g in gs is [B, *t.shape]) to the targets."""
        out = []
        for g, t in zip(gs, ts):
            g, t = g.float().flatten(1), t.float().flatten()
            out.append(
                self._dist((g * t).sum(1), (g * g).sum(1), (t * t).sum())
            )  # not g @ t: gemv sums less accurately
        return torch.stack(out).mean(0)

    def _autograd(
        self, h: torch.Tensor, per_sequence: bool, create_graph: bool, seq_graph: bool = False, shift: int = 0
    ):
        """seq_graph: per-sequence distances stay differentiable (the `sequence` objective); each
        row's gradient is a backward through the matched tensors only, the expensive backward
        to x happens once for the sum."""
        c, b, _ = h.shape
        logits = self.head(h).float()  # [C, B, V]
        if self.vocab is not None:
            logits, target = logits[..., self.vocab], torch.arange(c, device=h.device)
        else:
            target = self.labels
        lab = [(k + shift) % c for k in range(c)]  # the label (and target) of class k's rows
        target = target[lab]
        ce = F.cross_entropy(logits.reshape(c * b, -1), target.repeat_interleave(b), reduction="none").view(c, b)
        d_cls, d_seq = [], []
        params = self.matched.params
        for k in range(c):
            if not seq_graph:  # the sequence objective never uses the batch distance
                gs = torch.autograd.grad(ce[k].mean(), params, create_graph=create_graph, retain_graph=True)
                d_cls.append(self._tensor_dist(gs, self.targets[lab[k]]))
            if per_sequence:
                # all B per-sequence gradients in one vmapped backward (one-hot grad_outputs)
                onehot = torch.eye(b, device=ce.device, dtype=ce.dtype)
                gi = torch.autograd.grad(
                    ce[k],
                    params,
                    grad_outputs=onehot,
                    is_grads_batched=True,
                    retain_graph=True,
                    create_graph=seq_graph and create_graph,
                )
                ds = self._row_dist(gi, self.targets[lab[k]])
                d_seq.append(ds if seq_graph else ds.detach())
        if seq_graph:
            return None, torch.stack(d_seq)
        return torch.stack(d_cls), (torch.stack(d_seq) if per_sequence else None)

    def discrete(self, tokens: torch.Tensor, per_sequence: bool = False):
        """Matching distance of token ids [C, B, L] (no gradient w.r.t. inputs)."""
        if self.closed_form:
            with torch.no_grad():
                d, _, s = self.losses(self.tokens_to_x(tokens), per_sequence=per_sequence)
        else:
            with torch.enable_grad():
                d, _, s = self.losses(self.tokens_to_x(tokens).detach(), per_sequence=per_sequence, create_graph=False)
        return d.detach(), (s.detach() if s is not None else None)

    def text_losses(self, token_lists: Sequence[Sequence[int]], labels: Sequence[int]) -> torch.Tensor:
        """[N] per-sequence matching distance of each token list (any lengths) to its own
        label's target: what `discrete(..., per_sequence=True)` gives for a [C, B, L] batch.

        For the text a user receives: decoding the optimised ids and tokenising the text again
        rarely gives the same ids (SmolLM2-135M: 8 of 8 texts came back as other ids, 3 of
        them with another length; docs/generation.md), so the optimised ids' distance is not
        the written text's. Sequences of one length share a forward; each row's distance
        depends on that row only (no attention across rows, per-row gradients)."""
        out = torch.full((len(token_lists),), float("nan"))
        groups: dict[int, list[int]] = {}
        for i, t in enumerate(token_lists):
            groups.setdefault(len(t), []).append(i)
        c = len(self.targets)
        ch = self.seq_chunk or len(token_lists)  # rows per pass (seq_chunk: see _chunked)
        chunks = [(n, idx[j : j + ch]) for n, idx in groups.items() for j in range(0, len(idx), ch)]
        for length, idx in chunks:
            tokens = torch.tensor([list(token_lists[i]) for i in idx], dtype=torch.long, device=self.device).view(
                len(idx), length
            )
            x = self.tokens_to_x(tokens).detach()
            with torch.set_grad_enabled(not self.closed_form):
                h = self._hidden(x)[:, -1]
                h = h[None].expand(c, *h.shape)  # every row under every label: one forward, C targets
                _, d_seq = self._distances(h, True, create_graph=False, objective="batch", shift=0)
            rows = torch.arange(len(idx), device=d_seq.device)
            own = torch.tensor([labels[i] for i in idx], device=d_seq.device)
            out[torch.tensor(idx)] = d_seq.detach()[own, rows].float().cpu()
        return out

    @torch.no_grad()
    def perplexity(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-sequence perplexity of the text tokens [..., L] given the LM context."""
        shape = tokens.shape
        t = tokens.reshape(-1, shape[-1])
        prefix = torch.tensor(self.context_ids, device=t.device).expand(t.shape[0], -1)
        ids = torch.cat([prefix, t], 1)
        logits = self.model(input_ids=ids).logits[:, len(self.context_ids) - 1 : -1].float()
        nll = (
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), reduction="none").view(t.shape).mean(1)
        )
        return nll.exp().view(shape[:-1])
