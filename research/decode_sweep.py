"""Time every candidate config of an integer decode kernel on one GPU.

    python -m research.decode_sweep [--bits 4,3] [--shapes 8192x28672,28672x8192] [--group 128]
    python -m research.decode_sweep --pairings --bits 4,3           # BYTE_PAIRS vs IN_PLACE (wint_h2)
    python -m research.decode_sweep --tc --m 16 --bits 4 --wide     # kernels/wint_tc.py
    python -m research.decode_sweep --mma --m 16 --bits 4           # kernels/wint_mma.py (Hopper, Gluon)

For each (bits, shape) at M tokens (the fp16x2 kernel of kernels/wint_h2.py at M=1 by default):
random packed weights, each candidate checked against a torch dequantize-then-matmul reference, then
its GPU time (kernels/tune.gpu_time_ms, L2 flushed); prints the candidates sorted by time and the fp16
matmul time of the same shape. A tool for choosing the tuner's candidate list, not part of the report.
"""

import argparse

import torch

from qbench.kernels.matmul import sm_count
from qbench.kernels.splitk import wave_splits
from qbench.kernels.tune import gpu_time_ms
from qbench.kernels.wint_h2 import h2_decode_configs, run_h2_decode
from qbench.kernels.wint_mma import mma_configs, run_mma
from qbench.kernels.wint_tc import run_tc, tc_configs
from qbench.quant.packing import pack_cols, pack_rows


