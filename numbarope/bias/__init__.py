"""Relative biases: builders of arrays and typed structures.

A relative bias is a function ``b(t)`` of the offset ``t = i + query_offset − j``
(query i, key j; ``query_offset`` 0 for self-attention) added to the logits;
``-inf`` masks. For L queries and S keys it is stored as an array of length
``L+S−1`` with ``bias[e] = b(t)``, ``e = i − j + S − 1``, i.e.
``t = e − (S − 1) + query_offset``; for a square problem (``L = S = n``,
offset 0) that is ``bias[t + n − 1] = b(t)``, ``t`` in ``[−(n−1), n−1]``. This is
the storage expected by ``rope_attention(..., bias=..., query_offset=...)``.
A relative bias keeps the Toeplitz structure, so it costs the fast path nothing
in accuracy: it is applied exactly (Alman & Song 2025, §1).

Two layers:

* builders returning square arrays: :func:`causal_bias`, :func:`window_bias`,
  :func:`alibi_slopes`, :func:`alibi_bias`, :func:`t5_buckets`, :func:`t5_bias`;
* typed structures (frozen dataclasses, subclasses of :class:`Structure`; the
  relative ones of :class:`RelativeBias`) that carry their structure to the
  planner — they know no algorithm: each algorithm of :mod:`numbarope.ops`
  names the structure types it serves: :class:`NoBias`,
  :class:`Causal`, :class:`Window`, :class:`Decay`, :class:`ALiBi`,
  :class:`T5Buckets`, :class:`Dense` and their :class:`Sum`. Each gives its
  array with ``values(L, S, offset)`` (``materialize(n)`` for a square one).

Composition: ``X + Y`` adds the biases (``-inf`` wins) and keeps the most
specific structure it can: ``NoBias()`` is the identity, ``Causal() + X`` is
``X`` with the causal mask when ``X`` has one (``Decay(r) + Causal() ==
Decay(r, causal=True)``, ``Window(l, r) + Causal() == Window(l, 0)``), two
windows give their intersection, two decays the sum of their rates; anything
else is a :class:`Sum`. An array operand is a :class:`Dense`.

Every structure also says which keys a query row may see at most, as one
contiguous range per row (:meth:`Structure.key_ranges`: the causal mask,
a window; None for all keys), which the exact path uses to skip key blocks, and
gives its most specific equivalent (:meth:`Structure.canonical`). A structure
that is not a function of ``i − j`` alone (e.g. chunked local attention) is a
:class:`Structure` that is not a :class:`RelativeBias`: it has key ranges and no
bias values; ``docs/extending.md`` adds one from outside the package.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §1 (relative bias, Toeplitz structure).
O. Press, N. A. Smith, M. Lewis, "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation", ICLR 2022, §3 (ALiBi).
C. Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 21 (2020), §2.1 (T5 relative buckets).
A. Q. Jiang et al., "Mistral 7B", arXiv:2310.06825 (2023), §2 (sliding window).
"""

from .arrays import (alibi_bias, alibi_slopes, causal_bias, offsets, t5_bias, t5_buckets,
                     window_bias)
from .parametric import ALiBi, Decay, T5Buckets, Window
from .structures import (Causal, Chunked, Dense, NoBias, Packed, RelativeBias, Structure,
                         Sum, as_structure)

__all__ = ["offsets", "causal_bias", "window_bias", "alibi_slopes", "alibi_bias",
           "t5_buckets", "t5_bias", "Structure",
           "RelativeBias", "NoBias", "Causal", "Chunked", "Packed", "Window", "Decay", "ALiBi",
           "T5Buckets",
           "Dense", "Sum", "as_structure"]
