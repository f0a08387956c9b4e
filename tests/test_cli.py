"""Command line: bad input ends with one line on stderr and exit code 2 (no
traceback); ``run`` writes what ``rope_attention`` computes; ``plan`` prints
a table; ``demo`` runs (kept cheap); ``--version``; help text on every option."""

import argparse
import importlib.metadata
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import naive
import numbarope
from numbarope import Rotary, rope_attention
from numbarope.cli import _parser, main

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
    save("gqa.npz", query=np.concatenate([q, q * 0.5]), key=k, value=v)   # 4 on 2 heads
    np.save(tmp_path / "mask5.npy", np.ones(5, bool))
    paths["mask5.npy"] = str(tmp_path / "mask5.npy")
    save("masks2.npz", a=np.ones(8, bool), b=np.ones(8, bool))
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
    ("missing, output exists", ["run", "{missing}", "-o", "{good.npz}"],
     r"missing\.npz.*does not exist"),
    ("text", ["run", "{text.npz}", "-o", "{out}"], r"cannot read .*text\.npz.*npz"),
    ("empty", ["run", "{empty.npz}", "-o", "{out}"], r"cannot read .*empty\.npz.*npz"),
    ("directory", ["run", "{dir}", "-o", "{out}"], r"cannot read"),
    ("no arrays", ["run", "{other.npz}", "-o", "{out}"], r"lacks array\(s\).*query.*key.*value"),
    ("no key", ["run", "{nokey.npz}", "-o", "{out}"], r"lacks array\(s\) \['key'\]"),
    ("no key plan", ["plan", "{nokey.npz}"], r"lacks array\(s\) \['key'\]"),
    ("out folder", ["run", "{good.npz}", "-o", "{nodir_out}"], r"cannot write the output"),
    ("out is dir", ["run", "{good.npz}", "-o", "{dir}"], r"cannot write the output"),
    ("eps 2", ["run", "{good.npz}", "-o", "{out}", "--eps", "2"], r"--eps 2\.0 must lie in \(0, 1\)"),
    ("eps nan", ["plan", "{good.npz}", "--eps", "nan"], r"--eps nan"),
    ("degree", ["run", "{good.npz}", "-o", "{out}", "--degree", "99"], r"--degree 99"),
    ("scale", ["run", "{good.npz}", "-o", "{out}", "--scale", "-1"], r"scale=-1\.0"),
    ("verify", ["run", "{good.npz}", "-o", "{out}", "--verify", "-3"], r"verify"),
    ("rotary dim", ["run", "{good.npz}", "-o", "{out}", "--rotary", "--rotary-dim", "3"],
     r"--rotary-dim must be.*got 3"),
    ("rotary dim > E", ["plan", "{good.npz}", "--rotary", "--rotary-dim", "6"],
     r"--rotary-dim 6 is larger than head_dim=4"),
    ("rotary base", ["plan", "{good.npz}", "--rotary", "--rotary-base", "1"],
     r"--rotary-base must be"),
    # no rotary unless --rotary (as rope_attention): its parameters alone are refused
    ("rotary flag alone", ["plan", "{good.npz}", "--layout", "interleaved"],
     r"--layout sets the rotary embedding, which is applied only with --rotary.*add --rotary"),
    ("rotary flags, no-rotary", ["plan", "{good.npz}", "--no-rotary", "--rotary-base", "5",
                                 "--rotary-dim", "2"], r"--rotary-base, --rotary-dim set"),
    ("rotary and no-rotary", ["plan", "{good.npz}", "--rotary", "--no-rotary"],
     r"--rotary and --no-rotary contradict"),
    ("rotary with relative", ["plan", "{relative.npz}", "--rotary"],
     r"--rotary do not apply: the input holds 'relative'"),
    # the library's errors name the CLI's options (new-user report: "pass enable_gqa=True")
    ("gqa advice", ["plan", "{gqa.npz}"], r"grouped-query attention pass --enable-gqa$"),
    ("offset and alignment", ["plan", "{good.npz}", "--causal", "--query-offset", "1",
                              "--causal-alignment", "bottom_right"],
     r"give --query-offset or --causal-alignment bottom_right, not both"),
    ("mask missing", ["plan", "{good.npz}", "--key-padding-mask", "{missing}"],
     r"--key-padding-mask '.*missing\.npz': the file does not exist"),
    ("mask not a file of arrays", ["plan", "{good.npz}", "--key-padding-mask", "{text.npz}"],
     r"--key-padding-mask .*cannot read it.*np\.save"),
    ("mask shape", ["plan", "{good.npz}", "--key-padding-mask", "{mask5.npy}"],
     r"--key-padding-mask has shape \(5,\); expected \(\.\.\., 8\)"),
    ("mask archive", ["plan", "{good.npz}", "--key-padding-mask", "{masks2.npz}"],
     r"holds \['a', 'b'\]; expected one array"),
    ("mask not bool", ["plan", "{good.npz}", "--key-padding-mask", "{good.npz}"],
     r"holds \['key', 'query', 'value'\]"),
    ("degree with exact", ["run", "{good.npz}", "-o", "{out}", "--method", "exact",
                           "--degree", "3"],
     (r"--degree 3 sets the fast path's polynomial; --method exact uses none: omit --degree, "
      r"or use --method fast \(or auto\)")),
    ("nan", ["run", "{nan.npz}", "-o", "{out}"], r"query contains NaN"),
    ("int", ["run", "{int.npz}", "-o", "{out}"], r"query.*int64"),
    ("shape", ["run", "{shape.npz}", "-o", "{out}"], r"value has shape \(2, 8, 4\); expected \(\.\.\., 5, Ev\)"),
    ("fast refused", ["run", "{good.npz}", "-o", "{out}", "--method", "fast", "--eps", "1e-300"],
     r"--method fast cannot serve"),
    ("fast refused advice", ["plan", "{good.npz}", "--method", "fast", "--eps", "1e-300"],
     (r"Use --method exact or auto, a larger eps, or smaller logits \(--scale, or a "
      r"tighter --radius\)")),
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
    ("good.npz", [], dict()),                              # rope_attention's default
    ("good.npz", ["--rotary"], dict(rotary=Rotary())),
    ("good.npz", ["--method", "exact", "--causal", "--rotary", "--layout", "interleaved",
                  "--rotary-base", "500000"],
     dict(rotary=Rotary(base=500000.0, layout="interleaved"), is_causal=True)),
    ("good.npz", ["--no-rotary", "--scale", "0.5", "--method", "fast", "--eps", "1e-4",
                  "--verify", "3"], dict(scale=0.5)),
    ("bias.npz", ["--method", "fast", "--rotary", "--rotary-dim", "2"],
     dict(rotary=Rotary(dim=2))),
    ("relative.npz", ["--method", "fast", "--degree", "4"], dict(degree=4)),
    ("gqa.npz", ["--enable-gqa", "--causal", "--rotary"],
     dict(enable_gqa=True, is_causal=True, rotary=Rotary())),
    ("good.npz", ["--method", "fast", "--radius", "2.5"], dict(radius=2.5)),
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
        assert res["info_method"].shape == info.batch_shape == (len(arrays["query"]),)
        np.testing.assert_array_equal(res["info_method"], info.method.astype(str))
        np.testing.assert_array_equal(res["info_algorithm"], info.algorithm.astype(str))
        np.testing.assert_allclose(res["info_radius"], info.radius.astype(float))
        np.testing.assert_allclose(res["info_error_bound"],
                                   info.error_bound.astype(float))
    exact = rope_attention(arrays["query"], arrays["key"], arrays["value"], method="exact",
                           **{k: v for k, v in kw.items() if k not in ("eps", "degree")})
    assert np.all(np.abs(ref - exact) <= info.error_bound.astype(float)[:, None, None] + 1e-15)


