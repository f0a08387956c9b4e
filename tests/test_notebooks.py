"""Execute every notebook in ``notebooks/`` and fail if any cell raises.

The notebooks carry their own checks (``assert error <= bound`` and the like;
no timing assertions at small sizes). They are stored without outputs; this
test runs them in a fresh ``python3`` kernel (ipykernel's own kernelspec, which
jupyter_client launches with the running interpreter, ``sys.executable``) with
the notebooks directory as working directory, and the in-tree package first on
the kernel's ``PYTHONPATH`` so that the notebooks exercise the same numbarope as
the rest of the suite.

Sizes: each notebook reads ``NUMBAROPE_FULL_NOTEBOOKS``; unset (the default, and
what CI runs) it uses small sizes, about a minute for all four on two cores.
``NUMBAROPE_FULL_NOTEBOOKS=1 python -m pytest tests/test_notebooks.py`` runs them
at full sizes (several minutes; the scaling notebook times sequences up to
n = 2^20), with a longer cell timeout.
"""

import os
import pathlib
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
FULL = os.environ.get("NUMBAROPE_FULL_NOTEBOOKS") == "1"
CELL_TIMEOUT = 3600 if FULL else 300     # seconds per cell
KERNEL_NAME = "python3"
FULL_SWITCH = 'FULL = os.environ.get("NUMBAROPE_FULL_NOTEBOOKS") == "1"'


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_layout(path):
    """What every notebook promises its reader: the question and the paper first, one
    switch for the sizes, plots, and a closing summary."""
    nb = nbformat.read(path, as_version=4)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert "Question" in first.source and "2505.11892" in first.source, \
        f"{path.name}: the first cell should say what question it answers and cite the paper"
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert sum(FULL_SWITCH in src for src in code) == 1, \
        f"{path.name}: one cell should define {FULL_SWITCH}"
    assert any("plt.show()" in src for src in code), f"{path.name}: no plot"
    assert any("assert " in src for src in code), f"{path.name}: no checks"
    assert last.cell_type == "markdown" and last.source.startswith("## What we saw"), \
        f"{path.name}: the last cell should be a '## What we saw' summary"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is stored with outputs; clear them before committing"
    # The kernel inherits this environment: in-tree package first.
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(ROOT)] + ([pythonpath] if pythonpath else [])))
    # One extra cell, not stored: which interpreter did the kernel run?
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name}: a cell raised\n{exc}")
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
    kernel_prefix = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert kernel_prefix == sys.prefix, \
        f"kernel {KERNEL_NAME!r} ran in {kernel_prefix!r}, not in this environment {sys.prefix!r}"
    print(f"{path.name}: executed in {elapsed:.1f} s in {kernel_prefix}"
          f"{' (full sizes)' if FULL else ''}")
