"""Packed sequences: each sequence its own problem, through the key-side state.

A :class:`numbarope.bias.Packed` head (flash-attn's ``cu_seqlens``, xformers'
``BlockDiagonalMask``, transformers' padding-free batches) is block-diagonal: the
queries at positions ``cu_s <= p < cu_{s+1}`` see only the keys of that range,
causally (:mod:`.prefix` on the sequence) or all of them (:mod:`.gemm`). The blocks
are not Toeplitz (they sit at absolute positions), but each block is an ordinary
problem of the polynomial method (Alman & Song 2025, §4), so this algorithm runs the
inner algorithm once per sequence on its own rows and keys: ``O(Σ_s (L_s+S_s)·m·Ev)``,
no term across sequences, no padding.

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
from ._bounds import rounding_term
from ._common import _example_qkv
from .gemm import Gemm, gemm_attention
from .prefix import Prefix, prefix_attention
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

    def example(self, rng):
        q, k, v = _example_qkv(rng)
        n = q.shape[-2]
        return q, k, v, dict(rotary=True, bias=_bias.Packed([0, n // 3, n // 3 + 1, n]))


register(PackedSequences())
