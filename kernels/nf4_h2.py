"""NF4/FP4 decode with fp16 activations: the 16-value code table looked up in registers, two weights an fma.

Reads a column copy of the bitsandbytes layout of kernels/nf4.py (`column_layout`, built once per weight
and kept on the codes tensor): the same codes and absmax, transposed, so that a program streams the
words of many columns in the order the GPTQ-layout integer kernel (kernels/wint_h2.py) does:
    words   int32 [K/8, N]           nibble j of word w of column n = slot label of element k = 8w + j
    absmax  [K/blocksize, N]         float32; a double-quantized absmax (uint8 codes, absmax2, offset) is
                                     decoded once into this copy, with the float32 operations of the torch
                                     path (code2[c] * absmax2[b // 256], then + offset)
The table, scaled by c and rounded to fp16, lives in eight registers: bytes of the values in slots 0-7
(low bytes in two, high bytes in two) and bytes of slots 8-15 XOR a sign fill (see `slot_table`, which
also picks c and the slot of each code). For a 16-bit chunk S of labels (elements e0..e3 from bit 0),
`prmt(A, S)` looks up four low bytes among slots 0-7 and `prmt(B, S ^ 0x8888)` among slots 8-15 (a
selector nibble with bit 3 set yields a sign fill instead), one `xor` merges them; the same for the high
bytes; two more `prmt`s interleave low and high bytes into the fp16 pairs (e0, e1) and (e2, e3), which
meet the activation pairs (x[k], x[k+1]), one int32 load each, in an `fma.rn.f16x2`. Ten instructions
per four weights, no memory access for the table. The fp16 pair sums of a K tile (inside one block) go
to float32 and are scaled by absmax / c once.

The first version of this kernel read the bitsandbytes layout in place (row segments of 64-256 bytes per
program and K tile) and was slower than the word-at-a-time kernel on the H100 (0.23 vs 0.15 ms on
8192x28672, reports/kernels/NOTES.md); the column copy costs the memory of the 4-bit weight once more.

Under TRITON_INTERPRET=1 (CPU) the lookup step runs as Triton operations (a load of the slot's fp16
value) on the same registers (`PTX=False`); tests model the prmt/xor sequence bit by bit. Masks,
blocks, double quant, split-K are the same code in both modes.
"""

import torch
import triton
import triton.language as tl

from qbench.kernels.half2 import pack_h2, unpack_h2
from qbench.kernels.splitk import (decode_launch, h2_configs, split_tile, store_result, store_stream, stream_span,
                                   stream_tile, wave_splits)
from qbench.kernels.tune import cdiv, interpreted


