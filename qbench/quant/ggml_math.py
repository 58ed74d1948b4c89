"""ggml's float32 arithmetic for the GGUF quantizers (qbench/quant/gguf_quants.py), operation by operation.

Each helper computes what a line of ggml-quants.c computes, in the same float32 steps: `nearest_int`'s
magic-number rounding, left-to-right sums (a C `for` loop), the first-on-ties absmax, and the scale
searches of the K-quants (`make_qkx2_quants`, `make_qx_quants`, `make_q3_quants`), vectorized over all
sub-blocks at once. The bytes of our GGUF files are identical to llama.cpp's because of these details.
"""

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 v + 1.5*2**23, low mantissa bits; bit for bit, also out of range."""
    with np.errstate(all="ignore"):
        bits = (np.asarray(v, dtype=F32) + F32(12582912.0)).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def seqsum(a: np.ndarray) -> np.ndarray:
    """Left-to-right float32 sum over axis 0 (a C `for` loop; np.sum may sum pairwise)."""
    total = a[0].astype(F32, copy=True)
    for row in a[1:]:
        total += row
    return total


def f16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even, as GGML_FP32_TO_FP16)."""
    return np.asarray(v, dtype=F32).astype(np.float16)


def f16_bytes(v: np.ndarray) -> np.ndarray:
    return f16(v).reshape(-1, 1).view(np.uint8)


def absmax_value(x: np.ndarray) -> np.ndarray:
    """The value with the largest |x| over the last axis, first one on ties (C: `if (ax > amax)`)."""
    idx = np.argmax(np.abs(x), axis=-1)
    return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d != 0, F32(1) / d, F32(0)).astype(F32)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad, clamp_before_rounding=False):
    """Scale and min of asymmetric sub-blocks by a search over scales; returns (scale, -min, L).

    x, w: [n, M], element i of sub-block m at [i, m] (sums over axis 0 then run contiguously).
    clamp_before_rounding: the search's codes as make_qkx3_quants makes them (v > 0 ? round(min(v, nmax))
    : 0, safe when v is out of range) instead of clamping the rounded value; equal for finite v."""
    with np.errstate(all="ignore"):
        mn = np.minimum(x.min(axis=0), F32(0))
        mx = x.max(axis=0)
        flat, flat_min = mx == mn, -mn
        sum_w, sum_x = seqsum(w), seqsum(w * x)

        def error(scale, mn, L):
            diff = scale * L + mn - x
            return seqsum(w * (np.abs(diff) if use_mad else diff * diff))

        iscale = F32(nmax) / (mx - mn)
        scale = F32(1) / iscale
        L = np.clip(nearest_int(iscale * (x - mn)), 0, nmax).astype(F32)
        best = error(scale, mn, L)
        for step in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / (mx - mn)
            v = iscale * (x - mn)
            if clamp_before_rounding:
                Laux = np.where(v > 0, nearest_int(np.minimum(v, F32(nmax))), 0).astype(F32)
            else:
                Laux = np.clip(nearest_int(v), 0, nmax).astype(F32)
            wl = w * Laux  # C: w*l*l and w*l*x[i] are (w*l)*l and (w*l)*x[i]
            sum_l, sum_l2, sum_xl = seqsum(wl), seqsum(wl * Laux), seqsum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            positive = this_min > 0
            this_min = np.where(positive, F32(0), this_min)
            this_scale = np.where(positive, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, Laux)
            better = (D > 0) & (cur < best)
            L = np.where(better, Laux, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    return (np.where(flat, F32(0), scale).astype(F32), np.where(flat, flat_min, -mn).astype(F32),
            np.where(flat, 0, L).astype(np.int32))


def make_qx_quants(x, nmax, qw=None):
    """Symmetric sub-blocks (rmse_type=1), x: [n, M]; returns (scale, L in [0, 2*nmax)). The fit's weights
    are qw (importance weights, [n, M]) when given, else x*x."""
    with np.errstate(all="ignore"):
        mx = absmax_value(x.T)
        zero = np.abs(mx) < GROUP_MAX_EPS
        w = x * x if qw is None else qw

        def levels(iscale):
            l = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F32)
            return l, seqsum(w * x * l), seqsum(w * l * l)

        l, sumlx, suml2 = levels(F32(-nmax) / mx)
        L = l + F32(nmax)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            l, sumlx, suml2 = levels(-(F32(nmax) + F32(0.1) * F32(step)) / mx)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            L = np.where(better, l + F32(nmax), L)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, 0, L).astype(np.int32)


