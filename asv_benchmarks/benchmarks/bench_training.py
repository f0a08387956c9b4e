"""asv benchmarks of one training step with numbarope attention (issue 22).

The model, text and step are those of ``notebooks/05_training.ipynb``, defined once in
``notebooks/_training.py`` (imported here by its path): a causal character model of 2
blocks of 2 heads of dimension 16 (width 32, 4× MLP), queries and keys L2-normalised and
a fixed scale 0.5, so that every head's logit radius is ``R = 0.5`` whatever the weights
(Alman & Song, arXiv:2505.11892: the bounded-entry regime, where a degree-3 polynomial
certifies ``eps = 1e-3``), RoPE by ``rotary=``, ``is_causal=True``; the text is numbarope's
own docstrings. One step is forward, cross-entropy, backward (numbarope's exact backward,
or the certified fast ``prefix`` backward) and ``Adam.step()``, batch of one sequence of n
characters, float32.

Conventions as :mod:`bench_attention`: data and model from fixed seeds in ``setup``, one
warm-up step there (numba's compilation, first touch of memory); ``n = 32768`` (where the
fast step overtakes the exact one) is skipped with ``NUMBAROPE_BENCH_QUICK=1``. Without torch every benchmark here is skipped
(``NotImplementedError`` in ``setup``, shown as ``n/a``).
"""

import importlib.util
import os
import pathlib

#: Sizes above it are skipped when NUMBAROPE_BENCH_QUICK is set.
LARGE_N = 16384
#: The shared model module of the notebook (the repository's notebooks/ folder).
TRAINING_MODULE = pathlib.Path(__file__).resolve().parents[2] / "notebooks" / "_training.py"


def _skip_large(n):
    if n > LARGE_N and os.environ.get("NUMBAROPE_BENCH_QUICK"):
        raise NotImplementedError("large size skipped (NUMBAROPE_BENCH_QUICK is set)")


def load_training():
    """``notebooks/_training.py`` as a module; ``NotImplementedError`` (asv: skipped)
    when torch is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(f"torch is not installed ({exc}): "
                                  f'pip install ".[notebooks]"') from exc
    spec = importlib.util.spec_from_file_location("numbarope_notebook_training",
                                                  TRAINING_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TrainingStep:
    """One training step (forward + backward + Adam) of the bounded character model of
    ``05_training.ipynb`` at n characters, attention ``method`` exact or fast."""

    # method first: the dashboard draws every value of the first parameter and the first
    # of the others (n = 16384); fast wins the whole step from n ≈ 32768 (notebook 05)
    params = (["exact", "fast"], [LARGE_N, 4096, 2 * LARGE_N])
    param_names = ["method", "n"]
    timeout = 600.0
    number = 1
    repeat = (1, 5, 60.0)

    def setup(self, method, n):
        _skip_large(n)
        T = load_training()
        ids, chars = T.encode(T.corpus())
        self.batch = T.batches(ids, n, 1, 1, seed=0)[0]
        self.summarise = T.summarise
        self.eps = T.EPS
        self.step = T.make_step(T.build(len(chars), seed=0), method)
        self.step(self.batch)                       # compile / warm

    def time_step(self, method, n):
        self.step(self.batch)

    def track_bound(self, method, n):
        """Largest certified error bound of the step's forward over all heads, relative
        to the head's max|V|: the fast path certifies <= eps = 1e-3; the exact path's
        bound is its float32 rounding."""
        _, infos = self.step(self.batch)
        return self.summarise(infos)["bound"]

    track_bound.unit = "bound/max|V|"
