"""The published asv dashboard renders benchmark graphs offline in a real headless browser.

asv's ``index.html`` loads its JavaScript from CDNs; ``tools/dashboard.py`` serves
the site with those URLs mapped to copies from npm (cached in
``asv_benchmarks/.vendor/``, ``npm pack``-ed when missing). The rewriting is tested
here without network; the rendering test is skipped unless chromium (Debian's
``chromium`` package) and asv are installed, a published site exists
(``$NUMBAROPE_ASV_HTML`` if set, else ``asv_benchmarks/html`` of this checkout, made
by ``asv publish`` in ``asv_benchmarks/``) and the vendored files are cached or
npm can fetch them.
"""

import base64
import hashlib
import importlib.util
import os
import sys
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import dashboard  # noqa: E402

HTML = os.environ.get("NUMBAROPE_ASV_HTML", dashboard.DEFAULT_HTML)
HAVE_ASV = importlib.util.find_spec("asv") is not None

needs_site = [
    pytest.mark.skipif(dashboard.find_chromium() is None, reason="chromium not installed"),
    pytest.mark.skipif(not HAVE_ASV, reason="asv not installed"),
    pytest.mark.skipif(not dashboard.published(HTML),
                       reason=f"no published asv site in {HTML} (asv publish)"),
]


def _asv_index_html():
    spec = importlib.util.find_spec("asv")
    path = os.path.join(os.path.dirname(spec.origin), "www", "index.html")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _offline_site():
    try:
        return dashboard.OfflineSite(HTML)
    except dashboard.VendorError as exc:          # no cache and no npm registry here
        pytest.skip(f"vendored scripts unavailable: {exc}")


def test_check_dom_rejects_errors():
    assert dashboard.check_dom("", ["x"])
    assert "no <canvas> plot element" in dashboard.check_dom("<div>x</div>", ["x"])
    assert dashboard.check_dom("<canvas></canvas> x Failed to load", ["x"])
    assert dashboard.check_dom("<canvas></canvas> x", ["x"]) == []


def test_offline_html_maps_urls_and_keeps_matching_sri():
    good, bad = b"var a = 1;", b"var b = 2;"
    sri = "sha256-" + base64.b64encode(hashlib.sha256(good).digest()).decode()
    html = (f'<script src="https://cdn.example/a.js" integrity="{sri}" crossorigin="anonymous">'
            '</script>\n<script src="https://cdn.example/b.js" integrity="sha256-xxx" '
            'crossorigin="anonymous" referrerpolicy="no-referrer" onerror="f()"></script>\n'
            '<link rel="stylesheet" href="https://cdn.example/c.css">\n'
            '<a href="https://github.com/x">not a resource</a>')
    files = {"https://cdn.example/a.js": ("_vendor/a.js", good),
             "https://cdn.example/b.js": ("_vendor/b.js", bad),
             "https://cdn.example/c.css": ("_vendor/c.css", b"")}
    assert dashboard.cdn_urls(html) == list(files)
    out = dashboard.offline_html(html, files)
    assert dashboard.cdn_urls(out) == []
    assert f'src="_vendor/a.js" integrity="{sri}" crossorigin="anonymous"' in out
    assert '<script src="_vendor/b.js" onerror="f()"></script>' in out
    assert 'href="_vendor/c.css"' in out and 'href="https://github.com/x"' in out


@pytest.mark.skipif(not HAVE_ASV, reason="asv not installed")
def test_every_asv_cdn_url_has_an_npm_source():
    urls = dashboard.cdn_urls(_asv_index_html())
    assert len(urls) >= 5
    missing = [u for u in urls if dashboard.npm_source(u) is None]
    assert missing == [], "add rules to dashboard.CDN_RULES for these"


def _site_tests(f):
    for m in needs_site:
        f = m(f)
    return f


@_site_tests
def test_server_serves_vendored_scripts():
    site = _offline_site()
    assert dashboard.cdn_urls(site.html) == []
    assert len(site.verified) >= 4            # jquery, bootstrap js/css, md5, orderBars
    with dashboard.Server(site) as srv:
        page = urllib.request.urlopen(srv.url + "index.html", timeout=30).read().decode()
        assert "https://code.jquery.com" not in page and "_vendor/jquery@" in page
        for local, data in site.files.values():
            assert urllib.request.urlopen(srv.url + local, timeout=30).read() == data
        assert urllib.request.urlopen(srv.url + "index.json", timeout=30).read()


@_site_tests
def test_dashboard_renders_graphs(tmp_path):
    _offline_site()                           # skip here, not fail, without the scripts
    res = dashboard.run(HTML, out=str(tmp_path / "dashboard.png"), timeout=90)
    assert res["benchmarks"] > 0
    assert res["index_problems"] == [], res
    assert res["graph_problems"] == [], res
    assert res["index_canvases"] > 0 and res["graph_canvases"] > 0
    assert os.path.getsize(res["screenshot"]) > 10_000       # a picture, not a blank page


def test_history_plot_draws_medians_and_noise_bands(tmp_path):
    # asv's graphs draw medians only: the history figure adds each point's
    # interquartile band and 99% interval, commits of the branch in git order
    pytest.importorskip("matplotlib")
    import json
    import subprocess
    commits = subprocess.run(["git", "rev-list", "--max-count=3", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True).stdout.split()
    if len(commits) < 3:
        pytest.skip("needs a git checkout with 3 commits")
    cols = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a",
            "stats_ci_99_b", "stats_q_25", "stats_q_75", "stats_number", "stats_repeat"]
    (tmp_path / "vm").mkdir()
    for i, c in enumerate(commits[1:]):                 # not the newest: a gap is fine
        res = {b: [[0.1 + i, 0.2], [["False", "True"]], "v", 0, 1.0, [0.05, 0.1],
                   [0.2, 0.3], [0.08, 0.15], [0.12, 0.25], [1, 1], [5, 5]]
               for b in dashboard.HISTORY}
        (tmp_path / "vm" / f"{c[:8]}-env.json").write_text(json.dumps(
            {"commit_hash": c, "date": 1_800_000_000_000 + i, "result_columns": cols,
             "results": res}))
    (tmp_path / "vm" / "machine.json").write_text("{}")
    out = tmp_path / "history.png"
    drawn = dashboard.history_plot(str(tmp_path), str(out), branch="HEAD")
    assert drawn == {b: 2 for b in dashboard.HISTORY}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