def make_q3_quants(x, nmax):
    """Symmetric 3-bit sub-blocks with ggml's coordinate-descent refinement, x: [n, M]; returns (scale, L in [0, 2*nmax))."""
    with np.errstate(all="ignore"):
        mx = absmax_value(x.T)
        zero = np.abs(mx) < GROUP_MAX_EPS
        w = x * x
        L = np.clip(nearest_int((F32(-nmax) / mx) * x), -nmax, nmax - 1).astype(F32)
        sumlx, suml2 = seqsum(w * x * L), seqsum(w * L * L)
        for _ in range(5):  # a pass that changes nothing is a fixed point, so no early exit is needed
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.clip(nearest_int(xi * sl2 / slx), -nmax, nmax - 1).astype(F32)
                slx2 = slx + wi * xi * new_l
                sl2_2 = sl2 + wi * new_l * new_l
                take = (slx > 0) & (new_l != li) & (sl2_2 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2_2)
                L[i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl2_2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, 0, L + F32(nmax)).astype(np.int32)


def make_qkx3_quants(x, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36):
    """The importance-weighted asymmetric search (ggml's make_qkx3_quants with weights, squared error):
    make_qkx2_quants' search with its safe rounding; returns (scale, -min, L). x, w: [n, M]."""
    return make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, False, clamp_before_rounding=True)


def make_qp_quants(x, nmax, w):
    """Unsigned codes 0..nmax with one scale for non-negative values x (the sub-block scales or mins of a
    K-quant super-block), weighted by w: a search over 8 scales around nmax/max, then ggml's
    coordinate-descent refinement of the codes. x, w: [n, M]; returns (scale [M], L int32 [n, M])."""
    with np.errstate(all="ignore"):
        mx = np.maximum(x.max(axis=0), F32(0))
        zero = mx < GROUP_MAX_EPS

        def mse(iscale, clamp):
            l = nearest_int(iscale * x)
            l = np.minimum(nmax, l) if clamp else l
            diff = x - (F32(1) / iscale) * l.astype(F32)
            return seqsum(w * diff * diff)

        iscale = F32(nmax) / mx
        best = mse(iscale, False)
        for step in range(-4, 5):
            if step == 0:
                continue
            iscale_is = (F32(0.1) * F32(step) + F32(nmax)) / mx
            cur = mse(iscale_is, True)
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, iscale_is, iscale).astype(F32)
        L = np.minimum(nmax, nearest_int(iscale * x)).astype(F32)
        sumlx, suml2 = seqsum(w * x * L), seqsum(w * L * L)
        for _ in range(5):  # as make_q3_quants: a pass that changes nothing is a fixed point
            for i in range(x.shape[0]):
                wi, xi, li = w[i], x[i], L[i]
                slx = sumlx - wi * xi * li
                sl2 = suml2 - wi * li * li
                new_l = np.minimum(nmax, nearest_int(xi * sl2 / slx)).astype(F32)
                slx2 = slx + wi * xi * new_l
                sl2_2 = sl2 + wi * new_l * new_l
                take = (slx > 0) & (sl2 > 0) & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl2_2)
                L[i] = np.where(take, new_l, li)
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl2_2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale).astype(F32), np.where(zero, 0, L).astype(np.int32)
