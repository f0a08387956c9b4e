"""numbarope imported from a read-only install, with a read-only HOME.

numba's ``cache=True`` needs a writable directory when a kernel is decorated;
``numbarope._runtime.cache`` supplies one. The package is copied and bind-mounted
read-only (permissions alone do not stop root, and CI runs as root); the tests
skip where mounting is not permitted. Each subprocess compiles only the exact
and fast kernels of one tiny call.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numbarope as nr

_PACKAGE_DIR = os.path.dirname(os.path.abspath(nr.__file__))

_SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, warnings
    import numpy as np
    if os.environ.get("RO_TEST_TEMPDIR"):
        tempfile.tempdir = os.environ["RO_TEST_TEMPDIR"]   # a read-only temp dir
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import numbarope
        import numba
        from numba.core.registry import CPUDispatcher
        rng = np.random.default_rng(0)
        q, k, v = rng.standard_normal((3, 1, 32, 4)) * 0.3
        out = sys.argv[1]
        for method in sys.argv[2].split(","):
            r = numbarope.rope_attention(q, k, v, rotary=True, eps=1e-3, method=method)
            np.save(os.path.join(out, method + ".npy"), r)
    hits = misses = 0
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("numbarope."):
            for obj in vars(mod).values():
                if isinstance(obj, CPUDispatcher):
                    hits += sum(obj.stats.cache_hits.values())
                    misses += sum(obj.stats.cache_misses.values())
    print(json.dumps({
        "file": numbarope.__file__,
        "cache_dir": numba.config.CACHE_DIR,
        "warnings": [f"{w.category.__name__}: {w.message}" for w in caught],
        "hits": hits, "misses": misses}))
""")


def _mount_ro(src, dst):
    """Bind ``src`` on ``dst`` read-only; False if mounting is not permitted."""
    os.makedirs(dst, exist_ok=True)
    try:
        r = subprocess.run(["mount", "--bind", src, dst], capture_output=True)
    except OSError:             # no mount(8)
        return False
    if r.returncode != 0:
        return False
    r = subprocess.run(["mount", "-o", "remount,bind,ro", dst], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["umount", dst], capture_output=True)
        return False
    return True


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    """Read-only copies of the package (``root``) and of an empty HOME (``home``)."""
    if sys.platform != "linux" or not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("read-only bind mounts need Linux and root with CAP_SYS_ADMIN")
    base = tmp_path_factory.mktemp("readonly")
    src, home_src = base / "src", base / "home_src"
    shutil.copytree(_PACKAGE_DIR, src / "numbarope",
                    ignore=shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc"))
    home_src.mkdir()
    mounted = []
    try:
        for s, d in ((src, base / "root"), (home_src, base / "home")):
            if not _mount_ro(str(s), str(d)):
                pytest.skip("mount --bind is not permitted here (no CAP_SYS_ADMIN?)")
            mounted.append(d)
        probe = base / "root" / "numbarope" / "probe"
        with pytest.raises(OSError):
            probe.write_text("")
        yield {"base": base, "root": base / "root", "home": base / "home"}
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", str(d)], check=False)


@pytest.fixture(scope="module")
def expected():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 1, 32, 4)) * 0.3
    return {m: nr.rope_attention(q, k, v, rotary=True, eps=1e-3, method=m)
            for m in ("exact", "fast")}


def _run(ro, out, tmpdir, ro_tempdir=None, methods=("exact", "fast")):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(PYTHONPATH=str(ro["root"]), HOME=str(ro["home"]),
               XDG_CACHE_HOME=str(ro["home"] / ".cache"), TMPDIR=str(tmpdir))
    if ro_tempdir is not None:
        env["RO_TEST_TEMPDIR"] = str(ro_tempdir)
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", _SCRIPT, str(out), ",".join(methods)], env=env,
                       capture_output=True, text=True, cwd=str(ro["home"]), timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(ro["root"])), info["file"]
    return info


def _check_results(out, expected, methods=("exact", "fast")):
    for m in methods:
        ref = expected[m]
        np.testing.assert_allclose(np.load(out / f"{m}.npy"), ref, rtol=1e-12, atol=1e-15)


def test_readonly_install_caches_in_private_temp_dir(readonly, expected):
    tmpdir = readonly["base"] / "tmp"
    tmpdir.mkdir()
    first = _run(readonly, readonly["base"] / "out1", tmpdir)
    cache = tmpdir / f"numbarope-numba-cache-{os.getuid()}"
    assert first["cache_dir"] == str(cache)
    assert len(first["warnings"]) <= 1, first["warnings"]
    assert first["misses"] > 0
    _check_results(readonly["base"] / "out1", expected)
    assert (cache.stat().st_mode & 0o777) == 0o700
    files = [p.name for p in cache.rglob("*")]
    assert any(f.endswith(".nbi") for f in files) and any(f.endswith(".nbc") for f in files)

    second = _run(readonly, readonly["base"] / "out2", tmpdir)
    assert second["misses"] == 0 and second["hits"] > 0, second   # loaded, not compiled
    assert len(second["warnings"]) <= 1, second["warnings"]
    _check_results(readonly["base"] / "out2", expected)


def test_nothing_writable_compiles_in_memory(readonly, expected):
    """No writable temp dir either: kernels compile in memory, one warning.

    Only the exact kernel is compiled (the in-memory switch covers every
    dispatcher of the package alike), to keep the test short.
    """
    tmpdir = readonly["base"] / "tmp_unused"
    tmpdir.mkdir()
    info = _run(readonly, readonly["base"] / "out3", tmpdir, ro_tempdir=readonly["home"],
                methods=("exact",))
    assert info["cache_dir"] == ""
    assert len(info["warnings"]) == 1, info["warnings"]
    assert info["warnings"][0].startswith("NumbaCacheWarning: ")
    assert "NUMBA_CACHE_DIR" in info["warnings"][0]
    assert info["hits"] == 0 and info["misses"] > 0
    _check_results(readonly["base"] / "out3", expected, methods=("exact",))
    assert not list(tmpdir.iterdir())
