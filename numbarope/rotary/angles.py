"""The exact reduction of rotary angles modulo 2π, and the rotation's error bounds.

The angle of a float64 position and a float64 inverse frequency is formed exactly
(a double-double) and reduced modulo 2π with 2π held to 161 bits, in numba
(``_reduced_angles``, used by :meth:`numbarope.Rotary.angles`). :data:`ANGLE_ERROR`
is its proven bound (the proof is the comment of the constant), :data:`MAX_ANGLE`
the range of the proof; :data:`ROTATION_ERROR` and :func:`rotation_logit_error`
bound a rotated vector and a logit of rotated vectors, the rotation term of the
certified bounds. Import them from :mod:`numbarope.rotary`.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


# ------------------------------------------------- exact angle reduction mod 2π
# The angle of position p and inverse frequency θ (both float64) is reduced as
# r = p·θ − k·2π, |r| <= π, without rounding p·θ first:
#
# 1. p·θ = hi + lo exactly (Dekker's two-product with Veltkamp's split; the
#    operands are first scaled to their frexp mantissas so that the split can
#    neither overflow nor lose bits to underflow; the two parts are scaled back
#    with ldexp, exact unless they fall below 2**-1022).
# 2. 2π = _C1 + _C2 + _C3 + δ, |δ| < 2**-161; k = k1 + k2 with k1 = rint(hi / 2π)
#    and k2 = rint(r1 / 2π) of the first remainder r1 (|k2| <= 62), and one more
#    2π off when the rounded result lies beyond ±fl(π) (k2 misjudged by the
#    rounding of r1 / 2π, within 1e-13 of ±π); every k_i·C_j is formed exactly
#    as a two-product.
# 3. hi + lo − Σ k_i·C_j is summed with Ogita-Rump-Oishi's Sum2 (a cascade of
#    two-sums, the errors accumulated), hi − k1·C1 first, and rounded once.
#
# _C1, _C2, _C3 are the float64 rounded-to-nearest of 2π and of the successive
# remainders (Python integers: π from Machin's formula to 420 bits; the test
# test_two_pi_constants recomputes them):
#     one = 1 << 420
#     def atan_inv(x):                      # arctan(1/x) * one
#         s = t = one // x; n, sign = 1, -1
#         while t:
#             t //= x * x; n += 2; s += sign * (t // n); sign = -sign
#         return s
#     r = Fraction(8 * (4 * atan_inv(5) - atan_inv(239)), one)    # 2π, error < 2**-400
#     for i in range(3): c = float(r); print(c.hex()); r -= Fraction(c)
_C1 = float.fromhex("0x1.921fb54442d18p+2")       # 6.283185307179586
_C2 = float.fromhex("0x1.1a62633145c07p-52")      # 2.4492935982947064e-16
_C3 = float.fromhex("-0x1.f1976b7ed8fbcp-108")    # -5.989539619436679e-33
_INV_2PI = float.fromhex("0x1.45f306dc9c883p-3")  # float64 nearest 1/(2π)
_PI = _C1 / 2                                     # fl(π) (halving is exact)
_SPLITTER = 134217729.0                           # 2**27 + 1 (Veltkamp)

#: Largest |position × inverse frequency| (radians) :meth:`Rotary.angles` reduces:
#: beyond it the analysis of :data:`ANGLE_ERROR` does not hold and a ValueError is raised.
MAX_ANGLE = 2.0 ** 60

#: Proven bound (radians) on |computed − exact| for the reduced angles of
#: :meth:`Rotary.angles`, "exact" being the product of the float64 position and
#: the float64 inverse frequency reduced modulo 2π (compared modulo 2π). Derivation
#: (u = 2**-53, |p·θ| < MAX_ANGLE = 2**60, so |k1| < 2**57.4 and
#: |k1 − hi/2π| <= 2u·|hi/2π| + 1/2 < 41.2): the result is fl(z), the rounding of
#: a double-double z in [−π − 2**-40, π + 2**-40] ⊂ (−4, 4), so fl(z) is within
#: half an ulp, 2**-52, of z. z differs from p·θ − k·2π by (a) the Sum2 error of
#: its at most 20 terms, <= γ18·γ19·Σ|terms| (Ogita, Rump, Oishi 2005, Prop. 4.5
#: and Lemma 4.3; γn = n u / (1 − n u)) with Σ|terms| < 1400 (|hi − fl(k1 C1)| <
#: 41.2·2π + |k1|·|2π − C1| + 2**8 < 561, |lo| <= 2**7, |k1 C1 − fl(k1 C1)| <=
#: 2**8, |k1 C2| < 45, |k2 C1| < 390, |C1| < 6.3 for the last 2π, the rest
#: < 2**-40), i.e. < 2**-87; (b) |k|·|δ| < 2**58 · 2**-161 = 2**-103 for the tail
#: of 2π; (c) <= 2**-1073 when p·θ is subnormal. Hence 2**-52 + 2**-86 (about
#: 2.2204e-16: the float64 result is the correctly rounded reduced angle but for
#: ties within 2**-86 of a rounding boundary). Every result lies in [−fl(π), fl(π)].
#: cos and sin of it come from numpy (glibc's libm: < 1 ulp each, <= 2**-53 on
#: values below 1; an assumption on the platform's libm, not part of ANGLE_ERROR).
ANGLE_ERROR = 2.0 ** -52 + 2.0 ** -86

#: Bound on ``‖x̂' − R_p x‖₂ / ‖x‖₂`` for a vector rotated by :func:`rotate` in
#: float64 (x̂' computed, R_p the exact rotation by the float64 angles p·θ):
#: per pair (a, b), ``a·cos − b·sin`` with cos, sin of the reduced angle within
#: ANGLE_ERROR + u of the exact ones (ANGLE_ERROR for the angle, the assumed 1-ulp
#: libm <= 2u near 1, the attention factor's product u) and the products and the
#: sum (2u + u): each component errs by at most (|a| + |b|)(ANGLE_ERROR + 6u);
#: summed over pairs in quadrature, ``<= √2·‖x‖·(ANGLE_ERROR + 6u)``.
#: A logit s·q'ᵀk' of rotated q', k' then errs by at most
#: ``(2η + η²)·R`` (η this constant, R = s‖q‖‖k‖): the rotation term of the
#: certified bounds (``numbarope.ops.streaming.exact_error_bound``, ``numbarope._pipeline.plan``).
ROTATION_ERROR = math.sqrt(2.0) * (ANGLE_ERROR + 6 * 2.0 ** -53)


def rotation_logit_error(radius):
    """Absolute error bound of a logit ``s·q'ᵀk'`` (``|·| <= radius``) of vectors
    rotated in float64 by numbarope, against the exact rotation: ``(2η + η²)·R``,
    η = :data:`ROTATION_ERROR`."""
    eta = ROTATION_ERROR
    return (2 * eta + eta * eta) * float(radius)


def _veltkamp(a):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


_C1_HI, _C1_LO = _veltkamp(_C1)
_C2_HI, _C2_LO = _veltkamp(_C2)
_C3_HI, _C3_LO = _veltkamp(_C3)


@njit(cache=True, nogil=True)
def _two_sum(a, b):
    # Knuth: s + e == a + b exactly
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@njit(cache=True, nogil=True)
def _two_prod(a, a_hi, a_lo, b, b_hi, b_lo):
    # Dekker: x + y == a * b exactly (a_hi + a_lo == a split in 26-bit halves;
    # no fma is used: numba compiles without fastmath, so no contraction)
    x = a * b
    y = a_lo * b_lo - (((x - a_hi * b_hi) - a_lo * b_hi) - a_hi * b_lo)
    return x, y


@njit(cache=True, nogil=True)
def _split(a):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


@njit(cache=True, nogil=True)
def _subtract_k_two_pi(s, c, k):
    # Continue the Sum2 cascade (s, c) with the six exact parts of −k·(C1 + C2 + C3).
    k_hi, k_lo = _split(k)
    p, e = _two_prod(k, k_hi, k_lo, _C1, _C1_HI, _C1_LO)
    s, t = _two_sum(s, -p)
    c += t
    s, t = _two_sum(s, -e)
    c += t
    p, e = _two_prod(k, k_hi, k_lo, _C2, _C2_HI, _C2_LO)
    s, t = _two_sum(s, -p)
    c += t
    s, t = _two_sum(s, -e)
    c += t
    p, e = _two_prod(k, k_hi, k_lo, _C3, _C3_HI, _C3_LO)
    s, t = _two_sum(s, -p)
    c += t
    s, t = _two_sum(s, -e)
    c += t
    return s, c


@njit(cache=True, nogil=True)
def _reduce_two_pi(hi, lo):
    """hi + lo (a double-double) reduced modulo 2π to [−π, π], rounded to float64."""
    k1 = np.rint(hi * _INV_2PI)
    if k1 == 0.0:
        s, c = _two_sum(hi, lo)
    else:
        k_hi, k_lo = _split(k1)
        p, e = _two_prod(k1, k_hi, k_lo, _C1, _C1_HI, _C1_LO)
        s, c = _two_sum(hi, -p)           # exact (Sterbenz) but for small k1
        s, t = _two_sum(s, lo)
        c += t
        s, t = _two_sum(s, -e)
        c += t
        p, e = _two_prod(k1, k_hi, k_lo, _C2, _C2_HI, _C2_LO)
        s, t = _two_sum(s, -p)
        c += t
        s, t = _two_sum(s, -e)
        c += t
        p, e = _two_prod(k1, k_hi, k_lo, _C3, _C3_HI, _C3_LO)
        s, t = _two_sum(s, -p)
        c += t
        s, t = _two_sum(s, -e)
        c += t
    k2 = np.rint((s + c) * _INV_2PI)
    if k2 != 0.0:
        s, c = _subtract_k_two_pi(s, c, k2)
    r = s + c
    # fl(z) > fl(π) means z > π + 1e-16 (fl(π) < π, ties to its even mantissa):
    # one more 2π off lands in (−π, −π + 1e-13] (and symmetrically)
    if r > _PI:
        s, c = _subtract_k_two_pi(s, c, 1.0)
        r = s + c
    elif r < -_PI:
        s, c = _subtract_k_two_pi(s, c, -1.0)
        r = s + c
    return r


@njit(cache=True, nogil=True)
def _reduced_angles_kernel(pos, inv, out):
    # out[i, j] = (pos[i] · inv[j]) mod 2π in [−π, π], from the exact product
    m = inv.shape[0]
    t_m = np.empty(m)
    t_hi = np.empty(m)
    t_lo = np.empty(m)
    t_e = np.empty(m, dtype=np.int64)
    for j in range(m):
        f, e = math.frexp(inv[j])
        t_m[j] = f
        t_hi[j], t_lo[j] = _split(f)
        t_e[j] = e
    for i in range(pos.shape[0]):
        f, ep = math.frexp(pos[i])
        f_hi, f_lo = _split(f)
        for j in range(m):
            x, y = _two_prod(f, f_hi, f_lo, t_m[j], t_hi[j], t_lo[j])
            e = ep + t_e[j]
            out[i, j] = _reduce_two_pi(math.ldexp(x, e), math.ldexp(y, e))


def _reduced_angles(pos, inv):
    """``(pos[:, None] · inv[None, :]) mod 2π`` in [−π, π], float64, from the exact products.

    ``pos`` and ``inv`` are finite float64 with ``max|pos| · max|inv| < MAX_ANGLE``
    (checked by the caller). Error <= :data:`ANGLE_ERROR`.
    """
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    inv = np.ascontiguousarray(inv, dtype=np.float64)
    out = np.empty((pos.shape[0], inv.shape[0]))
    if out.size:
        _reduced_angles_kernel(pos, inv, out)
    return out
