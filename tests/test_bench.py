"""``python -m numbarope.bench`` on tiny sizes: the table has its rows, the numbers
are sane (positive times, measured error within the certified bound), torch is
never imported into the numbarope process. No timing assertions."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from numbarope import apply_rotary, bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TORCH = importlib.util.find_spec("torch") is not None
TINY = ["--scale-n", "1/512", "--repeat", "2"]     # n = 16 .. 128


def _check_rows(rows, with_torch):
    names = [r["name"] for r in rows]
    assert names == ["exact-E64", "exact-causal-E64", "exact-E16", "fast", "fast (exact)",
                     "fast-causal", "fast-causal (exact)"]
    for r in rows:
        assert r["error"] is None, r
        assert r["n"] >= 16 and r["E"] in (16, 64)
        assert len(r["numbarope_times"]) == 2 and min(r["numbarope_times"]) > 0
        assert 0 < r["numbarope_best"] <= r["numbarope_median"]
        assert r["method"] == [r["method_requested"]]
        assert r["bound"] > 0
        if r["err_exact"] is not None:
            assert r["method_requested"] == "fast"
            assert r["err_exact"] <= r["bound"]
        if with_torch:
            assert r["torch_error"] is None
            assert r["torch_backend"] in (None, "FLASH_ATTENTION")   # not the n×n MATH path
            assert 0 < r["torch_best"] <= r["torch_median"]
            assert r["speedup"] > 0
            # same inputs: exact agrees with SDPA to float32 accuracy, fast within its bound
            tol = 1e-5 * r["max_abs_value"]
            limit = tol if r["method_requested"] == "exact" else r["bound"] + tol
            assert r["diff_torch"] <= limit, r
        else:
            assert r["torch_best"] is None and r["diff_torch"] is None
    assert all(r["err_exact"] is not None for r in rows if r["method_requested"] == "fast")


def test_bench_subprocess(tmp_path):
    """The real command, in a clean interpreter; torch stays out of its process."""
    out_json = tmp_path / "bench.json"
    code = ("import sys; from numbarope.bench import main; "
            "rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch was imported into the numbarope process'; "
            "sys.exit(rc)")
    args = TINY + ["--with-exact-long", "--json", str(out_json)]
    if not HAS_TORCH:
        args.append("--no-torch")
    proc = subprocess.run([sys.executable, "-c", code] + args, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    assert "| case | n | E | causal |" in table
    for i in range(1, 6):
        assert f"\n| {i} " in table
    assert "Xeon" in table or "machine:" in table
    result = json.loads(out_json.read_text())
    _check_rows(result["rows"], HAS_TORCH)
    m = result["machine"]
    assert m["threads"] == os.cpu_count()
    for key in ("cpu", "numpy", "scipy", "numba", "date", "torch"):
        assert m[key]
    if HAS_TORCH:
        assert m["torch_threads"] == m["threads"]
        assert "not installed" not in table


def test_bench_without_torch(monkeypatch, capsys):
    """torch missing: numbarope only, and the table says so."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    assert bench.main(["--cases", "1", "fast", "--scale-n", "1/512", "--repeat", "1",
                       "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "torch is not installed" in table
    assert table.count("\n| 1 exact-E64 ") == 1 and table.count("\n| 4 fast ") == 1
    assert "| 2 " not in table


def test_cases_filter_and_bad_options(capsys):
    assert bench._parse_cases(None) == [0, 1, 2, 3, 4]
    assert bench._parse_cases(["4,1", "fast-causal", "1"]) == [3, 0, 4]
    assert bench.main(["--cases", "9", "--no-torch"]) == 2
    assert "unknown case '9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--scale-n", "-1"])
    assert bench.main(["--repeat", "0", "--no-torch"]) == 2


@pytest.mark.parametrize("E", [16, 64])
def test_bounded_inputs_have_radius(E):
    q, k, v = bench.make_inputs(257, E, radius=0.5)
    assert q.dtype == k.dtype == v.dtype == np.float32 and q.shape == (1, 257, E)
    for a, b in ((q, k), (apply_rotary(q), apply_rotary(k))):
        r = np.linalg.norm(a.astype(np.float64), axis=-1).max() \
            * np.linalg.norm(b.astype(np.float64), axis=-1).max() / np.sqrt(E)
        assert 0.499 < r <= 0.5
    q2, k2, _ = bench.make_inputs(257, E, radius=0.5)
    assert np.array_equal(q, q2) and np.array_equal(k, k2)      # fixed seed
