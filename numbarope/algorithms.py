"""One object per attention algorithm, in a registry the planner walks.

Each algorithm says, for a head described by a :class:`HeadSpec`:

* why it cannot serve that head (:meth:`Algorithm.unavailable`: a list of
  :class:`Reason`, each a machine-readable ``code`` and a sentence; empty when it
  can);
* its feature count, predicted time (seconds, :data:`numbarope.planner.COST_CONSTANTS`)
  and working memory (bytes) at a polynomial degree;
* its floating-point allowance (:meth:`Algorithm.rounding`) and whether that part of
  its bound is proven (``bound_kind`` "certified") or estimated (FFT rounding);
* how to run it (:meth:`Algorithm.run`).

Adding an algorithm is one subclass and one :func:`register` call: the planner
(:func:`numbarope.planner.plan_head`) considers every registered fast algorithm
that can serve a head and takes the cheapest that meets ``eps``; an unknown name
is an error (:func:`get`), never a fall-through.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4–5.
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (2002), §3.1,
§4.2, §24.1 (rounding of sums, dot products and the FFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _config
from ._monomials import n_features
from .fast import fast_general, fast_memory, fast_separable, prefix_chunk
from .toeplitz import fft_length

__all__ = ["FastPathError", "Reason", "REASONS", "HeadSpec", "Algorithm", "register", "unregister", "get",
           "registry", "fast_algorithms"]

_U = 2.0 ** -53

#: Machine-readable reason codes of :class:`Reason` and ``HeadPlan.code``, with what
#: each means in plain words (the demo and the docs print these).
REASONS = {
    # why a method was chosen
    "fast-cheaper": "the fast path meets eps and is predicted cheaper than exact",
    "exact-cheaper": "exact is predicted cheaper than the fast path at the degree eps "
                     "needs (or, screened before certifying, at a lower bound of it)",
    "fast-requested": "method='fast' was requested",
    "exact-requested": "method='exact' was requested",
    "empty": "nothing to compute (no queries, no keys or no value columns)",
    "no-visible-key": "no query sees any key; every output row is 0",
    # why the fast path cannot serve a head
    "degree-limit": "the logits are too large: no polynomial of allowed degree "
                    "approximates exp to eps on [-R, R]",
    "feature-limit": "the polynomial needs more features than allowed (head_dim and "
                     "degree too large)",
    "memory-limit": "the fast path would need more memory than allowed",
    "misses-eps": "the certified bound of the fast path exceeds eps",
    "output-rounding": "float32 output rounding alone exceeds eps",
    "structure": "this algorithm does not fit the head's relative structure",
    "row-mass": "a row's relative weights underflow: the FFT rounding cannot be bounded",
}


class FastPathError(ValueError):
    """``method="fast"`` cannot serve a head (raised before any work).

    Attributes
    ----------
    code : str
        Why, as a key of :data:`REASONS` (e.g. ``"degree-limit"``, ``"feature-limit"``).
    head : tuple
        Index of the head in the batch dims.
    detail : str
        The reason sentence alone, with the head's figures.
    """

    def __init__(self, message, code, head=(), detail=""):
        super().__init__(message)
        self.code, self.head, self.detail = code, head, detail


@dataclass(frozen=True)
class Reason:
    """Why something was chosen or refused: ``code`` (a key of :data:`REASONS`) and a
    sentence with the head's figures."""

    code: str
    text: str

    def __post_init__(self):
        if self.code not in REASONS:
            raise ValueError(f"unknown reason code {self.code!r}; known: {sorted(REASONS)}")

    def __str__(self):
        return self.text


