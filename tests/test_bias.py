import numpy as np
import pytest

import naive
import numbarope as nr
from numbarope import bias as nb


def test_offsets_and_causal():
    assert nb.offsets(3).tolist() == [-2, -1, 0, 1, 2]
    assert nb.offsets(0).shape == (0,)
    b = nb.causal_bias(3)
    assert np.isneginf(b[:2]).all() and (b[2:] == 0).all()


def test_causal_bias_equals_is_causal():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((11, 4)) for _ in range(3))
    a = nr.rope_attention(q, k, v, rotary=True, bias=nb.causal_bias(11), method="exact")
    b = nr.rope_attention(q, k, v, rotary=True, is_causal=True, method="exact")
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_alibi_slopes_known():
    np.testing.assert_allclose(nb.alibi_slopes(8), 2.0 ** -np.arange(1, 9))
    s6 = nb.alibi_slopes(6)       # 4 heads of the power-of-2 rule + 2 interleaved
    np.testing.assert_allclose(s6[:4], 2.0 ** (-2.0 * np.arange(1, 5)))
    np.testing.assert_allclose(s6[4:], [2.0 ** -1, 2.0 ** -3])


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_and_window_match_naive(causal):
    rng = np.random.default_rng(1)
    n = 13
    q, k, v = (rng.standard_normal((n, 4)) for _ in range(3))
    for b in (nb.alibi_bias(n, 0.3, causal=causal), nb.window_bias(n, 4, causal=causal)):
        ref = naive.rope_attention(q, k, v, bias=lambda t: b[t + n - 1])
        out = nr.rope_attention(q, k, v, rotary=True, bias=b, method="exact")
        np.testing.assert_allclose(out, ref, atol=1e-12)
        fast, info = nr.rope_attention(q * 0.3, k * 0.3, v, rotary=True, bias=b,
                                       method="fast", return_info=True)
        ref = naive.rope_attention(q * 0.3, k * 0.3, v, bias=lambda t: b[t + n - 1])
        assert np.abs(fast - ref).max() <= info.error_bound


def test_t5_buckets_follow_hf():
    table = np.arange(32, dtype=float)
    b = nb.t5_bias(200, table, bidirectional=True, max_distance=128)
    n = 200
    at = lambda t: b[t + n - 1]   # noqa: E731
    assert at(0) == 0              # j - i = 0
    assert at(-1) == 17            # j - i = +1 -> upper half
    assert at(1) == 1
    assert at(7) == 7 and at(8) == 8
    assert at(199) == 15           # saturates at the last bucket of the half
    d = nb.t5_bias(50, table, bidirectional=False)
    assert d[49 - 5] == 0          # decoder: future keys (j > i) share bucket 0
    assert (np.diff(d[49:]) >= 0).all()


def test_bad_inputs():
    with pytest.raises(ValueError, match="n must be"):
        nb.offsets(-1)
    with pytest.raises(ValueError, match="window"):
        nb.window_bias(4, -2)
    with pytest.raises(ValueError, match="num_heads"):
        nb.alibi_slopes(0)
    with pytest.raises(ValueError, match="slopes"):
        nb.alibi_bias(4, np.nan)
    with pytest.raises(ValueError, match="table"):
        nb.t5_bias(4, np.zeros((2, 3, 4)))


def test_t5_field_report_max_distance():
    table = np.arange(32.)
    with pytest.raises(ValueError, match=r"max_distance must be an int > num_buckets // 2 = 16"):
        nb.t5_bias(40, table, bidirectional=False, max_distance=10)
    with pytest.raises(ValueError, match=r"max_distance must be an int > num_buckets // 2 = 16"):
        nb.t5_bias(40, table, bidirectional=False, max_distance=16)
    with pytest.raises(ValueError, match=r"max_distance must be an int > num_buckets // 4 = 8"):
        nb.t5_bias(40, table, bidirectional=True, max_distance=8)
    # the smallest valid max_distance gives buckets in range for every offset
    for bidirectional, md in ((False, 17), (True, 9)):
        b = nb.t5_buckets(500, 32, bidirectional=bidirectional, max_distance=md)
        assert b.min() >= 0 and b.max() < 32


