"""Command line: bad input ends with one line on stderr and exit code 2 (no
traceback); ``run`` writes what ``rope_attention`` computes; ``plan`` prints
a table; ``demo`` runs (kept cheap)."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import numbarope
from numbarope import Rotary, rope_attention
from numbarope.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 8, 4)) * 0.3 for _ in range(3))
    paths = {}

    def save(name, **arrays):
        p = tmp_path / name
        np.savez(p, **arrays)
        paths[name] = str(p)

    save("good.npz", query=q, key=k, value=v)
    save("bias.npz", query=q, key=k, value=v, bias=rng.standard_normal(15))
    save("relative.npz", query=q, key=k, value=v,
         relative=numbarope.rotary_relative_matrices(8, None, 4))
    save("nokey.npz", query=q, value=v)
    save("nan.npz", query=np.where(q > 0.5, np.nan, q), key=k, value=v)
    save("int.npz", query=(q * 10).astype(np.int64), key=k, value=v)
    save("shape.npz", query=q, key=k[:, :5], value=v)
    np.save(tmp_path / "array.npy", q)
    paths["array.npy"] = str(tmp_path / "array.npy")
    (tmp_path / "text.npz").write_text("this is not a zip archive\n")
    paths["text.npz"] = str(tmp_path / "text.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    paths["empty.npz"] = str(tmp_path / "empty.npz")
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as z:
        z.writestr("readme.txt", "hello")
    paths["other.npz"] = str(tmp_path / "other.npz")
    paths["dir"] = str(tmp_path)
    paths["missing"] = str(tmp_path / "missing.npz")
    paths["out"] = str(tmp_path / "out.npz")
    paths["nodir_out"] = str(tmp_path / "no" / "such" / "folder" / "out.npz")
    paths["arrays"] = dict(query=q, key=k, value=v)
    return paths


def _call(argv, capsys):
    """main(argv) -> (code, stdout, stderr); argparse's SystemExit counted as its code."""
    try:
        code = main(argv)
    except SystemExit as exc:          # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(code, err, pattern):
    import re
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0]), lines[0]


# --------------------------------------------------------------- bad input

BAD = [
    ("missing", ["run", "{missing}", "-o", "{out}"], r"missing\.npz.*does not exist"),
    ("missing plan", ["plan", "{missing}"], r"missing\.npz.*does not exist"),
    ("text", ["run", "{text.npz}", "-o", "{out}"], r"cannot read .*text\.npz.*npz"),
    ("empty", ["run", "{empty.npz}", "-o", "{out}"], r"cannot read .*empty\.npz.*npz"),
    ("directory", ["run", "{dir}", "-o", "{out}"], r"cannot read"),
    ("no arrays", ["run", "{other.npz}", "-o", "{out}"], r"lacks array\(s\).*query.*key.*value"),
    ("no key", ["run", "{nokey.npz}", "-o", "{out}"], r"lacks array\(s\) \['key'\]"),
    ("no key plan", ["plan", "{nokey.npz}"], r"lacks array\(s\) \['key'\]"),
    ("out folder", ["run", "{good.npz}", "-o", "{nodir_out}"], r"cannot write the output"),
    ("out is dir", ["run", "{good.npz}", "-o", "{dir}"], r"cannot write the output"),
    ("eps 2", ["run", "{good.npz}", "-o", "{out}", "--eps", "2"], r"eps=2\.0 must lie in \(0, 1\)"),
    ("eps nan", ["plan", "{good.npz}", "--eps", "nan"], r"eps=nan"),
    ("degree", ["run", "{good.npz}", "-o", "{out}", "--degree", "99"], r"degree=99"),
    ("scale", ["run", "{good.npz}", "-o", "{out}", "--scale", "-1"], r"scale=-1\.0"),
    ("verify", ["run", "{good.npz}", "-o", "{out}", "--verify", "-3"], r"verify"),
    ("rotary dim", ["run", "{good.npz}", "-o", "{out}", "--rotary-dim", "3"], r"dim.*3"),
    ("rotary dim > E", ["plan", "{good.npz}", "--rotary-dim", "6"], r"dim=6.*head_dim=4"),
    ("rotary base", ["plan", "{good.npz}", "--rotary-base", "1"], r"base"),
    ("nan", ["run", "{nan.npz}", "-o", "{out}"], r"query contains NaN"),
    ("int", ["run", "{int.npz}", "-o", "{out}"], r"query.*int64"),
    ("shape", ["run", "{shape.npz}", "-o", "{out}"], r"value has shape \(2, 8, 4\); expected \(\.\.\., 5, Ev\)"),
    ("fast refused", ["run", "{good.npz}", "-o", "{out}", "--method", "fast", "--eps", "1e-300"],
     r"method='fast' cannot serve"),
    ("npy", ["run", "{array.npy}", "-o", "{out}"], r"npz"),
]