@dataclass
class HeadSpec:
    """Everything the planner needs about one head, built in one place
    (``numbarope.attention._head_specs``).

    Sizes: ``n`` query rows (L) against ``S`` key rows, query 0 at position
    ``offset``; ``E`` head_dim, ``Ev`` value columns; ``heads`` query heads computed
    together on this head's key/value head (grouped-query sharing).
    Structure: ``general`` (relative matrices W_t), ``structure`` one of
    ``"none"``, ``"causal"`` (the causal mask cuts keys), ``"decay"`` (``T(t) =
    γ^|t|``, ``rate``, ``causal``), ``"window"`` (``window = (left, right)``),
    ``"dense"`` (any relative bias).
    Radius: ``radius`` R (for the polynomial), ``radius1`` R₁ (for the rounding
    term), ``radius_given``. Values: ``vmax`` = max|v|. ``row_mass``: smallest
    Σ_j T(i−j) over rows that see a key (T normalised to max 1). ``exact_bound``: the
    exact path's bound; ``out_rounding``: the final rounding to the output dtype;
    ``logit_error``: the absolute error of the logits from the inputs' preparation
    (the float64 rotation, :func:`numbarope.rotary.rotation_logit_error`).
    """

    head: tuple
    n: int
    S: int
    E: int
    Ev: int
    radius: float
    radius1: float
    vmax: float
    offset: int = 0
    general: bool = False
    structure: str = "none"
    causal: bool = False
    rate: float | None = None
    window: tuple | None = None
    row_mass: float = 1.0
    exact_bound: float = 0.0
    out_rounding: float = 0.0
    radius_given: bool = False
    compute_dtype: str = "float64"
    heads: int = 1
    pairs: float | None = None          # visible (query, key) pairs; None: n·S
    logit_error: float = 0.0            # logits' error from preparation (rotation)
    extra: dict = field(default_factory=dict)


