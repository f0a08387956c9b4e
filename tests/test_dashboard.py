"""The published asv dashboard renders benchmark graphs in a real headless browser.

Skipped unless chromium (Debian's ``chromium`` package) and asv are installed and a
published site exists: ``$NUMBAROPE_ASV_HTML`` if set, else ``asv_benchmarks/html``
of this checkout (made by ``asv publish`` in ``asv_benchmarks/``). Serves the
directory on 127.0.0.1 and loads it with ``tools/dashboard.py``.
"""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import dashboard  # noqa: E402

HTML = os.environ.get("NUMBAROPE_ASV_HTML", dashboard.DEFAULT_HTML)

pytestmark = [
    pytest.mark.skipif(dashboard.find_chromium() is None, reason="chromium not installed"),
    pytest.mark.skipif(importlib.util.find_spec("asv") is None, reason="asv not installed"),
    pytest.mark.skipif(not dashboard.published(HTML),
                       reason=f"no published asv site in {HTML} (asv publish)"),
]


def test_check_dom_rejects_errors():
    assert dashboard.check_dom("", ["x"])
    assert "no <canvas> plot element" in dashboard.check_dom("<div>x</div>", ["x"])
    assert dashboard.check_dom("<canvas></canvas> x Failed to load", ["x"])
    assert dashboard.check_dom("<canvas></canvas> x", ["x"]) == []


def test_dashboard_renders_graphs(tmp_path):
    res = dashboard.run(HTML, out=str(tmp_path / "dashboard.png"), timeout=60)
    assert res["benchmarks"] > 0
    assert res["index_problems"] == [], res
    assert res["graph_problems"] == [], res
    assert res["index_canvases"] > 0 and res["graph_canvases"] > 0
    assert os.path.getsize(res["screenshot"]) > 10_000       # a picture, not a blank page