def test_softcap_workers_and_packed_sequences(tmp_path, capsys):
    # the options the library offers reach the CLI: --softcap, --workers, and packed
    # sequences as a 'cu_seqlens' array of the input (flash-attn's varlen argument)
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((2, 40, 8)) for _ in range(3))
    cu = np.array([0, 15, 40], np.int32)
    path, out = str(tmp_path / "packed.npz"), str(tmp_path / "o.npz")
    np.savez(path, query=q, key=k, value=v, cu_seqlens=cu)
    code, _, err = _call(["run", path, "-o", out, "--softcap", "5", "--workers", "1",
                          "--causal", "-q"], capsys)
    assert code == 0, err
    ref = rope_attention(q, k, v, softcap=5.0, cu_seqlens=cu, is_causal=True)
    with np.load(out) as res:
        np.testing.assert_array_equal(res["out"], ref)
    code, _, err = _call(["plan", path, "--softcap", "-1"], capsys)
    _assert_clean_error(code, err, r"--softcap -1.0 must be .*leave out --softcap")
    code, _, err = _call(["run", path, "-o", out, "--workers", "0"], capsys)
    _assert_clean_error(code, err, r"--workers: must be >= 1")


def test_run_quiet(files, capsys):
    code, out, err = _call(["run", files["good.npz"], "-o", files["out"], "-q"], capsys)
    assert code == 0 and out == "" and err == ""
    assert os.path.exists(files["out"])


