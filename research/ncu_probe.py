"""Three launches each of the W4A16 decode kernel and of the load-only probe, for Nsight Compute.

    ncu --launch-skip 2 --launch-count 1 -k regex:wint_h2 --section SpeedOfLight --section SchedulerStats \
        --section Occupancy python3 -m research.ncu_probe      # (-k regex:stream_words: the probe)

8192x28672 at M=1, the config the tuner chose on the H200 (reports/kernels/NOTES.md quotes the result).
"""

import torch

from research.decode_sweep import packed_weights
from research.probe_load import stream_words
from qbench.kernels.wint_h2 import run_h2_decode

CONFIG = {"KERNEL": "wint_h2", "BLOCK_N": 512, "BLOCK_K": 64, "SPLIT_K": 7, "CHAIN": 2, "STAGES": 3, "num_warps": 4,
          "num_stages": 1, "IN_PLACE": True}


def main() -> None:
    dev = torch.device("cuda")
    K, N = 8192, 28672
    qweight, qzeros, scales, _ = packed_weights(K, N, 4, 128, dev)
    x = torch.randn(1, K, device=dev, dtype=torch.float16)
    for _ in range(3):
        run_h2_decode(CONFIG, x, qweight, qzeros, scales, 4, 128, N)
    out = torch.empty(7, N, dtype=torch.int32, device=dev)
    for _ in range(3):
        stream_words[(N // 512, 7)](qweight, out, N, K // 8, 7, BLOCK_N=512, ROWS=8, STAGES=2, num_warps=4)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
