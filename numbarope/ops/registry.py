"""One object per attention algorithm, in a registry the planner walks.

Each algorithm says, for a head described by a :class:`HeadSpec`:

* why it cannot serve that head (:meth:`Algorithm.unavailable`: a list of
  :class:`Reason`, each a machine-readable ``code`` and a sentence; empty when it
  can);
* the structure types it serves (:attr:`Algorithm.structures`, classes of
  :mod:`numbarope.bias`: a structure knows no algorithm, an algorithm names the
  structures it serves, as xformers' ``SUPPORTED_ATTN_BIAS_TYPES``);
* its feature count, predicted time (seconds, :data:`numbarope.ops._cost.COST_CONSTANTS`)
  and working memory (bytes) at a polynomial degree;
* its floating-point allowance (:meth:`Algorithm.rounding`) and whether that part of
  its bound is proven (``bound_kind`` "certified") or estimated (FFT rounding);
* how to run it (:meth:`Algorithm.run`), and optionally its certified backward: a
  method ``backward(q, k, v, out, den, dout, scale, coef, *, structure=None, T=None,
  offset=0, key_mask=None, workers=None) -> (dq, dk, dv)`` (``relative=`` too for a
  ``general`` algorithm; the exact gradients with
  the forward's weights, e.g. :func:`numbarope.ops.gemm.gemm_backward`; the arguments
  as :meth:`Algorithm.run`'s, ``out`` and ``den`` what it returned for one query head,
  ``dout`` the gradient of ``out``); only algorithms that have one serve inputs that
  require grad. With it, a method ``gradient_bound(q, k, v, dout, scale, coef, delta, *,
  structure=None, T=None, offset=0, key_mask=None, radius=None) -> (bq, bk, bv)``: the
  certified bounds on its gradients' errors against the exact attention's, which the
  call's :attr:`AttentionInfo.gradient_bound` reports after the backward.

Adding an algorithm is one subclass and one :func:`register` call, from any file:
the planner (:func:`numbarope._pipeline.plan.plan_head`) considers every registered
fast algorithm that can serve a head and takes the cheapest that meets ``eps``;
an unknown name is an error (:func:`get`), never a fall-through.
``docs/extending.md`` adds chunked local attention this way, outside the package.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §4–5.
N. J. Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed. (2002), §3.1,
§4.2, §24.1 (rounding of sums, dot products and the FFT).
"""

from __future__ import annotations

from dataclasses import dataclass, field


from .. import bias as _bias
from ._bounds import rounding_term
from ._features import n_features

__all__ = ["FastPathError", "Reason", "REASONS", "HeadSpec", "Algorithm", "register",
           "unregister", "get", "registry", "fast_algorithms"]

#: Machine-readable reason codes of :class:`Reason` and ``HeadPlan.code``, with what
#: each means in plain words (the demo and the docs print these).
REASONS = {
    # why a method was chosen
    "fast-cheaper": "the fast path meets eps and is predicted cheaper than exact",
    "exact-cheaper": "exact is predicted cheaper than the fast path at the degree eps "
                     "needs (or, screened before certifying, at a lower bound of it)",
    "fast-requested": "method='fast' was requested",
    "exact-requested": "method='exact' was requested",
    "exact-for-gradients": "the inputs require grad and the head's fast algorithm has no "
                           "backward for it (no backward so far, or a soft cap)",
    "empty": "nothing to compute (no queries, no keys or no value columns)",
    "no-visible-key": "no query sees any key; every output row is 0",
    # why the fast path cannot serve a head
    "degree-limit": "the logits are too large: no polynomial of allowed degree "
                    "certifies exp to eps on [-R, R] (beyond a radius set by eps, about "
                    "13 at eps=1e-3, none of any degree does: the float64 rounding of "
                    "the polynomial grows like e^(2R))",
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
    (:func:`numbarope._pipeline.heads.head_specs`).

    Sizes: ``n`` query rows (L) against ``S`` key rows, query 0 at position
    ``offset``; ``E`` head_dim, ``Ev`` value columns; ``heads`` query heads computed
    together on this head's key/value head (grouped-query sharing).
    Structure: ``structure``, the head's canonical :class:`numbarope.bias.Structure`
    (``NoBias()`` when every query sees every real key; ``Causal()`` when the causal
    mask hides a real key from some query; ``Decay``, ``Window``, ...; ``Dense`` for
    any other relative bias; a per-head parameter already selected for this head),
    and ``general`` (relative matrices W_t).
    Radius: ``radius`` R (for the polynomial), ``radius1`` R₁ (for the rounding
    term), ``radius_given``. Values: ``vmax`` = max|v| over the keys the head sees.
    ``row_mass``: smallest Σ_j T(i−j) over rows that see a key (T normalised to max
    1). ``exact_bound``: the exact path's bound; ``out_rounding``: the final rounding
    to the output dtype; ``logit_error``: the absolute error of the logits from the
    inputs' preparation (the float64 rotation,
    :func:`numbarope.rotary.rotation_logit_error`). ``pairs``: (query, key) pairs the
    exact kernel visits (None: n·S). ``softcap``: the logit cap c (weights
    ``exp(c·tanh(x/c))``, the polynomial approximates that) or None. ``extra``: room
    for an algorithm's own facts.
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
    structure: _bias.Structure = field(default_factory=_bias.NoBias)
    row_mass: float = 1.0
    exact_bound: float = 0.0
    out_rounding: float = 0.0
    radius_given: bool = False
    compute_dtype: str = "float64"
    heads: int = 1
    pairs: float | None = None
    logit_error: float = 0.0
    softcap: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def causal(self) -> bool:
        """Whether the structure masks every key after the query."""
        return bool(self.structure.causal)


