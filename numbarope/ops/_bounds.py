"""Floating-point allowances of the fast algorithms (shared by several of them).

* :func:`rounding_term`: the polynomial method's dot products and sums over keys
  (every separable and general algorithm), plus the FFT's rounding (an estimate).
* :func:`recurrence_rounding`: the chunked recurrences without FFT (decay and
  window), a proof.

The exact path's bound lives beside its kernel (:mod:`numbarope.ops.streaming`).

References
----------
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (2002), §2.2,
§3.1, §4.2, §24.1.
"""

import math

import numpy as np

from ._exp import EXP_ULPS

__all__ = ["rounding_term", "recurrence_rounding", "DECAY_CUT"]

_U = 2.0 ** -53

#: Decay factors ``e^{−rate·d}`` with ``fl(rate·d) > DECAY_CUT`` are stored as exactly
#: 0 (they are < e^{−699.9} relative to the row's nearest key, see
#: :func:`recurrence_rounding`); all others are normal numbers >= e^{−700}
#: (> 2^{−1010}), computed by numbarope's proven exp kernel.
DECAY_CUT = 700.0


def _gamma(k, u=2.0 ** -53):
    """Higham's γ_k = k·u / (1 − k·u) (Accuracy and Stability of Numerical Algorithms, §3.1)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1 else np.inf



def rounding_term(n, m, coef, radius, radius1, delta, fft_length_=None, row_mass=None):
    """Floating-point allowance added to δ (relative error of the weights).

    * Dot products of features and sums over keys: by the standard bound
      (Higham 2002, §3.1) each computed weight sum is within ``γ_{n+m+2g+2}``
      times ``Σ|φ_α ψ_α|`` of the exact, and ``Σ_α |φ_α(q) ψ_α(k)| <=
      P₁ = Σ_k |a_k| R₁^k`` with ``R₁ = s·max‖q‖₁·max‖k‖₁`` (×max|W| for
      general W). Dividing by the smallest weight ``(1−δ)e^{−R}`` makes it
      relative. This part is a proof.
    * FFT convolutions (``fft_length_`` given) add an absolute error of about
      ``5u·log2(N)·‖c‖₂‖u‖₂ <= 7.5u·log2(N)·n·P₁`` per entry, relative to the
      smallest row mass ``min_i Σ_j T(i−j)`` (``row_mass``) times ``(1−δ)e^{−R}``.
      This part is an estimate (the constant of the FFT error bound depends on
      the FFT implementation; Higham 2002, §24.1).
    """
    g = len(coef) - 1
    kk = n + m + 2 * g + 2
    gamma = kk * _U / (1 - kk * _U)
    with np.errstate(over="ignore", invalid="ignore"):      # inf is the honest answer
        P1 = float(np.sum(np.abs(coef) * min(radius1, 1e300) ** np.arange(len(coef))))
        scale_ = np.exp(min(radius, 700.0)) / max(1e-300, 1 - delta)
        rnd = gamma * P1 * scale_
        if fft_length_ is not None:
            rnd += (7.5 * _U * np.log2(max(fft_length_, 2)) * n * P1 * scale_
                    / max(row_mass, 1e-300))
    return rnd


def recurrence_rounding(algorithm, S, m, coef, radius, radius1, delta, chunk=None, rate=None):
    """Rigorous relative floating-point allowance ρ of the decay and window algorithms
    (:func:`numbarope.ops.decay.decay_attention`,
    :func:`numbarope.ops.window.window_attention`).

    With it, ``max|out − o| <= 2(δ+ρ)/(1−δ−ρ)·max|v|`` where o is the exact softmax
    attention with weights ``e^{s q_iᵀk_j}·T(t_ij)`` (δ the certified relative error
    of p on ``[−R, R]``): the form of the proven part of
    :func:`rounding_term`, which it replaces for these paths.

    Parameters
    ----------
    algorithm : {"decay", "window"}
    S : int
        Keys (real keys; an upper bound is fine).
    m : int
        Features C(E+g, g).
    coef : (g+1,) array_like
        p's monomial coefficients.
    radius : float
        Proven logit radius R >= max |s q_iᵀk_j|.
    radius1 : float
        ``R₁ >= s·max_i,j Σ_e |q_ie k_je|`` (e.g. s·max‖q‖₂·max‖k‖₂, as the
        planner's radius1).
    delta : float
        Certified relative error of p on [−R, R].
    chunk : int, optional
        Keys per chunk the call used (:func:`numbarope.ops.decay.decay_chunk`,
        :func:`numbarope.ops.window.window_chunk`).
        Default: the smallest it can use (16) — a larger chunk
        only lowers the count.
    rate : float, optional
        The decay rate (``"decay"``); without it the worst case over rates.

    Returns
    -------
    float
        ρ (``inf`` when the bound is void).

    Notes
    -----
    Higham (2002): standard model ``fl(a op b) = (a op b)(1 + ε)``, ``|ε| <= u = 2⁻⁵³``
    (§2.2, without underflow); Lemma 3.1: a product of k factors ``(1+ε_i)^{±1}`` is
    ``1 + θ_k``, ``|θ_k| <= γ_k = ku/(1−ku)``; Lemma 3.3: ``(1+θ_j)(1+θ_k) = 1 +
    θ_{j+k}`` — its proof uses only ``|θ| <= γ``, so any factor ``1 + η`` with
    ``|η| <= γ_j`` counts as j roundings. A result that is, by linearity, a sum
    of products each computed through at most k roundings (the multiplications
    on its path and the additions it passes, in any order or association —
    §3.1, §4.2; with fused multiply-adds fewer) is within ``γ_k Σ|term|`` of the
    exact sum.

    *Polynomial part* (as rounding_term): ``num_i = Σ_j Σ_α
    φ_α(q_i)ψ_α(k_j)·w_ij·[v_j, 1]`` (inside a chunk, Horner on the logit, whose
    own rounding δ already certifies); features and the dot product φᵀS cost at
    most ``m + 2g + 2`` roundings and ``Σ_α |φ_αψ_α| <= P₁ = Σ_k |a_k| R₁^k``.
    Additions over keys: at most S − 1 inside any association (the chunk GEMMs).

    *Decay* — path of key j (chunk c) to row i (chunk c') in the forward scan:
    the chunk weight, the task total's steps (chunks c+1 .. end of its task),
    one step per later task in the exclusive scan, the walk over the row's task
    up to c' (one-pass two-sided: one step per chunk in between), the row's
    factor, the forward/backward combination: at most ``c' − c + 2 <= nch + 1``
    decay factors (2 inside a chunk; rows that see every key skip the row's
    factor; the backward side is the mirror image), and as many additions, plus the row's
    own chunk, the combination and the output division: ``nch + 4`` additions
    beyond the S above. Each factor is ``fl(exp(−fl(rate·d)))`` (exactly 1 at
    d = 0) ``= e^{−rate·d}·e^{−rate·d·ε}(1 + η)``, ``|ε| <= u``, ``|η| <= EXP_ULPS·u``
    (numbarope.ops._exp, proven: 64u), applied by one multiplication:
    ``EXP_ULPS + 1`` roundings. The factors' distances telescope to
    ``|t| − t0 <= S − 1`` (t0 the row's nearest visible key: every factor spans
    two positions in 0..S−1), so the arguments' errors multiply the path by
    ``e^{η'}``, ``|η'| <= u·rate·(|t| − t0)``.

    Case A, ``rate·(|t| − t0) <= T_B = DECAY_CUT/(1+u)``: no factor is 0 (each
    ``fl(rate·d_l) <= T_B(1+u)``) and ``e^{|η'|} − 1 <= γ_A``, ``A =
    min(rate·(S−1), DECAY_CUT)``. With

        k = S + m + 2g + 2 + (nch + 4) + (EXP_ULPS + 1)(nch + 2) + ⌈A⌉   (decay)
        k = S + m + 2g + 2 + 3⌈log2 nch⌉ + 3                          (window)

    (window: tree levels <= ⌈log2 nch⌉ and the range's <= 2 nodes per level,
    two Horner spans, the division; no factors) each term is within
    ``γ_k·P₁·w_ij·|v_j|``; the exact softmax term has weight ``e^{x}w_ij >=
    e^{−R}w_ij``, so relative to it: ``ρ_A = γ_k P₁ e^R/(1−δ)`` (the 1/(1−δ) as
    in rounding_term, harmless).

    Case B, ``rate·(|t| − t0) > T_B``: the exact relative weight is ``< e^{−T_B}``
    and the computed one 0 or ``<= e^{−T_B(1−u)}(1 + γ_k)``; each such term errs
    by at most ``2(1+γ_k)e^{−T_B(1−u)}P₁ max|v|`` absolutely, at most S of them in
    a row, whose exact denominator is ``>= e^{−R}`` (its nearest visible key has
    relative weight 1): ``ρ_B = 2S(1+γ_k)P₁e^{R − T_B(1−u)}/(1−δ)`` relative to the
    row's mass (< 10⁻²⁸⁰·S·P₁e^R; none for the window, or when rate·(S−1) <= T_B).

    *Output.* Computed ``N̂ = Σ_j w_j(1+a_j)v_j + e_N``, ``D̂ = Σ_j w_j(1+b_j) + e_D``
    (w_j exact softmax weights, D = Σ w_j), ``|a_j|, |b_j| <= ε = δ + ρ_A``,
    ``|e_N| <= ρ_B·D·max|v|``, ``|e_D| <= ρ_B·D``: then ``|N̂D − ND̂| <= 2(ε+ρ_B)D²max|v|``
    and ``D̂ >= (1−ε−ρ_B)D``, so ``|N̂/D̂ − N/D| <= 2(δ+ρ)/(1−δ−ρ)·max|v|`` with
    the returned ``ρ = ρ_A + ρ_B``.

    *Underflow.* Decay factors are 0 or normal (>= e^{−700}). Gradual underflow
    of a product (a state entry times a factor, or a feature product, below
    2⁻¹⁰²²; absolute error <= 2⁻¹⁰⁷⁵ each, Higham (2.8)) is outside the model,
    as in rounding_term: it adds at most 2⁻¹⁰⁷⁵·(nch + m + C + 4)·
    max(1, Σ_α|φ_α(q)|)·max|v| to a row whose mass is >= (1−δ)e^{−R} >= e^{−351}
    — negligible unless the features exceed ~10¹⁵⁰.
    """
    g = len(coef) - 1
    S = max(int(S), 1)
    if algorithm not in ("decay", "window"):
        raise ValueError(f"algorithm must be 'decay' or 'window', got {algorithm!r}")
    c = max(1, int(chunk or 16))
    nch = -(-S // c)
    base = S + m + 2 * g + 2
    if algorithm == "window":
        k = base + 3 * math.ceil(math.log2(max(nch, 1))) + 3
    else:
        A = DECAY_CUT if rate is None else min(float(rate) * (S - 1), DECAY_CUT)
        ulps = float(EXP_ULPS[np.dtype(np.float64)])
        k = base + (nch + 4) + (ulps + 1) * (nch + 2) + math.ceil(A)
    gk = _gamma(k)
    with np.errstate(over="ignore", invalid="ignore"):
        P1 = float(np.sum(np.abs(np.asarray(coef, np.float64))
                          * min(float(radius1), 1e300) ** np.arange(g + 1)))
        eR = np.exp(min(float(radius), 700.0)) / max(1e-300, 1.0 - delta)
        rho = gk * P1 * eR
        if algorithm == "decay":
            TB = DECAY_CUT / (1 + _U)
            if rate is None or float(rate) * (S - 1) > TB:
                rho += 2 * S * (1 + gk) * P1 * eR * np.exp(-TB * (1 - _U))
    return float(rho) if np.isfinite(rho) else np.inf
