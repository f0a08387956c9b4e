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

__all__ = ["rounding_term", "recurrence_rounding", "gradient_bound", "causal_gradient_bound",
           "DECAY_CUT"]

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


def _gradient_terms(Q, K, V, scale, coef, delta, S, radius, radius1, rounding=None):
    """The terms every fast gradient bound shares (see :func:`gradient_bound`, Notes),
    from the real keys K, V (S of them, at most, per row) and the rows Q: ``(g, m, s,
    R, κ_q, κ_k, V, ε_P, e_Δ, H, a₁, a₂)``, or None when the bound is void (``ε = δ + ρ
    >= 1``). ``rounding(R, R₁) -> ρ``: the forward's floating-point allowance (default
    :func:`rounding_term` of S + 8g + 4 terms; a recurrence passes its own)."""
    E, Ev = Q.shape[1], V.shape[1]
    coef = np.asarray(coef, dtype=np.float64)
    g = len(coef) - 1
    m = math.comb(E + g, g)
    s = float(scale)
    cs = s * float(np.linalg.norm(Q, axis=1).max()) * float(np.linalg.norm(K, axis=1).max())
    R = cs if radius is None else float(radius)
    R1 = cs if radius1 is None else float(radius1)
    kq = float(np.abs(Q).max()) if E else 0.0
    kk = float(np.abs(K).max()) if E else 0.0
    Vm = float(np.abs(V).max()) if Ev else 0.0
    nu = float((V.max(axis=0) - V.min(axis=0)).max()) if Ev else 0.0
    V2 = float(np.linalg.norm(V, axis=1).max()) if Ev else 0.0
    rho = (rounding_term(S + 8 * g + 4, m, coef, R, R1, delta) if rounding is None
           else rounding(R, R1))
    eps = float(delta) + float(rho)
    if not eps < 1:
        return None
    eP = (float(delta) + eps) / (1 - eps)
    eo = (1 + _U) * 2 * eps / (1 - eps) + _U
    eD = eo + _gamma(Ev) * (1 + eo)
    with np.errstate(over="ignore", invalid="ignore"):
        P1 = float(np.sum(np.abs(coef) * min(R1, 1e300) ** np.arange(g + 1)))
        H = P1 * np.exp(min(R, 700.0)) / (1 - eps)
    a1 = eP * nu + (1 + eP) * eD * Vm                  # per ‖dO_i‖₁
    a2 = (2 * eP + (1 + eP) * eD) * V2                 # per ‖dO_i‖₂
    return g, m, s, R, kq, kk, Vm, eP, eD, H, a1, a2


