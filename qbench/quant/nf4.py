"""NF4 / FP4 blockwise 4-bit quantization (QLoRA, Dettmers et al. 2023) in bitsandbytes' layout.

Storage layout (identical bytes to `bitsandbytes.functional.quantize_4bit`; Triton kernels read this):
    W          the [out, in] weight, flattened row-major: element e = W[e // in, e % in]
    blocks     consecutive runs of `blocksize` elements of that flat order (blocksize = group_size,
               default 64); a block may span two rows when in % blocksize != 0; the last block is
               shorter when out*in % blocksize != 0
    absmax     float32 [n_blocks]: max |W| over the block (0 for an all-zero block)
    codes      4-bit index into the 16-entry code book of the scaled value W * (1/absmax) (W / absmax
               in a short last block; clamped to [-1, 1]): nearest entry, ties to the lower (`encode`)
    packed     uint8 [ceil(out*in/2), 1]: element 2i in the HIGH nibble of byte i, element 2i+1 in
               the LOW nibble; an odd element count is padded with the code of 0.0
    dequant    W[e] = code_book[code[e]] * absmax[e // blocksize], computed in float32, then cast
Double quantization (`double_quant=True`, QLoRA section 3): the float32 absmax vector is replaced by
    offset     float32 scalar: mean(absmax)
    absmax     uint8 [n_blocks]: `DYNAMIC_MAP` codes of (absmax - offset), in blocks of 256
               (chosen as bitsandbytes' CPU quantizer does, see `quantize_dynamic`)
    absmax2    float32 [ceil(n_blocks/256)]: max |absmax - offset| per block of 256
    so absmax[b] = DYNAMIC_MAP[absmax_codes[b]] * absmax2[b // 256] + offset (float32).
The code books: NF4 values are the normal-quantile table of the QLoRA paper, listed in code order
(0 = -1.0, 7 = 0.0, 15 = 1.0). FP4 is bitsandbytes' e2m1 format with exponent bias 2 and no
inf/nan: code = sign bit (8) | 3 magnitude bits, magnitudes {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12.
FP4 has two zero codes (0 and 8). Nearest-value encoding on the sorted book with +0 before -0
(bitsandbytes' CPU quantizer) gives code 8 to (0, 0.0026*absmax] and code 0 to (-0.0026*absmax, 0];
bitsandbytes' CUDA kernel picks the zero by sign instead. Both decode to 0.
The layout is checked byte for byte against bitsandbytes 0.50 on the CPU in tests/test_nf4.py.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from qbench.quant.kernel_choice import use_triton

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # those bitsandbytes accepts
DQ_BLOCKSIZE = 256  # double-quantization block of absmax values

NF4_VALUES = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
_FP4_MAGNITUDES = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]  # e2m1, bias 2, by the 3 low bits


def code_book(quant_type: str) -> torch.Tensor:
    """float32 [16]: the value of each 4-bit code, normalized to max |value| = 1."""
    if quant_type == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if quant_type == "fp4":
        mags = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
        return torch.cat([mags, -mags]) / 12.0
    raise ValueError(f"unknown 4-bit type {quant_type!r}; valid: nf4, fp4")


def dynamic_map() -> torch.Tensor:
    """float32 [256]: the signed 8-bit dynamic tree map (Dettmers 2016) used for double quantization.

    For exponent i = 0..6 the positive half holds the 2**i midpoints of linspace(0.1, 1, 2**i + 1)
    scaled by 10**(i - 6), mirrored for the negative half; plus 0 and 1.0; sorted ascending.
    """
    values = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist() + (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


@lru_cache(maxsize=None)
def _on_device(name: str, device: torch.device) -> torch.Tensor:
    """A code book / map copied once per device (read-only use)."""
    return (DYNAMIC_MAP if name == "dynamic" else code_book(name)).to(device)


def _block_scaled(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax of a flat float32 tensor and the values scaled into [-1, 1].

    Full blocks are scaled by multiplying with 1/absmax, the short last block by dividing by it:
    the exact float32 operations of bitsandbytes' quantizer, so the codes agree bit for bit.
    """
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].view(-1, blocksize)
    absmax = body.abs().amax(dim=1)
    scaled = [torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)]
    if full < n:
        tail_max = flat[full:].abs().max()
        absmax = torch.cat([absmax, tail_max[None]])
        scaled.append(torch.clamp(flat[full:] / tail_max.clamp(min=1e-38), -1, 1))
    return absmax, torch.cat(scaled)