@pytest.mark.parametrize("kwargs, match", [
    (dict(table=[0., np.nan, 1., 2.]), "table must not contain NaN or"),
    (dict(table=[0., np.inf, 1., 2.]), r"table must not contain NaN or \+inf"),
    (dict(table=np.array([1 + 1j, 2, 3, 4])), "table must be real numbers"),
    (dict(table=["a", "b", "c", "d"]), "table must be real numbers"),
    (dict(table=np.zeros((2, 3, 4))), r"table must have shape"),
    (dict(table=np.zeros(3)), r"num_buckets must be an int >= 4"),          # max_exact 0
    (dict(table=np.zeros(1), bidirectional=False), r"num_buckets must be an int >= 2"),
    (dict(table=np.zeros(0), bidirectional=False), r"num_buckets must be an int >= 2"),
    (dict(max_distance=128.0), r"max_distance must be an int"),
    (dict(max_distance=True), r"max_distance must be an int"),
    (dict(max_distance=-5), r"max_distance must be an int > num_buckets // 4 = 8"),
    (dict(bidirectional="False"), "bidirectional must be a bool"),
    (dict(bidirectional=None), "bidirectional must be a bool"),
    (dict(n=-1), "n must be an int >= 0"),
    (dict(n=4.0), "n must be an int >= 0"),
    (dict(n=True), "n must be an int >= 0"),
])
def test_t5_bad_inputs(kwargs, match):
    args = dict(n=6, table=np.zeros(32), bidirectional=True, max_distance=128)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nb.t5_bias(**args)


def test_t5_minus_inf_table_masks_and_numpy_ints():
    table = np.zeros(4)
    table[0] = -np.inf
    b = nb.t5_bias(np.int64(3), table, bidirectional=np.bool_(False),
                   max_distance=np.int32(3))
    assert np.isneginf(b[:3]).all() and np.isfinite(b[3:]).all()


@pytest.mark.parametrize("call, match", [
    (lambda: nb.t5_buckets(4, 3), r"num_buckets must be an int >= 4"),
    (lambda: nb.t5_buckets(4, 32.0), r"num_buckets must be an int"),
    (lambda: nb.window_bias(4, 1.5), "window must be an int >= 0"),
    (lambda: nb.window_bias(4, True), "window must be an int >= 0"),
    (lambda: nb.window_bias(4, 2, causal="yes"), "causal must be a bool"),
    (lambda: nb.window_bias(-1, 2), "n must be an int >= 0"),
    (lambda: nb.causal_bias(2.0), "n must be an int >= 0"),
    (lambda: nb.alibi_slopes(2.0), "num_heads must be an int >= 1"),
    (lambda: nb.alibi_slopes(True), "num_heads must be an int >= 1"),
    (lambda: nb.alibi_bias(4, np.ones((2, 3))), r"slopes must be a scalar or have shape \(H,\)"),
    (lambda: nb.alibi_bias(4, [0.5, np.inf]), "slopes must be finite and >= 0"),
    (lambda: nb.alibi_bias(4, -0.5), "slopes must be finite and >= 0"),
    (lambda: nb.alibi_bias(4, 1j), "slopes must be real numbers"),
    (lambda: nb.alibi_bias(4, "0.5"), "slopes must be real numbers"),
    (lambda: nb.alibi_bias(4, 0.5, causal=None), "causal must be a bool"),
    (lambda: nb.alibi_bias(4.5, 0.5), "n must be an int >= 0"),
])
def test_other_builders_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_t5_buckets_match_transformers():
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    settings = [  # (num_buckets, max_distance, bidirectional, n)
        (32, 128, True, 400), (32, 128, False, 400), (32, 9, True, 60),
        (32, 17, False, 60), (4, 2, True, 9), (2, 2, False, 9), (5, 3, True, 20),
        (33, 100, False, 300), (64, 256, True, 700), (8, 1000, True, 50),
    ]
    for num_buckets, max_distance, bidirectional, n in settings:
        ours = nb.t5_buckets(n, num_buckets, bidirectional=bidirectional,
                             max_distance=max_distance)
        rel = torch.from_numpy(-nb.offsets(n))      # memory - query position = j - i
        ref = T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=num_buckets,
            max_distance=max_distance).numpy()
        np.testing.assert_array_equal(
            ours, ref, err_msg=str((num_buckets, max_distance, bidirectional, n)))
        table = np.random.default_rng(n).standard_normal((2, num_buckets))
        np.testing.assert_array_equal(
            nb.t5_bias(n, table, bidirectional=bidirectional, max_distance=max_distance),
            table[:, ref])
