"""numbarope.rotary against HF transformers (5.24): frequencies, attention factor, rotation.

transformers forms its frequencies and angles in float32, numbarope in float64
(angles exact to half an ulp: double-double products reduced modulo 2π), so each comparison states its tolerance:

* inv_freq: transformers rounds the exponent 2i/dim and the power to float32,
  a relative error of about 2**-24 · (1 + |ln inv_freq|) <= 1e-6 for
  base <= 5e5 (measured: 1.2e-7): rtol 1e-6.
* rotation convention (layout, sign, partial rotary, attention factor): both
  sides get the same float64 cos/sin, so only float64 rounding is left: 1e-13.
* end to end (transformers' float32 cos/sin of LlamaRotaryEmbedding): the
  float32 angle p · inv_freq (inv_freq <= 1) errs by p · (1.2e-7 from inv_freq +
  6e-8 from the product) rad, cos/sin round to 2**-24: tolerance
  1e-6 + 2.5e-7 · n at n positions (measured: 4.4e-8 · n), i.e. it grows with
  the position.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gpt_neox import modeling_gpt_neox  # noqa: E402
from transformers.models.gptj import modeling_gptj  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402

import numbarope  # noqa: E402
from numbarope import Rotary, apply_rotary  # noqa: E402
from numbarope.rotary import rotary_tables  # noqa: E402

HEAD_DIM = 32
MAX_POS = 256       # config.max_position_embeddings
ORIG = 64           # original_max_position_embeddings
INV_RTOL = 1e-6
CONV_ATOL = 1e-13


def _e2e_tol(n):
    return 1e-6 + 2.5e-7 * n


def _ramp(m, lo, hi):
    return [float(v) for v in np.linspace(lo, hi, m)]


# rope_parameters per case, without partial_rotary_factor (added by the tests)
CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
             "original_max_position_embeddings": ORIG},
    "yarn-notrunc-betas": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                           "original_max_position_embeddings": ORIG, "beta_fast": 16.0,
                           "beta_slow": 2.0, "truncate": False},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": ORIG, "mscale": 0.707,
                    "mscale_all_dim": 1.0},
    "yarn-attention-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": ORIG,
                              "attention_factor": 1.5},
    "yarn-implicit-factor": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": None,
                             "original_max_position_embeddings": ORIG},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0,
                 "original_max_position_embeddings": ORIG},   # factor from MAX_POS / ORIG
}
PRF = (1.0, 0.5)


def _params(case, prf):
    p = dict(CASES[case])
    if case == "longrope":
        m = int(HEAD_DIM * prf) // 2
        p["short_factor"], p["long_factor"] = _ramp(m, 1.0, 1.5), _ramp(m, 1.0, 6.0)
    if prf != 1.0:
        p["partial_rotary_factor"] = prf
    return p


def _config(params):
    return transformers.LlamaConfig(hidden_size=2 * HEAD_DIM, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=HEAD_DIM,
                                    max_position_embeddings=MAX_POS, rope_parameters=dict(params))


def _hf_inv_freq(config, seq_len=None):
    kind = config.rope_parameters["rope_type"]
    if kind == "default":       # GPT-NeoX's default honours partial_rotary_factor
        inv, a = modeling_gpt_neox.GPTNeoXRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv, a = ROPE_INIT_FUNCTIONS[kind](config, None, seq_len=seq_len)
    return inv.double().numpy(), float(a)


def _seq_lens(case):
    # None: the frequencies at init; lengths below, at and above the thresholds
    if case in ("dynamic", "longrope"):
        return (None, 10, ORIG, ORIG + 1, MAX_POS, MAX_POS + 1, 3000)
    return (None, 3000)


# ------------------------------------------------ inv_freq and attention factor
@pytest.mark.parametrize("prf", PRF)
@pytest.mark.parametrize("case", list(CASES))
def test_inv_freq_and_attention_factor(case, prf):
    params = _params(case, prf)
    config = _config(params)
    rot = Rotary.from_hf(params, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS)
    assert Rotary.from_hf(config) == rot        # the config object gives the same Rotary
    assert rot.rotary_dim(HEAD_DIM) == int(HEAD_DIM * prf)
    for seq_len in _seq_lens(case):
        inv_hf, a_hf = _hf_inv_freq(config, seq_len)
        inv = rot.inv_freq(HEAD_DIM, seq_len)
        np.testing.assert_allclose(inv, inv_hf, rtol=INV_RTOL, atol=0, err_msg=f"{seq_len=}")
        # the attention factor is computed in Python floats on both sides
        assert rot.attention_factor == pytest.approx(a_hf, rel=1e-15, abs=0)


def test_cases_cover_every_supported_rope_type():
    kinds = {p["rope_type"] for p in CASES.values()}
    assert kinds == {"default", "linear", "dynamic", "llama3", "yarn", "longrope"}
    assert kinds - {"default"} <= set(ROPE_INIT_FUNCTIONS)


# ---------------------------------------------- rotation convention, in float64
def _hf_rotate(x, cos, sin, layout, dim):
    """transformers' own rotation of x (B, H, n, E) with float64 tables (n, dim/2)."""
    xt = torch.from_numpy(x)
    c, s = torch.from_numpy(np.ascontiguousarray(cos)), torch.from_numpy(np.ascontiguousarray(sin))
    if layout == "half":      # GPT-NeoX / Llama rotate_half, partial rotary built in
        c2, s2 = torch.cat((c, c), -1)[None], torch.cat((s, s), -1)[None]
        out, _ = modeling_gpt_neox.apply_rotary_pos_emb(xt, xt, c2, s2)
        return out.numpy()
    # GPT-J rotate_every_two acts on (B, n, H, dim); the rest passes through
    rot = modeling_gptj.apply_rotary_pos_emb(xt[..., :dim].transpose(1, 2), s[None], c[None])
    return torch.cat((rot.transpose(1, 2), xt[..., dim:]), -1).numpy()


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("prf", PRF)
@pytest.mark.parametrize("case", ["default", "dynamic", "llama3", "yarn", "longrope"])
def test_apply_matches_transformers_rotation_float64(case, prf, layout):
    rng = np.random.default_rng(5)
    params = _params(case, prf)
    rot = Rotary.from_hf(params, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS,
                         layout=layout)
    dim = rot.rotary_dim(HEAD_DIM)
    for n in (7, MAX_POS + 9):           # below and above the length thresholds
        x = rng.standard_normal((1, 2, n, HEAD_DIM))
        # the same float64 angles on both sides: only the convention is compared
        ang = rot.angles(np.arange(n), HEAD_DIM)
        a = rot.attention_factor
        ref = _hf_rotate(x, a * np.cos(ang), a * np.sin(ang), layout, dim)
        np.testing.assert_allclose(apply_rotary(x, rot), ref, rtol=0, atol=CONV_ATOL)
        cos, sin = rotary_tables(rot, n, HEAD_DIM)
        np.testing.assert_allclose(cos, a * np.cos(ang), rtol=0, atol=1e-15)