def slot_table(lut: torch.Tensor):
    """The code table arranged for the lookup of nf4_chunk_fma, or None if no scale c below makes it fit.

    Returns (words int32 [8], slot_values float32 [16], label of each code [16], 1 / c). The 16 values
    v * c, rounded to fp16 (c is chosen, see below; the kernel multiplies the absmax by 1 / c), sit in
    slots 0..15; code q is stored as its slot label[q]. A `prmt` whose selector nibble has bit 3 set
    writes the sign (bit 7) of the selected byte to all 8 bits, so for a nibble i < 8, prmt(A, s) gives
    byte A[i] and prmt(B, s ^ 8) the fill of B[i]; for i >= 8 the fill of A[i - 8] and B[i - 8]. With
    A[i] = byte of slot i and B[i] = byte of slot i + 8 XOR the fill of A[i], A ^ B is the byte of slot
    i or i + 8 -- if slots i and i + 8 agree in bit 7 of that byte (bit 7 of the pair's XOR is the same
    for both). That holds for the low and the high byte when each pair of slots shares the sign and
    bit 7 of the low byte: each of those four classes must hold an even number of values. Scaling the
    values by c changes their low bytes (the rounding error stays below 2**-11 relative); a zero may
    be +0 or -0. NF4 needs c = 1.0713 (1 + 73/1024), FP4 c = 1.
    """
    values = lut.detach().float().cpu()
    for step in range(1024):
        c = 1 + step / 1024
        bits = [int(b) & 0xFFFF for b in (values * c).half().view(torch.int16).tolist()]
        classes: dict = {}
        zeros = []
        for q, b in enumerate(bits):
            if b & 0x7FFF == 0:
                zeros.append(q)
            else:
                classes.setdefault((b >> 15, (b >> 7) & 1), []).append(q)
        if len(classes.get((0, 1), [])) % 2 or len(classes.get((1, 1), [])) % 2:
            continue
        if (len(classes.get((0, 0), [])) + len(classes.get((1, 0), [])) + len(zeros)) % 2:
            continue
        for q in zeros:  # each zero goes (as +0 or -0) where the count is odd, else to +0
            key = (1, 0) if len(classes.get((1, 0), [])) % 2 else (0, 0)
            bits[q] = 0x8000 if key == (1, 0) else 0
            classes.setdefault(key, []).append(q)
        order = [q for key in sorted(classes) for q in classes[key]]  # pairs of one class are neighbours
        slots = order[0::2] + order[1::2]  # slot i and slot i + 8 hold a pair
        label = [0] * 16
        for slot, q in enumerate(slots):
            label[q] = slot
        fill = lambda byte: 0xFF if byte & 0x80 else 0  # noqa: E731
        table = []
        for shift in (0, 8):  # low bytes, then high bytes
            a = [(bits[slots[i]] >> shift) & 0xFF for i in range(8)]
            b = [((bits[slots[i + 8]] >> shift) & 0xFF) ^ fill(a[i]) for i in range(8)]
            for row in (a, b):
                table += [row[0] | row[1] << 8 | row[2] << 16 | row[3] << 24,
                          row[4] | row[5] << 8 | row[6] << 16 | row[7] << 24]
        words = torch.tensor([w - (1 << 32) if w >= 1 << 31 else w for w in table], dtype=torch.int32)
        signed = [bits[q] - (1 << 16) if bits[q] >= 1 << 15 else bits[q] for q in slots]
        slot_values = torch.tensor(signed, dtype=torch.int16).view(torch.float16).float()
        return words, slot_values, label, 1 / c
    return None