def test_plan_prints_table(files, capsys):
    code, out, err = _call(["plan", files["good.npz"], "--causal", "--rotary"], capsys)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["head", "R", "method", "algorithm"]
    assert len(lines) == 3                       # header + 2 heads
    assert str(numbarope.plan(**{k: v for k, v in files["arrays"].items()}, rotary=True,
                              is_causal=True)) == out.rstrip("\n")


# --------------------------------------------------------------- demo

def _fast_count(sample, li, scale, eps=1e-3):
    """Heads of one layer that method='fast' accepts (the library's own answer)."""
    rot = sample.rotary or Rotary()
    causal = sample.rotary is not None
    n_ok = 0
    for h in range(sample.heads[0]):
        kv = h // sample.group
        try:
            numbarope.plan(sample.query[li, h], sample.key[li, kv], sample.value[li, kv],
                           rotary=rot, scale=scale, is_causal=causal, eps=eps, method="fast")
        except ValueError:
            continue
        n_ok += 1
    return n_ok


FAST_DEMO = ["--n", "2048", "--repeat", "1"]


def test_demo_smollm2_default(capsys):
    import re
    code, out, err = _call(["demo", "--layers", "0", *FAST_DEMO], capsys)
    assert code == 0, err
    assert err == ""
    flat = " ".join(out.split())                   # undo the wrapping of long lines
    # provenance: the RoPE-trained decoder, with its own rotary, grouped-query, causal
    assert "SmolLM2-135M-Instruct" in flat and "TRAINED WITH RoPE (base 1e5" in flat
    assert "WITHOUT" not in flat and "for illustration" not in flat
    assert "Q4_1" in flat and "GPL-3" in flat and "n=512" in flat
    assert "enable_gqa=True" in flat and "9 query heads share 3 key/value heads" in flat
    assert "causal (is_causal=True): a decoder" in flat
    # provenance without the path of the machine that made the sample
    assert "/usr/share" not in out and "GNU GPL v3 (file GPL-3, sha256" in flat
    # timings: how they were taken, and that they are noisy (new-user report: t auto and
    # t exact 2x apart on the same kernel)
    assert ("timings: wall time of 1 call per method after a warm-up call, the methods "
            "compared interleaved") in flat
    assert "Timings on a shared machine are noisy" in flat
    assert "t auto (ms)" in flat and "t exact (ms)" in flat
    # the degree-limit head (R = 61.8): the real causes, not "a higher MAX_DEGREE"
    assert "no degree at all certifies eps=0.001 at R=61.8" in flat
    assert "raising MAX_DEGREE=24 would not help" in flat and "> MAX_DEGREE=24)" not in flat
    # one summary line per scale, with counts the library confirms
    s = numbarope.load_sample("smollm2")
    summaries = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("summary")]
    assert len(summaries) == 4, summaries                  # 2 scales + 2 masks of (b)
    for line, label, scale in ((summaries[0], "1/sqrt(64) = 1/8", 0.125),
                               (summaries[1], "1/64", 1 / 64)):
        m = re.match(r"summary, scale (.+?): (\d+) of (\d+) heads can use the fast path at "
                     r"eps=1e-3 \((smallest|largest).*needs R <= 0\.961", line)
        assert m, line
        assert m[1] == label and m[3] == "9"
        assert int(m[2]) == _fast_count(s, 0, scale)
    assert "all 9 run exact" in summaries[0]
    # reasons in plain words, grouped
    from numbarope.ops import REASONS
    assert REASONS["feature-limit"] in flat
    assert re.search(r"\d+ heads: " + re.escape(REASONS["feature-limit"]), flat)
    # (b): synthetic, repeated timings, crossover line per mask
    assert "synthetic" in flat and "not model data" in flat
    assert re.search(r"summary, causal: (crossover at n = \d+|fast never|fast beats)", out)
    assert re.search(r"summary, none: .*auto picked the faster method at \d of 2 sizes", out)
    assert "n = 1024, 2048" in flat
    assert "done in" in flat


