"""The vectorised exp of the exact path and the decay factors, with a proven error.

Cody–Waite reduction ``x = k·ln2 + r``, ``|r| <= ln2/2``, a Taylor polynomial of
``e^r`` (degree 13 in float64, 7 in float32), and ``2^k`` written into the
exponent bits. Relative error at most ``EXP_ULPS[dtype]`` units of roundoff
(proven for float64; checked over every float32 input). Arguments below
``EXP_FLUSH[dtype]`` give exactly 0 (weights that would be subnormal).
"""

import numpy as np
from numba import njit, types
from llvmlite import ir as llvmir
from numba.extending import intrinsic, overload

from .. import _config

__all__ = ["EXP_ULPS", "EXP_FLUSH", "exp_kernel", "row_max"]

_FM = set(_config.FASTMATH)

#: Bound on the relative error of :func:`_exp_block`, in units of the dtype's
#: unit roundoff u (2⁻⁵³, 2⁻²⁴).
#:
#: * float64, proven: k = round(x/ln2) is exact; k·LN2HI is exact (33-bit
#:   constant, |k| < 2¹¹) and so is x − k·LN2HI (Cody–Waite); subtracting
#:   k·LN2LO adds <= u|r| + |k|·|ln2 − LN2HI − LN2LO| < 0.4u to r, |r| <= 0.347.
#:   The Taylor remainder of degree 13 is <= 0.347¹⁴/14! < 0.05u relative.
#:   Horner with FMA: <= γ₂₆·Σ|a_i||r|^i / p(r) <= γ₂₆·e^{2|r|} < 53u (Higham
#:   2002, §5.1). Scaling by 2^k is exact (results below 2⁻¹⁰²² are flushed).
#:   In all < 54u; 64u is claimed. Measured: about 2u.
#: * float32: measured over every float32 in (−87, 0] with
#:   ``NUMBAROPE_FULL_TESTS=1`` (tests/ops/test_exp.py::
#:   test_exp_kernel_float32_every_input_sampled; every 97th one by default):
#:   1.33u at worst over all 1,118,699,520 inputs; 4u is claimed.
EXP_ULPS = {np.dtype(np.float64): 64.0, np.dtype(np.float32): 4.0}
#: Arguments below this give exactly 0 (weights that would be subnormal).
EXP_FLUSH = {np.dtype(np.float64): -708.0, np.dtype(np.float32): -87.0}

_LOG2E = 1.4426950408889634
_SHIFT64 = 6755399441055744.0       # 1.5·2⁵²: x + SHIFT rounds x to an integer
_SHIFT32 = 12582912.0               # 1.5·2²³
_LN2HI64 = 0.6931471803691238       # 33 significant bits: k·LN2HI exact for |k| < 2^11
_LN2LO64 = 1.9082149292705877e-10
_LN2HI32 = 0.693359375              # 9 significant bits
_LN2LO32 = -2.12194440e-4


@intrinsic
def _as_float64(typingctx, bits):
    """Reinterpret the bits of an int64 as a float64 (an LLVM bitcast; vectorises)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], llvmir.FloatType())
    return types.float32(types.int32), codegen


@njit(cache=True, nogil=True, fastmath={"contract"})
def _exp64(x, n, m):
    # No reassociation here: the shifter trick t − SHIFT relies on the order.
    lo = -708.0
    for i in range(n):
        xi = x[i] - m
        xc = xi if xi > lo else lo
        t = xc * _LOG2E + _SHIFT64
        kf = t - _SHIFT64
        r = (xc - kf * _LN2HI64) - kf * _LN2LO64
        p = 1.0 + r * (1.0 + r * (0.5 + r * (1.6666666666666666e-1 + r * (
            4.1666666666666664e-2 + r * (8.333333333333333e-3 + r * (
                1.388888888888889e-3 + r * (1.984126984126984e-4 + r * (
                    2.48015873015873e-5 + r * (2.7557319223985893e-6 + r * (
                        2.755731922398589e-7 + r * (2.505210838544172e-8 + r * (
                            2.08767569878681e-9 + r * 1.6059043836821613e-10))))))))))))
        scale = _as_float64((np.int64(kf) + 1023) << 52)      # 2^k, exact
        x[i] = p * scale if xi > lo else 0.0
    return _row_sum(x, n)


@njit(cache=True, nogil=True, fastmath={"contract"})
def _exp32(x, n, m):
    lo = np.float32(-87.0)
    m32 = np.float32(m)
    for i in range(n):
        xi = x[i] - m32
        xc = xi if xi > lo else lo
        t = xc * np.float32(_LOG2E) + np.float32(_SHIFT32)
        kf = t - np.float32(_SHIFT32)
        r = (xc - kf * np.float32(_LN2HI32)) - kf * np.float32(_LN2LO32)
        p = np.float32(1.0) + r * (np.float32(1.0) + r * (np.float32(0.5) + r * (
            np.float32(1.6666667e-1) + r * (np.float32(4.1666668e-2) + r * (
                np.float32(8.333334e-3) + r * (np.float32(1.3888889e-3) + r * (
                    np.float32(1.9841270e-4))))))))
        scale = _as_float32((np.int32(kf) + np.int32(127)) << np.int32(23))
        x[i] = p * scale if xi > lo else np.float32(0.0)
    return _row_sum(x, n)


@njit(cache=True, nogil=True, fastmath=_FM)
def _row_sum(x, n):
    # float64 sum, re-associated (vectorised): a sum of n positive terms keeps its
    # γ_n bound in any order
    tot = 0.0
    for i in range(n):
        tot += np.float64(x[i])
    return tot


def _exp_block(x, n, m):
    """x[:n] = exp(x[:n] − m) in place, for x <= m + headroom (−inf → 0); returns
    Σ x[:n] in float64. (Implemented for numba only.)"""
    raise NotImplementedError("numba-only")


@overload(_exp_block)
def _exp_block_impl(x, n, m):
    if x.dtype == types.float64:
        return lambda x, n, m: _exp64(x, n, m)
    return lambda x, n, m: _exp32(x, n, m)


def row_max(x, a, b):
    """max of x[a:b] as float64 (−inf when empty; −inf entries allowed). With a NaN
    entry the result is a NaN or a number, by the NaN's sign bit; the kernels' exp of
    the row carries the NaN into the row's sum either way. (Implemented for numba
    only.)"""
    raise NotImplementedError("numba-only")


@overload(row_max)
def _row_max_impl(x, a, b):
    # the float order is the integer order of the bits with the negatives' magnitude
    # bits flipped (i ^ 0x7FF..F for i < 0): an integer maximum, which vectorises (a
    # float maximum by compare and select does not, without fast-math on NaN)
    wide = x.dtype == types.float64
    it = np.int64 if wide else np.int32
    sign = it(63 if wide else 31)
    mag = it(0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF)
    least = it(np.iinfo(it).min)
    as_float = _as_float64 if wide else _as_float32

    def impl(x, a, b):
        if b <= a:
            return -np.inf
        u = x[a:b].view(it)
        best = least
        for t in range(u.size):
            i = u[t]
            o = i ^ ((i >> sign) & mag)
            best = o if o > best else best
        return np.float64(as_float(best ^ ((best >> sign) & mag)))
    return impl


@njit(cache=True, nogil=True, fastmath={"contract"})
def exp_kernel(x):
    """exp of a 1-D array of values <= 0 with :func:`_exp_block` (for tests)."""
    out = x.copy()
    _exp_block(out, x.size, 0.0)
    return out