def column_layout(codes: torch.Tensor, absmax: torch.Tensor, N: int, K: int, blocksize: int, label: list,
                  absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None, offset: float = 0.0) -> tuple:
    """(words [K/8, N] int32, absmax [K/blocksize, N] float32) of a bitsandbytes-layout weight (K % blocksize
    == 0, K % 8 == 0), codes replaced by their slot labels; cached on `codes` until it or the absmax changes.

    With double quant (absmax2 given, absmax holding uint8 codes) the absmax is decoded here, once: decoding
    it in the kernel (a 256-entry table gather and an absmax2 load per column and block) made the H200
    NF4 decode 8 % slower than reading a float32 absmax (0.0586 vs 0.0545 ms on 8192x28672), although the
    codes are a quarter of the bytes."""
    key = (codes._version, absmax.data_ptr(), absmax._version, tuple(label),
           None if absmax2 is None else (absmax2.data_ptr(), absmax2._version, code2.data_ptr(), float(offset)))
    cached = getattr(codes, "_qbench_columns", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    relabel = torch.tensor(label, device=codes.device)
    b = codes.reshape(-1)[: N * K // 2].view(N, K // 8, 4).long()
    elems = relabel[torch.stack((b >> 4, b & 15), dim=-1).view(N, K // 8, 8)]  # the high nibble is the even element
    shifts = torch.arange(0, 32, 4, device=codes.device)
    words = (elems << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed
    am = absmax.reshape(-1)[: N * K // blocksize]
    if absmax2 is not None:  # as qbench.quant.nf4.dequantize_dynamic, then + offset
        am = code2.float()[am.long()] * absmax2.float().repeat_interleave(256)[: am.numel()] + float(offset)
    am = am.float().view(N, K // blocksize)
    layout = (words.T.contiguous(), am.T.contiguous())
    codes._qbench_columns = (key, layout)
    return layout


@triton.jit
def nf4_chunk_fma(s, t, la, la1, lb, lb1, ha, ha1, hb, hb1, xa, xb, acc, slot_values, PTX: tl.constexpr):
    """acc + v(e0, e1) * xa + v(e2, e3) * xb on fp16 pairs, for the four slot labels e0..e3 in the low 16
    bits of s (e0 in bits 0-3); t = s ^ 0x8888. Table words as slot_table returns them: low bytes of
    slots 0-3, 4-7 (la, la1), of slots 8-15 XOR fill (lb, lb1), high bytes likewise (ha.., hb..)."""
    if PTX:
        out = tl.inline_asm_elementwise(
            """{
            .reg .b32 a, b, lo, hi, pa, pb, u;
            prmt.b32 a, $3, $4, $1;
            prmt.b32 b, $5, $6, $2;
            xor.b32 lo, a, b;
            prmt.b32 a, $7, $8, $1;
            prmt.b32 b, $9, $10, $2;
            xor.b32 hi, a, b;
            prmt.b32 pa, lo, hi, 0x5140;
            prmt.b32 pb, lo, hi, 0x7362;
            fma.rn.f16x2 u, pa, $11, $13;
            fma.rn.f16x2 $0, pb, $12, u;
            }""",
            "=r,r,r,r,r,r,r,r,r,r,r,r,r,r", [s, t, la, la1, lb, lb1, ha, ha1, hb, hb1, xa, xb, acc],
            dtype=tl.uint32, is_pure=True, pack=1)
    else:
        v0 = tl.load(slot_values + (s & 15))
        v1 = tl.load(slot_values + ((s >> 4) & 15))
        v2 = tl.load(slot_values + ((s >> 8) & 15))
        v3 = tl.load(slot_values + ((s >> 12) & 15))
        xa_lo, xa_hi = unpack_h2(xa)
        xb_lo, xb_hi = unpack_h2(xb)
        a_lo, a_hi = unpack_h2(acc)
        # two fp16 fmas per half, each rounded, as fma.rn.f16x2 (products exact in float32)
        t_lo = (v0 * xa_lo.to(tl.float32) + a_lo.to(tl.float32)).to(tl.float16)
        t_hi = (v1 * xa_hi.to(tl.float32) + a_hi.to(tl.float32)).to(tl.float16)
        out = pack_h2((v2 * xb_lo.to(tl.float32) + t_lo.to(tl.float32)).to(tl.float16),
                   (v3 * xb_hi.to(tl.float32) + t_hi.to(tl.float32)).to(tl.float16))
    return out


@triton.jit
def _tile_sums(xw, words_ptr, absmax, la, la1, lb, lb1, ha, ha1, hb, hb1, slot_values, inv_c,
               N, K, offs_n, nmask, t_start, t_end, BLOCKSIZE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHAIN: tl.constexpr, STAGES: tl.constexpr,
               PTX: tl.constexpr, EVEN_N: tl.constexpr):
    """sum over K tiles t_start..t_end-1 of x[m, tile] @ W^T[tile, offs_n], float32 [BLOCK_N] (xw: the
    token's activation pairs as uint32)."""
    ROWS: tl.constexpr = BLOCK_K // 8 // CHAIN  # words of a column per chained slab
    offs_r = tl.arange(0, ROWS)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # reduced over the rows once, after the loop
    for t in tl.range(t_start, t_end, num_stages=STAGES):
        g = t * BLOCK_K // BLOCKSIZE
        if EVEN_N:
            a = tl.load(absmax + g * N + offs_n)
        else:
            a = tl.load(absmax + g * N + offs_n, mask=nmask, other=0.0)
        part = tl.zeros((ROWS, BLOCK_N), dtype=tl.uint32)  # fp16 pair sums over the tile of a column
        for c in tl.static_range(CHAIN):
            row = t * (BLOCK_K // 8) + c * ROWS + offs_r
            ptrs = words_ptr + row[:, None] * N + offs_n[None, :]
            if EVEN_N:
                words = tl.load(ptrs)
            else:
                words = tl.load(ptrs, mask=nmask[None, :], other=0)
            words = words.to(tl.uint32, bitcast=True)
            x0 = tl.load(xw + row * 4)[:, None]
            x1 = tl.load(xw + row * 4 + 1)[:, None]
            x2 = tl.load(xw + row * 4 + 2)[:, None]
            x3 = tl.load(xw + row * 4 + 3)[:, None]
            flipped = words ^ 0x88888888
            part = nf4_chunk_fma(words, flipped, la, la1, lb, lb1, ha, ha1, hb, hb1, x0, x1, part, slot_values, PTX)
            part = nf4_chunk_fma(words >> 16, flipped >> 16, la, la1, lb, lb1, ha, ha1, hb, hb1, x2, x3, part,
                                 slot_values, PTX)
        p_lo, p_hi = unpack_h2(part)
        acc += (p_lo.to(tl.float32) + p_hi.to(tl.float32)) * (a * inv_c)[None, :]
    return tl.sum(acc, axis=0)


@triton.jit
def load_slot_table(table):
    """The eight words of slot_table's table (low bytes of slots 0-7, of slots 8-15 XOR fill, high bytes
    likewise) as uint32 scalars, kept in registers for the prmt lookups."""
    return (tl.load(table).to(tl.uint32, bitcast=True), tl.load(table + 1).to(tl.uint32, bitcast=True),
            tl.load(table + 2).to(tl.uint32, bitcast=True), tl.load(table + 3).to(tl.uint32, bitcast=True),
            tl.load(table + 4).to(tl.uint32, bitcast=True), tl.load(table + 5).to(tl.uint32, bitcast=True),
            tl.load(table + 6).to(tl.uint32, bitcast=True), tl.load(table + 7).to(tl.uint32, bitcast=True))


@triton.jit
def nf4_h2_decode_kernel(x_ptr, out_ptr, words_ptr, absmax, table, slot_values, inv_c, partials, counters,
                         N, K, stride_xm, stride_om, SPLIT_K, BLOCKSIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHAIN: tl.constexpr, STAGES: tl.constexpr,
                         PTX: tl.constexpr, EVEN_N: tl.constexpr, STREAM: tl.constexpr = False):
    m = tl.program_id(2)
    la, la1, lb, lb1, ha, ha1, hb, hb1 = load_slot_table(table)
    xw = x_ptr.to(tl.pointer_type(tl.uint32)) + m * (stride_xm // 2)  # activation pairs (x[2i], x[2i+1])
    k_tiles = K // BLOCK_K  # the launcher makes BLOCK_K divide the block, and blocks divide K
    if STREAM:  # grid axis 0: P programs, each a range of the (column tile, K tile) units (kernels/splitk.py)
        n_tiles = tl.cdiv(N, BLOCK_N)
        start, end, first_tile, end_tile, P, U = stream_span(n_tiles, k_tiles)
        for tile in range(first_tile, end_tile):
            lo, hi, offs_n, nmask = stream_tile(tile, start, end, k_tiles, N, BLOCK_N)
            res = _tile_sums(xw, words_ptr, absmax, la, la1, lb, lb1, ha, ha1, hb, hb1, slot_values, inv_c,
                             N, K, offs_n, nmask, lo, hi, BLOCKSIZE, BLOCK_N, BLOCK_K, CHAIN, STAGES, PTX, EVEN_N)
            store_stream(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, tile, n_tiles, k_tiles, P, U,
                         BLOCK_N)
    else:
        t_start, t_end, offs_n, nmask = split_tile(k_tiles, SPLIT_K, N, BLOCK_N)
        res = _tile_sums(xw, words_ptr, absmax, la, la1, lb, lb1, ha, ha1, hb, hb1, slot_values, inv_c,
                         N, K, offs_n, nmask, t_start, t_end, BLOCKSIZE, BLOCK_N, BLOCK_K, CHAIN, STAGES,
                         PTX, EVEN_N)
        store_result(out_ptr, res, partials, counters, offs_n, nmask, N, stride_om, SPLIT_K, BLOCK_N)


def nf4_h2_configs(M: int, N: int, K: int, blocksize: int, lut: torch.Tensor, dtype: torch.dtype, n_sm: int) -> list[dict]:
    """Configs of nf4_h2_decode_kernel (fp16 activations, M <= 4, rows of whole blocks of 32k elements):
    the tiles of the integer fp16x2 kernel at 4 bits (kernels/wint_h2.py, chosen by an H100 sweep), a K
    tile inside one block, the K range split so that two to four programs per SM fill the GPU."""
    if M > 4 or dtype != torch.float16 or K % blocksize or blocksize % 32 or device_slot_table(lut) is None:
        return []
    small = 64 if blocksize % 64 == 0 else 32
    configs = []
    # MAXNREG 160: at its default register budget (96) ptxas keeps half of the table words in uniform
    # registers and copies one back before every prmt (257 of the 1188 loop instructions of a 512-column
    # tile, offline sm_90 compile); with room for 116 registers the loop is 930 instructions. On the H100
    # it won on both Llama-3-70B MLP shapes by about 2 % (reports/kernels/NOTES.md).
    for bn, bk, warps, cap in ((512, small, 4, None), (512, small, 4, 160), (256, small, 4, None),
                               (1024, small, 8, None), (512, 128, 8, None)):
        if blocksize % bk:
            continue
        # stream-K (3-4 equal programs per SM) only for the 512-column 4-warp tiles: no gain measured on the H100
        streams = [max(per_sm * n_sm // M, 1) for per_sm in (3, 4)] if (bn, warps) == (512, 4) else []
        configs += h2_configs("nf4_h2", bn, bk, warps, 2, wave_splits(K // bk, cdiv(N, bn) * M, n_sm), streams,
                              MAXNREG=cap)
    return configs


def device_slot_table(lut: torch.Tensor):
    """slot_table(lut) with its tensors on lut's device, cached on `lut` (no host sync after the first call,
    so that calls can be captured in CUDA graphs)."""
    cached = getattr(lut, "_qbench_slots", None)
    if cached is not None and cached[0] == lut._version:
        return cached[1]
    found = slot_table(lut)
    found = found and (found[0].to(lut.device), found[1].to(lut.device), found[2], found[3])
    lut._qbench_slots = (lut._version, found)
    return found


def run_nf4_h2(cfg: dict, x2: torch.Tensor, codes: torch.Tensor, absmax, lut32, absmax2, code2, offset: float,
               N: int, blocksize: int) -> torch.Tensor:
    M, K = x2.shape
    if K % blocksize or blocksize % cfg["BLOCK_K"] or cfg["BLOCK_K"] % (8 * cfg["CHAIN"]):
        raise ValueError(f"nf4_h2: BLOCK_K {cfg['BLOCK_K']} must divide blocksize {blocksize}, which must divide K {K}")
    slots = device_slot_table(lut32)
    if slots is None:
        raise ValueError("nf4_h2: no scale fits this code table to the prmt lookup (see slot_table)")
    table, slot_values, label, inv_c = slots
    words, absmax_cols = column_layout(codes, absmax, N, K, blocksize, label, absmax2, code2, offset)
    if x2.stride(0) % 2 or x2.data_ptr() % 4:  # x is read as int32 pairs
        x2 = x2.contiguous().clone()
    stream = cfg.get("STREAM", 0)  # stream-K: programs per token (0: split-K)
    out, partials, counters, grid, split = decode_launch(cfg, x2, N, K // cfg["BLOCK_K"])
    nf4_h2_decode_kernel[grid](x2, out, words, absmax_cols, table, slot_values, inv_c, partials, counters, N, K,
                               x2.stride(0), out.stride(0), split, BLOCKSIZE=blocksize, BLOCK_N=cfg["BLOCK_N"],
                               BLOCK_K=cfg["BLOCK_K"], CHAIN=cfg["CHAIN"], STAGES=cfg.get("STAGES", 1), PTX=not interpreted(),
                               EVEN_N=N % cfg["BLOCK_N"] == 0, STREAM=bool(stream), num_warps=cfg["num_warps"],
                               num_stages=cfg["num_stages"], **({"maxnreg": cfg["MAXNREG"]} if cfg.get("MAXNREG") else {}))
    return out