def test_demo_minilm_is_not_called_rope_trained(capsys):
    code, out, err = _call(["demo", "--sample", "minilm", "--layers", "5", *FAST_DEMO],
                           capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "all-MiniLM-L6-v2" in flat and "trained WITHOUT RoPE" in flat
    assert "for illustration only" in flat and "TRAINED WITH" not in flat
    assert "not causal" in flat
    assert "0 of 12 heads can use the fast path" in flat


def test_demo_quiet_prints_only_summaries(capsys):
    code, out, err = _call(["demo", "-q", "--layers", "1", *FAST_DEMO], capsys)
    assert code == 0, err
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 4 and all(ln.startswith("summary, ") for ln in lines), out


def test_demo_per_head(capsys):
    code, out, err = _call(["demo", "--per-head", "--layers", "18", *FAST_DEMO], capsys)
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("       18 ")]
    assert len(rows) == 18                          # 9 heads x 2 scales
    assert [int(r[1]) for r in rows[:9]] == list(range(9))
    assert [int(r[2]) for r in rows[:9]] == [h // 3 for h in range(9)]    # kv head
    assert all(r[5] == "exact" for r in rows)


def test_demo_heads_the_fast_path_can_serve(capsys):
    """At a loose eps, MiniLM heads at scale 1/E fit the fast path: counted, run and
    checked against exact."""
    import re
    code, out, err = _call(["demo", "--sample", "minilm", "--layers", "5", "--eps", "0.2",
                            *FAST_DEMO], capsys)
    assert code == 0, err
    s = numbarope.load_sample("minilm")
    m = re.search(r"summary, scale 1/32: (\d+) of 12 heads can use the fast path at "
                  r"eps=2e-1 \(largest such R", out)
    assert m, out
    assert int(m[1]) == _fast_count(s, 2, 1 / 32, eps=0.2) > 0
    flat = " ".join(out.split())                   # undo the wrapping of long lines
    ex = re.search(r"max\|fast - exact\| (\S+) <= bound (\S+),", flat)
    assert ex and float(ex[1]) <= float(ex[2])


@pytest.mark.parametrize("E, eps", [(64, 1e-3), (16, 1e-3), (32, 0.2)])
def test_demo_radius_limit_is_the_planners(E, eps):
    """fast_radius_limit: method='fast' accepts a head just below it, refuses just above."""
    from numbarope.cli import fast_radius_limit
    lim = fast_radius_limit(E, eps)
    rng = np.random.default_rng(0)
    n, scale = 64, 1 / np.sqrt(E)
    q, k = rng.standard_normal((n, E)), rng.standard_normal((n, E))
    v = rng.standard_normal((n, E))
    for factor, ok in ((0.999, True), (1.001, False)):
        R = lim["radius"] * factor
        qs = q * np.sqrt(R / scale) / np.linalg.norm(q, axis=1).max()
        ks = k * np.sqrt(R / scale) / np.linalg.norm(k, axis=1).max()
        if ok:
            hp = numbarope.plan(qs, ks, v, rotary=True, eps=eps, method="fast").heads[0]
            assert hp.degree <= lim["degree"]
        else:
            with pytest.raises(ValueError, match="MAX_FEATURES|MAX_DEGREE"):
                numbarope.plan(qs, ks, v, rotary=True, eps=eps, method="fast")


def test_demo_crossover_helpers():
    from numbarope.cli import _crossover, _sizes
    assert _sizes(16384) == [1024, 2048, 4096, 8192, 16384]
    assert _sizes(3000) == [1024, 2048, 3000]
    assert _sizes(500) == [500]
    rows = [dict(n=n, t_exact=te, t_fast=tf) for n, te, tf in
            ((1, 1, 2), (2, 1, 0.5), (4, 1, 2), (8, 2, 1), (16, 4, 1))]
    assert _crossover(rows) == 8               # from there on, not the first lucky n
    assert _crossover(rows[:3]) is None
    assert _crossover(rows[3:]) == 8


@pytest.mark.parametrize("ext", ["png", "svg"])
def test_demo_plot(tmp_path, capsys, ext):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"demo.{ext}"
    code, out, err = _call(["demo", "-q", "--layers", "0", "18", "--plot", str(path),
                            *FAST_DEMO], capsys)
    assert code == 0, err
    assert f"wrote {path}" in out
    data = path.read_bytes()
    assert len(data) > 10_000
    if ext == "png":
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert b"<svg" in data[:2000]


def test_demo_plot_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import fails
    path = tmp_path / "demo.png"
    code, out, err = _call(["demo", "--plot", str(path), *FAST_DEMO], capsys)
    _assert_clean_error(code, err, r'needs matplotlib.*pip install "numbarope\[plot\]"')
    assert out == "" and not path.exists()


@pytest.mark.parametrize("argv, pattern", [
    (["--plot", "demo.pdf"], r"--plot 'demo\.pdf': the file name must end in \.png or \.svg"),
    (["--plot", "/no/such/folder/demo.png"], r"folder '/no/such/folder' is missing"),
    (["--layers", "5"], r"--layers \[5\]: the smollm2 sample holds layers \[0, 1, 18\]"),
    (["--sample", "minilm", "--layers", "1"], r"the minilm sample holds layers \[0, 2, 5\]"),
    (["--layers"], r"--layers \(none\)"),
    (["--eps", "0"], r"--eps must lie in \(0, 1\)"),
    (["--eps", "1.5"], r"--eps must lie in \(0, 1\)"),
])
def test_demo_bad_options_one_line(capsys, argv, pattern):
    code, out, err = _call(["demo", *argv], capsys)
    _assert_clean_error(code, err, pattern)
    assert out == ""


@pytest.mark.parametrize("argv", [["--sample", "llama"], ["--repeat", "0"], ["--n", "-5"],
                                  ["--plot"], ["--repeat", "two"]])
def test_demo_usage_errors(capsys, argv):
    code, out, err = _call(["demo", *argv], capsys)
    assert code == 2 and out == ""
    assert "Traceback" not in err and "error:" in err.strip().splitlines()[-1]


def test_demo_options_all_have_help():
    from numbarope.cli import _parser
    p = _parser()
    demo = p._subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        assert action.help, action.option_strings


# ---------------------------------------------------------------- version and help
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"numbarope {numbarope.__version__}"
    try:
        installed = importlib.metadata.version("numbarope")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("numbarope is not installed (only imported from the tree)")
    assert installed == numbarope.__version__, (
        "installed metadata differs from numbarope.__version__: reinstall (pip install -e .) "
        "after changing the version")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def test_every_cli_option_has_help():
    parser = _parser()
    commands = _subparsers(parser)
    assert set(commands) == {"demo", "run", "plan"}
    missing = []
    for name, p in [("numbarope", parser), *commands.items()]:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help text: {missing}"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert all(helps.get(name) for name in commands), helps
    for name, p in commands.items():
        assert p.description, name


# ---------------------------------------------------------------- new-user findings
def _nu_qkv(seed=0, n=64, E=8, s=0.3):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 2, n, E)) * s
    return q, k, rng.standard_normal((2, n, E))


