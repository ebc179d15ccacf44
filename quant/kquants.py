"""Reference quantizers for the 256-weight super-block types: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K.

Byte-identical ports of `quantize_row_q*_K_ref` in llama.cpp's ggml-quants.c, which is what
`llama-quantize` runs when no importance matrix is given. Every intermediate stays float32 and is
evaluated in C's order (no FMA contraction, as ggml-base is built), so the rounding matches.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .fp import F16_TO_F32, f32_bits, f32_to_f16, nearest_int

QK_K = 256
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


@njit(cache=True, inline="always")
def _put_u16(out: np.ndarray, o: int, v: int) -> None:
    out[o] = v & 0xFF
    out[o + 1] = (v >> 8) & 0xFF


@njit(cache=True, inline="always")
def _signed_absmax(x: np.ndarray, s: int, n: int) -> tuple[float, float]:
    """(value of largest magnitude, its magnitude), first one on ties: the `ax > amax` scan."""
    vmax = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[s + i])
        if ax > amax:
            amax = ax
            vmax = x[s + i]
    return vmax, amax


@njit(cache=True)
def _make_qx_quants_rmse1(n: int, nmax: int, x: np.ndarray, s: int, L: np.ndarray, lo: int) -> float:
    """make_qx_quants(rmse_type=1, qw=NULL): symmetric scale search weighted by x^2 (Q6_K)."""
    vmax, amax = _signed_absmax(x, s, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F32(0.0)
    fn = F32(nmax)
    iscale = F32(F32(-nmax) / vmax)
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = x[s + i]
        l = max(-nmax, min(nmax - 1, nearest_int(F32(iscale * xi))))
        L[lo + i] = l + nmax
        w = F32(xi * xi)
        fl = F32(l)
        sumlx = F32(sumlx + F32(F32(w * xi) * fl))
        suml2 = F32(suml2 + F32(F32(w * fl) * fl))
    scale = F32(sumlx / suml2) if suml2 != 0 else F32(0.0)
    best = F32(scale * sumlx)
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = F32(F32(-F32(fn + F32(F32(0.1) * F32(step)))) / vmax)
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            xi = x[s + i]
            fl = F32(max(-nmax, min(nmax - 1, nearest_int(F32(iscale * xi)))))
            w = F32(xi * xi)
            sumlx = F32(sumlx + F32(F32(w * xi) * fl))
            suml2 = F32(suml2 + F32(F32(w * fl) * fl))
        if suml2 > 0 and F32(sumlx * sumlx) > F32(best * suml2):
            for i in range(n):
                L[lo + i] = nmax + max(-nmax, min(nmax - 1, nearest_int(F32(iscale * x[s + i]))))
            scale = F32(sumlx / suml2)
            best = F32(scale * sumlx)
    return scale


@njit(cache=True)
def _make_q3_quants(n: int, nmax: int, x: np.ndarray, s: int, L: np.ndarray, lo: int) -> float:
    """make_q3_quants(do_rmse=true): coordinate descent on the x^2-weighted error (Q3_K)."""
    vmax, amax = _signed_absmax(x, s, n)
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[lo + i] = 0
        return F32(0.0)
    iscale = F32(F32(-nmax) / vmax)
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        xi = x[s + i]
        l = max(-nmax, min(nmax - 1, nearest_int(F32(iscale * xi))))
        L[lo + i] = l
        w = F32(xi * xi)
        sumlx = F32(sumlx + F32(F32(w * xi) * F32(l)))
        suml2 = F32(suml2 + F32(F32(w * F32(l)) * F32(l)))
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            xi = x[s + i]
            w = F32(xi * xi)
            li = F32(L[lo + i])
            slx = F32(sumlx - F32(F32(w * xi) * li))
            if slx > 0:
                sl2 = F32(suml2 - F32(F32(w * li) * li))
                new_l = max(-nmax, min(nmax - 1, nearest_int(F32(F32(xi * sl2) / slx))))
                if new_l != L[lo + i]:
                    fl = F32(new_l)
                    slx = F32(slx + F32(F32(w * xi) * fl))
                    sl2 = F32(sl2 + F32(F32(w * fl) * fl))
                    if sl2 > 0 and F32(F32(slx * slx) * suml2) > F32(F32(sumlx * sumlx) * sl2):
                        L[lo + i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[lo + i] += nmax
    return F32(sumlx / suml2) if suml2 > 0 else F32(0.0)


@njit(cache=True)
def _make_qkx2_quants(n: int, nmax: int, x: np.ndarray, s: int, weights: np.ndarray, L: np.ndarray, lo: int,
                      Laux: np.ndarray, rmin: float, rdelta: float, nstep: int, use_mad: bool) -> tuple[float, float]:
    """make_qkx2_quants: asymmetric (scale, min) grid search; returns (scale, -min) (Q2_K, Q4_K, Q5_K)."""
    vmin = x[s]
    vmax = x[s]
    sum_w = weights[0]
    sum_x = F32(sum_w * x[s])
    for i in range(1, n):
        xi = x[s + i]
        if xi < vmin:
            vmin = xi
        if xi > vmax:
            vmax = xi
        w = weights[i]
        sum_w = F32(sum_w + w)
        sum_x = F32(sum_x + F32(w * xi))
    if vmin > 0:
        vmin = F32(0.0)
    if vmax == vmin:
        for i in range(n):
            L[lo + i] = 0
        return F32(0.0), F32(-vmin)
    span = F32(vmax - vmin)
    iscale = F32(F32(nmax) / span)
    scale = F32(F32(1.0) / iscale)
    best_error = F32(0.0)
    for i in range(n):
        xi = x[s + i]
        l = max(0, min(nmax, nearest_int(F32(iscale * F32(xi - vmin)))))
        L[lo + i] = l
        diff = F32(F32(F32(scale * F32(l)) + vmin) - xi)
        diff = abs(diff) if use_mad else F32(diff * diff)
        best_error = F32(best_error + F32(weights[i] * diff))
    if nstep < 1:
        return scale, F32(-vmin)
    for step in range(nstep + 1):
        # min moves when a step wins, and later steps search around the new (max - min), as in C
        iscale = F32(F32(F32(rmin + F32(rdelta * F32(step))) + F32(nmax)) / F32(vmax - vmin))
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            xi = x[s + i]
            l = max(0, min(nmax, nearest_int(F32(iscale * F32(xi - vmin)))))
            Laux[i] = l
            w = weights[i]
            fl = F32(l)
            wl = F32(w * fl)
            sum_l = F32(sum_l + wl)
            sum_l2 = F32(sum_l2 + F32(wl * fl))
            sum_xl = F32(sum_xl + F32(wl * xi))
        D = F32(F32(sum_w * sum_l2) - F32(sum_l * sum_l))
        if D > 0:
            this_scale = F32(F32(F32(sum_w * sum_xl) - F32(sum_x * sum_l)) / D)
            this_min = F32(F32(F32(sum_l2 * sum_x) - F32(sum_l * sum_xl)) / D)
            if this_min > 0:
                this_min = F32(0.0)
                this_scale = F32(sum_xl / sum_l2)
            cur_error = F32(0.0)
            for i in range(n):
                diff = F32(F32(F32(this_scale * F32(Laux[i])) + this_min) - x[s + i])
                diff = abs(diff) if use_mad else F32(diff * diff)
                cur_error = F32(cur_error + F32(weights[i] * diff))
            if cur_error < best_error:
                for i in range(n):
                    L[lo + i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                vmin = this_min
    return scale, F32(-vmin)


@njit(cache=True, inline="always")
def _scale_min_k4(j: int, q: np.ndarray, o: int) -> tuple[int, int]:
    """get_scale_min_k4: the 6-bit scale and min of sub-block j from the 12 packed bytes at q[o:]."""
    if j < 4:
        return np.int64(q[o + j]) & 63, np.int64(q[o + j + 4]) & 63
    d = (np.int64(q[o + j + 4]) & 0xF) | ((np.int64(q[o + j - 4]) >> 6) << 4)
    m = (np.int64(q[o + j + 4]) >> 4) | ((np.int64(q[o + j]) >> 6) << 4)
    return d, m


@njit(cache=True, inline="always")
def _pack_2bit(L: np.ndarray, out: np.ndarray, o: int) -> None:
    """Four 2-bit values 32 apart per byte, 128 weights per 32 bytes (Q2_K/Q3_K qs)."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[o + j // 4 + l] = (L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)) & 0xFF


