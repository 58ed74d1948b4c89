"""Split-K and stream-K for decode kernels without a zeroing pass or a cast pass.

Split-K: the K range of a column tile is split over SPLIT_K programs (grid axis 1; axis 0 the column
tile, axis 2 the token). Each stores its float32 partial in `partials` [SPLIT_K, M, N]; the last one of
the tile to finish (an int32 counter per (token, tile), left at 0 again for the next call) adds them up
and writes the output in its dtype. Against atomics into a zeroed float32 buffer this saves two kernel
boundaries, about a tenth of a 60 us GEMV on the H100 (reports/kernels/NOTES.md).

Stream-K: the (column tile, K tile) units of a token, column tile major, are cut into P equal ranges,
one per program (grid axis 0; program p holds units [p*U//P, (p+1)*U//P)), so that P = a whole number
of programs per SM gives every SM the same work whatever the number of column tiles (N = 28672 makes
7 x 2^k tiles, which no split count spreads evenly over 132 SMs). A program walks the tiles its range
touches; for each it stores a partial in slot (p - first owner of the tile) and the last owner to
arrive sums the tile's slots, as in split-K.
"""

import functools

import torch
import triton
import triton.language as tl

from qbench.kernels.tune import cdiv


@triton.jit
def merge_partial(out, res, partials, cols, mask, N, M, rows, slot, count, ticket):
    """Store res as partial `slot` of `count` for output rows `rows` (a token, or a [1, BLOCK_M] tensor of
    them) and columns `cols` of an [M, N] result; the last of the count to arrive (ticket: their int32
    counter) sums the partials into out and resets the counter."""
    tl.store(partials + (slot * M + rows) * N + cols, res, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter says so
    arrived = tl.atomic_add(ticket, 1, sem="acq_rel")
    if arrived == count - 1:
        total = tl.zeros_like(res)
        for k in range(0, count):
            total += tl.load(partials + (k * M + rows) * N + cols, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(out, total.to(out.dtype.element_ty), mask=mask)
        tl.atomic_xchg(ticket, 0)


@triton.jit
def store_result(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, SPLIT_K, BLOCK_N: tl.constexpr):
    """out[m, offs_n] = res summed over the SPLIT_K programs of this (token, column tile)."""
    m = tl.program_id(2)
    out = out_ptr + m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        ticket = counters + m * tl.num_programs(0) + tl.program_id(0)
        merge_partial(out, res, partials, offs_n, nmask, N, tl.num_programs(2), m, tl.program_id(1), SPLIT_K, ticket)


@triton.jit
def stream_owner(u, P, U):
    """The stream-K program whose range [p*U//P, (p+1)*U//P) holds unit u (U >= P, int64 scalars)."""
    return ((u + 1) * P - 1) // U


@triton.jit
def stream_span(n_tiles, k_tiles):
    """This program's units [start, end), the column tiles they touch [first_tile, end_tile), and the
    programs P and units U (int64)."""
    P = tl.num_programs(0).to(tl.int64)
    U = (n_tiles * k_tiles).to(tl.int64)
    start = tl.program_id(0) * U // P
    end = (tl.program_id(0) + 1) * U // P
    return start, end, (start // k_tiles).to(tl.int32), ((end - 1) // k_tiles + 1).to(tl.int32), P, U


@triton.jit
def stream_bounds(tile, start, end, k_tiles):
    """(first, end) K tile of column tile `tile` inside this program's span [start, end)."""
    base = (tile * k_tiles).to(tl.int64)
    return (tl.maximum(start, base) - base).to(tl.int32), (tl.minimum(end, base + k_tiles) - base).to(tl.int32)


@triton.jit
def store_stream(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, tile, n_tiles, k_tiles, P, U,
                 BLOCK_N: tl.constexpr):
    """out[m, offs_n] of column tile `tile` = res summed over the tile's stream-K owners (this program is
    one of them). The owners are worked out here, after the K loop: held across it they cost registers
    (ptxas gave the NF4 kernel 153 instead of 96, offline sm_90)."""
    base = (tile * k_tiles).to(tl.int64)
    first = stream_owner(base, P, U)
    last = stream_owner(base + k_tiles - 1, P, U)
    m = tl.program_id(2)
    out = out_ptr + m * stride_om + offs_n
    if first == last:
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        ticket = counters + m * n_tiles + tile
        merge_partial(out, res, partials, offs_n, nmask, N, tl.num_programs(2), m, tl.program_id(0) - first,
                      last - first + 1, ticket)


@functools.lru_cache(maxsize=None)
def stream_slots(n_tiles: int, k_tiles: int, programs: int) -> int:
    """Most stream-K owners of one column tile: the partial slots a launch needs."""
    units = n_tiles * k_tiles
    owner = lambda u: ((u + 1) * programs - 1) // units  # noqa: E731  (stream_owner)
    return max(owner((t + 1) * k_tiles - 1) - owner(t * k_tiles) + 1 for t in range(n_tiles))


def wave_splits(k_tiles: int, tiles: int, n_sm: int, per_sm=(2, 3, 4)) -> list[int]:
    """Split counts that make tiles x split about per_sm programs per SM (one wave), at most k_tiles."""
    return sorted({min(max(round(c * n_sm / tiles), 1), k_tiles) for c in per_sm})


_COUNTERS: dict = {}  # device -> int32 zeros, one arrival counter per (token, column tile); kernels leave them 0


def split_buffers(x2: torch.Tensor, N: int, split: int, block_n: int) -> tuple:
    """(out [M, N] in x2's dtype, partials, counters) for a launch over grid (cdiv(N, block_n), split, M)."""
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    n = M * cdiv(N, block_n)
    counters = _COUNTERS.get(x2.device)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=x2.device)
        _COUNTERS[x2.device] = counters
    # One slot: no partials are read, but stream-K compiles its merge branch (the owner count is only
    # known at run time), so the counters stay int32 (triton 3.6 has no fp16 atomic_xchg).
    partials = out if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x2.device)
    return out, partials, counters