@pytest.fixture
def npz(tmp_path):
    q, k, v = _nu_qkv()
    path = tmp_path / "in.npz"
    np.savez(path, query=q, key=k, value=v)
    rel = tmp_path / "rel.npz"
    np.savez(rel, query=q, key=k, value=v,
             relative=numbarope.rotary_relative_matrices(64, None, 8))
    extra = tmp_path / "extra.npz"
    np.savez(extra, query=q, key=k, value=v, foo=q)
    return tmp_path, path, rel, extra


def _one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_refuses_overwriting_input(npz, capsys):
    """New-user findings."""
    _, path, _, _ = npz
    before = path.read_bytes()
    assert main(["run", str(path), "-o", str(path)]) == 2
    assert "is the input file" in _one_line(capsys)
    assert path.read_bytes() == before


def test_cli_rotary_flags_with_relative_refused(npz, capsys):
    """New-user findings."""
    tmp, _, rel, _ = npz
    assert main(["run", str(rel), "-o", str(tmp / "o.npz"), "--layout", "interleaved"]) == 2
    assert "do not apply" in _one_line(capsys)


def test_cli_unknown_arrays_refused(npz, capsys):
    """New-user findings."""
    tmp, _, _, extra = npz
    assert main(["run", str(extra), "-o", str(tmp / "o.npz")]) == 2
    assert "foo" in _one_line(capsys)


