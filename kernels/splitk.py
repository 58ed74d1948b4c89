"""Split-K for decode kernels without a zeroing pass or a cast pass.

The K range of a column tile is split over SPLIT_K programs (grid axis 1; axis 0 the column tile, axis 2
the token). Each stores its float32 partial in `partials` [SPLIT_K, M, N]; the last one of the tile to
finish (an int32 counter per (token, tile), left at 0 again for the next call) adds them up and writes
the output in its dtype. Against atomics into a zeroed float32 buffer this saves two kernel boundaries,
about a tenth of a 60 us GEMV on the H100 (reports/kernels/NOTES.md).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def store_result(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, SPLIT_K, BLOCK_N: tl.constexpr):
    """out[m, offs_n] = res summed over the SPLIT_K programs of this (token, column tile)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    out = out_ptr + m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=nmask)
    else:
        M = tl.num_programs(2)
        tl.store(partials + (pid_k * M + m) * N + offs_n, res, mask=nmask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        ticket = counters + m * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(ticket, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k in range(0, SPLIT_K):
                total += tl.load(partials + (k * M + m) * N + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=nmask)
            tl.atomic_xchg(ticket, 0)


def wave_splits(k_tiles: int, tiles: int, n_sm: int, per_sm=(2, 3, 4)) -> list[int]:
    """Split counts that make tiles x split about per_sm programs per SM (one wave), at most k_tiles."""
    return sorted({min(max(round(c * n_sm / tiles), 1), k_tiles) for c in per_sm})


_COUNTERS: dict = {}  # device -> int32 zeros, one arrival counter per (token, column tile); kernels leave them 0


def split_buffers(x2: torch.Tensor, N: int, split: int, block_n: int) -> tuple:
    """(out [M, N] in x2's dtype, partials, counters) for a launch over grid (cdiv(N, block_n), split, M)."""
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x2.dtype, device=x2.device)
    if split == 1:
        return out, out, out  # unused by the kernel
    n = M * triton.cdiv(N, block_n)
    counters = _COUNTERS.get(x2.device)
    if counters is None or counters.numel() < n:
        counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=x2.device)
        _COUNTERS[x2.device] = counters
    return out, torch.empty((split, M, N), dtype=torch.float32, device=x2.device), counters
