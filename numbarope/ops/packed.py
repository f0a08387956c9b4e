"""Packed sequences: each sequence its own problem, through the key-side state.

A :class:`numbarope.bias.Packed` head (flash-attn's ``cu_seqlens``, xformers'
``BlockDiagonalMask``, transformers' padding-free batches) is block-diagonal: the
queries at positions ``cu_s <= p < cu_{s+1}`` see only the keys of that range,
causally (:mod:`.prefix` on the sequence) or all of them (:mod:`.gemm`). The blocks
are not Toeplitz (they sit at absolute positions), but each block is an ordinary
problem of the polynomial method (Alman & Song 2025, §4), so this algorithm runs the
inner algorithm once per sequence on its own rows and keys: ``O(Σ_s (L_s+S_s)·m·Ev)``,
no term across sequences, no padding.

The backward (:meth:`PackedSequences.backward`) is the inner algorithm's certified
backward on each sequence (:func:`numbarope.ops.gemm.gemm_backward`,
:func:`numbarope.ops.prefix.prefix_backward`), its bound the largest of the
sequences' bounds (a gradient entry belongs to one sequence).

The floating-point allowance is the inner algorithm's at the longest sequence's key
count (:func:`numbarope.ops._bounds.rounding_term` counts the terms a row sums, at
most one sequence's keys), and the polynomial's δ is the head's: every sequence's
logits lie in the head's ``[−R, R]``.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
"""

from dataclasses import replace

import numpy as np

from .. import bias as _bias
from ._bounds import causal_gradient_bound, gradient_bound, rounding_term
from ._common import _example_qkv
from .gemm import Gemm, gemm_attention, gemm_backward
from .prefix import Prefix, prefix_attention, prefix_backward
from .registry import Algorithm, register

__all__ = ["PackedSequences", "packed_segments"]

#: Seconds of Python overhead per sequence (slicing and one inner call), in the
#: prediction: many short sequences cost more than their arithmetic.
PER_SEQUENCE = 4e-5


def packed_segments(cu_seqlens, L, S, offset=0):
    """The sequences that hold a query, as index ranges.

    Parameters
    ----------
    cu_seqlens : sequence of int
        ``[0, n₁, n₁+n₂, …, total]`` (:class:`numbarope.bias.Packed`).
    L, S : int
        Query rows (query i at position ``i + offset``) and keys (positions 0..S−1).
    offset : int, optional

    Returns
    -------
    list of (qa, qb, ka, kb) int tuples
        Queries ``qa <= i < qb`` see keys ``ka <= j < kb`` (causally, up to their own
        position, when the structure is causal); empty query ranges are left out.
    """
    out = []
    cu = np.asarray(cu_seqlens, np.int64)
    for a, b in zip(cu[:-1], cu[1:]):
        qa, qb = max(int(a) - offset, 0), min(int(b) - offset, L)
        if qb > qa:
            out.append((qa, qb, min(int(a), S), min(int(b), S)))
    return out


