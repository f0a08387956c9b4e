"""Regressions for what a new user found by trying to break the package."""

import subprocess
import sys
import warnings

import numpy as np
import pytest

import numbarope as nr
from numbarope import rope_attention
from numbarope.cli import main


def _qkv(seed=0, n=64, E=8, s=0.3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, n, E)) * s
    return q, k, rng.standard_normal((2, n, E))


def test_auto_with_degree_never_misses_eps():
    q, k, v = _qkv()
    out, info = nr.rope_attention(q, k, v, rotary=True, degree=0, return_info=True)
    assert (info.method == "exact").all()
    assert info.heads[0].code == "misses-eps" and "certifies" in info.heads[0].reason
    ex = nr.rope_attention(q, k, v, rotary=True, method="exact")
    assert np.abs(out - ex).max() <= 1e-3 * np.abs(v).max()


def test_fast_with_degree_is_honoured_and_bound_reported():
    q, k, v = _qkv()
    out, info = nr.rope_attention(q, k, v, rotary=True, degree=0, method="fast",
                                  return_info=True)
    ex = nr.rope_attention(q, k, v, rotary=True, method="exact")
    assert (info.degree == 0).all()
    assert np.abs(out - ex).max() <= info.error_bound.max()


def test_float32_fast_refuses_eps_below_output_rounding():
    q, k, v = (a.astype(np.float32) for a in _qkv())
    with pytest.raises(ValueError, match="float32 output rounding"):
        nr.rope_attention(q, k, v, rotary=True, method="fast", eps=1e-8)
    out, info = nr.rope_attention(q, k, v, rotary=True, eps=1e-8, return_info=True)
    assert (info.method == "exact").all()


def test_float32_exact_reports_output_rounding():
    q, k, v = (a.astype(np.float32) for a in _qkv())
    out, info = nr.rope_attention(q, k, v, rotary=True, method="exact", return_info=True)
    ref = nr.rope_attention(*(a.astype(np.float64) for a in (q, k, v)), rotary=True,
                            method="exact")
    assert (info.error_bound > 0).all()
    assert np.abs(out - ref).max() <= info.error_bound.max()


def test_rotary_message_for_head_dim_one_is_actionable():
    q = np.zeros((3, 1))
    with pytest.raises(ValueError, match="cannot be rotated: use rotary=None"):
        nr.rope_attention(q, q, q, rotary=True)


def test_radius_too_small_warns_when_verify_sees_it():
    q, k, v = _qkv(s=2.0)
    with pytest.warns(RuntimeWarning, match="radius"):
        nr.rope_attention(q, k, v, rotary=True, method="fast", radius=0.01, verify=8)


def test_huge_values_do_not_overflow():
    q = np.zeros((1, 9, 4))
    for vmax in (1e308, np.finfo(np.float64).max):
        v = np.full((1, 9, 3), vmax)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for method in ("exact", "fast"):
                out = nr.rope_attention(q, q, v, method=method)
                np.testing.assert_allclose(out, vmax, rtol=1e-12)


def test_big_endian_is_accepted():
    q, k, v = _qkv()
    ref = nr.rope_attention(q, k, v, rotary=True, method="exact")
    out = nr.rope_attention(q.astype(">f8"), k.astype(">f8"), v.astype(">f8"), rotary=True,
                            method="exact")
    np.testing.assert_array_equal(out, ref)


def test_masked_array_refused():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="masked"):
        nr.rope_attention(np.ma.masked_less(q, 0), k, v)


@pytest.mark.parametrize("kw, exc", [(dict(radius="1"), TypeError),
                                     (dict(return_info="yes"), TypeError)])
def test_option_types(kw, exc):
    q, k, v = _qkv()
    with pytest.raises(exc, match=next(iter(kw))):
        nr.rope_attention(q, k, v, **kw)


def test_rotary_false_means_none_and_base_string_refused():
    q, k, v = _qkv()
    np.testing.assert_array_equal(nr.rope_attention(q, k, v, rotary=False),
                                  nr.rope_attention(q, k, v))
    with pytest.raises(TypeError, match="base"):
        nr.Rotary(base="1e4")
    with pytest.raises(ValueError, match="n must be an int"):
        nr.rotary_relative_matrices(4.0, None, 4)


@pytest.fixture
def npz(tmp_path):
    q, k, v = _qkv()
    path = tmp_path / "in.npz"
    np.savez(path, query=q, key=k, value=v)
    rel = tmp_path / "rel.npz"
    np.savez(rel, query=q, key=k, value=v, relative=nr.rotary_relative_matrices(64, None, 8))
    extra = tmp_path / "extra.npz"
    np.savez(extra, query=q, key=k, value=v, foo=q)
    return tmp_path, path, rel, extra


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_refuses_overwriting_input(npz, capsys):
    _, path, _, _ = npz
    before = path.read_bytes()
    assert main(["run", str(path), "-o", str(path)]) == 2
    assert "is the input file" in _one_line(capsys)
    assert path.read_bytes() == before


def test_cli_rotary_flags_with_relative_refused(npz, capsys):
    tmp, _, rel, _ = npz
    assert main(["run", str(rel), "-o", str(tmp / "o.npz"), "--layout", "interleaved"]) == 2
    assert "do not apply" in _one_line(capsys)