def wide_grid(N: int, K: int, bits: int, group: int, n_sm: int) -> list[dict]:
    """More configs than the tuner tries: tile, warps, programs per SM, pipeline depth, pairing."""
    per = 32 if bits == 3 else 32 // bits
    chain = 1 if bits == 3 else 2
    out = []
    for bn, bk, warps in ((512, 64, 8), (1024, 64, 8), (512, 128, 8), (256, 128, 8), (512, 64, 4), (256, 64, 4)):
        if group % bk or bk // per < chain:
            continue
        for split in wave_splits(-(-K // bk), -(-N // bn), n_sm, (2, 3, 4, 6, 8)):
            for stages in (1, 2, 3, 4):
                for bp in ((False, True) if bits in (4, 8) else (False,)):
                    out.append({"KERNEL": "wint_h2", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "CHAIN": chain,
                                "STAGES": stages, "BYTE_PAIRS": bp, "num_warps": warps, "num_stages": 1})
    return out


PAIRING_TILES = ((512, 64, 4), (1024, 64, 4), (1024, 64, 8))  # (columns, K rows, warps)


def pairing_grid(N: int, K: int, bits: int, group: int, n_sm: int, tiles=PAIRING_TILES,
                 per_sm=(2, 3, 4)) -> list[dict]:
    """The ways of pairing codes and inputs (none, BYTE_PAIRS, IN_PLACE) on tiles (columns, K rows, warps;
    default the 4-warp tiles of 512 and 1024 columns and the 8-warp tile of 1024), with the tuner's
    pipeline depths and splits for per_sm programs per SM."""
    per = 32 if bits == 3 else 32 // bits
    chain = 1 if bits == 3 else 2
    pairings = {3: ({}, {"IN_PLACE": True}), 4: ({"BYTE_PAIRS": True}, {"IN_PLACE": True})}
    out = []
    for bn, bk, warps in tiles:
        if group % bk or bk // per < chain:
            continue
        for split in wave_splits(-(-K // bk), -(-N // bn), n_sm, per_sm):
            for stages in (2, 3):
                for pairing in pairings.get(bits, ({},)):
                    out.append({"KERNEL": "wint_h2", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "CHAIN": chain,
                                "STAGES": stages, "num_warps": warps, "num_stages": 1, **pairing})
    return out


def wide_tc_grid(N: int, K: int, group: int, n_sm: int) -> list[dict]:
    """More wint_tc configs than the tuner tries: tile, warps, pipeline depth, programs per SM."""
    out = []
    for bn, bk, warps in ((64, 64, 4), (64, 128, 4), (128, 64, 4), (128, 64, 8), (128, 128, 4), (128, 128, 8),
                          (256, 64, 8), (256, 128, 8)):
        if K % bk or group % bk:
            continue
        for split in wave_splits(K // bk, -(-N // bn), n_sm, (2, 3, 4, 6, 8)):
            for stages in (2, 3, 4):
                out.append({"KERNEL": "wint_tc", "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split, "STAGES": stages,
                            "num_warps": warps, "num_stages": 1})
    return out


def packed_weights(K: int, N: int, bits: int, group: int, dev):
    """Random GPTQ-layout tensors and the fp32 [N, K] weight they encode."""
    G = K // group
    codes = torch.randint(0, 1 << bits, (K, N), device=dev, dtype=torch.int64)
    zeros = torch.randint(0, 1 << bits, (G, N), device=dev, dtype=torch.int64)
    scales = (torch.rand(G, N, device=dev) * 0.02 + 0.001).half()

    qweight, qzeros = pack_rows(codes, bits), pack_cols(zeros, bits)
    w = ((codes.float() - zeros.float().repeat_interleave(group, 0)) * scales.float().repeat_interleave(group, 0)).T
    return qweight, qzeros, scales, w


def tile_args(args) -> tuple:
    """(tiles, per_sm) of pairing_grid from --tiles and --per-sm."""
    tiles = tuple(tuple(map(int, t.split("x"))) for t in args.tiles.split(",")) if args.tiles else PAIRING_TILES
    if any(len(t) != 3 for t in tiles):
        raise ValueError("a tile has three numbers")
    return tiles, tuple(map(int, args.per_sm.split(",")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--shapes", default="8192x28672,28672x8192")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--wide", action="store_true", help="a wider grid than the tuner's candidates")
    ap.add_argument("--pairings", action="store_true", help="the code/input pairings of kernels/wint_h2.py, side by side")
    ap.add_argument("--tiles", default="", help="with --pairings: tiles as COLSxKROWSxWARPS,... (e.g. 128x64x1)")
    ap.add_argument("--per-sm", default="2,3,4", help="with --pairings: programs per SM the splits aim at")
    ap.add_argument("--only", default="", help="with --pairings: one pairing only (IN_PLACE, BYTE_PAIRS)")
    ap.add_argument("--tc", action="store_true", help="the tensor-core kernel (kernels/wint_tc.py, 4 bits, 2-16 tokens)")
    ap.add_argument("--mma", action="store_true", help="the Gluon tensor-core kernel (kernels/wint_mma.py, Hopper)")
    ap.add_argument("--m", type=int, default=1, help="tokens")
    args = ap.parse_args(argv)
    try:
        tiles = tile_args(args)
    except ValueError:
        ap.error(f"--tiles {args.tiles!r} / --per-sm {args.per_sm!r}: use COLSxKROWSxWARPS,... and N,N,... (e.g. 512x64x4 / 2,3,4)")
    dev = torch.device("cuda")
    for bits in map(int, args.bits.split(",")):
        for K, N in (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")):
            qweight, qzeros, scales, w = packed_weights(K, N, bits, args.group, dev)
            x = torch.randn(args.m, K, device=dev, dtype=torch.float16)
            want = x.float() @ w.T
            wh = w.T.contiguous().half()
            fp16_ms = gpu_time_ms(lambda: x @ wh)
            results = []
            if args.mma:
                run = run_mma
                grid = mma_configs(args.m, N, K, bits, args.group, x.dtype, dev, sm_count(dev))
            elif args.tc:
                run = run_tc
                grid = wide_tc_grid(N, K, args.group, sm_count(dev)) if args.wide else \
                    tc_configs(args.m, N, K, bits, args.group, x.dtype, sm_count(dev))
            else:
                run = run_h2_decode
                grid = wide_grid(N, K, bits, args.group, sm_count(dev)) if args.wide else \
                    pairing_grid(N, K, bits, args.group, sm_count(dev), *tiles) if args.pairings else \
                    h2_decode_configs(args.m, N, K, bits, args.group, x.dtype, sm_count(dev))
            if args.only:
                grid = [c for c in grid if c.get(args.only)]
            for cfg in grid:
                y = run(cfg, x, qweight, qzeros, scales, bits, args.group, N)
                err = ((y.float() - want).norm() / want.norm()).item()
                if not err < 5e-3:
                    print(f"WRONG {err:.2e} {cfg}")
                    continue
                ms = gpu_time_ms(lambda: run(cfg, x, qweight, qzeros, scales, bits, args.group, N))
                results.append((ms, cfg))
            results.sort(key=lambda r: r[0])
            print(f"W{bits}A16 g{args.group} K={K} N={N} M={args.m}: fp16 matmul {fp16_ms:.4f} ms; {len(results)} configs")
            for ms, cfg in results[:args.top]:
                short = {k: v for k, v in cfg.items() if k not in ("KERNEL", "CHAIN", "num_stages")}
                print(f"  {ms:.4f} ms  x{fp16_ms / ms:.2f}  {short}", flush=True)
            del qweight, qzeros, scales, w, wh


if __name__ == "__main__":
    main()