class Algorithm:
    """Base of every algorithm; see the module docstring."""

    name = "?"
    fast = True
    #: "certified": every part of the bound is proven; "estimated": the FFT rounding is
    #: an estimate (the polynomial part is still certified)
    bound_kind = "certified"

    def unavailable(self, h: HeadSpec) -> list:
        return []

    def features(self, E, degree):
        return n_features(E, degree)

    def predict(self, h: HeadSpec, degree):
        raise NotImplementedError

    def memory(self, h: HeadSpec, degree):
        raise NotImplementedError

    def rounding(self, h: HeadSpec, coef, delta):
        """Relative floating-point allowance ρ added to δ (see :func:`rounding_term`)."""
        return rounding_term(h.S, self.features(h.E, len(coef) - 1), coef, h.radius,
                             h.radius1, delta)

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0,
            key_mask=None, relative=None, rate=None, window=None, workers=None):
        raise NotImplementedError

    def example(self, rng):
        """A small square problem this algorithm serves and the planner gives it, for
        the test suite (tests/test_registry_suite.py runs every registered algorithm on
        its example against the dense reference): ``(q, k, v, kwargs)`` with kwargs of
        :func:`numbarope.rope_attention` (``rotary``, ``is_causal``, ``bias`` as an array
        or a :mod:`numbarope.bias` structure, ``relative``)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<algorithm {self.name!r}>"


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


def _c():
    from .planner import COST_CONSTANTS
    return COST_CONSTANTS


def _separable_only(h):
    if h.general:
        return [Reason("structure", "general relative matrices W_t need the "
                                    "block-Toeplitz FFT (toeplitz-fft)")]
    return []


def _example_qkv(rng, n=96, E=4, s=0.4):
    return (rng.standard_normal((n, E)) * s, rng.standard_normal((n, E)) * s,
            rng.standard_normal((n, 3)))


class Gemm(Algorithm):
    """Every query sees every key, no bias: two GEMMs through a key-side state
    ``Σ_j ψ(k_j)[v_j, 1]ᵀ`` (Alman & Song 2025, §4, the polynomial method)."""

    name = "gemm"

    def unavailable(self, h):
        why = _separable_only(h)
        if h.structure != "none":
            why.append(Reason("structure", f"a {h.structure} structure: not every query "
                                           f"sees every key with weight 1"))
        return why

    def predict(self, h, degree):
        c = _c()
        m = n_features(h.E, degree)
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * (h.Ev + 1)) / h.heads

    def memory(self, h, degree):
        return fast_memory("gemm", h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0, key_mask=None,
            workers=None, **_):
        return fast_separable(q, k, v, scale, coef, None, False, workers, offset=offset,
                              key_mask=key_mask)

    def example(self, rng):
        return (*_example_qkv(rng), dict(rotary=True))


class Prefix(Gemm):
    """Causal mask (any offset, key padding): chunked prefix sums of key-side states,
    a masked polynomial inside each chunk."""

    name = "prefix"

    def unavailable(self, h):
        why = _separable_only(h)
        if h.structure != "causal":
            why.append(Reason("structure", f"a {h.structure} structure, not a causal mask"))
        return why

    def predict(self, h, degree):
        c = _c()
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(prefix_chunk(m), max(h.S, 1))
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * ch * (2 * degree + 3)) / h.heads

    def memory(self, h, degree):
        return fast_memory("prefix", h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0, key_mask=None,
            workers=None, **_):
        return fast_separable(q, k, v, scale, coef, None, True, workers, offset=offset,
                              key_mask=key_mask)

    def example(self, rng):
        return (*_example_qkv(rng), dict(rotary=True, is_causal=True))


class FFT(Algorithm):
    """Any relative bias T(t) = exp(b_t): circulant embedding, blocked over features
    (Alman & Song 2025, §5)."""

    name = "fft"
    bound_kind = "estimated"

    def unavailable(self, h):
        why = _separable_only(h)
        if h.row_mass <= 0:
            why.append(Reason("row-mass", "a row that sees a key has relative weights that "
                                          "underflow to 0"))
        return why

    def rounding(self, h, coef, delta):
        return rounding_term(h.S, self.features(h.E, len(coef) - 1), coef, h.radius,
                             h.radius1, delta, fft_length(h.n, h.S), h.row_mass)

    def predict(self, h, degree):
        c = _c()
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        N = fft_length(h.n, h.S)
        nlog = N * np.log2(max(N, 2))
        return (c["feature"] * (h.heads * h.n + h.S) * m + c["fft_flop"] * 2 * m * ev1 * nlog
                + c["exact_flop"] * h.heads * h.n * m * ev1) / h.heads

    def memory(self, h, degree):
        return fast_memory("fft", h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0, key_mask=None,
            workers=None, **_):
        if T is None:
            T = _ones_toeplitz(q.shape[-2], k.shape[0], offset, causal)
        return fast_separable(q, k, v, scale, coef, T, False, workers, offset=offset,
                              key_mask=key_mask)

    def example(self, rng):
        q, k, v = _example_qkv(rng)
        return q, k, v, dict(rotary=True, bias=rng.standard_normal(2 * len(q) - 1))


def _ones_toeplitz(L, S, offset, causal):
    T = np.ones(L + S - 1)
    if causal:
        T[:int(min(max(S - 1 - offset, 0), L + S - 1))] = 0.0
    return T


def _nearest_visible(L, S, offset, causal, key_mask):
    """(L,) int64: index of each row's nearest visible real key (−1: none)."""
    real = np.arange(S) if key_mask is None else np.flatnonzero(key_mask)
    pos = np.arange(L) + int(offset)
    if real.size == 0:
        return np.full(L, -1)
    a = np.searchsorted(real, pos, side="right") - 1          # last real key <= pos
    before = np.where(a >= 0, real[np.maximum(a, 0)], -1)
    if causal:
        return before
    after = real[np.minimum(a + 1, real.size - 1)]
    after = np.where(after >= pos, after, -1)                 # first real key > pos
    use_after = (before < 0) | ((after >= 0) & (after - pos < pos - before))
    return np.where(use_after, after, before)