def test_cli_unknown_arrays_refused(npz, capsys):
    tmp, _, _, extra = npz
    assert main(["run", str(extra), "-o", str(tmp / "o.npz")]) == 2
    assert "foo" in _one_line(capsys)


def test_cli_verify_is_saved_and_shown(npz, capsys):
    tmp, path, _, _ = npz
    out = tmp / "o.npz"
    assert main(["run", str(path), "-o", str(out), "--method", "fast", "--verify", "4"]) == 0
    assert "observed" in capsys.readouterr().out
    with np.load(out) as d:
        assert np.all(d["info_observed_error"] <= d["info_error_bound"])


@pytest.mark.parametrize("argv", [["run", "x.npz", "-o", "y.npz", "--eps", "abc"],
                                  ["plan"], ["demo", "--layers", "7"], ["demo", "--eps", "0"]])
def test_cli_usage_errors_are_one_line(argv):
    res = subprocess.run([sys.executable, "-m", "numbarope.cli", *argv], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0], res.stderr
    assert res.stdout == ""


# ---- second new-user round (after the float32 exact path landed)

def test_float32_values_near_the_maximum_stay_finite():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 32, 8)) for _ in range(3))
    vb = (v / np.abs(v).max() * 3e38).astype(np.float32)
    out, info = rope_attention((q * 0.3).astype(np.float32), (k * 0.3).astype(np.float32),
                               vb, rotary=True, return_info=True)
    ref = rope_attention(q * 0.3, k * 0.3, vb.astype(np.float64), rotary=True,
                         method="exact", precision="float64")
    assert np.isfinite(out).all()
    assert np.abs(out.astype(np.float64) - ref).max() <= info.error_bound.max()


def test_logits_beyond_float32_use_float64_or_are_refused():
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 32, 8)) for _ in range(3))
    q32, k32, v32 = ((q * 1e20).astype(np.float32), (k * 1e20).astype(np.float32),
                     v.astype(np.float32))
    out, info = rope_attention(q32, k32, v32, rotary=True, return_info=True)
    assert list(info.precision) == ["float64"] and np.abs(out).max() > 0.1
    ref = rope_attention(q32, k32, v32, rotary=True, precision="float64")
    np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match=r"precision='float32' cannot hold these logits"):
        rope_attention(q32, k32, v32, rotary=True, precision="float32")
    with pytest.raises(ValueError, match=r"overflow float64"):
        rope_attention(q * 1e150, k * 1e160, v, rotary=True)


def test_explicit_degree_that_certifies_nothing_warns():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 256, 4)) * 3 for _ in range(3))
    with pytest.warns(RuntimeWarning, match=r"degree=20 certifies no accuracy"):
        rope_attention(q, k, v, rotary=True, method="fast", degree=20)


def test_single_head_memory_refusal_gives_applicable_advice(monkeypatch):
    from numbarope import _config
    monkeypatch.setattr(_config, "memory_limit", lambda: 1000)
    monkeypatch.setattr(_config, "SMALL_REQUEST", 0)     # check even tiny requests
    q = np.zeros((1, 64, 4))
    with pytest.raises(ValueError, match=r"one head of this length does not fit"):
        rope_attention(q, q, q)
    q2 = np.zeros((3, 64, 4))
    with pytest.raises(ValueError, match=r"split the batch"):
        rope_attention(q2, q2, q2)


def test_squares_overflowing_the_input_dtype_are_not_an_overflow():
    # ‖q‖² overflows float32 although the logits (~1e20) are finite in float32
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 64, 8)) for _ in range(3))
    qq = (q * 1e19).astype(np.float32)
    out = nr.rope_attention(qq, k.astype(np.float32), v.astype(np.float32))
    ref = nr.rope_attention(qq.astype(np.float64), k, v)
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 1e-4
    big = nr.rope_attention(q * 1e160, k, v, method="exact")     # logits ~1e160: finite
    assert np.isfinite(big).all()


def test_set_workers_checks_its_argument_when_called():
    with pytest.raises((TypeError, ValueError)):
        nr.set_workers(0)
    with pytest.raises(TypeError):
        nr.set_workers("x")


def test_a_call_predicted_to_take_hours_warns_before_starting(monkeypatch):
    import numbarope.attention as at
    monkeypatch.setattr(at, "LONG_CALL_SECONDS", 1e-9)
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning, match="predicted to take"):
        nr.rope_attention(q, k, v)


def test_steep_bias_on_the_fast_path_says_why():
    # a bias spanning e^100 leaves the FFT no certified accuracy: the refusal names the
    # row mass (it said "degree 4 certifies inf > eps·max|V|")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 128, 4)) * 0.1 for _ in range(3))
    with pytest.raises(nr.FastPathError, match="smallest row mass") as e:
        nr.rope_attention(q, k, v, bias=np.linspace(-50, 50, 255), method="fast")
    assert e.value.code == "row-mass"
    with pytest.raises(TypeError, match="None/False"):
        nr.rope_attention(q, k, v, rotary="half")
