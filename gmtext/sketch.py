"""A low-dimensional gradient space: Kronecker-factored random projections of per-layer gradients.

Why: the DP release adds N(0, σ²I) to a clipped gradient sum. The noise norm grows with
√(dimension) while the signal (the clipped sum, norm ≤ n·C) does not, so matching ~3.5 M raw
coordinates drowns every target. Projecting each layer's gradient to k coordinates before
the release makes the noise norm ~σ√k instead of ~σ√d.

Construction (the idea of LoGra / LogIX, written from scratch here): for a chosen
``nn.Linear`` y = W x we add a side branch

    y = W x + P_out G P_inᵀ x,     P_in ∈ R^{in×k_in}, P_out ∈ R^{out×k_out}, G ∈ R^{k_out×k_in}

with P_in, P_out fixed Gaussian matrices (entries N(0, 1/k), so projections roughly keep
norms) drawn from a PUBLIC seed and the module's name, and G a zero-initialised Parameter.
Because G = 0 the model computes exactly what it computed before, and by the chain rule

    ∂L/∂G = P_outᵀ (Σ_t δ_t x_tᵀ) P_in          (δ_t = ∂L/∂y_t)

which is the projection of the layer's weight gradient Σ_t δ_t x_tᵀ. G is an ordinary
parameter, so everything that already differentiates w.r.t. matched parameters (targets,
vmap per-example gradients, the double-backward x-step, margin rescoring) works on it.

Spec syntax in ``matched_params`` (see `MatchedParams`):

* ``sketch:<K_IN>x<K_OUT>:<SEED>:<regex>``: full form; sketch every nn.Linear whose module name
  matches <regex> (re.search), e.g. ``sketch:16x16:0:layers\\.(1[0-9])\\.``.
* ``<regex>`` may also be ``middle_blocks`` or ``last_blocks:K``: the blocks of the same names in
  `MatchedParams`, relative to the model's depth (``sketch:16x16:0:middle_blocks``).
* ``sketch:<regex>``: short form, filled in from the config's ``sketch.k_in/k_out/seed`` by
  `expand_specs` (the CLI does this before any stage runs).

The G parameters are named ``<module>.gm_sketch.G_v1_<K_IN>x<K_OUT>_s<SEED>``: the release
fingerprint hashes matched parameter names, so a release is never reused with another k,
seed or construction version (bump ``VERSION`` if the way P is drawn ever changes).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Sequence

import torch
from torch import nn

VERSION = "v1"
BRANCH = "gm_sketch"
PREFIX = "sketch:"
# the per-example gradient passes' compute precision (root key target_precision): float32, or the
# forward and backward under bf16 autocast with the per-example sums, clipping and noise in float32
PRECISIONS = ("float32", "bfloat16")
_FULL = re.compile(r"^sketch:(\d+)x(\d+):(\d+):(.*)$")
_PARAM = re.compile(r"^(?P<module>.+)\." + BRANCH + r"\.G_" + VERSION + r"_(?P<ki>\d+)x(?P<ko>\d+)_s(?P<seed>\d+)$")


def param_name(k_in: int, k_out: int, seed: int) -> str:
    return f"G_{VERSION}_{k_in}x{k_out}_s{seed}"


def _public_generator(seed: int, module: str, side: str) -> torch.Generator:
    """Generator for one projection: a function of (public seed, module name, side) only, so the
    release and every later stage rebuild the same P without storing it."""
    h = hashlib.sha256(f"gmtext-sketch:{VERSION}:{seed}:{module}:{side}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def projection(rows: int, k: int, seed: int, module: str, side: str) -> torch.Tensor:
    """[rows, k] with N(0, 1/k) entries (E‖Pᵀv‖² = ‖v‖²: clip norms stay on the raw scale)."""
    return torch.randn(rows, k, generator=_public_generator(seed, module, side)) / math.sqrt(k)


class SketchBranch(nn.Module):
    """The side branch of one Linear: x ↦ P_out G P_inᵀ x (zero while G = 0).

    `capture`, when a list, receives (a, z) of every forward: a = P_inᵀ x [.., k_in] and
    z = a Gᵀ [.., k_out]; ∂L/∂z = δ P_out, so per-example ∂L/∂G = Σ_t (∂L/∂z_t) a_tᵀ
    (the hook path of `per_example_grads_hooks`)."""

    def __init__(
        self,
        module_name: str,
        in_features: int,
        out_features: int,
        k_in: int,
        k_out: int,
        seed: int,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.k_in, self.k_out, self.seed, self.module_name = k_in, k_out, seed, module_name
        self.pname = param_name(k_in, k_out, seed)
        # non-persistent: rebuilt from the public seed, never saved in a checkpoint
        self.register_buffer(
            "p_in", projection(in_features, k_in, seed, module_name, "in").to(device, dtype), persistent=False
        )
        self.register_buffer(
            "p_out", projection(out_features, k_out, seed, module_name, "out").to(device, dtype), persistent=False
        )
        self.register_parameter(self.pname, nn.Parameter(torch.zeros(k_out, k_in, device=device, dtype=dtype)))
        self.capture: list | None = None

    @property
    def G(self) -> torch.Tensor:
        return getattr(self, self.pname)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.G
        a = x @ self.p_in.to(x.dtype)
        z = a @ g.to(x.dtype).T
        if self.capture is not None:
            self.capture.append((a, z))
        return z @ self.p_out.to(x.dtype).T


def _branch_hook(linear: nn.Linear, inputs, output):
    br = getattr(linear, BRANCH)
    if br.capture is None and not torch.is_grad_enabled() and not br.G.any():
        return output  # inference with G = 0 (LM sampling, perplexity): the branch adds exactly 0
    return output + br(inputs[0])


def attach(model: nn.Module, pattern: str, k_in: int, k_out: int, seed: int) -> list[str]:
    """Give every nn.Linear whose name matches `pattern` a side branch; returns the G names.

    Idempotent for the same (k_in, k_out, seed); a Linear that carries a branch with other
    settings gets a new one (the old G leaves the model). The forward output is unchanged."""
    if k_in < 1 or k_out < 1 or seed < 0:
        raise ValueError(f"sketch k_in={k_in}, k_out={k_out}, seed={seed}: need k_in, k_out >= 1 and seed >= 0")
    names = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or not re.search(pattern, name):
            continue
        old = getattr(mod, BRANCH, None)
        if old is None or (old.k_in, old.k_out, old.seed) != (k_in, k_out, seed):
            w = mod.weight
            setattr(
                mod, BRANCH, SketchBranch(name, mod.in_features, mod.out_features, k_in, k_out, seed, w.device, w.dtype)
            )
            if old is None:
                mod._gm_sketch_hook = mod.register_forward_hook(_branch_hook)
        names.append(f"{name}.{BRANCH}.{param_name(k_in, k_out, seed)}")
    return names


def detach(model: nn.Module) -> int:
    """Remove every side branch (and its hook); returns how many were removed."""
    n = 0
    for mod in list(model.modules()):
        if isinstance(mod, nn.Linear) and hasattr(mod, BRANCH):
            mod._gm_sketch_hook.remove()
            del mod._gm_sketch_hook
            delattr(mod, BRANCH)
            n += 1
    return n


def branches(model: nn.Module) -> dict[str, SketchBranch]:
    """G parameter name → its branch, for every attached branch."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SketchBranch):
            out[f"{name}.{mod.pname}"] = mod
    return out