def test_cli_verify_is_saved_and_shown(npz, capsys):
    """New-user findings."""
    tmp, path, _, _ = npz
    out = tmp / "o.npz"
    assert main(["run", str(path), "-o", str(out), "--method", "fast", "--verify", "4"]) == 0
    assert "observed" in capsys.readouterr().out
    with np.load(out) as d:
        assert np.all(d["info_observed_error"] <= d["info_error_bound"])


@pytest.mark.parametrize("argv", [["run", "x.npz", "-o", "y.npz", "--eps", "abc"],
                                  ["plan"], ["demo", "--layers", "7"], ["demo", "--eps", "0"]])
def test_cli_usage_errors_are_one_line(argv):
    """New-user findings."""
    res = subprocess.run([sys.executable, "-m", "numbarope.cli", *argv], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "error" in lines[0], res.stderr
    assert res.stdout == ""


# ---------------------------------------------------------------- field reports
def test_boolean_bias_through_the_cli(tmp_path):
    """Field reports (issue 7), boolean masks: a boolean bias in the input file."""
    t = np.arange(-5, 6)
    keep = (t >= 0) & (t <= 1)
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((6, 4)) * 0.5 for _ in range(3))
    np.savez(tmp_path / "in.npz", query=q, key=k, value=v, bias=keep)
    assert main(["run", str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz"),
                 "--method", "exact", "--no-rotary", "-q"]) in (0, None)
    with np.load(tmp_path / "out.npz") as d:
        out = d["out"]
    ref = naive.attention(q, k, v, bias=lambda tt: 0.0 if keep[tt + 5] else -np.inf)
    np.testing.assert_allclose(out, ref, atol=1e-14)


