"""Triton device functions that dequantize one [BLOCK_K, BLOCK_N] tile of W^T from its packed bytes.

Each returns float32 values of W[n, k] laid out as tile[k - k0, n - n0], for the input channels offs_k
and output channels offs_n (K = in_features, N = out_features). Lanes outside the matrix read nothing
(masked) and may hold any finite value: the matmul skeleton zeroes the activations there.

Layouts (never changed here; the packing code of each format is the reference):
- WINT (RTN/GPTQ/AWQ, qbench/quant/qlinear.py): qweight [ceil(K*bits/32), N] int32, a little-endian
  bit stream of codes along K (3/5/6/7-bit codes straddle words); qzeros [G, ceil(N*bits/32)] int32,
  the same stream along N (no -1 offset); scales [G, N] fp16; g_idx [K] int32.
  W[n, k] = (q[k, n] - z[g, n]) * s[g, n] with g = g_idx[k].
- NF4/FP4 (bitsandbytes): codes uint8 [ceil(N*K/2)], the row-major [N, K] weight flattened, two
  codes a byte, element 2i in the HIGH nibble; lut float32 [16] (the NF4 or FP4 table); absmax
  float32 [ceil(N*K/blocksize)] per block of `blocksize` consecutive flat elements, or with double
  quant uint8 codes into code2 (float32 [256], bnb's dynamic map) scaled by absmax2 float32 per 256
  blocks plus `offset`. W = lut[code] * absmax[block].
- GGUF (ggml): raw uint8 [N, K/block_elems*block_bytes], each row a run of ggml blocks.
  Q4_0: 18 B = fp16 d, 16 B nibbles (element j low nibble of byte j, element j+16 high nibble);
        W = d * (q - 8).  Q8_0: 34 B = fp16 d, 32 int8; W = d * q.
  Q4_K: 144 B per 256 elements = fp16 d, fp16 dmin, 12 B of 6-bit scales/mins (8 sub-blocks of 32),
        128 B nibbles (element e: byte 32*(e//64) + e%32, high nibble when e%64 >= 32);
        W = d * sc[e//32] * q - dmin * m[e//32].
  Q4_1: 20 B = fp16 d, fp16 m, 16 B nibbles as Q4_0; W = d * q + m.
  Q5_0: 22 B = fp16 d, 4 B qh (bit e: bit 4 of element e's code), 16 B nibbles as Q4_0; W = d * (q - 16).
  Q5_1: 24 B = fp16 d, fp16 m, 4 B qh, 16 B nibbles; W = d * q + m.
  Q5_K: 176 B per 256 = fp16 d, fp16 dmin, 12 B scales/mins as Q4_K, 32 B qh (bit e//32 of byte e%32:
        bit 4 of the code), 128 B nibbles as Q4_K; W = d * sc * q - dmin * m.
  Q6_K: 210 B per 256 = 128 B ql (low 4 bits), 64 B qh (2 high bits), 16 int8 scales, fp16 d. For
        e = 128 h + 32 j + l (j < 4, l < 32): ql byte 64 h + l + 32 (j % 2), high nibble when j >= 2;
        qh byte 32 h + l, bits 2j..2j+1; scale 8 h + l // 16 + 2 j; W = d * scale * (q - 32).
  Q2_K: 84 B per 256 = 16 B scales (low nibble scale, high nibble min), 64 B 2-bit codes, fp16 d,
        fp16 dmin. For e = 128 h + 32 j + 16 t + l (j < 4, t < 2, l < 16): code byte 32 h + 16 t + l,
        bits 2j..2j+1; s = scales[8 h + 2 j + t]; W = d * (s & 15) * q - dmin * (s >> 4).
  Q3_K: 110 B per 256 = 32 B hmask, 64 B 2-bit codes (as Q2_K), 12 B of 6-bit scales, fp16 d. Code
        q - 4 unless bit 4 h + j of hmask[16 t + l] is set; scale c = 8 h + 2 j + t: low 4 bits of byte
        c % 4 + 4 (c // 4 % 2) (high nibble when c >= 8), high 2 bits from byte 8 + c % 4 at bit
        2 (c // 4); W = d * (scale - 32) * q.
"""

import triton
import triton.language as tl

Q4_0, Q8_0, Q4_K, Q4_1, Q5_0, Q5_1, Q5_K, Q6_K, Q2_K, Q3_K = range(10)  # GGUF types of dequant_gguf


@triton.jit
def stream_bits(base, index, stride, n_words, mask, BITS: tl.constexpr):
    """Code number `index` of a little-endian bit stream of BITS-bit codes in int32 words at base + word*stride,
    as uint32."""
    bit = index * BITS
    word = bit >> 5
    shift = (bit & 31).to(tl.uint32)
    v = tl.load(base + word * stride, mask=mask, other=0).to(tl.uint32, bitcast=True) >> shift
    if 32 % BITS != 0:  # the code may continue in the next word
        hi = tl.load(base + (word + 1) * stride, mask=mask & (word + 1 < n_words), other=0)
        v = v | ((hi.to(tl.uint32, bitcast=True) << 1) << (31 - shift))
    return v & ((1 << BITS) - 1)