class Decay(Algorithm):
    """Exponential decay T(t) = γ^{|t|} (ALiBi, ``numbarope.bias.Decay``), causal or
    two-sided: chunked decayed prefix scans of the key-side states, no FFT
    (``numbarope._recurrence.fast_decay``; rounding proven in
    :func:`numbarope._recurrence.recurrence_rounding`)."""

    name = "decay"

    def unavailable(self, h):
        why = _separable_only(h)
        if h.structure != "decay":
            why.append(Reason("structure", f"a {h.structure} structure, not an "
                                           f"exponential decay"))
        return why

    def _chunk(self, h, degree):
        from ._recurrence import decay_chunk
        return decay_chunk(n_features(h.E, degree), h.E, h.Ev, degree)

    def predict(self, h, degree):
        c = _c()
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(self._chunk(h, degree), max(h.S, 1))
        sides = 1 if h.causal else 2
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * sides * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * ch * (2 * degree + 4)) / h.heads

    def memory(self, h, degree):
        return 2 * fast_memory("prefix", h.n, h.E, h.Ev, degree, h.S, h.heads)

    def rounding(self, h, coef, delta):
        from ._recurrence import recurrence_rounding
        g = len(coef) - 1
        return recurrence_rounding("decay", h.S, n_features(h.E, g), coef, h.radius,
                                   h.radius1, delta, self._chunk(h, g), h.rate)

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0, key_mask=None,
            rate=None, workers=None, **_):
        from ._recurrence import fast_decay
        out, den = fast_decay(q, k, v, scale, coef, rate, causal, workers, offset=offset,
                              key_mask=key_mask)
        if T is not None:       # den in T's normalisation (fast_decay: per row, by the
            L, S = q.shape[-2], k.shape[0]          # weight of its nearest visible key)
            j = _nearest_visible(L, S, offset, causal, key_mask)
            w = np.where(j >= 0, T[np.arange(L) - j + S - 1], 0.0)
            den = den * w
        return out, den

    def example(self, rng):
        from .bias import ALiBi
        q, k, v = _example_qkv(rng, n=300)
        return q, k, v, dict(rotary=True, bias=ALiBi([0.05]))


