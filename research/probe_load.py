"""Probe: how fast can a Triton program with wint_h2's tiling just stream the packed 4-bit words?

    python -m research.probe_load

Each program reads its [BLOCK_K/8, BLOCK_N] int32 tiles over its split of K (the decode kernel's
grid, loads pipelined with tl.range(num_stages)) and XORs them together, so the time is the load
structure alone, without the dequantization; compared with the copy bandwidth and the real kernel.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.tune import gpu_time_ms


@triton.jit
def stream_words(q, out, N, K_ROWS, SPLIT, BLOCK_N: tl.constexpr, ROWS: tl.constexpr, STAGES: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tiles = K_ROWS // ROWS
    per = tl.cdiv(tiles, SPLIT)
    start = tl.program_id(1) * per
    end = tl.minimum(start + per, tiles)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.int32)
    for t in tl.range(start, end, num_stages=STAGES):
        rows = t * ROWS + tl.arange(0, ROWS)
        acc ^= tl.load(q + rows[:, None] * N + offs_n[None, :])
    tl.store(out + tl.program_id(1) * N + offs_n, tl.sum(acc, axis=0))


def main() -> None:
    dev = torch.device("cuda")
    src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_ms = gpu_time_ms(lambda: dst.copy_(src))
    print(f"{torch.cuda.get_device_name()}: copy {2 * src.numel() / copy_ms / 1e6:.0f} GB/s")
    del src, dst
    for K, N in ((8192, 28672), (28672, 8192)):
        q = torch.randint(-2**31, 2**31 - 1, (K // 8, N), dtype=torch.int32, device=dev)
        mb = q.numel() * 4 / 1e6
        res = []
        for bn, warps in ((512, 4), (1024, 8), (256, 4), (1024, 4)):
            for split in sorted({max(round(c * 132 / (N // bn)), 1) for c in (2, 3, 4, 6, 8)}):
                for stages in (2, 3, 4, 6):
                    out = torch.empty(split, N, dtype=torch.int32, device=dev)
                    def call():
                        stream_words[(N // bn, split)](q, out, N, K // 8, split, BLOCK_N=bn, ROWS=8, STAGES=stages,
                                                       num_warps=warps)
                    try:
                        ms = gpu_time_ms(call)
                    except Exception as e:  # shared memory overflow at deep pipelines
                        print(f"  skip bn{bn} w{warps} s{stages}: {type(e).__name__}")
                        continue
                    res.append((ms, bn, warps, split, stages))
        res.sort()
        print(f"K={K} N={N}: 4-bit words {mb:.0f} MB")
        for ms, bn, warps, split, stages in res[:10]:
            print(f"  {ms:.4f} ms  {mb / ms:.0f} GB/s  BLOCK_N {bn} warps {warps} split {split} stages {stages}")


if __name__ == "__main__":
    main()