def is_sketch_name(name: str) -> bool:
    return f".{BRANCH}." in name


def parse_spec(spec: str):
    """'sketch:16x8:0:<regex>' → (16, 8, 0, regex); a short form raises (it needs `expand_specs`)."""
    m = _FULL.match(spec)
    if not m:
        raise ValueError(
            f"matched_params entry {spec!r}: the short form sketch:<regex> must be expanded with the "
            "config's sketch.k_in/k_out/seed (gmtext.sketch.expand_specs), "
            "or write sketch:<K_IN>x<K_OUT>:<SEED>:<regex>"
        )
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4)


def expand_specs(specs: Sequence[str], sketch_cfg) -> list[str]:
    """Rewrite short `sketch:<regex>` entries to the full form with the configured k_in/k_out/seed
    (full forms and other specs pass through)."""
    out = []
    for s in specs:
        if s.startswith(PREFIX) and not _FULL.match(s):
            if sketch_cfg is None:
                raise ValueError(f"matched_params entry {s!r} needs a `sketch` config block (k_in, k_out, seed)")
            s = f"{PREFIX}{int(sketch_cfg.k_in)}x{int(sketch_cfg.k_out)}:{int(sketch_cfg.seed)}:{s[len(PREFIX) :]}"
        out.append(s)
    return out


