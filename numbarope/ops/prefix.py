"""Causal mask (any offset, key padding): chunked prefix sums of key-side states.

With ``p(q'ᵀk') = φ(q')ᵀψ(k')`` (the polynomial method, Alman & Song 2025, §4;
:mod:`numbarope.ops._common`), causal attention is a sum over a prefix of the keys::

    num_i = Σ_{j visible to i} p(q'_iᵀk'_j) [v_j, 1],   out_i = num_i[:Ev] / num_i[Ev].

The keys are cut into chunks of C = :func:`prefix_chunk` keys; each chunk's state
``Σ_{j∈c} ψ(k'_j)[v_j, 1]ᵀ`` is formed once, an exclusive prefix sum of the states
gives every row the state of the chunks before its last visible key
(``φ(q'_i)ᵀS``), and the keys of its own chunk are taken by Horner on the logits,
masked (:func:`numbarope.ops._common._scan`, the masked chunk kernel
:func:`numbarope.ops._common._horner_block` without a decay). Work
``O((G·L + S)·m·(Ev+1) + G·L·C·(E + Ev + g))``.

Rectangular attention at an offset (query i at position ``i + offset`` sees the keys
at positions ``<= i + offset``), padded keys (removed: the real keys keep their
order) and G query heads on one key/value head are all served. The planner gives
this algorithm a head only when the causal mask hides some real key from some row
(else :mod:`numbarope.ops.gemm` serves it).

State in, state out: ``initial_state=(S₀, s₀)`` is the state (:func:`key_state`) of
keys before key 0 that every query row sees in full (the earlier blocks of one long
sequence); ``return_state=True`` returns the state of this call's real keys plus the
initial one, for the next block.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §4.2
(any summation order of k terms is within γ_{k−1}).
"""

import numpy as np

from .. import bias as _bias
from .._runtime.threads import resolve_workers
from ._common import (_check_state, _example_qkv, _scan, _Side, _setup, _shaped, add_states,
                      key_side_state, prefix_chunk, scan_memory, visible_keys)
from ._cost import COST_CONSTANTS
from ._features import n_features
from .registry import Algorithm, register

__all__ = ["Prefix", "prefix_attention", "key_state", "add_states", "prefix_memory",
           "prefix_chunk"]

#: The key-side state of a block of keys alone (:func:`numbarope.ops._common.key_side_state`):
#: ``key_state(k, v, scale, coef, *, key_mask=None, workers=None) -> (S, s)``; the same
#: state as :mod:`numbarope.ops.gemm`'s.
key_state = key_side_state


def prefix_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`prefix_attention`:
    :func:`numbarope.ops._common.scan_memory` with :func:`prefix_chunk` keys per chunk
    (the stored chunk states of a group, the tasks' states, per thread a feature block
    and the intra-chunk logits). Parameters as :func:`numbarope.ops.gemm.gemm_memory`."""
    S = n if S is None else S
    return scan_memory(n, S, E, Ev, degree, heads, prefix_chunk(n_features(E, degree)))


def prefix_attention(q, k, v, scale, coef, *, offset=0, key_mask=None, workers=None,
                     initial_state=None, return_state=False):
    """Fast causal attention: query i (position ``i + offset``) sees the real keys at
    positions ``<= i + offset``.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, already rotated (RoPE) if any; G query heads sharing this key/value
        head are computed together (key side once).
    k : (S, E) ndarray of float64
        Keys at positions 0 .. S−1, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    offset : int, optional
        Position of query 0 (default 0).
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part.
    workers : int, optional
        Threads (scipy.fft's meaning; None: :func:`numbarope.get_workers`). The result
        does not depend on it (bitwise).
    initial_state : tuple of ndarray, optional
        ``(S₀, s₀)`` of shapes (m, Ev) and (m,): the key-side state (:func:`key_state`)
        of keys before key 0 that every query row sees in full.
    return_state : bool, optional
        Also return the state of this call's real keys plus ``initial_state`` (the
        ``initial_state`` of the next block).

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_{j visible} p(s·q_iᵀk_j)`` (rows with den <= 0, no visible key, get out = 0).
    state : (S, s), with ``return_state=True``

    Notes
    -----
    Accuracy: each weight sum is ``Σ_j p(q'_iᵀk'_j)[v_j, 1]`` with p formed in float64
    from the same features (or by Horner inside a chunk); only the order of the
    additions differs from a running sum (chunk states, task totals, prefix). The
    rounding bound γ_{n+m+2g+2}·Σ|φ_αψ_α| of
    :func:`numbarope.ops._bounds.rounding_term` counts the terms, not their order
    (Higham 2002, §4.2), so it holds.
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    F = _Side(coef, E)
    if initial_state is not None:
        initial_state = _check_state(initial_state, F.m, Ev, "prefix")
    nw = resolve_workers(workers)
    nk = kpos.size
    if (G * L == 0 or (nk == 0 and initial_state is None)) and not return_state:
        return _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
    lim = visible_keys(L, S, offset, True, key_mask)
    if lim is None:                       # every row sees every real key
        lim = np.full(L, nk, np.int64)
    num, den, St, st = _scan(qs, ks, v64, np.tile(lim, G), F, nw, prefix_chunk(F.m),
                             state=initial_state)
    res = _shaped(num, den, G, L, Ev, single)
    return res + ((St, st),) if return_state else res


class Prefix(Algorithm):
    """Causal mask (any offset, key padding): chunked prefix sums of key-side states,
    a masked polynomial inside each chunk (:func:`prefix_attention`)."""

    name = "prefix"
    structures = (_bias.Causal,)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(prefix_chunk(m), max(h.S, 1))
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * ch * (2 * degree + 3)) / h.heads

    def memory(self, h, degree):
        return prefix_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`prefix_attention` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`); ``structure`` (``Causal()``) and ``T``
        are not read. ``initial_state`` / ``return_state``: the state ``(S, s)`` of
        :func:`key_state` of keys before key 0."""
        return prefix_attention(q, k, v, scale, coef, offset=offset, key_mask=key_mask,
                                workers=workers, initial_state=initial_state,
                                return_state=return_state)

    def example(self, rng):
        return (*_example_qkv(rng), dict(rotary=True, is_causal=True))


register(Prefix())
