"""Every query sees every key, no bias: two GEMMs through a key-side state.

With ``p(q'ᵀk') = φ(q')ᵀψ(k')`` (the polynomial method, Alman & Song 2025, §4;
:mod:`numbarope.ops._common`), when every query row sees every real key with weight
1 the numerator and denominator of every row are one product with the same state::

    S = Σ_j ψ(k'_j) v_jᵀ  (m × Ev),   s = Σ_j ψ(k'_j)  (m,),
    num_i = φ(q'_i)ᵀ S,   den_i = φ(q'_i)ᵀ s,   out_i = num_i / den_i,

``O((G·L + S)·m·(Ev+1))`` work for G query heads of L rows on S keys, m = C(E+g, g)
features; features are formed in blocks kept in L2 next to their GEMM, never as an
``n × m`` array.

State in, state out: ``initial_state=(S₀, s₀)`` adds the state of further keys that
every row sees (e.g. the earlier blocks of one long sequence: :func:`key_state` of
each block, combined by :func:`add_states`), ``return_state=True`` returns the state
of this call's keys plus the initial one. :func:`apply_state` is the query side alone.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4.
N. J. Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed. (2002), §3.1.
"""

import numpy as np

from .. import bias as _bias
from .._runtime.threads import resolve_workers
from ._common import (_check_state, _example_qkv, _key_states, _query_apply, _Side, _setup,
                      _shaped, _state_tasks, add_states, base_memory, gemm_chunk,
                      key_side_state)
from ._cost import COST_CONSTANTS
from ._features import n_features
from .registry import Algorithm, register

__all__ = ["Gemm", "gemm_attention", "key_state", "add_states", "apply_state",
           "gemm_memory"]

#: The key-side state of a block of keys alone (:func:`numbarope.ops._common.key_side_state`):
#: ``key_state(k, v, scale, coef, *, key_mask=None, workers=None) -> (S, s)``.
key_state = key_side_state


def gemm_memory(n, E, Ev, degree, S=None, heads=1):
    """Peak working memory (bytes, an upper estimate) of :func:`gemm_attention`.

    Parameters
    ----------
    n, E, Ev, degree : int
        Query rows n (= L), head_dim, value columns, polynomial degree.
    S : int, optional
        Key rows (default n).
    heads : int, optional
        Query heads computed together on one key/value head (grouped-query).

    Returns
    -------
    int
        Bytes of float64 work arrays, not counting inputs/outputs: the copies
        (:func:`~numbarope.ops._common.base_memory`), the tasks' private states and per
        thread a feature block, its product and a running state.
    """
    S = n if S is None else S
    m = n_features(E, degree)
    ev1 = Ev + 1
    nw = resolve_workers(None)
    cf = min(gemm_chunk(m), max(n, S, 1))
    per_thread = 8 * (m * cf + 2 * m * ev1)        # feature block, product, running S
    states = _state_tasks(m, ev1, -(-S // cf)) * m * ev1
    return base_memory(n, S, E, Ev, heads) + 8 * states + nw * per_thread


def gemm_attention(q, k, v, scale, coef, *, key_mask=None, workers=None, initial_state=None,
                   return_state=False):
    """Fast attention in which every query row sees every real key, no bias.

    Parameters
    ----------
    q : (L, E) or (G, L, E) ndarray of float64
        Queries, already rotated (RoPE) if any. G query heads that share this
        key/value head (grouped-query attention) are computed together: the key-side
        state is formed once for all of them.
    k : (S, E) ndarray of float64
        Keys, already rotated.
    v : (S, Ev) ndarray of float64
    scale : float
        s > 0.
    coef : (g+1,) ndarray of float64
        Monomial coefficients of p ≈ exp on the logit interval.
    key_mask : (S,) ndarray of bool, optional
        True = a real key; padded keys take no part.
    workers : int, optional
        Threads for the feature kernels and the GEMMs (scipy.fft's meaning; None:
        :func:`numbarope.get_workers`). The result does not depend on it (bitwise).
    initial_state : tuple of ndarray, optional
        ``(S₀, s₀)`` of shapes (m, Ev) and (m,): the key-side state (:func:`key_state`)
        of further keys that every query row sees in full, added to this call's.
    return_state : bool, optional
        Also return the state of this call's real keys plus ``initial_state``.

    Returns
    -------
    out : (L, Ev) or (G, L, Ev) ndarray of float64
    den : (L,) or (G, L) ndarray of float64
        ``Σ_j p(s·q_iᵀk_j)`` (rows with den <= 0 get out = 0).
    state : (S, s), with ``return_state=True``
    """
    single, G, L, E, S, Ev, qs, ks, v64, kpos = _setup(q, k, v, scale, coef, key_mask)
    F = _Side(coef, E)
    if initial_state is not None:
        initial_state = _check_state(initial_state, F.m, Ev, "gemm")
    nw = resolve_workers(workers)
    if G * L == 0 and not return_state:
        return _shaped(np.zeros((0, Ev)), np.zeros(0), G, L, Ev, single)
    if kpos.size == 0 and initial_state is None:
        res = _shaped(np.zeros((G * L, Ev)), np.zeros(G * L), G, L, Ev, single)
        return res + ((np.zeros((F.m, Ev)), np.zeros(F.m)),) if return_state else res
    St, st = _key_states(ks, v64, F, nw)
    if initial_state is not None:
        St += initial_state[0]
        st += initial_state[1]
    num, den = _query_apply(qs, St, st, F, nw)
    res = _shaped(num, den, G, L, Ev, single)
    return res + ((St, st),) if return_state else res


def apply_state(q, state, scale, coef, *, workers=None):
    """The query side alone: ``out_i = φ(q'_i)ᵀS / φ(q'_i)ᵀs`` for a state ``(S, s)``
    (:func:`key_state`, :func:`add_states`) of keys every row sees — what
    ``gemm_attention(q, k[:0], v[:0], ..., initial_state=state)`` gives.

    Returns ``(out, den)`` shaped as :func:`gemm_attention`'s.
    """
    Q = np.asarray(q)
    E = Q.shape[-1]
    S0 = np.asarray(state[0])
    Ev = S0.shape[1]
    return gemm_attention(Q, np.zeros((0, E)), np.zeros((0, Ev)), scale, coef,
                          workers=workers, initial_state=state)


class Gemm(Algorithm):
    """Every query sees every key, no bias: two GEMMs through a key-side state
    ``Σ_j ψ(k_j)[v_j, 1]ᵀ`` (Alman & Song 2025, §4, the polynomial method;
    :func:`gemm_attention`)."""

    name = "gemm"
    structures = (_bias.NoBias,)

    def predict(self, h, degree):
        c = COST_CONSTANTS
        m = n_features(h.E, degree)
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * (h.Ev + 1)) / h.heads

    def memory(self, h, degree):
        return gemm_memory(h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, structure=None, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """:func:`gemm_attention` (see :meth:`Algorithm.run
        <numbarope.ops.registry.Algorithm.run>`); ``structure``, ``T`` and ``offset`` are
        not read: every row sees every real key with weight 1. ``initial_state`` /
        ``return_state``: the state ``(S, s)`` of :func:`key_state`."""
        return gemm_attention(q, k, v, scale, coef, key_mask=key_mask, workers=workers,
                              initial_state=initial_state, return_state=return_state)

    def example(self, rng):
        return (*_example_qkv(rng), dict(rotary=True))


register(Gemm())