# ---------------------------------------------------------------- new-user report (CLI traps)
def test_cli_and_api_share_the_rotary_default(npz, capsys):
    """rope_attention(q, k, v) applies no RoPE; `numbarope run` applied it unless
    --no-rotary, so the two differed on the same data. One rule now: none unless asked
    (--rotary / rotary=); --no-rotary is kept as a no-op."""
    tmp, path, _, _ = npz
    with np.load(path) as d:
        q, k, v = d["query"], d["key"], d["value"]
    outs = {}
    for name, extra in (("default", []), ("no-rotary", ["--no-rotary"]),
                        ("rotary", ["--rotary"])):
        out = tmp / f"{name}.npz"
        assert main(["run", str(path), "-o", str(out), "--method", "exact", "-q", *extra]) == 0
        with np.load(out) as d:
            outs[name] = d["out"]
    np.testing.assert_array_equal(outs["default"], rope_attention(q, k, v, method="exact"))
    np.testing.assert_array_equal(outs["no-rotary"], outs["default"])
    np.testing.assert_array_equal(outs["rotary"],
                                  rope_attention(q, k, v, method="exact", rotary=True))
    assert not np.array_equal(outs["rotary"], outs["default"])
    parser = _parser()
    run = _subparsers(parser)["run"]
    helps = {a.option_strings[0]: a.help for a in run._actions if a.option_strings}
    assert "Default: no rotary" in helps["--rotary"] and "the default" in helps["--no-rotary"]


