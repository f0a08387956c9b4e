"""Rotary position embeddings (RoPE).

Conventions follow HF transformers: ``inv_freq[i] = base ** (-2 i / dim)`` for
``i = 0 .. dim/2 - 1``; a feature pair rotated by the angle ``p * inv_freq[i]``
(radians) at position ``p``. Two pairings exist in the wild:

* ``layout="half"`` (HF ``rotate_half``; GPT-NeoX, Llama): feature ``i`` pairs
  with feature ``i + dim/2``;
* ``layout="interleaved"`` (GPT-J, RoFormer): feature ``2i`` pairs with ``2i+1``.

With ``dim < head_dim`` only the leading ``dim`` features are rotated (partial
rotary, as GPT-NeoX's ``rotary_pct``).

Context-extension variants (``Rotary(scaling=...)``) follow the formulas of HF
transformers 5.24, ``transformers/modeling_rope_utils.py``
(``ROPE_INIT_FUNCTIONS``): :class:`LinearScaling`, :class:`DynamicNTKScaling`,
:class:`Llama3Scaling`, :class:`YarnScaling` and :class:`LongRopeScaling`;
:meth:`Rotary.from_hf` builds a ``Rotary`` from a model's
``config.rope_parameters``. YaRN and LongRoPE multiply cos and sin by an
*attention factor* ``a`` (logits of the rotated features grow by ``a**2``);
:func:`rotary_tables` and :func:`apply_rotary` include it, :meth:`Rotary.angles`
does not. Angles are always computed in float64,
whatever the input dtype (a float32 angle ``p * inv_freq`` loses about 1e-3 rad
at position 32768), from the exact product of position and inverse frequency
reduced modulo 2π (:meth:`Rotary.angles`: within :data:`ANGLE_ERROR` = 2.2e-16
rad at any position up to ``2**60 / inv_freq``).

References
----------
J. Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
Neurocomputing 568 (2024), §3.4 (eq. 34: the block rotation R_{Θ,m}).
S. Chen et al., "Extending Context Window of Large Language Models via Positional
Interpolation", arXiv:2306.15595 (2023) (linear scaling; also kaiokendev 2023).
bloc97, "NTK-Aware Scaled RoPE", r/LocalLLaMA (2023), and emozilla's dynamic
variant, as ``rope_type="dynamic"`` in transformers.
B. Peng, J. Quesnelle, H. Fan, E. Shippole, "YaRN: Efficient Context Window
Extension of Large Language Models", arXiv:2309.00071 (2023), §3.2-3.4
(eq. 17-20: the ramp γ and the attention factor 0.1 ln s + 1).
Meta, Llama 3.1 rope scaling (``apply_scaling`` in meta-llama/llama-models
``llama3/model.py``; A. Grattafiori et al., "The Llama 3 Herd of Models",
arXiv:2407.21783, 2024).
Y. Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens",
arXiv:2402.13753 (2024).
"""

from .angles import ANGLE_ERROR, MAX_ANGLE, ROTATION_ERROR, rotation_logit_error
from .embedding import Rotary, apply_rotary, rotary_relative_matrices
from .scaling import (DynamicNTKScaling, LinearScaling, Llama3Scaling, LongRopeScaling,
                      YarnScaling)

# Names outside __all__ that numbarope and its tests import from here: the layouts,
# the cos/sin tables and the rotation (numbarope._pipeline, numbarope.backends), the
# constants and kernels of the angle reduction (tests/test_rotary.py: the pieces of
# 2π, the proof of ANGLE_ERROR).
from .angles import (_C1, _C1_HI, _C1_LO, _C2, _C2_HI, _C2_LO, _C3, _C3_HI,  # noqa: F401
                     _C3_LO, _INV_2PI, _PI, _reduce_two_pi, _reduced_angles)
from .embedding import LAYOUT_ALIASES, LAYOUTS, rotary_tables, rotate  # noqa: F401

__all__ = ["Rotary", "apply_rotary", "rotary_relative_matrices",
           "LinearScaling", "DynamicNTKScaling", "Llama3Scaling", "YarnScaling",
           "LongRopeScaling", "ANGLE_ERROR", "MAX_ANGLE", "ROTATION_ERROR",
           "rotation_logit_error"]