@triton.jit
def stream_codes(base, index, stride, n_words, mask, BITS: tl.constexpr):
    """stream_bits as float32."""
    return stream_bits(base, index, stride, n_words, mask, BITS).to(tl.float32)


@triton.jit
def dequant_wint(qweight, qzeros, scales, g_idx, offs_k, offs_n, k0, N, K, n_zero_words,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, ACT_ORDER: tl.constexpr, BLOCK_K: tl.constexpr):
    """GROUP_SIZE 0: one group. Without act-order, a tile inside one group reads one row of scales/zeros."""
    kmask = offs_k < K
    nmask = offs_n < N
    n_words = tl.cdiv(K * BITS, 32)
    if 32 % BITS == 0:  # 2/4/8 bits: each word loaded once, its PER codes split off by shifts
        PER: tl.constexpr = 32 // BITS
        offs_w = k0 // PER + tl.arange(0, BLOCK_K // PER)
        words = tl.load(qweight + offs_w[:, None] * N + offs_n[None, :],
                        mask=(offs_w < n_words)[:, None] & nmask[None, :], other=0)
        q3 = (words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & ((1 << BITS) - 1)
        q = tl.reshape(q3, (BLOCK_K, offs_n.shape[0])).to(tl.float32)
    else:
        q = stream_codes(qweight + offs_n[None, :], offs_k[:, None], N, n_words, kmask[:, None] & nmask[None, :], BITS)
    if ACT_ORDER:
        g = tl.load(g_idx + offs_k, mask=kmask, other=0)[:, None]
    elif GROUP_SIZE == 0:
        g = k0 * 0
    elif GROUP_SIZE % BLOCK_K == 0:
        g = k0 // GROUP_SIZE
    else:
        g = (tl.minimum(offs_k, K - 1) // GROUP_SIZE)[:, None]
    zmask = nmask[None, :]
    s = tl.load(scales + g * N + offs_n[None, :], mask=zmask, other=0.0).to(tl.float32)
    z = stream_codes(qzeros + g * n_zero_words, offs_n[None, :], 1, n_zero_words, zmask, BITS)
    return q * s - z * s


@triton.jit
def dequant_nf4(codes, absmax, lut, absmax2, code2, offset, offs_k, offs_n, N, K,
                BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    idx = offs_n[None, :] * K + offs_k[:, None]  # flat index into the row-major [N, K] weight
    byte = tl.load(codes + (idx >> 1), mask=mask, other=0).to(tl.int32)
    v = tl.load(lut + ((byte >> ((1 - (idx & 1)) * 4)) & 15))
    blk = idx // BLOCKSIZE
    if DOUBLE_QUANT:
        c = tl.load(absmax + blk, mask=mask, other=0).to(tl.int32)
        a = tl.load(code2 + c) * tl.load(absmax2 + blk // 256, mask=mask, other=0.0) + offset
    else:
        a = tl.load(absmax + blk, mask=mask, other=0.0)
    return v * a


@triton.jit
def _f16_le(p, mask):
    lo = tl.load(p, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(p + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _byte(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def dequant_gguf(raw, offs_k, offs_n, N, K, row_bytes, QTYPE: tl.constexpr):
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    row = raw + offs_n[None, :] * row_bytes
    k = offs_k[:, None]
    if QTYPE == 0:  # Q4_0
        blk = row + (k // 32) * 18
        j = k % 32
        b = _byte(blk + 2 + j % 16, mask)
        q = tl.where(j < 16, b & 15, b >> 4)
        w = _f16_le(blk, mask) * (q - 8).to(tl.float32)
    elif QTYPE == 1:  # Q8_0
        blk = row + (k // 32) * 34
        q = tl.load(blk + 2 + k % 32, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = _f16_le(blk, mask) * q.to(tl.float32)
    elif QTYPE == 2 or QTYPE == 6:  # Q4_K, Q5_K (the same scales and nibbles; Q5_K adds qh and 16 B)
        blk = row + (k // 256) * (144 if QTYPE == 2 else 176)
        e = k % 256
        sc, mn = _scale_min_k4(blk + 4, e // 32, mask)
        qb = _byte(blk + (16 if QTYPE == 2 else 48) + 32 * (e // 64) + e % 32, mask)
        q = tl.where(e % 64 < 32, qb & 15, qb >> 4)
        if QTYPE == 6:
            q = q | (((_byte(blk + 16 + e % 32, mask) >> (e // 32)) & 1) << 4)
        w = _f16_le(blk, mask) * (sc * q).to(tl.float32) - _f16_le(blk + 2, mask) * mn.to(tl.float32)
    elif QTYPE == 7:  # Q6_K
        blk = row + (k // 256) * 210
        e = k % 256
        h = e // 128
        j = (e % 128) // 32
        lane = e % 32
        qb = _byte(blk + 64 * h + lane + 32 * (j % 2), mask)
        low = tl.where(j < 2, qb & 15, qb >> 4)
        high = (_byte(blk + 128 + 32 * h + lane, mask) >> (2 * j)) & 3
        scale = tl.load(blk + 192 + 8 * h + lane // 16 + 2 * j, mask=mask, other=0).to(tl.int8, bitcast=True)
        w = (_f16_le(blk + 208, mask) * scale.to(tl.float32)) * ((low | (high << 4)) - 32).to(tl.float32)
    elif QTYPE == 8 or QTYPE == 9:  # Q2_K, Q3_K: 2-bit codes in 4 planes per 32 bytes
        blk = row + (k // 256) * (84 if QTYPE == 8 else 110)
        e = k % 256
        h = e // 128
        j = (e % 128) // 32
        t = (e % 32) // 16
        lane = e % 16
        c = 8 * h + 2 * j + t  # the 16-element sub-block's scale
        q = (_byte(blk + (16 if QTYPE == 8 else 32) + 32 * h + 16 * t + lane, mask) >> (2 * j)) & 3
        if QTYPE == 8:
            sm = _byte(blk + c, mask)
            w = (_f16_le(blk + 80, mask) * (sm & 15).to(tl.float32)) * q.to(tl.float32) \
                - _f16_le(blk + 82, mask) * (sm >> 4).to(tl.float32)
        else:
            q = q - tl.where(((_byte(blk + 16 * t + lane, mask) >> (4 * h + j)) & 1) != 0, 0, 4)
            g = c // 4
            low = (_byte(blk + 96 + c % 4 + 4 * (g % 2), mask) >> (4 * (g // 2))) & 15
            high = (_byte(blk + 104 + c % 4, mask) >> (2 * g)) & 3
            w = (_f16_le(blk + 108, mask) * ((low | (high << 4)) - 32).to(tl.float32)) * q.to(tl.float32)
    else:  # Q4_1, Q5_0, Q5_1: 32 elements, nibbles as Q4_0 after d (and m) (and qh)
        nbytes: tl.constexpr = 20 if QTYPE == 3 else 22 if QTYPE == 4 else 24
        qs: tl.constexpr = 4 if QTYPE == 3 else 6 if QTYPE == 4 else 8
        blk = row + (k // 32) * nbytes
        j = k % 32
        b = _byte(blk + qs + j % 16, mask)
        q = tl.where(j < 16, b & 15, b >> 4)
        if QTYPE != 3:  # bit 4 of the code from qh (little-endian 32 bits before the nibbles)
            q = q | (((_byte(blk + qs - 4 + j // 8, mask) >> (j % 8)) & 1) << 4)
        if QTYPE == 4:
            w = _f16_le(blk, mask) * (q - 16).to(tl.float32)
        else:
            w = _f16_le(blk, mask) * q.to(tl.float32) + _f16_le(blk + 2, mask)
    return w


@triton.jit
def _scale_min_k4(scales, sub, mask):
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block `sub` (0..7) of a Q4_K/Q5_K block."""
    i = sub % 4
    a = _byte(scales + i, mask)  # scales[i], scales[i+4], scales[i+8] hold sub-blocks i and i+4
    b = _byte(scales + 4 + i, mask)
    c = _byte(scales + 8 + i, mask)
    low = sub < 4
    sc = tl.where(low, a & 63, (c & 15) | ((a >> 6) << 4))
    mn = tl.where(low, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


@triton.jit
def dequant_tile(offs_k, offs_n, k0, N, K, qweight, qzeros, scales, g_idx, n_zero_words, codes, absmax, lut, absmax2,
                 code2, offset, raw, row_bytes, FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
                 ACT_ORDER: tl.constexpr, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, QTYPE: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of W^T, float32, of the weight in FORMAT ("wint", "nf4" or "gguf"); only that
    format's arguments are read (kernels/matmul.py's layouts set them, the others are None or 0)."""
    if FORMAT == "wint":
        w = dequant_wint(qweight, qzeros, scales, g_idx, offs_k, offs_n, k0, N, K, n_zero_words, BITS, GROUP_SIZE,
                         ACT_ORDER, BLOCK_K)
    elif FORMAT == "nf4":
        w = dequant_nf4(codes, absmax, lut, absmax2, code2, offset, offs_k, offs_n, N, K, BLOCKSIZE, DOUBLE_QUANT)
    else:
        w = dequant_gguf(raw, offs_k, offs_n, N, K, row_bytes, QTYPE)
    return w
