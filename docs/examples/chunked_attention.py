"""Chunked local attention added to numbarope from outside the package.

Llama 4's ``attention_chunk_size = c``: the sequence is cut into chunks of c
positions, and a query sees the keys of its own chunk only, causally (key j is
seen by the query at position p when ⌊j/c⌋ = ⌊p/c⌋ and j <= p). It is not a
relative bias (it depends on the positions, not only on i − j), so it is a
:class:`numbarope.bias.Structure` that gives, per query row, the range of keys it
may see: :class:`numbarope.bias.Chunked` (its whole definition is a ``_key_ranges``
method; a structure of your own is written the same way, docs/extending.md); the
exact path serves it from that alone. The fast path gets a new algorithm, a
causal prefix scan that restarts at every chunk, built from the registered
``"prefix"`` algorithm, and registered with one call. Nothing in numbarope is
edited: this file is all there is.

Use::

    import chunked_attention                      # registers "chunked-prefix"
    out, info = numbarope.rope_attention(q, k, v, rotary=True,
                                         bias=chunked_attention.Chunked(8192),
                                         return_info=True)
"""

from __future__ import annotations

import numpy as np

import numbarope
from numbarope import ops
from numbarope.bias import Causal, Chunked  # noqa: F401  (Chunked: the structure served)


class ChunkedPrefix(ops.Algorithm):
    """Chunked local attention on the fast path: within each chunk, the causal prefix
    scan of the ``"prefix"`` algorithm on that chunk's queries and keys (its state
    starts at zero: a chunk sees nothing before it). Same polynomial, features and
    rounding as ``"prefix"``, so the same certified bound."""

    name = "chunked-prefix"
    structures = (Chunked,)

    def _prefix(self):
        return ops.get("prefix")

    def predict(self, h, degree):
        # no more than a causal prefix scan of the whole sequence (fewer pairs)
        return self._prefix().predict(h, degree)

    def memory(self, h, degree):
        return self._prefix().memory(h, degree)

    def run(self, q, k, v, scale, coef, *, structure, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        if initial_state is not None or return_state:
            raise ValueError("chunked-prefix: every chunk starts from an empty state")
        Q = q[None] if q.ndim == 2 else q
        G, L, _ = Q.shape
        S, Ev = k.shape[0], v.shape[1]
        out, den = np.zeros((G, L, Ev)), np.zeros((G, L))
        c, a = structure.size, structure.start
        pos = np.arange(L) + offset
        prefix = self._prefix()
        for start in np.unique((pos - a) // c * c + a):    # the chunks the queries are in
            rows = np.flatnonzero((pos >= start) & (pos < start + c))
            j0, j1 = max(int(start), 0), min(int(start) + c, S)
            if rows.size == 0 or j1 <= j0:
                continue
            mask = None if key_mask is None else key_mask[j0:j1]
            if mask is not None and not mask.any():
                continue
            o, d = prefix.run(Q[:, rows], k[j0:j1], v[j0:j1], scale, coef,
                              structure=Causal(), offset=int(pos[rows[0]]) - j0,
                              key_mask=mask, workers=workers)
            out[:, rows], den[:, rows] = o, d
        return (out[0], den[0]) if q.ndim == 2 else (out, den)

    def example(self, rng):
        q, k, v = (rng.standard_normal((300, 4)) * 0.4, rng.standard_normal((300, 4)) * 0.4,
                   rng.standard_normal((300, 3)))
        return q, k, v, dict(rotary=True, bias=Chunked(64))


ops.register(ChunkedPrefix())
