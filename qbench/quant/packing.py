"""Bit packing of integer codes into int32 words, the GPTQ checkpoint convention.

Codes are laid out as a little-endian bit stream along dimension 0: code i occupies bits
[i*bits, (i+1)*bits) of the stream, word w holds stream bits [32w, 32w+32), bit 0 being the least
significant. For 2, 4 and 8 bits this is "code i at shift (i % (32/bits)) * bits of word
i // (32/bits)"; for 3 bits it is the GPTQ reference's 32-codes-in-3-words packing, where codes
may straddle two words. The stream is zero-padded to whole words.
"""

import torch

_U32 = 0xFFFFFFFF


def packed_rows(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] integer codes -> [ceil(n*bits/32), m] int32 words."""
    n = codes.shape[0]
    c = codes.to(torch.int64) & ((1 << bits) - 1)
    offset = torch.arange(n, device=codes.device) * bits
    word, shift = offset // 32, (offset % 32)[:, None]
    words = torch.zeros((packed_rows(n, bits) + 1, *codes.shape[1:]), dtype=torch.int64, device=codes.device)
    words.index_add_(0, word, (c << shift) & _U32)  # codes never overlap, so add == or
    words.index_add_(0, word + 1, c >> (32 - shift))  # the part that spills into the next word
    words = words[:-1]
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement view of uint32


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_rows: [ceil(n*bits/32), m] int32 -> [n, m] int32 codes."""
    w = words.to(torch.int64) & _U32
    w = torch.cat([w, torch.zeros_like(w[:1])])
    offset = torch.arange(n, device=words.device) * bits
    word, shift = offset // 32, (offset % 32)[:, None]
    value = (w[word] >> shift) | (w[word + 1] << (32 - shift))
    return (value & ((1 << bits) - 1)).to(torch.int32)


def pack_cols(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[m, n] codes packed along dimension 1 (the qzeros layout) -> [m, ceil(n*bits/32)] int32."""
    return pack_rows(codes.T, bits).T.contiguous()


def unpack_cols(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return unpack_rows(words.T, bits, n).T.contiguous()