class Algorithm:
    """Base of every algorithm; see the module docstring.

    Subclasses set ``name``, ``structures`` (the :mod:`numbarope.bias` structure
    types served; ``()`` for the exact path, which serves every structure) and
    implement :meth:`predict`, :meth:`memory`, :meth:`run` and :meth:`example`;
    :meth:`unavailable`, :meth:`features` and :meth:`rounding` have defaults.
    """

    name = "?"
    fast = True
    #: "certified": every part of the bound is proven; "estimated": the FFT rounding is
    #: an estimate (the polynomial part is still certified)
    bound_kind = "certified"
    #: Structure types (classes of numbarope.bias) this algorithm serves exactly.
    structures: tuple = ()
    #: Whether it serves general relative matrices W_t (else separable logits only).
    general = False

    def serves(self, structure) -> bool:
        """Whether ``structure`` (a canonical :class:`numbarope.bias.Structure`) is one
        of the types this algorithm serves."""
        return isinstance(structure, self.structures)

    def unavailable(self, h: HeadSpec) -> list:
        """Why this algorithm cannot serve head ``h``: a list of :class:`Reason` (empty
        when it can). The default checks the structure type and W_t."""
        why = []
        if h.general and not self.general:
            why.append(Reason("structure", "general relative matrices W_t need the "
                                           "block-Toeplitz FFT (toeplitz-fft)"))
        elif not h.general and self.general:
            why.append(Reason("structure", "no relative matrices W_t (the separable "
                                           "algorithms serve this head)"))
        if not self.serves(h.structure):
            kinds = ", ".join(t.__name__ for t in self.structures) or "none"
            why.append(Reason("structure", f"a {h.structure.kind} structure "
                                           f"({type(h.structure).__name__}); {self.name} "
                                           f"serves {kinds}"))
        return why

    def features(self, E, degree):
        return n_features(E, degree)

    def predict(self, h: HeadSpec, degree):
        raise NotImplementedError

    def memory(self, h: HeadSpec, degree):
        raise NotImplementedError

    def rounding(self, h: HeadSpec, coef, delta):
        """Relative floating-point allowance ρ added to δ
        (:func:`numbarope.ops._bounds.rounding_term`)."""
        return rounding_term(h.S, self.features(h.E, len(coef) - 1), coef, h.radius,
                             h.radius1, delta)

    def run(self, q, k, v, scale, coef, *, structure, T=None, offset=0, key_mask=None,
            relative=None, workers=None, initial_state=None, return_state=False):
        """Fast attention of the query heads of one key/value head.

        Parameters
        ----------
        q : (L, E) or (G, L, E) ndarray of float64
            Queries (rotated if RoPE); query i at position ``i + offset``. G query
            heads sharing this key/value head are computed together.
        k : (S, E) ndarray of float64
            Keys at positions 0 .. S−1.
        v : (S, Ev) ndarray of float64
        scale : float
        coef : (g+1,) ndarray of float64
            Monomial coefficients of the certified polynomial p ≈ exp.
        structure : numbarope.bias.Structure
            The head's canonical structure (one of :attr:`structures`).
        T : (L+S−1,) ndarray of float64, optional
            Toeplitz weights ``exp(b_t − max b)`` of a relative bias (causal zeros
            included); None without a bias.
        key_mask : (S,) ndarray of bool, optional
            True = a real key.
        relative : (L+S−1, E, E) ndarray of float64, optional
            General relative matrices (``general`` algorithms only).
        initial_state, return_state
            Key-side state in and out (separable algorithms that support them).

        Returns
        -------
        out : (L, Ev) or (G, L, Ev) ndarray of float64
        den : (L,) or (G, L) ndarray of float64
            The approximate softmax denominators (rows with den <= 0 get out = 0).
        state : optional
            With ``return_state=True``.
        """
        raise NotImplementedError

    def example(self, rng):
        """A small square problem this algorithm serves and the planner gives it, for
        the test suite (tests/ops/test_registry_suite.py runs every registered
        algorithm on its example against the dense reference): ``(q, k, v, kwargs)``
        with kwargs of :func:`numbarope.rope_attention`."""
        raise NotImplementedError

    def __repr__(self):
        return f"<algorithm {self.name!r}>"


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