def encode(scaled: torch.Tensor, book: torch.Tensor) -> torch.Tensor:
    """Nearest code of each value in [-1, 1] (ties to the lower value); int64 codes."""
    order = torch.argsort(book, stable=True)  # identity for NF4; for FP4 puts +0 (code 0) before -0
    sorted_book = book[order]
    midpoints = (sorted_book[:-1] + sorted_book[1:]) / 2
    return order[torch.bucketize(scaled, midpoints)]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Flat codes (even count) -> uint8 [count/2, 1], first code in the high nibble."""
    c = codes.to(torch.uint8)
    return ((c[0::2] << 4) | c[1::2])[:, None]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()


_GRID = 65536  # points of bitsandbytes' CPU lookup grid for 8-bit blockwise quantization


def _grid_codes(book: torch.Tensor) -> torch.Tensor:
    """Nearest entry of a sorted map (ties to the lower) for each of the 65536 grid points -1 + 2i/65535."""
    midpoints = (book[:-1] + book[1:]) * 0.5
    grid = -1.0 + (2.0 * torch.arange(_GRID, dtype=torch.float32)) / (_GRID - 1)
    return torch.searchsorted(midpoints, grid).to(torch.uint8)  # = number of midpoints below the point


DYNAMIC_GRID_CODES = _grid_codes(DYNAMIC_MAP)


def quantize_dynamic(x: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a flat float32 tensor onto DYNAMIC_MAP, as bitsandbytes' CPU does it.

    Each value is multiplied by 1/absmax of its block, snapped to the nearest of 65536 grid points on
    [-1, 1] (index = trunc((v + 1) / 2 * 65535 + 0.5)), and takes that grid point's nearest map entry.
    (A direct nearest-entry search differs only for values within 1.5e-5 of a midpoint between two
    entries.) An all-zero block gets absmax 0 and codes 0. Returns uint8 codes [n], float32 absmax.
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x.float(), (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = torch.clamp(padded * inv[:, None], -1, 1)
    grid_index = ((normed + 1.0) * 0.5 * (_GRID - 1) + 0.5).long()
    codes = DYNAMIC_GRID_CODES.to(x.device)[grid_index]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def dequantize_dynamic(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    values = _on_device("dynamic", codes.device)[codes.long()]
    return values * absmax.repeat_interleave(blocksize)[: values.numel()]


@dataclass
class Quantized4bit:
    """A 4-bit weight in the layout of the module docstring."""

    packed: torch.Tensor  # uint8 [ceil(n/2), 1]
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 [n_blocks] codes when double-quantized
    shape: tuple
    blocksize: int
    quant_type: str
    absmax2: torch.Tensor | None = None  # float32 [ceil(n_blocks/256)] (double quant)
    offset: torch.Tensor | None = None  # float32 scalar (double quant)

    def block_absmax(self) -> torch.Tensor:
        """float32 [n_blocks] absmax, decoded from the double quantization when there is one."""
        if self.absmax2 is None:
            return self.absmax
        return dequantize_dynamic(self.absmax, self.absmax2) + self.offset

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_4bit(self.packed, self.block_absmax(), self.quant_type, self.blocksize, self.shape, dtype)


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                  double_quant: bool = False) -> Quantized4bit:
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} not supported; valid: {', '.join(map(str, BLOCKSIZES))}")
    flat = weight.detach().reshape(-1).float()
    absmax, scaled = _block_scaled(flat, blocksize)
    codes = encode(torch.nn.functional.pad(scaled, (0, scaled.numel() % 2)), code_book(quant_type).to(flat.device))
    q = Quantized4bit(pack_nibbles(codes), absmax, tuple(weight.shape), blocksize, quant_type)
    if double_quant:
        q.offset = absmax.mean()
        q.absmax, q.absmax2 = quantize_dynamic(absmax - q.offset)
    return q


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, shape,
                    dtype=torch.float32) -> torch.Tensor:
    n = int(torch.Size(shape).numel())
    values = _on_device(quant_type, packed.device)[unpack_nibbles(packed, n)]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).view(shape).to(dtype)


class Linear4bit(nn.Module):
    """A linear layer with NF4/FP4 weights (buffers named as in the layout above)."""

    def __init__(self, q: Quantized4bit, bias: torch.Tensor | None, compute_dtype=None, kernel: str = "auto"):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.quant_type, self.blocksize, self.kernel = q.quant_type, q.blocksize, kernel
        self.compute_dtype = compute_dtype  # None: the input's dtype
        self.register_buffer("packed", q.packed)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax2", q.absmax2)
        self.register_buffer("offset", q.offset)
        self.offset_value = None if q.offset is None else float(q.offset)  # for kernels, without a device sync
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str, blocksize: int, double_quant: bool,
                    compute_dtype=None, kernel: str = "auto") -> "Linear4bit":
        q = quantize_4bit(linear.weight.data, quant_type, blocksize, double_quant)
        return cls(q, linear.bias, compute_dtype, kernel)

    def quantized(self) -> Quantized4bit:
        return Quantized4bit(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                             self.quant_type, self.absmax2, self.offset)

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.quantized().dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype or x.dtype
        xc = x.to(dtype)
        y = self.forward_triton(xc) if use_triton(self.kernel, xc) else self.forward_torch(xc)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path: dequantize to x's dtype (the compute dtype), one matmul."""
        return nn.functional.linear(x, self.dequantize(x.dtype))

    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """THE Triton path of 4-bit layers (qbench.kernels.nf4_matmul, same layout)."""
        from qbench.kernels import nf4_matmul

        double = self.absmax2 is not None
        return nf4_matmul(x, self.packed, self.absmax, _on_device(self.quant_type, x.device), self.out_features,
                          self.blocksize, self.absmax2, _on_device("dynamic", x.device) if double else None,
                          self.offset_value if double else 0.0)

    def weight_bits(self) -> float:
        """Stored bits per weight, code book excluded."""
        n = self.out_features * self.in_features
        extra = self.absmax.numel() * self.absmax.element_size() * 8
        if self.absmax2 is not None:
            extra += self.absmax2.numel() * 32 + 32
        return (self.packed.numel() * 8 + extra) / n

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.absmax2 is not None}, compute_dtype={self.compute_dtype}")