@pytest.mark.parametrize("extra, kw", [
    (["--causal", "--causal-alignment", "bottom_right"],
     dict(is_causal=True, causal_alignment="bottom_right")),
    (["--causal", "--query-offset", "3", "--rotary"],
     dict(is_causal=True, query_offset=3, rotary=True)),
    (["--causal", "--causal-alignment", "top_left", "--enable-gqa"],
     dict(is_causal=True, enable_gqa=True)),
    (["--key-padding-mask", "{mask.npy}", "--enable-gqa"],
     dict(key_padding_mask="mask", enable_gqa=True)),
    (["--key-padding-mask", "{mask.npz}", "--causal", "--causal-alignment", "bottom_right"],
     dict(key_padding_mask="mask", is_causal=True, causal_alignment="bottom_right")),
], ids=["bottom-right", "offset", "gqa", "mask-npy", "mask-npz"])
def test_cli_offers_what_its_errors_advise(tmp_path, capsys, extra, kw):
    """--enable-gqa, --causal-alignment, --query-offset and --key-padding-mask: the same
    result as the keywords of rope_attention (decoding: 3 queries on 10 keys, 4 query
    heads on 2 key/value heads, keys 0-1 of batch 1 padded)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 4, 3, 8)) * 0.4
    k, v = rng.standard_normal((2, 2, 2, 10, 8)) * 0.4
    mask = np.ones((2, 1, 10), bool)
    mask[1, :, :2] = False
    np.savez(tmp_path / "in.npz", query=q, key=k, value=v)
    np.save(tmp_path / "mask.npy", mask)
    np.savez(tmp_path / "mask.npz", key_padding_mask=mask)
    argv = [a.replace("{mask.npy}", str(tmp_path / "mask.npy"))
            .replace("{mask.npz}", str(tmp_path / "mask.npz")) for a in extra]
    if "enable_gqa" not in kw:                       # one key/value head per query head
        np.savez(tmp_path / "in.npz", query=q, key=np.repeat(k, 2, axis=1),
                 value=np.repeat(v, 2, axis=1))
        k, v = np.repeat(k, 2, axis=1), np.repeat(v, 2, axis=1)
    kw = {key: (mask if val == "mask" else val) for key, val in kw.items()}
    out_path = tmp_path / "out.npz"
    assert main(["run", str(tmp_path / "in.npz"), "-o", str(out_path), "--method", "exact",
                 "-q", *argv]) == 0, capsys.readouterr().err
    with np.load(out_path) as d:
        got = d["out"]
    np.testing.assert_array_equal(got, rope_attention(q, k, v, method="exact", **kw))
    code, out, err = _call(["plan", str(tmp_path / "in.npz"), *argv], capsys)
    assert code == 0 and err == "" and str(numbarope.plan(q, k, v, **kw)) == out.rstrip("\n")


def test_cli_messages_name_the_options():
    """Library messages through the CLI: the options where their names differ from the
    Python keywords; other text untouched."""
    from numbarope.cli import _cli_message
    cases = {
        "for grouped-query attention pass enable_gqa=True":
            "for grouped-query attention pass --enable-gqa",
        "enable_gqa=True: query has 4 heads": "--enable-gqa: query has 4 heads",
        "positions differ between query heads (enable_gqa): x":
            "positions differ between query heads (--enable-gqa): x",
        "is_causal=True with bias=Window(3): no causal form; pass is_causal=False":
            "--causal with bias=Window(3): no causal form; leave out --causal",
        "causal_alignment='diagonal' is unknown": "--causal-alignment 'diagonal' is unknown",
        "give query_offset or causal_alignment='bottom_right', not both":
            "give --query-offset or --causal-alignment bottom_right, not both",
        "got query_offset=-3, L=4": "got --query-offset -3, L=4",
        "key_padding_mask has shape (5,)": "--key-padding-mask has shape (5,)",
        "Use method='exact' or 'auto', a larger eps": "Use --method exact or auto, a larger eps",
        "use method='exact' or 'auto', or omit degree=":
            "use --method exact or auto, or omit --degree",
        "smaller logits (scale, or a tighter radius=).":
            "smaller logits (--scale, or a tighter --radius).",
        "Rotary: dim=6 is larger than head_dim=4":
            "Rotary: --rotary-dim 6 is larger than head_dim=4",
        "eps=2.0 must lie in (0, 1)": "--eps 2.0 must lie in (0, 1)",
        "query contains NaN": "query contains NaN",
    }
    for text, expected in cases.items():
        assert _cli_message(text) == expected, text


def test_demo_helpers_timing_and_provenance():
    """The demo's timings are interleaved and shown as median [min-max]; its provenance
    names no path of the machine that made the sample."""
    import re

    from numbarope.cli import _interleaved, _sample_setup, _spread, _text_source
    order = []
    res, ts = _interleaved({"a": lambda: order.append("a") or 1,
                            "b": lambda: order.append("b") or 2}, 3)
    assert order == ["a", "b"] * 4                       # one untimed call each, then 3
    assert res == {"a": 1, "b": 2} and [len(t) for t in ts.values()] == [3, 3]
    assert _spread([0.004, 0.001, 0.002]) == "2 [1–4] ms"
    assert _spread([0.25, 0.5, 1.5], unit=False) == "500 [250–1500]"
    assert _spread([0.0123]) == "12.3 ms"
    text = _text_source({"text_source": "/home/dev/work/corpora/GPL-3",
                         "text_sha256": "3972dc9744f6499f"})
    assert "/home" not in text and "GNU GPL v3 (file GPL-3, sha256 3972dc9744f6..." in text
    assert "numbarope/data/README.md" in text
    assert "/" not in _text_source({"text_source": "C:\\corpus\\notes.txt"}).split(";")[0]
    for name in ("smollm2", "minilm"):
        s = numbarope.load_sample(name)
        for line in _sample_setup(numbarope, s)[2]:
            assert not re.search(r"(^|[\s(])(/|~/)\w[\w.-]*/|[A-Za-z]:\\", line), line


def test_demo_limit_names_the_rounding_floor(monkeypatch):
    """Where MAX_DEGREE seems to bind (tiny head_dim), the limit is float64 rounding at
    eps=1e-9: the demo's limit text says a higher MAX_DEGREE would not help; with
    MAX_DEGREE=6 the degree limit binds, and the text says that."""
    from numbarope import _config
    from numbarope.cli import _limit_text, fast_radius_limit
    lim = fast_radius_limit(2, 1e-9)
    assert lim["binding"] == "rounding" and lim["degree"] == _config.MAX_DEGREE
    assert "no degree certifies eps" in _limit_text(lim)
    assert "would not help" in _limit_text(lim)
    with pytest.raises(ValueError):                 # and indeed: just beyond, with a higher
        monkeypatch.setattr(_config, "MAX_DEGREE", 40)     # limit, nothing certifies
        numbarope.exp_approximation(lim["radius"] * 1.05, eps=0.9e-9 / (2 + 1e-9))
    monkeypatch.setattr(_config, "MAX_DEGREE", 6)
    lim6 = fast_radius_limit(2, 1e-3)
    assert lim6["binding"] == "degree" and "MAX_DEGREE=6 certifies" in _limit_text(lim6)
