"""Inputs of the fast-backward tests (tests/ops/test_gemm_backward.py,
test_prefix_backward.py): bounded q, k, standard normal v and dO, a key mask."""

import numpy as np


def inputs(rng, G, L, S, E, Ev, R, padded):
    """q, k with s·max‖q‖₂·max‖k‖₂ = R exactly, v and dO standard normal, a key mask."""
    s = 1.0 / np.sqrt(E)
    shape = (L, E) if G == 1 else (G, L, E)
    q = rng.standard_normal(shape)
    k = rng.standard_normal((S, E))
    c = np.sqrt(R / s / (np.linalg.norm(q, axis=-1).max() * np.linalg.norm(k, axis=-1).max()))
    v = rng.standard_normal((S, Ev))
    dO = rng.standard_normal(shape[:-1] + (Ev,))
    keep = None
    if padded:
        keep = rng.random(S) < 0.7
        keep[rng.integers(S)] = True
    return q * c, k * c, v, dO, s, keep