@njit(cache=True)
def _q2_k_block(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray, Laux: np.ndarray,
                weights: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> None:
    # block_q2_K: scales[16] (4-bit scale | 4-bit min << 4), qs[64], d (f16), dmin (f16).
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(QK_K // 16):
        for l in range(16):
            weights[l] = abs(x[s + 16 * j + l])
        sc, mn = _make_qkx2_quants(16, 3, x, s + 16 * j, weights, L, 16 * j, Laux, F32(-0.5), F32(0.1), 15, True)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    q4scale = F32(15.0)
    d_bits = 0
    dmin_bits = 0
    if max_scale > 0:
        iscale = F32(q4scale / max_scale)
        for j in range(QK_K // 16):
            out[o + j] = nearest_int(F32(iscale * scales[j])) & 0xFF
        d_bits = f32_to_f16(F32(max_scale / q4scale))
    else:
        for j in range(QK_K // 16):
            out[o + j] = 0
    if max_min > 0:
        iscale = F32(q4scale / max_min)
        for j in range(QK_K // 16):
            out[o + j] = (np.int64(out[o + j]) | (nearest_int(F32(iscale * mins[j])) << 4)) & 0xFF
        dmin_bits = f32_to_f16(F32(max_min / q4scale))
    _put_u16(out, o + 80, d_bits)
    _put_u16(out, o + 82, dmin_bits)
    for j in range(QK_K // 16):
        d = F32(F16_TO_F32[d_bits] * F32(np.int64(out[o + j]) & 0xF))
        if d == 0:
            continue
        dm = F32(F16_TO_F32[dmin_bits] * F32(np.int64(out[o + j]) >> 4))
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, nearest_int(F32(F32(x[s + 16 * j + ii] + dm) / d))))
    _pack_2bit(L, out, o + 16)


@njit(cache=True)
def _q3_k_block(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray, scales: np.ndarray) -> None:
    # block_q3_K: hmask[32] (bit 2 of each quant), qs[64] (bits 0-1), scales[12] (16 x 6 bits), d (f16).
    max_scale = F32(0.0)
    amax = F32(0.0)
    for j in range(QK_K // 16):
        scales[j] = _make_q3_quants(16, 4, x, s + 16 * j, L, 16 * j)
        a = abs(scales[j])
        if a > amax:
            amax = a
            max_scale = scales[j]
    sb = o + 96
    for k in range(12):
        out[sb + k] = 0
    d_bits = 0
    if max_scale != 0:
        iscale = F32(F32(-32.0) / max_scale)
        for j in range(QK_K // 16):
            l = ((nearest_int(F32(iscale * scales[j])) + 128) & 0xFF) - 128  # stored in an int8_t
            l = max(-32, min(31, l)) + 32
            if j < 8:
                out[sb + j] = l & 0xF
            else:
                out[sb + j - 8] = np.int64(out[sb + j - 8]) | ((l & 0xF) << 4)
            l >>= 4
            out[sb + j % 4 + 8] = (np.int64(out[sb + j % 4 + 8]) | (l << (2 * (j // 4)))) & 0xFF
        d_bits = f32_to_f16(F32(F32(1.0) / iscale))
    _put_u16(out, o + 108, d_bits)
    for j in range(QK_K // 16):
        sc = (np.int64(out[sb + j]) & 0xF) if j < 8 else (np.int64(out[sb + j - 8]) >> 4)
        sc = (sc | (((np.int64(out[sb + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = F32(F16_TO_F32[d_bits] * F32(sc))
        if d == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, nearest_int(F32(x[s + 16 * j + ii] / d)))) + 4
    for k in range(32):
        out[o + k] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            out[o + m] = np.int64(out[o + m]) | hm
            L[j] -= 4
        m += 1
        if m == QK_K // 8:
            m = 0
            hm <<= 1
    _pack_2bit(L, out, o + 32)


@njit(cache=True)
def _k4_scales_mins(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray, Laux: np.ndarray,
                    weights: np.ndarray, scales: np.ndarray, mins: np.ndarray, nmax: int, rmin: float,
                    nstep: int) -> None:
    """Shared first half of Q4_K/Q5_K: per-32 (scale, min) search, 6-bit packing, requantisation to L."""
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(QK_K // 32):
        sum_x2 = F32(0.0)
        for l in range(32):
            v = x[s + 32 * j + l]
            sum_x2 = F32(sum_x2 + F32(v * v))
        av_x = F32(math.sqrt(F32(sum_x2 / F32(32.0))))
        for l in range(32):
            weights[l] = F32(av_x + abs(x[s + 32 * j + l]))
        sc, mn = _make_qkx2_quants(32, nmax, x, s + 32 * j, weights, L, 32 * j, Laux, rmin, F32(0.1), nstep, False)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    inv_scale = F32(F32(63.0) / max_scale) if max_scale > 0 else F32(0.0)
    inv_min = F32(F32(63.0) / max_min) if max_min > 0 else F32(0.0)
    sb = o + 4
    for j in range(QK_K // 32):
        ls = min(63, nearest_int(F32(inv_scale * scales[j])) & 0xFF)  # stored in a uint8_t, then clamped
        lm = min(63, nearest_int(F32(inv_min * mins[j])) & 0xFF)
        if j < 4:
            out[sb + j] = ls
            out[sb + j + 4] = lm
        else:
            out[sb + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[sb + j - 4] = np.int64(out[sb + j - 4]) | ((ls >> 4) << 6)
            out[sb + j] = np.int64(out[sb + j]) | ((lm >> 4) << 6)
    d_bits = f32_to_f16(F32(max_scale / F32(63.0)))
    dmin_bits = f32_to_f16(F32(max_min / F32(63.0)))
    _put_u16(out, o, d_bits)
    _put_u16(out, o + 2, dmin_bits)
    for j in range(QK_K // 32):
        sc, m = _scale_min_k4(j, out, sb)
        d = F32(F16_TO_F32[d_bits] * F32(sc))
        if d == 0:
            continue
        dm = F32(F16_TO_F32[dmin_bits] * F32(m))
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, nearest_int(F32(F32(x[s + 32 * j + ii] + dm) / d))))


@njit(cache=True)
def _q4_k_block(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray, Laux: np.ndarray,
                weights: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> None:
    # block_q4_K: d, dmin (f16), scales[12] (8 x 6-bit scale and min), qs[128] (two nibbles 32 apart).
    _k4_scales_mins(x, s, out, o, L, Laux, weights, scales, mins, 15, F32(-1.0), 20)
    q = o + 16
    for j in range(0, QK_K, 64):
        for l in range(32):
            out[q + l] = L[j + l] | (L[j + l + 32] << 4)
        q += 32


@njit(cache=True)
def _q5_k_block(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray, Laux: np.ndarray,
                weights: np.ndarray, scales: np.ndarray, mins: np.ndarray) -> None:
    # block_q5_K: d, dmin, scales[12] as Q4_K, qh[32] (bit 4 of each quant), qs[128] (low nibbles).
    _k4_scales_mins(x, s, out, o, L, Laux, weights, scales, mins, 31, F32(-0.5), 15)
    qh = o + 16
    ql = o + 48
    for k in range(32):
        out[qh + k] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                out[qh + j] = np.int64(out[qh + j]) | m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                out[qh + j] = np.int64(out[qh + j]) | m2
            out[ql + j] = l1 | (l2 << 4)
        m1 <<= 2
        m2 <<= 2
        ql += 32


@njit(cache=True)
def _q6_k_block(x: np.ndarray, s: int, out: np.ndarray, o: int, L: np.ndarray, scales: np.ndarray) -> None:
    # block_q6_K: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (int8), d (f16).
    max_scale = F32(0.0)
    max_abs_scale = F32(0.0)
    for ib in range(QK_K // 16):
        sc = _make_qx_quants_rmse1(16, 32, x, s + 16 * ib, L, 16 * ib)
        scales[ib] = sc
        if abs(sc) > max_abs_scale:
            max_abs_scale = abs(sc)
            max_scale = sc
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(210):
            out[o + k] = 0
        return
    iscale = F32(F32(-128.0) / max_scale)
    d_bits = f32_to_f16(F32(F32(1.0) / iscale))
    _put_u16(out, o + 208, d_bits)
    for ib in range(QK_K // 16):
        out[o + 192 + ib] = min(127, nearest_int(F32(iscale * scales[ib]))) & 0xFF
    for j in range(QK_K // 16):
        sc = ((np.int64(out[o + 192 + j]) + 128) & 0xFF) - 128
        d = F32(F16_TO_F32[d_bits] * F32(sc))
        if d == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-32, min(31, nearest_int(F32(x[s + 16 * j + ii] / d)))) + 32
    ql = o
    qh = o + 128
    for j in range(0, QK_K, 128):
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            out[ql + l] = q1 | (q3 << 4)
            out[ql + l + 32] = q2 | (q4 << 4)
            out[qh + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                           | ((L[j + l + 96] >> 4) << 6))
        ql += 64
        qh += 32


@njit(cache=True)
def _q8_k_block(x: np.ndarray, s: int, out: np.ndarray, o: int) -> None:
    # block_q8_K: d (f32), qs[256] (int8), bsums[16] (int16 sums of 16 quants each).
    vmax, amax = _signed_absmax(x, s, QK_K)
    if amax == 0:
        for k in range(292):
            out[o + k] = 0  # ggml leaves bsums unwritten here; zero is what they would sum to
        return
    iscale = F32(F32(-127.0) / vmax)
    for j in range(QK_K // 16):
        total = 0
        for ii in range(16):
            v = min(127, nearest_int(F32(iscale * x[s + 16 * j + ii])))
            out[o + 4 + 16 * j + ii] = v & 0xFF
            total += v
        _put_u16(out, o + 260 + 2 * j, total & 0xFFFF)
    bits = np.int64(f32_bits(F32(F32(1.0) / iscale)))
    for k in range(4):
        out[o + k] = (bits >> (8 * k)) & 0xFF


# Row drivers: float32 (rows, n) -> fill uint8 (rows, n / 256 * type_size), rows in parallel.

@njit(cache=True, parallel=True)
def quantize_rows_q2_k(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        Laux = np.zeros(16, dtype=np.int64)
        weights = np.zeros(16, dtype=np.float32)
        scales = np.zeros(16, dtype=np.float32)
        mins = np.zeros(16, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            _q2_k_block(x[r], b * QK_K, out[r], b * 84, L, Laux, weights, scales, mins)


@njit(cache=True, parallel=True)
def quantize_rows_q3_k(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        scales = np.zeros(16, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            _q3_k_block(x[r], b * QK_K, out[r], b * 110, L, scales)


@njit(cache=True, parallel=True)
def quantize_rows_q4_k(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        Laux = np.zeros(32, dtype=np.int64)
        weights = np.zeros(32, dtype=np.float32)
        scales = np.zeros(8, dtype=np.float32)
        mins = np.zeros(8, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            _q4_k_block(x[r], b * QK_K, out[r], b * 144, L, Laux, weights, scales, mins)


@njit(cache=True, parallel=True)
def quantize_rows_q5_k(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        Laux = np.zeros(32, dtype=np.int64)
        weights = np.zeros(32, dtype=np.float32)
        scales = np.zeros(8, dtype=np.float32)
        mins = np.zeros(8, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            _q5_k_block(x[r], b * QK_K, out[r], b * 176, L, Laux, weights, scales, mins)


@njit(cache=True, parallel=True)
def quantize_rows_q6_k(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        L = np.zeros(QK_K, dtype=np.int64)
        scales = np.zeros(16, dtype=np.float32)
        for b in range(x.shape[1] // QK_K):
            _q6_k_block(x[r], b * QK_K, out[r], b * 210, L, scales)


@njit(cache=True, parallel=True)
def quantize_rows_q8_k(x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(x.shape[0]):
        for b in range(x.shape[1] // QK_K):
            _q8_k_block(x[r], b * QK_K, out[r], b * 292)
