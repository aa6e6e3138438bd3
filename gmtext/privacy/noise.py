"""Gaussian noise for every privacy mechanism, drawn from the operating system's CSPRNG.

Why not a seeded generator: a PRNG is only as secret as its seed, and its state can be
searched. torch's CPU generator keeps 32 bits of whatever seed it is given, so a noisy
release seeded that way could be "un-noised" by trying 2^32 seeds. Here every draw reads
fresh bytes from ``os.urandom`` (the kernel's CSPRNG); there is no state to seed, save or
guess, and nothing in the config or the experiment seed influences the noise.

How: Box–Muller in float64 over pairs of 53-bit uniforms. Each uniform takes the top 53 bits
of a 64-bit word from ``os.urandom`` (the low 11 are dropped), mapped to (0, 1] so the log is
finite.

Floating-point attacks (Mironov 2012; Jin et al. 2022) read the low-order bits of a
float noisy value to learn which inputs could have produced it. Partial mitigation: the noise
and the clean value are added in float64, and only the float32 rounding of the sum is
released (``add_noise``), which discards the 29 low-order bits those attacks read. This is
not a proof: docs/privacy.md states the floating-point attack surface as out of scope.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

import numpy as np
import torch

SOURCE = "os.urandom (kernel CSPRNG), Box-Muller in float64 over 53-bit uniforms; no seed"
_CHUNK = 1 << 20  # normals per os.urandom call: bounds memory for tens of millions of coordinates


def _uniforms(n: int, entropy: Callable[[int], bytes]) -> np.ndarray:
    """n uniforms in (0, 1], from the top 53 bits of n fresh 64-bit words."""
    words = np.frombuffer(entropy(8 * n), dtype="<u8")
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def uniform(n: int) -> np.ndarray:
    """n independent uniforms in (0, 1] from os.urandom (Poisson sampling decisions)."""
    return _uniforms(n, os.urandom)


def standard_normal(n: int, entropy: Callable[[int], bytes] | None = None) -> np.ndarray:
    """n independent N(0, 1) draws (float64). `entropy` defaults to os.urandom; tests pass
    their own byte source to check that every high bit of it reaches the output."""
    if n < 0:
        raise ValueError(f"number of normals must be >= 0, got {n}")
    entropy = entropy or os.urandom
    out = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHUNK):
        m = min(_CHUNK, n - start)
        half = (m + 1) // 2
        u = _uniforms(2 * half, entropy)
        r = np.sqrt(-2.0 * np.log(u[:half]))
        theta = (2.0 * math.pi) * u[half:]
        z = np.concatenate([r * np.cos(theta), r * np.sin(theta)])
        out[start : start + m] = z[:m]
    return out


def normal_like(t: torch.Tensor, std: float, entropy: Callable[[int], bytes] | None = None) -> torch.Tensor:
    """N(0, std^2) noise of t's shape, float64 on t's device."""
    z = torch.from_numpy(standard_normal(t.numel(), entropy)).reshape(t.shape)
    return (z * float(std)).to(t.device)


def add_noise(values: Sequence[torch.Tensor], std: float, entropy: Callable[[int], bytes] | None = None):
    """(released, noise): values + N(0, std^2), summed in float64 and rounded to float32.

    `noise` is returned for tests and diagnostics only; it must never be written anywhere."""
    noise = [normal_like(v, std, entropy) for v in values]
    released = [(v.double() + z).float() for v, z in zip(values, noise)]
    return released, noise


def randn(shape, std: float = 1.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """torch.randn's shape/dtype/device interface over the secure source (for DP-SGD's noise)."""
    n = int(np.prod(shape)) if len(tuple(shape)) else 1
    z = torch.from_numpy(standard_normal(n)).reshape(tuple(shape))
    return (z * float(std)).to(dtype=dtype, device=device)
