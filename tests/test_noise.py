"""The privacy noise source: unseeded, every entropy bit used, correctly distributed."""

import numpy as np
import pytest
import scipy.stats as st
import torch

from gmtext.privacy import noise


def test_standard_normal_is_distributed_as_n01():
    z = noise.standard_normal(200_001)  # odd count: the Box-Muller pair split must not lose one
    assert z.shape == (200_001,) and z.dtype == np.float64
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    assert st.kstest(z, "norm").pvalue > 1e-4
    # the two halves of each Box-Muller pair are independent, not e.g. equal or mirrored
    assert abs(np.corrcoef(z[:100_000], z[100_000:200_000])[0, 1]) < 0.02


def test_no_seed_reproduces_the_noise():
    torch.manual_seed(0)
    np.random.seed(0)
    a = noise.standard_normal(64)
    torch.manual_seed(0)
    np.random.seed(0)
    b = noise.standard_normal(64)
    assert not np.array_equal(a, b)


def _bytes_from(words):
    return lambda n: np.asarray(words[: n // 8], dtype="<u8").tobytes()


def test_entropy_differing_only_in_high_bits_gives_different_noise():
    # the flaw this replaces: torch's generator kept only the low 32 bits of a 64-bit seed
    base = np.arange(1, 9, dtype=np.uint64) * np.uint64(0x0123456789)
    for bit in (63, 48, 33, 12):
        flipped = base ^ (np.uint64(1) << np.uint64(bit))
        assert not np.array_equal(
            noise.standard_normal(8, _bytes_from(base)), noise.standard_normal(8, _bytes_from(flipped))
        )


def test_extreme_words_stay_finite():
    for w in (0, 2**64 - 1):
        z = noise.standard_normal(8, _bytes_from(np.full(8, w, dtype=np.uint64)))
        assert np.isfinite(z).all()


def test_add_noise_sums_in_float64_and_releases_float32():
    v = [torch.zeros(5, 3), torch.ones(7)]
    released, z = noise.add_noise(v, 2.0)
    assert [r.dtype for r in released] == [torch.float32, torch.float32]
    assert [n.dtype for n in z] == [torch.float64, torch.float64]
    for r, x, n in zip(released, v, z):
        torch.testing.assert_close(r, (x.double() + n).float(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(3, 4), (10,), ()])
def test_randn_shape_and_dtype(shape):
    t = noise.randn(shape, std=3.0, dtype=torch.float16)
    assert tuple(t.shape) == shape and t.dtype == torch.float16
