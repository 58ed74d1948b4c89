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
def tile_offsets(tile, size, BLOCK: tl.constexpr):
    """The offsets tile * BLOCK + [0, BLOCK) of a column or token tile, and which of them are < size."""
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < size


@triton.jit
def split_tiles(k_tiles, SPLIT_K):
    """K tiles [first, end) of this program's part (grid axis 1) when k_tiles are split over SPLIT_K programs."""
    pid_k = tl.program_id(1)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    return pid_k * per_split, tl.minimum(pid_k * per_split + per_split, k_tiles)


@triton.jit
def split_tile(k_tiles, SPLIT_K, N, BLOCK_N: tl.constexpr):
    """The decode kernels' split-K program (grid axis 0 the column tile, 1 the split): its K tiles [first, end),
    columns and their mask."""
    t_start, t_end = split_tiles(k_tiles, SPLIT_K)
    offs_n, nmask = tile_offsets(tl.program_id(0), N, BLOCK_N)
    return t_start, t_end, offs_n, nmask


@triton.jit
def token_tile_program(M, N, K, SPLIT_K, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tensor-core kernels' program (grid axis 0 the column tile, 1 the split, 2 the token tile): its
    columns and tokens with their masks, and its K tiles [first, end); their launchers make BLOCK_K divide K."""
    offs_n, nmask = tile_offsets(tl.program_id(0), N, BLOCK_N)
    offs_m, mmask = tile_offsets(tl.program_id(2), M, BLOCK_M)
    t_start, t_end = split_tiles(K // BLOCK_K, SPLIT_K)
    return offs_n, nmask, offs_m, mmask, t_start, t_end


@triton.jit
def store_or_add(ptrs, acc, mask, ATOMIC: tl.constexpr):
    """acc at ptrs: added into the float32 output that split-K programs share (ATOMIC; the launcher zeroes it
    and casts it after, split_output), else stored in the output's dtype."""
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask)
    else:
        tl.store(ptrs, acc.to(ptrs.dtype.element_ty), mask=mask)


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
def store_token_tile(out_ptr, acc, partials, counters, offs_n, nmask, offs_m, mmask, N, M, stride_om, SPLIT_K):
    """out[offs_m, offs_n] = acc^T, acc [BLOCK_N, BLOCK_M] (the tensor-core kernels' out^T tile; grid axis 0 the
    column tile, 1 the split, 2 the token tile), summed over the SPLIT_K programs of the tile."""
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    mask = nmask[:, None] & mmask[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ticket = counters + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
        merge_partial(out, acc, partials, offs_n[:, None], mask, N, M, offs_m[None, :], tl.program_id(1), SPLIT_K,
                      ticket)


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
def stream_tile(tile, start, end, k_tiles, N, BLOCK_N: tl.constexpr):
    """(first, end) K tile of column tile `tile` inside this program's span, the tile's columns and their mask."""
    lo, hi = stream_bounds(tile, start, end, k_tiles)
    offs_n, nmask = tile_offsets(tile, N, BLOCK_N)
    return lo, hi, offs_n, nmask


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


def decode_launch(cfg: dict, x2: torch.Tensor, N: int, k_tiles: int) -> tuple:
    """(out, partials, counters, grid, split) of a decode kernel launch over k_tiles K tiles: stream-K when
    cfg has STREAM (programs per token; split 1), else split-K over cfg's SPLIT_K (grid axis 1)."""
    M = x2.shape[0]
    stream = cfg.get("STREAM", 0)
    if stream:
        n_tiles = cdiv(N, cfg["BLOCK_N"])
        programs = min(stream, n_tiles * k_tiles)  # every program holds at least one unit
        out, partials, counters = split_buffers(x2, N, stream_slots(n_tiles, k_tiles, programs), cfg["BLOCK_N"])
        return out, partials, counters, (programs, 1, M), 1
    split = cfg["SPLIT_K"]
    out, partials, counters = split_buffers(x2, N, split, cfg["BLOCK_N"])
    return out, partials, counters, (cdiv(N, cfg["BLOCK_N"]), split, M), split


def quarter_splits(N: int, K: int, M: int, block_n: int, block_k: int, n_sm: int) -> list[int]:
    """Split counts around the one that gives about four programs per SM (the decode kernels of kernels/
    wint_decode.py and nf4_decode.py): that power of two, half of it, and 1."""
    k_tiles = cdiv(K, block_k)
    want = max(1, (4 * n_sm) // (cdiv(N, block_n) * M))
    split = min(1 << (want.bit_length() - 1), k_tiles)
    return sorted({1, max(split // 2, 1), split})


def h2_configs(kernel: str, bn: int, bk: int, warps: int, chain: int, splits: list[int], streams: list[int],
               **extra) -> list[dict]:
    """The fp16x2 decode kernels' configs of one tile: each split count, then each stream-K program count,
    with 2 and 3 pipelined stages each; `extra`: the kernel's own keys (pairing, MAXNREG)."""
    def one(split, stages):
        return {"KERNEL": kernel, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "CHAIN": chain, "STAGES": stages,
                "num_warps": warps, "num_stages": 1, **extra}
    return [one(s, st) for s in splits for st in (2, 3)] + [{**one(1, st), "STREAM": p} for p in streams for st in (2, 3)]


def split_output(x2: torch.Tensor, N: int, split: int) -> torch.Tensor:
    """The [M, N] output of a launch whose K range is split over `split` programs: float32 zeros that they add
    into (the launcher casts it after), or with one program an empty tensor in x2's dtype."""
    M = x2.shape[0]
    if split > 1:
        return torch.zeros((M, N), dtype=torch.float32, device=x2.device)
    return torch.empty((M, N), dtype=x2.dtype, device=x2.device)