class PackedSequences(Algorithm):
    """Packed sequences (``bias=Packed(cu_seqlens)``): :mod:`.prefix` (causal) or
    :mod:`.gemm` (bidirectional) on each sequence's own rows and keys."""

    name = "packed"
    structures = (_bias.Packed,)

    @staticmethod
    def _inner(h):
        return (Prefix(), _bias.Causal()) if h.structure.causal else (Gemm(), _bias.NoBias())

    def _parts(self, h):
        alg, st = self._inner(h)
        return alg, [replace(h, n=qb - qa, S=kb - ka, structure=st,
                             offset=h.offset + qa - ka if st.causal else 0)
                     for qa, qb, ka, kb in packed_segments(h.structure.cu_seqlens, h.n, h.S,
                                                           h.offset)]

    def predict(self, h, degree):
        alg, parts = self._parts(h)
        return sum(alg.predict(s, degree) + PER_SEQUENCE for s in parts)

    def memory(self, h, degree):
        alg, parts = self._parts(h)
        return max((alg.memory(s, degree) for s in parts), default=0)

    def rounding(self, h, coef, delta):
        longest = max((kb - ka for _, _, ka, kb in packed_segments(
            h.structure.cu_seqlens, h.n, h.S, h.offset)), default=1)
        return rounding_term(max(longest, 1), self.features(h.E, len(coef) - 1), coef,
                             h.radius, h.radius1, delta)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """Each sequence through :func:`~numbarope.ops.prefix.prefix_attention` or
        :func:`~numbarope.ops.gemm.gemm_attention` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`); rows of no sequence get ``den = 0``.
        ``T`` is not read; no state in or out."""
        if initial_state is not None or return_state:
            raise NotImplementedError("packed sequences take no key-side state in or out")
        Q = np.asarray(q)
        single = Q.ndim == 2
        Q3 = Q[None] if single else Q
        G, L = Q3.shape[:2]
        Ev = v.shape[1]
        out = np.zeros((G, L, Ev))
        den = np.zeros((G, L))
        for qa, qb, ka, kb in packed_segments(structure.cu_seqlens, L, k.shape[0], offset):
            if kb <= ka:
                continue                          # no key: out 0, den 0
            km = None if key_mask is None else key_mask[ka:kb]
            if structure.causal:
                o, d = prefix_attention(Q3[:, qa:qb], k[ka:kb], v[ka:kb], scale, coef,
                                        offset=offset + qa - ka, key_mask=km,
                                        workers=workers)
            else:
                o, d = gemm_attention(Q3[:, qa:qb], k[ka:kb], v[ka:kb], scale, coef,
                                      key_mask=km, workers=workers)
            out[:, qa:qb] = o
            den[:, qa:qb] = d
        return (out[0], den[0]) if single else (out, den)

    def backward(self, q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
                 offset=0, key_mask=None, workers=None):
        """The certified fast gradients of :meth:`run`'s inputs, sequence by sequence:
        :func:`~numbarope.ops.prefix.prefix_backward` (causal) or
        :func:`~numbarope.ops.gemm.gemm_backward` on each sequence's rows and keys
        (arguments as :meth:`Algorithm.backward
        <numbarope.ops.registry.Algorithm>`; ``T`` is not read). Rows of no sequence
        and keys no row sees get zero gradients."""
        Q = np.asarray(q)
        dq, dk, dv = np.zeros(Q.shape), np.zeros(k.shape), np.zeros(v.shape)
        for sl, kw in self._sequences(structure, Q, k, offset, key_mask):
            (qs, ks), extra = sl, dict(key_mask=kw["key_mask"], workers=workers)
            if structure.causal:
                g = prefix_backward(Q[..., qs, :], k[ks], v[ks], out[..., qs, :],
                                    den[..., qs], dout[..., qs, :], scale, coef,
                                    offset=kw["offset"], **extra)
            else:
                g = gemm_backward(Q[..., qs, :], k[ks], v[ks], out[..., qs, :],
                                  den[..., qs], dout[..., qs, :], scale, coef, **extra)
            dq[..., qs, :] = g[0]
            dk[ks] += g[1]
            dv[ks] += g[2]
        return dq, dk, dv

    def gradient_bound(self, q, k, v, dout, scale, coef, delta, *, structure=None, T=None,
                       offset=0, key_mask=None, radius=None):
        """The largest over the sequences of :func:`~numbarope.ops._bounds.
        causal_gradient_bound` / :func:`~numbarope.ops._bounds.gradient_bound` of
        :meth:`backward` (every entry of a gradient comes from one sequence)."""
        Q = np.asarray(q)
        worst = np.zeros(3)
        for (qs, ks), kw in self._sequences(structure, Q, k, offset, key_mask):
            if structure.causal:
                b = causal_gradient_bound(Q[..., qs, :], k[ks], v[ks], dout[..., qs, :],
                                          scale, coef, delta, offset=kw["offset"],
                                          key_mask=kw["key_mask"], radius=radius)
            else:
                b = gradient_bound(Q[..., qs, :], k[ks], v[ks], dout[..., qs, :], scale,
                                   coef, delta, key_mask=kw["key_mask"], radius=radius)
            worst = np.maximum(worst, b)
        return tuple(float(x) for x in worst)

    @staticmethod
    def _sequences(structure, Q, k, offset, key_mask):
        """((query slice, key slice), inner keywords) of the sequences with keys."""
        for qa, qb, ka, kb in packed_segments(structure.cu_seqlens, Q.shape[-2],
                                              k.shape[0], offset):
            if kb > ka:
                yield (slice(qa, qb), slice(ka, kb)), dict(
                    offset=offset + qa - ka,
                    key_mask=None if key_mask is None else key_mask[ka:kb])

    def example(self, rng):
        q, k, v = _example_qkv(rng)
        n = q.shape[-2]
        return q, k, v, dict(rotary=True, bias=_bias.Packed([0, n // 3, n // 3 + 1, n]))


register(PackedSequences())
