"""Tests of the bundled real sample (numbarope.datasets)."""

import numpy as np
import pytest

from numbarope import datasets
from numbarope.datasets import Sample, load_sample


@pytest.fixture(scope="module")
def sample():
    return load_sample()


def test_type_and_frozen(sample):
    assert isinstance(sample, Sample)
    with pytest.raises(Exception):
        sample.layers = (1,)  # frozen dataclass
    assert set(datasets.__all__) == {"load_sample", "Sample"}


def test_shapes_and_dtypes(sample):
    assert sample.layers == (0, 2, 5)
    assert all(isinstance(layer, int) for layer in sample.layers)
    for arr in (sample.query, sample.key, sample.value):
        assert isinstance(arr, np.ndarray)
        assert arr.dtype == np.float32
        assert arr.shape == (3, 12, 512, 32)  # (layers, heads, n, head_dim)
        assert np.isfinite(arr).all()
    assert sample.shape == (3, 12, 512, 32)


def test_metadata(sample):
    md = sample.metadata
    for key in ("model_name", "text_source", "text_sha256", "n_tokens", "description"):
        assert key in md and isinstance(md[key], str) and md[key]
    assert "all-MiniLM-L6-v2" in md["model_name"]
    assert int(md["n_tokens"]) == 512
    assert len(md["text_sha256"]) == 64
    int(md["text_sha256"], 16)
    assert "make_sample.py" in md["description"]


def test_values_non_trivial(sample):
    for arr in (sample.query, sample.key, sample.value):
        assert np.ptp(arr) > 0
        # every head varies across tokens and dimensions
        std = arr.reshape(arr.shape[0], arr.shape[1], -1).std(axis=-1)
        assert (std > 1e-3).all()
        # tokens differ from one another within every head
        assert (arr.std(axis=2) > 0).any(axis=-1).all()
    # query, key and value are different projections
    assert not np.allclose(sample.query, sample.key)
    assert not np.allclose(sample.key, sample.value)


def test_logit_radii_plausible(sample):
    """Per-head logit radius max|q.k|/sqrt(32) is in the range seen at generation."""
    q = sample.query.astype(np.float64)
    k = sample.key.astype(np.float64)
    logits = np.einsum("lhid,lhjd->lhij", q, k) / np.sqrt(32.0)
    radius = np.abs(logits).max(axis=(-2, -1))
    assert radius.shape == (3, 12)
    assert radius.min() > 2.0
    assert radius.max() < 150.0
    bound = (np.linalg.norm(q, axis=-1).max(-1) * np.linalg.norm(k, axis=-1).max(-1)
             / np.sqrt(32.0))
    assert (bound >= radius * (1 - 1e-6)).all()


def test_missing_file_message(monkeypatch):
    class _Missing:
        def joinpath(self, *_):
            return self

        def read_bytes(self):
            raise FileNotFoundError("nope")

    import importlib.resources as resources

    monkeypatch.setattr(resources, "files", lambda _pkg: _Missing())
    with pytest.raises(FileNotFoundError, match="make_sample.py"):
        load_sample()
