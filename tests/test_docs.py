"""The Sphinx site builds without a warning and its pages hold the docstrings.

Needs the ``docs`` extra (``pip install ".[docs]"``: sphinx, numpydoc, myst-nb);
skipped without it. The build is the one the README gives::

    python -m sphinx -b html -W --keep-going docs OUTDIR
"""

import html
import os
import pathlib
import re
import subprocess
import sys

import pytest

import numbarope

pytest.importorskip("sphinx")
pytest.importorskip("numpydoc")
pytest.importorskip("myst_nb")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _text(path):
    """The visible text of an HTML page, whitespace collapsed."""
    raw = re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8"))
    return " ".join(html.unescape(raw).split())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("html")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-W",
                           "--keep-going", "-q", str(DOCS), str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def test_api_page_holds_the_docstrings(site):
    page = site / "api.html"
    assert page.exists()
    text = _text(page)
    first_line = numbarope.rope_attention.__doc__.strip().splitlines()[0]
    assert first_line in text                    # rope_attention's own summary line
    assert "Grouped-query" in text or "grouped-query" in text
    for name in ("numbarope.rope_attention", "numbarope.plan", "numbarope.AttentionInfo",
                 "numbarope.HeadPlan", "numbarope.Rotary", "numbarope.exp_approximation",
                 "numbarope.calibrate", "numbarope.set_workers", "numbarope.get_workers",
                 "numbarope.load_sample", "numbarope.bias.Causal", "numbarope.bias.ALiBi",
                 "numbarope.ops.register", "numbarope.ops.Algorithm"):
        assert f'id="{name}"' in page.read_text(encoding="utf-8"), name
    # numpydoc rendered the sections (not left as plain text)
    assert "Parameters :" in text or "Parameters:" in text
    # the report's generated per-field properties are documented
    assert 'id="numbarope.AttentionInfo.degree"' in page.read_text(encoding="utf-8")


def test_guide_pages_and_notebooks(site):
    assert "Alman" in _text(site / "index.html")
    assert "When the fast path pays" in _text(site / "guide.html")
    for nb in NOTEBOOKS:
        page = site / "notebooks" / f"{nb.stem}.html"
        assert page.exists(), nb.name
        # executed while building (issue 24): every notebook page shows its figures
        # (matplotlib's PNG outputs) and its printed results, and no error output
        raw = page.read_text(encoding="utf-8")
        assert re.search(r'<img[^>]+src="[^"]*\.png"', raw), f"{nb.name}: no figure"
        assert "cell_output" in raw, f"{nb.name}: no outputs"
        assert "Traceback" not in raw, f"{nb.name}: an error output"