def _bad_params():
    for name, argv, pattern in BAD:
        yield pytest.param(argv, pattern, id=name)


@pytest.mark.parametrize("argv, pattern", list(_bad_params()))
def test_bad_input_one_line_exit_2(files, capsys, argv, pattern):
    for key, val in files.items():
        if isinstance(val, str):
            argv = [a.replace("{" + key + "}", val) for a in argv]
    code, out, err = _call(argv, capsys)
    _assert_clean_error(code, err, pattern)
    assert not os.path.exists(files["out"]), "nothing may be written on error"


@pytest.mark.parametrize("argv", [
    ["run", "IN.npz", "-o", "OUT.npz", "--eps", "abc"],
    ["run", "IN.npz", "-o", "OUT.npz", "--method", "slow"],
    ["run", "IN.npz"],
    ["demo", "--n", "0"],
    ["frobnicate"],
])
def test_usage_errors_exit_2(capsys, argv):
    code, out, err = _call(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert "error:" in err.strip().splitlines()[-1]


def test_subprocess_no_traceback(files):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for argv in (["run", files["missing"], "-o", files["out"]],
                 ["run", files["nan.npz"], "-o", files["out"], "--eps", "0.5"],
                 ["plan", files["good.npz"], "--eps", "2"]):
        res = subprocess.run([sys.executable, "-m", "numbarope.cli", *argv], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("numbarope "), res.stderr


# --------------------------------------------------------------- happy paths

@pytest.mark.parametrize("name, extra, kw", [
    ("good.npz", [], dict(rotary=Rotary())),
    ("good.npz", ["--method", "exact", "--causal", "--layout", "interleaved",
                  "--rotary-base", "500000"],
     dict(rotary=Rotary(base=500000.0, layout="interleaved"), is_causal=True)),
    ("good.npz", ["--no-rotary", "--scale", "0.5", "--method", "fast", "--eps", "1e-4",
                  "--verify", "3"], dict(scale=0.5)),
    ("bias.npz", ["--method", "fast", "--rotary-dim", "2"], dict(rotary=Rotary(dim=2))),
    ("relative.npz", ["--method", "fast", "--degree", "4"], dict(degree=4)),
])
def test_run_writes_out_and_info(files, capsys, name, extra, kw):
    code, out, err = _call(["run", files[name], "-o", files["out"], *extra], capsys)
    assert code == 0, err
    assert err == ""
    assert "wrote" in out and "method" in out.splitlines()[0]
    with np.load(files[name]) as d:
        arrays = {k: d[k] for k in d.files}
    for opt in ("bias", "relative"):
        if opt in arrays:
            kw[opt] = arrays[opt]
    method = extra[extra.index("--method") + 1] if "--method" in extra else "auto"
    eps = float(extra[extra.index("--eps") + 1]) if "--eps" in extra else 1e-3
    if "degree" not in kw:
        kw["eps"] = eps
    ref, info = rope_attention(arrays["query"], arrays["key"], arrays["value"],
                               method=method, return_info=True, **kw)
    with np.load(files["out"]) as res:
        assert {"out", "info_method", "info_algorithm", "info_radius", "info_error_bound",
                "info_degree"} <= set(res.files)
        np.testing.assert_array_equal(res["out"], ref)
        assert res["info_method"].shape == (2,)
        np.testing.assert_array_equal(res["info_method"], info.method.astype(str))
        np.testing.assert_array_equal(res["info_algorithm"], info.algorithm.astype(str))
        np.testing.assert_allclose(res["info_radius"], info.radius.astype(float))
        np.testing.assert_allclose(res["info_error_bound"],
                                   info.error_bound.astype(float))
    exact = rope_attention(arrays["query"], arrays["key"], arrays["value"], method="exact",
                           **{k: v for k, v in kw.items() if k not in ("eps", "degree")})
    assert np.all(np.abs(ref - exact) <= info.error_bound.astype(float)[:, None, None] + 1e-15)


def test_run_quiet(files, capsys):
    code, out, err = _call(["run", files["good.npz"], "-o", files["out"], "-q"], capsys)
    assert code == 0 and out == "" and err == ""
    assert os.path.exists(files["out"])


def test_plan_prints_table(files, capsys):
    code, out, err = _call(["plan", files["good.npz"], "--causal"], capsys)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["head", "R", "method", "algorithm"]
    assert len(lines) == 3                       # header + 2 heads
    assert str(numbarope.plan(**{k: v for k, v in files["arrays"].items()}, rotary=True,
                              is_causal=True)) == out.rstrip("\n")


def test_demo_cheap(capsys):
    code, out, err = _call(["demo", "--n", "2048", "--layers", "5"], capsys)
    assert code == 0, err
    assert "(a) real sample" in out and "(b) long bounded case" in out
    assert "layers (5,)" in out
    assert "done in" in out