# ------------------------------------ end to end: LlamaRotaryEmbedding (float32)
@pytest.mark.parametrize("case", list(CASES))
def test_llama_rotary_embedding_end_to_end(case):
    params = _params(case, 1.0)
    rot = Rotary.from_hf(params, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS)
    rng = np.random.default_rng(6)
    for n in (5, MAX_POS + 44):
        emb = modeling_llama.LlamaRotaryEmbedding(_config(params))   # fresh: no state
        q = torch.from_numpy(rng.standard_normal((1, 2, n, HEAD_DIM)))
        pos = torch.arange(n)[None]
        cos, sin = emb(q.float(), pos)
        cos, sin = cos.double(), sin.double()
        tol = _e2e_tol(n)
        ours_cos, ours_sin = rotary_tables(rot, n, HEAD_DIM)
        np.testing.assert_allclose(np.concatenate([ours_cos] * 2, -1), cos[0].numpy(),
                                   rtol=0, atol=tol)
        np.testing.assert_allclose(np.concatenate([ours_sin] * 2, -1), sin[0].numpy(),
                                   rtol=0, atol=tol)
        q_hf, _ = modeling_llama.apply_rotary_pos_emb(q, q, cos, sin)
        np.testing.assert_allclose(apply_rotary(q.numpy(), rot), q_hf.numpy(), rtol=0,
                                   atol=tol * np.abs(q.numpy()).max() * 2)


def test_dynamic_is_stateless_where_transformers_is_not():
    params = _params("dynamic", 1.0)
    rot = Rotary.from_hf(params, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS)
    short = np.array(rotary_tables(rot, MAX_POS - 6, HEAD_DIM)[0])
    rotary_tables(rot, 4 * MAX_POS, HEAD_DIM)               # a long call in between
    np.testing.assert_array_equal(rotary_tables(rot, MAX_POS - 6, HEAD_DIM)[0], short)
    # a fresh transformers module agrees with our short call ...
    emb = modeling_llama.LlamaRotaryEmbedding(_config(params))
    x = torch.zeros(1, 1, 1, HEAD_DIM)
    cos0 = emb(x, torch.arange(MAX_POS - 6)[None])[0][0, :, :HEAD_DIM // 2].double().numpy()
    np.testing.assert_allclose(short, cos0, rtol=0, atol=_e2e_tol(MAX_POS))
    # ... and within (MAX_POS, cached length] transformers keeps the longer call's base
    emb(x, torch.arange(4 * MAX_POS)[None])
    n = MAX_POS + 10
    stale = emb(x, torch.arange(n)[None])[0][0, :, :HEAD_DIM // 2].double().numpy()
    fresh = modeling_llama.LlamaRotaryEmbedding(_config(params))(x, torch.arange(n)[None])
    ours = rotary_tables(rot, n, HEAD_DIM)[0]
    np.testing.assert_allclose(ours, fresh[0][0, :, :HEAD_DIM // 2].double().numpy(),
                               rtol=0, atol=_e2e_tol(n))
    assert np.abs(ours - stale).max() > 1e-3


def test_dynamic_ntk_with_positions_uses_the_batch_maximum_as_transformers():
    """A left-padded batch: every row's frequencies follow max(position_ids) + 1 of the
    whole batch, as transformers' dynamic RoPE does (tolerance: its float32 cos/sin)."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=16,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                       "rope_theta": 10000.0})
    rot = numbarope.Rotary.from_hf(cfg)
    S, E = 24, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, S, E, generator=g, dtype=torch.float64) for _ in range(3))
    pos = torch.stack([torch.arange(S),
                       torch.cat([torch.zeros(5, dtype=torch.long), torch.arange(S - 5)])])
    cos, sin = LlamaRotaryEmbedding(cfg)(v, pos)
    qr, kr = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    keep = torch.ones(2, 1, S, dtype=torch.bool)
    keep[1, :, :5] = False
    ref = numbarope.rope_attention(qr, kr, v, is_causal=True, key_padding_mask=keep)
    out = numbarope.rope_attention(q, k, v, rotary=rot, positions=pos[:, None, :],
                                   is_causal=True, key_padding_mask=keep)
    assert (out[0] - ref[0]).abs().max().item() < 1e-6
    assert (out[1, :, 5:] - ref[1, :, 5:]).abs().max().item() < 1e-6