class Window(Algorithm):
    """A band of offsets −right <= t <= left (sliding windows, ``numbarope.bias.Window``):
    sums of chunk states over a tree, masked polynomials at the band's ends, no
    differences of prefix sums (``numbarope._recurrence.fast_window``)."""

    name = "window"

    def unavailable(self, h):
        why = _separable_only(h)
        if h.structure != "window":
            why.append(Reason("structure", f"a {h.structure} structure, not a window"))
        return why

    def _chunk(self, h, degree):
        from ._recurrence import window_chunk
        return window_chunk(n_features(h.E, degree), h.E, h.Ev, degree, h.S)

    def predict(self, h, degree):
        c = _c()
        m = n_features(h.E, degree)
        ev1 = h.Ev + 1
        ch = min(self._chunk(h, degree), max(h.S, 1))
        nch = max(1, -(-h.S // ch))
        rows = h.heads * h.n + h.S
        return (c["feature"] * rows * m + c["gemm_flop"] * rows * m * ev1
                + c["gemm_flop"] * h.heads * h.n * 2 * ch * (h.E + ev1)
                + c["elementwise"] * h.heads * h.n * 2 * ch * (2 * degree + 3)
                + c["gemm_flop"] * (h.heads * h.n / ch + nch) * 2 * np.log2(nch + 1)
                * m * ev1) / h.heads

    def memory(self, h, degree):
        return fast_memory("prefix", h.n, h.E, h.Ev, degree, h.S, h.heads) \
            + _config.STATE_BYTES

    def rounding(self, h, coef, delta):
        from ._recurrence import recurrence_rounding
        g = len(coef) - 1
        return recurrence_rounding("window", h.S, n_features(h.E, g), coef, h.radius,
                                   h.radius1, delta, self._chunk(h, g))

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0, key_mask=None,
            window=None, workers=None, **_):
        from ._recurrence import fast_window
        left, right = window
        L, S = q.shape[-2], k.shape[0]
        big = L + S                       # an unbounded side: every offset that occurs
        return fast_window(q, k, v, scale, coef, big if left is None else left,
                           big if right is None else right, workers, offset=offset,
                           key_mask=key_mask)

    def example(self, rng):
        from .bias import Window as WindowBias
        q, k, v = _example_qkv(rng, n=300)
        return q, k, v, dict(rotary=True, bias=WindowBias(40, 0))


class ToeplitzFFT(Algorithm):
    """General relative matrices W_t: block-Toeplitz products per degree, per
    frequency (Alman & Song 2025, §5; Σ_k m_k² sequences)."""

    name = "toeplitz-fft"
    bound_kind = "estimated"

    def unavailable(self, h):
        why = []
        if not h.general:
            why.append(Reason("structure", "no relative matrices W_t (the separable "
                                           "algorithms serve this head)"))
        if h.row_mass <= 0:
            why.append(Reason("row-mass", "a row that sees a key has relative weights that "
                                          "underflow to 0"))
        return why

    def features(self, E, degree):
        return general_features(E, degree)

    def rounding(self, h, coef, delta):
        return rounding_term(h.S, n_features(h.E, len(coef) - 1), coef, h.radius, h.radius1,
                             delta, fft_length(h.n, h.S), h.row_mass)

    def predict(self, h, degree):
        c = _c()
        E, n, S, ev1 = h.E, h.n, h.S, h.Ev + 1
        N = fft_length(n, S)
        nlog = N * np.log2(max(N, 2))
        F = N // 2 + 1
        t = c["feature"] * (n + S) * n_features(E, degree)
        for k in range(degree + 1):
            mk = n_features(E, k) - (n_features(E, k - 1) if k else 0)
            mprev = n_features(E, k - 1) - (n_features(E, k - 2) if k > 1 else 0) if k else 1
            t += c["sympow"] * (n + S) * mk * mprev * E
            t += c["fft_flop"] * (mk * mk + 2 * mk * ev1) * nlog
            t += c["cmul"] * 4 * F * mk * mk * ev1 + c["exact_flop"] * n * mk * ev1
        return t

    def memory(self, h, degree):
        return fast_memory("toeplitz-fft", h.n, h.E, h.Ev, degree, h.S, h.heads)

    def run(self, q, k, v, scale, coef, *, T=None, causal=False, offset=0, key_mask=None,
            relative=None, workers=None, **_):
        if T is None:
            T = np.ones(q.shape[-2] + k.shape[0] - 1)
        return fast_general(q, k, v, scale, coef, relative, T, workers, key_mask=key_mask)

    def example(self, rng):
        q, k, v = _example_qkv(rng, n=40, E=2)
        W = rng.standard_normal((2 * 40 - 1, 2, 2))
        W /= np.linalg.norm(W, ord=2, axis=(1, 2)).max()
        return q, k, v, dict(relative=W, is_causal=True)


def general_features(E, degree):
    """Σ_k m_k² with m_k = C(E+k−1, k): Toeplitz sequences of the general path."""
    return int(sum((n_features(E, k) - (n_features(E, k - 1) if k else 0)) ** 2
                   for k in range(degree + 1)))


class Streaming(Algorithm):
    """The exact path: blocked online softmax, BLAS products (``numbarope.exact``)."""

    name = "streaming"
    fast = False
    bound_kind = "exact"

    def predict(self, h, degree=None):
        c = _c()
        sfx = "32" if h.compute_dtype == "float32" else ""
        pairs = float(h.n) * h.S if h.pairs is None else h.pairs
        t = pairs * (c["exact_pair" + sfx] + c["exact_flop" + sfx] * (h.E + h.Ev))
        if h.general:
            t += pairs * c["exact_general_flop"] * (h.E * h.E + h.E)
        return t

    def memory(self, h, degree=None):
        cfg = _config
        blocks = (cfg.EXACT_ROW_BLOCK * (cfg.EXACT_KEY_BLOCK + 2 * h.Ev + 2)
                  + 2 * cfg.EXACT_KEY_BLOCK + h.E)
        return 8 * (max(h.n, h.S) * (2 * h.E + 2 * h.Ev) + 2 * blocks)


_REGISTRY: dict = {}


def register(algorithm: Algorithm):
    """Add an algorithm to the registry (by its ``name``); returns it."""
    if not isinstance(algorithm, Algorithm):
        raise TypeError(f"register() takes an Algorithm instance, got {algorithm!r}")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def unregister(name):
    """Remove an algorithm from the registry (the built-in ones included)."""
    get(name)
    del _REGISTRY[name]


def get(name) -> Algorithm:
    """The registered algorithm called ``name``; ValueError for an unknown name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {sorted(_REGISTRY)}") \
            from None


def registry():
    """Names of the registered algorithms, in registration order."""
    return tuple(_REGISTRY)


def fast_algorithms():
    """The registered fast algorithms (every one but the exact path)."""
    return [a for a in _REGISTRY.values() if a.fast]


for _a in (Streaming(), Gemm(), Prefix(), Decay(), Window(), FFT(), ToeplitzFFT()):
    register(_a)
