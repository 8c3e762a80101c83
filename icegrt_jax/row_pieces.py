"""Rows cut into pieces that keep their devices.

``strided_pieces(x, n)``: ``[R, ...] -> [n, R / n, ...]``, piece ``i`` holding rows ``i, i + n,
i + 2n, ...``; ``merge_pieces`` is its inverse. Rows laid out over data-parallel devices in
contiguous blocks stay on their devices whenever ``n`` x devices divides ``R``: block boundaries
fall on multiples of ``n``, so each block holds its share of every piece, at the piece positions
that block owns. Contiguous pieces would put the row sharding on the piece axis and compile to
all-to-alls and permutes that move rows between devices (the sharded checks count them).
"""

from __future__ import annotations

import jax


def strided_pieces(x: jax.Array, n: int) -> jax.Array:
    """``[R, ...] -> [n, R / n, ...]`` with ``out[i, j] = x[i + j * n]``."""
    if x.shape[0] % n:
        raise ValueError(f"{x.shape[0]} rows do not split into {n} equal pieces")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)


def merge_pieces(pieces: jax.Array) -> jax.Array:
    """``strided_pieces``' inverse: ``[n, R / n, ...] -> [R, ...]``."""
    return pieces.swapaxes(0, 1).reshape(-1, *pieces.shape[2:])
