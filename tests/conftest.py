"""Shared test setup.

* ``tests/naive.py`` (dense loop references) is importable as ``import naive`` from
  every test directory (``tests/ops/_poly_ref.py`` from ``tests/ops/``, whose
  directory pytest puts on ``sys.path``: test files have distinct basenames).
* Every ``numbarope.*`` module comes from the tree under test: a module name that
  does not exist there (an old name, e.g. ``numbarope._monomials``) is a
  ModuleNotFoundError, as in a clean install, even where another finder on
  ``sys.meta_path`` (an editable install of another checkout) would supply it.
"""

import importlib.machinery
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


class _TreeOnly:
    """Meta path finder: ``numbarope.<sub>`` only from its parent package's __path__."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("numbarope.") or path is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} in {list(path)}", name=name)
        return spec


if not any(isinstance(f, _TreeOnly) for f in sys.meta_path):
    sys.meta_path.insert(0, _TreeOnly())