def specs_for_names(names: Sequence[str]) -> list[str]:
    """Specs that select exactly `names` (a release's param_names) on a freshly loaded model:
    sketch G names become full sketch specs for their own module (attaching the branch),
    the others `re:^name$`."""
    out = []
    for n in names:
        m = _PARAM.match(n)
        if m:
            out.append(f"{PREFIX}{m['ki']}x{m['ko']}:{m['seed']}:^{re.escape(m['module'])}$")
        else:
            out.append(f"re:^{re.escape(n)}$")
    return out


# --------------------------------------------------------------------------- per-example gradients (hooks)
def sketch_branches_for(matched) -> list[SketchBranch]:
    """The branch of every matched tensor, in matched order; raises if one is not a sketch G."""
    by_name = branches(matched.model)
    missing = [n for n in matched.names if n not in by_name]
    if missing:
        raise ValueError(
            f"per-example method sketch_hooks needs every matched tensor to be a sketch G; not: {missing[:3]}"
        )
    return [by_name[n] for n in matched.names]


def per_example_grads_hooks(
    model, task, matched, texts, label_id, max_text_tokens=None, vocab=None, precision="float32", min_width=0
) -> list[torch.Tensor]:
    """Per-example ∂L_i/∂G [N, k_out, k_in] for every matched G, from ONE batched forward and a
    backward that stops at the earliest sketched layer.

    Forward: each branch records a = P_inᵀ x and z = a Gᵀ. Backward: ∂(Σ_i L_i)/∂z, which per
    token belongs to exactly one example (rows interact only through attention, and the
    attention mask keeps them apart), so G_i = Σ_t (∂L/∂z_{i,t}) a_{i,t}ᵀ, summed over the
    real tokens of row i only (padding is masked; right padding cannot reach the last real
    token of a causal LM anyway).

    precision="bfloat16" runs the forward and the backward to the branches under bf16 autocast
    (about 2x faster on CPUs with bf16 matmul); the per-token products, their sums over tokens
    and everything the caller does with them (clipping, noise) stay float32.

    Rounding can make a record's value depend on its chunk's shape. Measured on SmolLM2 (8
    records): in bf16 bit-identical with any chunk-mates in chunks 23+ tokens wide, up to 5e-3
    apart in a 12-token chunk; in float32 ~1e-6 apart in any context (docs/privacy.md). So the
    release runs each record in a chunk of its own width (mechanism.chunk_plan), padded to at
    least `min_width`."""
    from .gradients import last_token_loss_fast

    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not valid; accepted: {', '.join(PRECISIONS)}")
    brs = sketch_branches_for(matched)
    dev = next(model.parameters()).device
    ids, mask, last = task.batch(list(texts), max_text_tokens, min_width=min_width)
    ids, mask, last = ids.to(dev), mask.to(dev), last.to(dev)
    caps = [[] for _ in brs]
    for b, c in zip(brs, caps):
        b.capture = c
    try:
        with torch.enable_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bfloat16"):
            labels = torch.full((len(texts),), label_id, device=dev)
            loss = last_token_loss_fast(model, ids, mask, last, labels, vocab)
            zs = [c[0][1] for c in caps]
            dzs = torch.autograd.grad(loss.sum(), zs, allow_unused=True)
    finally:
        for b in brs:
            b.capture = None
    m = mask.to(torch.float32)
    out = []
    for c, dz, b in zip(caps, dzs, brs):
        if len(c) != 1:
            raise RuntimeError(f"sketch branch of {b.module_name} ran {len(c)} times in one forward; expected once")
        a = c[0][0]
        if dz is None:  # this layer does not reach the loss (e.g. after the last used position)
            out.append(torch.zeros(len(texts), b.k_out, b.k_in, device=dev))
            continue
        if a.dim() == 2:  # a Linear run on one position per row (the head in last_token_loss_fast)
            out.append(torch.einsum("bk,bj->bkj", dz.float(), a.detach().float()))
        else:
            out.append(torch.einsum("btk,btj->bkj", dz.float() * m[..., None], a.detach().float()))
    return out
