"""Seed-regenerated random directions of zeroth-order training (MeZO; FedKSeed): never stored, only seeded.

``z(seed)`` is one random direction over an ordered list of tensors (a bundle's trainable tensors in
manifest order). :func:`perturb` applies ``theta_i += scale * z_i(seed)`` in place, regenerating ``z``
chunk by chunk, so the extra memory is one chunk (``CHUNK`` float32 values), never a copy of the
parameters: the "in-place perturbation with seed resampling" of MeZO (Malladi et al., NeurIPS 2023,
Algorithm 1). The coordinator regenerates the same ``z`` to expand a seed-and-scalar update (FedKSeed,
Qin et al., ICML 2024, eq. 4-5), so both sides must call this with the same seed, tensor order and shapes.

``z_i`` comes from ``SFC64(SeedSequence(seed, spawn_key=(i,)))``: it depends only on the seed and the
tensor's position, not on the other tensors or on chunking. Distributions (both have E[z z^T] = I, so the
SPSA estimate ``g * z`` is unbiased for the smoothed gradient):

- ``"rademacher"``: entries uniform in {-1, +1} (Spall 1992's SPSA; the smallest fourth moment of any
  unit-variance choice, hence the lowest-variance estimate); 64 entries per 64-bit draw.
- ``"gaussian"``: entries N(0, 1) in float32 (MeZO's and FedKSeed's choice); ~10x slower to generate.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np

from device_runtime.errors import ConfigError

Distribution = Literal["rademacher", "gaussian"]
DISTRIBUTIONS: tuple[Distribution, ...] = ("rademacher", "gaussian")
CHUNK = 1 << 16  # float32 values per generated block (256 KiB: stays in L2); a multiple of 64


def _generator(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence(seed, spawn_key=key)))


def _check(distribution: str, seed: int) -> None:
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")


def _add(flat: np.ndarray, rng: np.random.Generator, scale: float, distribution: str, scratch: np.ndarray) -> None:
    """``flat += scale * z`` with ``z`` drawn from ``rng`` chunk by chunk (``flat``: a writable float32 view)."""
    signs = np.array([-scale, scale], np.float32)
    for start in range(0, flat.size, CHUNK):
        part = flat[start : start + CHUNK]
        z = scratch[: part.size]
        if distribution == "rademacher":
            bits = np.unpackbits(
                rng.bit_generator.random_raw(-(-part.size // 64)).view(np.uint8), count=part.size, bitorder="little"
            )
            np.take(signs, bits, out=z)
        else:
            rng.standard_normal(out=z, dtype=np.float32)
            z *= np.float32(scale)
        part += z


def _writable(tensor: np.ndarray, index: int) -> np.ndarray:
    if tensor.dtype != np.float32 or not tensor.flags.c_contiguous or not tensor.flags.writeable:
        raise ConfigError(f"tensor {index} must be a writable C-contiguous float32 array")
    return tensor.reshape(-1)


def perturb(tensors: Sequence[np.ndarray], seed: int, scale: float, *, distribution: str = "rademacher") -> None:
    """``tensors[i] += scale * z_i(seed)`` in place, for every tensor.

    Args:
        tensors: writable, C-contiguous float32 arrays (any shapes), in the canonical order.
        seed: non-negative integer seed of the direction. scale: the multiplier (e.g. MeZO's ``eps``).
        distribution: ``"rademacher"`` or ``"gaussian"``.

    Raises:
        ConfigError: an unknown distribution, a negative seed, or a tensor that is not writable contiguous
            float32.
    """
    _check(distribution, seed)
    scratch = np.empty(CHUNK, np.float32)
    for index, tensor in enumerate(tensors):
        _add(_writable(tensor, index), _generator(seed, index), scale, distribution, scratch)


def row_key(name: str) -> int:
    """The stable integer key of a tensor name in :func:`perturb_rows` (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(name.encode())


def perturb_rows(
    tensors: Sequence[tuple[str, np.ndarray, Sequence[int]]],
    seed: int,
    scale: float,
    *,
    distribution: str = "rademacher",
) -> None:
    """``tensor[j] += scale * z(seed; name, rows[j])`` in place for each ``(name, tensor, rows)``: a direction
    over the GLOBAL model's expert rows, of which each holder regenerates only the rows it holds.

    Row ``g`` of the global tensor ``name`` (expert axis 0) draws from ``SeedSequence(seed, spawn_key=(
    row_key(name), g))``, independent of which other rows or tensors a peer holds: devices holding different
    experts and the coordinator holding all of them see the same ``z`` on the rows they share (HO-SFL's shared
    perturbations, Chen et al., ICML 2026, across heterogeneous expert subsets).

    Args:
        tensors: ``(global tensor name, writable C-contiguous float32 array (R, ...), R global row ids)``.
        seed: non-negative seed of the direction. scale: the multiplier.

    Raises:
        ConfigError: as :func:`perturb`, or a row-id list whose length is not the array's first dimension.
    """
    _check(distribution, seed)
    scratch = np.empty(CHUNK, np.float32)
    for index, (name, tensor, rows) in enumerate(tensors):
        flat = _writable(tensor, index)
        if tensor.ndim < 1 or len(rows) != tensor.shape[0]:
            raise ConfigError(f"{name}: {len(rows)} row ids for an array of shape {tensor.shape}")
        width = flat.size // max(1, tensor.shape[0])
        for j, row in enumerate(rows):
            rng = _generator(seed, row_key(name), int(row))
            _add(flat[j * width : (j + 1) * width], rng, scale, distribution, scratch)


def candidate_seeds(seed: int, round_id: int, count: int) -> tuple[int, ...]:
    """The round's ``count`` candidate seeds (FedKSeed's K seeds shared by server and clients), 63-bit.

    Both sides derive them from the round's FitConfig ``seed`` and the round id, so they never travel.
    """
    state = np.random.SeedSequence([seed, round_id]).generate_state(count, np.uint64)
    return tuple(int(s) >> 1 for s in state)


def direction(shapes: Sequence[tuple[int, ...]], seed: int, *, distribution: str = "rademacher") -> list[np.ndarray]:
    """``z(seed)`` materialised as new float32 arrays of ``shapes`` (tests and small tensors only)."""
    out = [np.zeros(shape, np.float32) for shape in shapes]
    perturb(out, seed, 1.0, distribution=distribution)
    return out