def gradient_bound(q, k, v, dout, scale, coef, delta, *, key_mask=None, radius=None,
                   radius1=None):
    r"""Certified bounds on the errors of :func:`numbarope.ops.gemm.gemm_backward`
    against the EXACT softmax attention's gradients.

    Parameters
    ----------
    q : (L, E) or (G, L, E) array_like
        Queries as given to the forward and the backward (rotated).
    k : (S, E) array_like
    v : (S, Ev) array_like
    dout : (L, Ev) or (G, L, Ev) array_like
        The gradient with respect to the output.
    scale : float
        s > 0.
    coef : (g+1,) array_like
        The polynomial p of the forward.
    delta : float
        δ: certified relative error of p against exp on ``[−R, R]`` (e.g.
        ``exp_approximation(...).error_bound``), R at least the ``radius`` used.
    key_mask : (S,) array_like of bool, optional
        True = a real key (only the real keys enter the maxima and the counts).
    radius : float, optional
        Proven ``R >= max |s q_iᵀk_j|`` over the real keys; default the
        Cauchy–Schwarz ``s·max‖q_i‖₂·max‖k_j‖₂``. δ must hold on ``[−R, R]``.
    radius1 : float, optional
        ``R₁ >= s·max_ij Σ_e |q_ie k_je|``; default ``s·max‖q_i‖₂·max‖k_j‖₂``.

    Returns
    -------
    (bq, bk, bv) : tuple of float
        Bounds on ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|``
        over all entries (``inf`` when the bound is void: ``δ + ρ >= 1``).

    Notes
    -----
    Computed from maxima in ``O((G·L + S)·(E + Ev))``: ``κ_q = max‖q_i‖_∞``, ``κ_k =
    max_j‖k_j‖_∞``, ``V = max|v_jc|``, ``ν = max_c (max_j v_jc − min_j v_jc)`` (<= 2V),
    ``N₁ = max_i‖dO_i‖₁``, ``Σ₁ = Σ_i‖dO_i‖₁``, ``Σ_∞ = Σ_i‖dO_i‖_∞``, with S the real
    keys, n = G·L rows, m = C(E+g, g), ``P₁ = Σ_k |a_k| R₁^k``, u = 2⁻⁵³, γ_k =
    ku/(1−ku) (Higham 2002, §3.1), ``c_A = 1/(1 + (S−1)e^{−2R})`` (<= min(1, e^{2R}/S):
    every ``A_ij = 1/(1 + Σ_{l≠j} e^{x_il − x_ij})`` has ``x_il − x_ij >= −2R``).
    Everything below is a proof, in the model of :func:`recurrence_rounding`
    (standard model, no underflow; any summation order; a fused multiply-add counts
    as fewer roundings).

    **The forward's weights.** The forward's computed denominator is
    ``D̂_i = Σ_j e^{x_ij}(1 + η_i)`` with ``|η_i| <= ε = δ + ρ``: ``Σ_j p(x_ij) = Σ_j
    e^{x_ij}(1 + δ̄)``, ``|δ̄| <= δ``, and the rounding of the sum over keys of
    ``φ̂ᵀψ̂`` is at most ``γ_k S P₁``, relative to ``Σ_j e^{x_ij} >= S e^{−R}`` at most
    ρ. Here ρ is :func:`rounding_term` with every rounding of a term counted: φ̂ and
    ψ̂ of degree d carry at most ``5d + 2`` roundings each (the scaled inputs
    ``fl(fl(√s)x)`` 2 per factor, the recurrence 2 per level, the ratios of the
    weights 1 per level — they telescope to the weight, itself ``fl(√fl(|a_k|·k!/α!))``,
    2; or ``4d + 3`` with the unit-weight recurrence), so ``k = S + m + 10g + 6``
    (rounding_term's ``n + m + 2g + 2`` with ``n = S + 8g + 4``). Hence, with the
    backward's ``P̃_ij = p(x_ij)/D̂_i`` in exact arithmetic and ``p(x_ij) =
    e^{x_ij}(1 + δ_ij)``, ``|δ_ij| <= δ``,

        P̃_ij / A_ij − 1 = (δ_ij − η_i)/(1 + η_i),   |P̃_ij − A_ij| <= ε_P A_ij,
        ε_P = (δ + ε)/(1 − ε) <= 2ε/(1 − ε),

    and ``Σ_j P̃_ij <= 1 + ε_P``. The forward's output satisfies ``|õ_ic − o_ic| <=
    e_o V``, ``e_o = (1+u)·2ε/(1−ε) + u`` (as :func:`recurrence_rounding`'s *Output*,
    plus the division's rounding), and the backward's ``Δ̂_i = fl(dO_i·õ_i)`` (γ_Ev,
    Higham §3.1) ``|Δ̂_i − Δ_i| <= e_Δ V‖dO_i‖₁``, ``e_Δ = e_o + γ_Ev(1 + e_o)``, and
    ``|Δ̂_i| <= (1 + e_Δ) V‖dO_i‖₁``. The same holds with 2-norms, ``‖õ_i − o_i‖₂ <=
    e_o V₂``, ``V₂ = max_j‖v_j‖₂`` (the same sums, Minkowski), so ``|Δ̂_i − Δ_i| <=
    e_Δ V₂‖dO_i‖₂`` (Cauchy–Schwarz; o_i a convex combination of the v_j).

    **Approximation** (the backward's formulas in exact arithmetic with P̃, D̂, Δ̂,
    against the exact gradients). With ``a_ij = dO_i·v_j``: ``dX̃_ij − dX_ij =
    (P̃_ij − A_ij)(a_ij − Δ_i) − P̃_ij(Δ̂_i − Δ_i)`` and ``|a_ij − Δ_i| = |dO_i·(v_j −
    o_i)| <= ν‖dO_i‖₁`` (o_i is a convex combination of the v_j). So

        |dQ̃_ie − dQ_ie| <= s κ_k Σ_j |dX̃_ij − dX_ij|
                          <= s κ_k N₁ [ε_P ν + (1 + ε_P) e_Δ V]  =  s κ_k N₁ a₁,
        |dK̃_je − dK_je| <= s κ_q Σ_i A_ij ‖dO_i‖₁ [ε_P ν + (1 + ε_P) e_Δ V]
                          <= s κ_q c_A Σ₁ a₁,
        |dṼ_jc − dV_jc| <= Σ_i |P̃_ij − A_ij| |dO_ic| <= ε_P c_A Σ_∞,

    and, by the 2-norm forms (``|a_ij − Δ_i| <= 2V₂‖dO_i‖₂``), the same with ``N₁ a₁``
    and ``Σ₁ a₁`` replaced by ``N₂ a₂`` and ``Σ₂ a₂``, ``a₂ = (2ε_P + (1 + ε_P)e_Δ)V₂``,
    ``N₂ = max_i‖dO_i‖₂``, ``Σ₂ = Σ_i‖dO_i‖₂`` (the smaller is taken: about √Ev
    smaller for dense dO and v).

    **Rounding of the backward's passes** (:func:`numbarope.ops.gemm.gemm_backward`).
    Each computed gradient entry is, by linearity, a sum of products; the exact sum is
    the backward's formula with P̃ (above), and each product passes at most k
    roundings, so the computed entry is within ``γ_k Σ|terms|`` (Higham §3.1, §4.2;
    Lemma 3.3 as in :func:`recurrence_rounding`).

    * dq, terms ``(√s/D̂_i)·dO_ic·φ_α ψ_α·v_jc k'_je`` and ``(√s/D̂_i)·Δ̂_i·φ_α ψ_α·
      k'_je``: features ``2(5g + 3)``, ``fl(v_jc k'_je)`` with k' 3, the GEMM's product
      1, the sum over keys (blocks, tasks) S − 1, ``φ̂ᵀZ`` m, the row factor
      ``fl(dO_ic·fl(fl(1/D̂_i)·fl(√s)))`` and its product 5, the sum over c Ev:
      ``k_q = S + m + Ev + 10g + 14``. ``Σ|terms| <= s κ_k (2 + e_Δ) V ‖dO_i‖₁ ·
      S P₁ / D̂_i`` and ``D̂_i >= (1 − ε) S e^{−R}``: at most ``s κ_k (2 + e_Δ) V N₁ H``,
      ``H = P₁ e^R/(1 − ε)``.
    * dk, terms ``√s v_jc·ψ_α φ_α·(dO_ic/D̂_i) q'_ie`` and ``√s·ψ_α φ_α·(Δ̂_i/D̂_i)
      q'_ie``: features ``2(5g + 3)``, the row's ``fl(fl(dO_ic·fl(1/D̂_i))·q'_ie)`` with
      q' 5, the product 1, the sum over the rows of all query heads n − 1, ``ψ̂ᵀZq``
      m, ``fl(v_jc·fl(√s))`` and its product 3, the sum over c Ev: ``k_k = n + m + Ev
      + 10g + 14``; ``Σ|terms| <= s κ_q (2 + e_Δ) V Σ₁ H / S``.
    * dv, terms ``ψ_α φ_α dO_ic/D̂_i``: features, the row factor 2, the product 1,
      the sum n − 1, ``ψ̂ᵀZq`` m: ``k_v = n + m + 10g + 8``; ``Σ|terms| <= Σ_∞ H/S``.

    The returned bounds are the sums of the two parts:

        bq = s κ_k [min(N₁a₁, N₂a₂) + γ_{k_q}(2 + e_Δ) V H N₁]
        bk = s κ_q [c_A min(Σ₁a₁, Σ₂a₂) + γ_{k_k}(2 + e_Δ) V H Σ₁ / S]
        bv = Σ_∞ [c_A ε_P + γ_{k_v} H / S]

    The approximation part dominates unless δ is near the rounding floor. It is a
    worst case over the signs and nearly attained: one key at logit +R with value +1,
    the others at −R with value −1, equal rows, p of even degree (its error has
    opposite signs at ±R) give errors of 0.04–0.13 (dq), 0.3–0.6 (dk) and 0.8–0.96
    (dv) of the bounds (tests/ops/test_gemm_backward.py). On random inputs the
    errors cancel over keys and rows: measured 50–10⁵× below. Rows of queries and
    keys in the underflow
    range (features below 2⁻¹⁰²²) are outside the model, as in
    :func:`recurrence_rounding`: they add at most ~2⁻¹⁰⁷⁵ per operation.
    """
    Q = np.asarray(q, dtype=np.float64)
    E = Q.shape[-1]
    Q = Q.reshape(-1, E)
    dO = np.asarray(dout, dtype=np.float64)
    K = np.asarray(k, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    Ev = V.shape[1]
    dO = dO.reshape(-1, Ev)
    if key_mask is not None:
        keep = np.asarray(key_mask, dtype=bool).reshape(K.shape[0])
        K, V = K[keep], V[keep]
    S, n = K.shape[0], Q.shape[0]
    if S == 0 or n == 0:
        return 0.0, 0.0, 0.0
    t = _gradient_terms(Q, K, V, scale, coef, delta, S, radius, radius1)
    if t is None:
        return np.inf, np.inf, np.inf
    g, m, s, R, kq, kk, Vm, eP, eD, H, a1, a2 = t
    r1 = np.abs(dO).sum(axis=1) if Ev else np.zeros(n)
    N1, S1 = float(r1.max()), float(r1.sum())
    r2 = np.linalg.norm(dO, axis=1) if Ev else np.zeros(n)
    N2, S2 = float(r2.max()), float(r2.sum())
    Sinf = float(np.abs(dO).max(axis=1).sum()) if Ev else 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        cA = 1.0 / (1.0 + (S - 1) * float(np.exp(-min(2 * R, 700.0))))
        bq = s * kk * (min(N1 * a1, N2 * a2)
                       + _gamma(S + m + Ev + 10 * g + 14) * (2 + eD) * Vm * H * N1)
        bk = s * kq * (cA * min(S1 * a1, S2 * a2)
                       + _gamma(n + m + Ev + 10 * g + 14) * (2 + eD) * Vm * H * S1 / S)
        bv = Sinf * (cA * eP + _gamma(n + m + 10 * g + 8) * H / S)
    out = tuple(float(b) if np.isfinite(b) else np.inf for b in (bq, bk, bv))
    return out


def causal_gradient_bound(q, k, v, dout, scale, coef, delta, *, offset=0, key_mask=None,
                          radius=None, radius1=None):
    r"""Certified bounds on the errors of :func:`numbarope.ops.prefix.prefix_backward`
    against the EXACT causal softmax attention's gradients: :func:`gradient_bound` with
    each row's own number of visible keys.

    Parameters
    ----------
    q, k, v, dout, scale, coef, delta, key_mask, radius, radius1
        As :func:`gradient_bound`.
    offset : int, optional
        Position of query 0: query i (position ``i + offset``) sees the real keys at
        positions ``<= i + offset``, as the forward and the backward.

    Returns
    -------
    (bq, bk, bv) : tuple of float
        Bounds on ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|``
        over all entries (``inf`` when void: ``δ + ρ >= 1``).

    Notes
    -----
    A proof, in :func:`gradient_bound`'s model and notation, with every sum over keys
    restricted to the ``S_i >= 1`` real keys row i sees (rows with ``S_i = 0`` have
    exact and computed gradients 0 and take no part; n the other rows of all query
    heads, ``S = max_i S_i``):

    * *The forward's weights*: row i's computed denominator is within ``γ_k S_i P₁``
      of ``Σ_j p(x_ij)`` (any association; a key of the row's own chunk, by Horner on
      the rounded logit ``fl(q'·k')``, passes at most ``g(E + 4)`` roundings in the
      logit's powers and ``2g + 1`` in Horner's rule (Higham §5.1) before the sum over
      keys, no more than a feature route's ``10g + 6 + m``, as ``m >= 1 + gE``),
      relative to ``Σ_j e^{x_ij} >= S_i e^{−R}``: the same ρ, ε, ε_P, e_o, e_Δ as
      :func:`gradient_bound` with S.
    * *Approximation*: per row unchanged, and ``A_ij <= c_i = 1/(1 + (S_i − 1)
      e^{−2R})``; a key's sum over the rows that see it is at most the sum over all
      rows (attained by the first real key, which every row sees):

          dq: s κ_k min(N₁a₁, N₂a₂),   dk: s κ_q min(Σ_i c_i‖dO_i‖₁ a₁, Σ_i c_i‖dO_i‖₂ a₂),
          dv: ε_P Σ_i c_i ‖dO_i‖_∞.

    * *Rounding* (:func:`numbarope.ops.prefix.prefix_backward`): ``D̂_i >= (1 − ε) S_i
      e^{−R}``, so ``S·P₁/D̂`` of :func:`gradient_bound` becomes ``S_i P₁/D̂_i <= H``
      for dq and ``P₁/D̂_i <= H/S_i`` per row for dk, dv. Roundings per term, the state
      route: features ``2(5g + 3)``; dq: ``fl(k'_je·[v_j, 1]_a)`` 3, the GEMM's product 1,
      the sum over the keys of the prefix (blocks, chunks, any association) S − 1,
      ``φ̂ᵀZ`` m, the row factor ``fl(fl(dO_ia·fl(1/D̂_i))·fl(√s))`` (or with Δ̂_i) 4, its
      product 1, the sum over a Ev, the addition of the explicit part 1: ``k_q = S + m
      + Ev + 10g + 15``; dk: ``fl(q'_ie·fl(dO_ia·fl(1/D̂_i)))`` 5, the product 1, the
      sum over rows n − 1, ``ψ̂ᵀZq`` m, ``fl(√s)·[v_j, 1]_a`` 2, its product 1, the sum
      over a Ev, the addition 1: ``k_k = n + m + Ev + 10g + 15``; dv: the row factor 2,
      product 1, sum n − 1, m, the addition 1: ``k_v = n + m + 10g + 9``. The explicit
      route (Horner on ``fl(q'·k')``: ``g(E + 6) + 1`` for the weight, ``Ev + 3`` for
      ``fl(dO_i/D̂_i·v_j) − Δ̂_i/D̂_i``, 2 for ``fl(√s)``, 1 for the weight's product, 3
      for ``k'`` (q'), at most ``min(C, S) − 1`` (n − 1) additions, the final 1) stays
      below these counts since ``m >= 1 + gE``.

    The returned bounds::

        bq = s κ_k [min(N₁a₁, N₂a₂) + γ_{k_q}(2 + e_Δ) V H N₁]
        bk = s κ_q [min(Σ c_i‖dO_i‖₁ a₁, Σ c_i‖dO_i‖₂ a₂) + γ_{k_k}(2 + e_Δ) V H Σ_i ‖dO_i‖₁/S_i]
        bv = ε_P Σ_i c_i‖dO_i‖_∞ + γ_{k_v} H Σ_i ‖dO_i‖_∞/S_i

    with κ_q over the rows that see a key, κ_k, V, ν, V₂ over the real keys. When every
    row sees every real key the approximation parts equal :func:`gradient_bound`'s.
    """
    Q = np.asarray(q, dtype=np.float64)
    E = Q.shape[-1]
    L = Q.shape[-2]
    Q = Q.reshape(-1, E)
    K = np.asarray(k, dtype=np.float64)
    V = np.asarray(v, dtype=np.float64)
    Ev = V.shape[1]
    dO = np.asarray(dout, dtype=np.float64).reshape(-1, Ev)
    S_all = K.shape[0]
    if key_mask is not None:
        keep = np.asarray(key_mask, dtype=bool).reshape(S_all)
    else:
        keep = np.ones(S_all, bool)
    cum = np.cumsum(keep, dtype=np.int64)
    last = np.arange(L, dtype=np.int64) + int(offset)
    lim = np.where(last < 0, 0, cum[np.clip(last, 0, S_all - 1)]) if S_all else \
        np.zeros(L, np.int64)
    lim = np.tile(lim, Q.shape[0] // max(L, 1))
    act = lim > 0
    K, V = K[keep], V[keep]
    Q, dO, Si = Q[act], dO[act], lim[act].astype(np.float64)
    n = Q.shape[0]
    if K.shape[0] == 0 or n == 0:
        return 0.0, 0.0, 0.0
    S = int(Si.max())
    t = _gradient_terms(Q, K, V, scale, coef, delta, S, radius, radius1)
    if t is None:
        return np.inf, np.inf, np.inf
    g, m, s, R, kq, kk, Vm, eP, eD, H, a1, a2 = t
    r1 = np.abs(dO).sum(axis=1) if Ev else np.zeros(n)
    r2 = np.linalg.norm(dO, axis=1) if Ev else np.zeros(n)
    ri = np.abs(dO).max(axis=1) if Ev else np.zeros(n)
    with np.errstate(over="ignore", invalid="ignore"):
        ci = 1.0 / (1.0 + (Si - 1) * float(np.exp(-min(2 * R, 700.0))))
        N1, N2 = float(r1.max()), float(r2.max())
        bq = s * kk * (min(N1 * a1, N2 * a2)
                       + _gamma(S + m + Ev + 10 * g + 15) * (2 + eD) * Vm * H * N1)
        bk = s * kq * (min(float(ci @ r1) * a1, float(ci @ r2) * a2)
                       + _gamma(n + m + Ev + 10 * g + 15) * (2 + eD) * Vm * H
                       * float(np.sum(r1 / Si)))
        bv = eP * float(ci @ ri) + _gamma(n + m + 10 * g + 9) * H * float(np.sum(ri / Si))
    return tuple(float(b) if np.isfinite(b) else np.inf for b in (bq, bk, bv))
