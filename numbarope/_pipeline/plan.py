"""Cost model, per-head method choice and the :class:`AttentionInfo` report.

For every head the planner knows the logit radius R, and from it (through
:func:`numbarope.exp_approximation`) the smallest polynomial degree g whose
certified relative error δ gives ``2δ/(1−δ) <= eps``. It then predicts the time
and peak memory of the exact kernel and of the fast path, and picks:

* ``method="exact"``: always exact;
* ``method="fast"``: the fast path, or a ``ValueError`` (before any work) when
  the degree or the memory it needs exceeds the limits of ``_config``;
* ``method="auto"``: the cheaper of the two by predicted time among those that
  meet ``eps`` and the limits.

Predicted times are ``Σ constant × operation count``, the constants in
:data:`COST_CONSTANTS` (seconds per operation, measured on the development
machine: 2 cores, x86_64; :func:`numbarope.calibrate` re-measures them).
"""

from dataclasses import dataclass, field, fields

import functools
import math

import numpy as np

from . import _config, algorithms
from .algorithms import (FastPathError, HeadSpec, Reason, general_features,  # noqa: F401
                         rounding_term)
from .fast import prefix_chunk
from .polynomial import exp_approximation

__all__ = ["HeadPlan", "AttentionInfo", "COST_CONSTANTS", "calibrate", "exact_memory",
           "exact_error_bound", "predict_exact", "predict_fast", "plan_head"]

#: Seconds per elementary operation of each kind (see module docstring).
COST_CONSTANTS = {
    # exact path: medians of 3 runs of calibrate() on the development machine
    # (2 cores, x86_64, AVX-512, OpenBLAS 0.3.30 via scipy), 2 threads, 2026-11-30
    "exact_pair": 2.6e-9,    # one (i, j) pair of the exact kernel, float64: exp + passes
    "exact_flop": 3.1e-11,   # one multiply-add of its GEMMs (Q K^T, P V), float64
    "exact_pair32": 1.3e-9,  # the same in float32
    "exact_flop32": 1.4e-11,
    "exact_general_flop": 1.2e-9,    # one multiply-add of the general-W bilinear forms
    # fast path: medians of 5 calibrate() runs, 2 threads (numbarope._threads), 2026-11-30
    "feature": 8.3e-10,      # one monomial feature value (features(): full arrays, all threads)
    "gemm_flop": 4.9e-11,    # one multiply-add of the gemm path's fused feature-block GEMMs
    "fft_flop": 9.9e-10,     # one unit of N·log2(N) in scipy.fft (per column)
    "cmul": 1.3e-10,         # one complex multiply-add per frequency (block products)
    "sympow": 2.5e-9,        # one multiply-add building symmetric powers
    "elementwise": 4.6e-10,  # one intra-chunk (pair, degree) step of the prefix path (numba)
}


@dataclass
class HeadPlan:
    """Plan and report of one head. All times in seconds, memory in bytes.

    The fields, in order: ``head`` (index tuple in ``batch_shape``), ``method``
    (``"exact"`` or ``"fast"``), ``algorithm``, ``radius`` (logit radius R),
    ``degree``, ``features`` and ``delta`` (the polynomial's degree, feature count
    and certified relative error; None where the fast path is infeasible),
    ``error_bound`` (certified bound on ``max|out − o|``, o the exact value),
    ``time_exact``, ``time_fast`` (predicted seconds), ``memory_fast`` (bytes),
    ``reason`` (in words), ``memory_exact`` (bytes), ``observed_error`` (with
    ``verify``), ``rounding`` (floating-point part of the bound), ``bound_kind``,
    ``coef`` (the polynomial's monomial coefficients), ``code`` (machine-readable
    reason, a key of ``numbarope.algorithms.REASONS``), ``shared_heads``,
    ``radius_given``, ``precision``. :class:`AttentionInfo` has each as a
    property over all heads.
    """

    head: tuple
    method: str                 # "exact" or "fast"
    algorithm: str              # "streaming", "gemm", "prefix", "fft", "toeplitz-fft"
    radius: float               # logit radius R used for the polynomial
    degree: int | None          # polynomial degree (None: fast infeasible)
    features: int | None        # C(E+g, g) (separable) or Σ m_k² (general)
    delta: float | None         # certified relative error of p vs exp on [−R, R]
    error_bound: float          # bound on max |out − exact| (absolute, same units as value)
    time_exact: float
    time_fast: float | None
    memory_fast: int | None
    reason: str
    memory_exact: int = 0                  # working memory of the exact kernel (bytes)
    observed_error: float | None = None    # filled by verify=k
    rounding: float = 0.0                  # floating-point part included in error_bound
    bound_kind: str = "exact"
    coef: np.ndarray | None = field(default=None, repr=False)   # p's monomial coefficients
    code: str = ""                         # machine-readable reason (algorithms.REASONS)
    shared_heads: int = 1                  # query heads sharing this head's fast key side
    radius_given: bool = False             # radius came from the caller (radius=)
    precision: str = "float64"             # compute precision of the exact path

    def to_dict(self) -> dict:
        """This head's plan as a dict of plain Python values, one key per field.

        ``head`` is a tuple, ``coef`` a list of floats, every other value a
        ``str``, ``int``, ``float``, ``bool`` or ``None`` (no fast-path value):
        ready for ``json.dumps``.
        """
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def _repr_html_(self) -> str:
        """Jupyter display: a two-column table of the fields (``coef`` abbreviated)."""
        import html
        rows = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                text = f"{v.size} coefficients"
            else:
                text = "—" if v is None else _cell(f.name, v)
            rows.append(f"<tr><th style=\"text-align:left\">{html.escape(f.name)}</th>"
                        f"<td style=\"text-align:left\">{html.escape(text)}</td></tr>")
        return (f"<table><caption>HeadPlan {html.escape(str(self.head))}: "
                f"{html.escape(self.method)} ({html.escape(self.algorithm)})</caption>"
                f"<tbody>{''.join(rows)}</tbody></table>")


@dataclass(repr=False)
class AttentionInfo:
    """Per-head report of :func:`numbarope.rope_attention` / :func:`numbarope.plan`.

    ``repr(info)`` (what a notebook or the REPL shows) is a one-line summary
    followed by the table (first and last rows for many heads); ``print(info)``
    prints the whole table; Jupyter renders an HTML table (``_repr_html_``).

    Every field of :class:`HeadPlan` is also a property of the info (``info.method``,
    ``info.degree``, ``info.error_bound``, ...): an ndarray of shape ``batch_shape``
    holding that field for every head. Strings give ``str`` arrays, ``head`` an
    object array of tuples and ``coef`` an object array of ndarrays (or None).
    Numeric fields that have no value on some heads — ``degree``, ``features``,
    ``delta``, ``time_fast``, ``memory_fast`` (None where the fast path is
    infeasible or was not evaluated) and ``observed_error`` (None without
    ``verify``) — are always float64 arrays with NaN there (``np.isnan`` finds
    them; degrees and feature counts are exact integers in float64).
    :meth:`to_dict` and :meth:`to_dataframe` export the table.

    Attributes
    ----------
    heads : list of HeadPlan
        One entry per head, in C order of ``batch_shape``.
    batch_shape : tuple of int
        The broadcast leading (batch, head) dims.
    eps : float
        The requested tolerance (``max|out − exact| <= eps·max|V|`` on fast heads).
    extra : dict
        Additional facts of the call (may be empty).

    Examples
    --------
    Head 0 has small logits (R = 0.25), head 1 large ones (R = 100: no
    polynomial of degree <= MAX_DEGREE certifies eps there):

    >>> import numpy as np, numbarope
    >>> q = k = v = np.stack([np.full((4096, 4), 0.25), np.full((4096, 4), 5.0)])
    >>> info = numbarope.plan(q, k, v, rotary=True, scale=1.0)
    >>> info.summary().split(";")[0]
    '2 heads: 1 fast (gemm), 1 exact (streaming)'
    >>> info.method.tolist(), np.isnan(info.degree).tolist()
    (['fast', 'exact'], [False, True])
    >>> info.to_dict()["degree"][1] is None
    True
    """

    heads: list
    batch_shape: tuple
    eps: float = 1e-3
    extra: dict = field(default_factory=dict)

    #: Heads shown by ``repr`` (text) before the middle ones are left out.
    repr_rows = 20
    #: Heads shown by ``_repr_html_`` (Jupyter) before the middle ones are left out.
    html_rows = 50

    def table(self, max_rows: int | None = None) -> str:
        """The report as a fixed-width text table, one line per head.

        Columns: head index; logit radius R; method; algorithm; polynomial degree;
        features; certified bound on max|out − exact|; with ``verify``, the
        observed max error on the checked rows; predicted seconds of exact and
        fast; the reason of the choice.

        Parameters
        ----------
        max_rows : int, optional
            Show at most this many heads (the first and last halves, with a line
            saying how many are left out between them); default all.
        """
        verified = any(h.observed_error is not None for h in self.heads)
        obs = f" {'observed':>9}" if verified else ""
        head = (f"{'head':>10} {'R':>8} {'method':>6} {'algorithm':>12} {'deg':>4} "
                f"{'features':>9} {'bound':>9}{obs} {'time_exact':>10} {'time_fast':>9}  reason")
        lines = [head]
        for h in _elide(self.heads, max_rows):
            if h is None:
                lines.append(f"{'...':>10}  ({_omitted(self.heads, max_rows)} more heads)")
                continue
            deg = "-" if h.degree is None else str(h.degree)
            feat = "-" if h.features is None else f"{h.features:.3g}"
            tf = "-" if h.time_fast is None else f"{h.time_fast:9.2e}"
            ob = ""
            if verified:
                ob = " " + ("-" if h.observed_error is None else f"{h.observed_error:9.2e}").rjust(9)
            lines.append(
                f"{str(h.head):>10} {h.radius:8.3f} {h.method:>6} {h.algorithm:>12} "
                f"{deg:>4} {feat:>9} {h.error_bound:9.2e}{ob} {h.time_exact:10.2e} {tf:>9}  "
                f"{h.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def summary(self) -> str:
        """One line: heads, how many run each method (algorithms in brackets), the
        largest certified bound, the largest observed error (with ``verify``), eps."""
        n = len(self.heads)
        parts = [f"{n} head{'' if n == 1 else 's'}"]
        if len(self.batch_shape) > 1:
            parts[0] += f" of batch_shape {tuple(self.batch_shape)}"
        counts = {}
        for h in self.heads:
            counts.setdefault(h.method, {}).setdefault(h.algorithm, 0)
            counts[h.method][h.algorithm] += 1
        order = sorted(counts, key=lambda m: ({"fast": 0, "exact": 1}.get(m, 2), m))
        methods = []
        for m in order:
            algs = counts[m]
            total = sum(algs.values())
            inner = (next(iter(algs)) if len(algs) == 1 else
                     ", ".join(f"{c} {a}" for a, c in sorted(algs.items(), key=lambda x: -x[1])))
            methods.append(f"{total} {m} ({inner})")
        text = parts[0] + (": " + ", ".join(methods) if methods else "")
        if n:
            text += f"; max bound {max(h.error_bound for h in self.heads):.1e}"
            obs = [h.observed_error for h in self.heads if h.observed_error is not None]
            if obs:
                text += f"; max observed {max(obs):.1e}"
        return f"{text}; eps {_short_e(self.eps)}"

    def __repr__(self) -> str:
        text = f"AttentionInfo({self.summary()})"
        if not self.heads:
            return text
        text += "\n" + self.table(max_rows=self.repr_rows)
        if len(self.heads) > self.repr_rows:
            text += f"\n(all {len(self.heads)} heads: print(info) or info.to_dataframe())"
        return text

    def _repr_html_(self) -> str:
        """Jupyter display: the summary and an HTML table of the heads (escaped)."""
        import html
        verified = any(h.observed_error is not None for h in self.heads)
        cols = [("head", "head"), ("radius", "R"), ("method", "method"),
                ("algorithm", "algorithm"), ("degree", "degree"), ("features", "features"),
                ("error_bound", "bound"), *([("observed_error", "observed")] if verified
                                            else []),
                ("time_exact", "time exact (s)"), ("time_fast", "time fast (s)"),
                ("memory_fast", "memory fast"), ("reason", "reason")]
        left = {"head", "method", "algorithm", "reason"}

        def style(name):
            return f' style="text-align:{"left" if name in left else "right"}"'

        head = "".join(f"<th{style(c)}>{html.escape(t)}</th>" for c, t in cols)
        body = []
        for h in _elide(self.heads, self.html_rows):
            if h is None:
                more = _omitted(self.heads, self.html_rows)
                body.append(f'<tr><td colspan="{len(cols)}" style="text-align:center">'
                            f"… {more} more heads (info.to_dataframe() for all) …</td></tr>")
                continue
            cells = "".join(f"<td{style(c)}>{html.escape(_cell(c, getattr(h, c)))}</td>"
                            for c, _ in cols)
            body.append(f"<tr>{cells}</tr>")
        return (f'<div class="numbarope-attention-info"><p><b>AttentionInfo</b>: '
                f"{html.escape(self.summary())}</p><table><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table></div>")

    def to_dict(self, orient: str = "list") -> dict | list:
        """The per-head fields as plain Python values (JSON-serialisable).

        Parameters
        ----------
        orient : {"list", "records"}, optional
            ``"list"`` (default): a dict of columns, field name → list with one
            value per head in C order of ``batch_shape`` (``pandas.DataFrame(
            info.to_dict())`` makes a table of it). ``"records"``: a list of
            per-head dicts (:meth:`HeadPlan.to_dict`).

        Returns
        -------
        dict or list
            Values as :meth:`HeadPlan.to_dict`: ``None`` where a head has no value
            (e.g. ``degree`` where the fast path is infeasible), ``head`` a tuple,
            ``coef`` a list of floats. ``batch_shape`` and ``eps`` are not
            included: they are attributes of the info.
        """
        records = [h.to_dict() for h in self.heads]
        if orient == "records":
            return records
        if orient != "list":
            raise ValueError(f"orient must be 'list' or 'records', got {orient!r}")
        return {f.name: [r[f.name] for r in records] for f in fields(HeadPlan)}

    def to_dataframe(self):
        """The per-head fields as a :class:`pandas.DataFrame`, one row per head.

        Rows in C order of ``batch_shape`` (the ``head`` column holds the index
        tuple); one column per :class:`HeadPlan` field except ``coef``. Optional
        integers (``degree``, ``features``, ``memory_fast``) use pandas' nullable
        ``Int64`` (``<NA>`` where the fast path is infeasible); optional floats NaN.
        ``df.attrs`` holds ``batch_shape`` and ``eps``.

        Raises
        ------
        ImportError
            When pandas is not installed (``pip install pandas``).
        """
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("AttentionInfo.to_dataframe() needs pandas: "
                              "pip install pandas") from None
        cols = {}
        for f in fields(HeadPlan):
            if f.name == "coef":
                continue
            kind, optional_int = _field_kind(f)
            values = [getattr(h, f.name) for h in self.heads]
            if optional_int:
                cols[f.name] = pd.array([None if v is None else int(v) for v in values],
                                        dtype="Int64")
            elif kind == "object":
                cols[f.name] = pd.Series(_column(values, kind), dtype=object)
            else:
                cols[f.name] = _column(values, kind)
        df = pd.DataFrame(cols)
        df.attrs.update(batch_shape=tuple(self.batch_shape), eps=self.eps)
        return df


# ---- display and export helpers of HeadPlan / AttentionInfo, and the per-field
# properties of AttentionInfo (generated so that they show in dir() and tab completion)

_FIELD_DOCS = {
    "head": "index of the head in ``batch_shape`` (object array of tuples)",
    "method": '"exact" or "fast"',
    "algorithm": 'algorithm run: "streaming" (exact), "gemm", "prefix", "fft", '
                 '"toeplitz-fft", ...',
    "radius": "logit radius R used for the polynomial",
    "degree": "polynomial degree (NaN: fast path infeasible)",
    "features": "number of features, C(E+g, g) (separable) or Σ m_k² (general); NaN: "
                "fast path infeasible",
    "delta": "certified relative error of the polynomial vs exp on [−R, R] (NaN: none)",
    "error_bound": "certified bound on max|out − o|, o the exact value (units of value)",
    "time_exact": "predicted seconds of the exact path",
    "time_fast": "predicted seconds of the fast path (NaN: not evaluated)",
    "memory_fast": "predicted working memory of the fast path in bytes (NaN: not evaluated)",
    "reason": "why the method was chosen, in words",
    "memory_exact": "working memory of the exact kernel in bytes",
    "observed_error": "observed max error on the rows checked by ``verify=k`` (NaN: not "
                      "checked)",
    "rounding": "floating-point part included in ``error_bound``",
    "bound_kind": "what ``error_bound`` certifies",
    "coef": "monomial coefficients of the polynomial (object array of ndarrays or None)",
    "code": "machine-readable reason (a key of ``numbarope.algorithms.REASONS``)",
    "shared_heads": "query heads sharing this head's fast key side",
    "radius_given": "whether the radius came from the caller (``radius=``)",
    "precision": "compute precision of the exact path",
}


def _field_kind(f):
    """('float' | 'int' | 'bool' | 'str' | 'object', optional int) of a HeadPlan field,
    from its annotation: numbers that may be None are 'float' (NaN for None)."""
    import typing
    try:
        t = typing.get_type_hints(HeadPlan)[f.name]
    except Exception:                               # unresolvable string annotation
        t = f.type
    args = typing.get_args(t)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), t) if optional else t
    if base is bool:
        return "bool", False
    if base in (int, float):
        return ("float" if optional or base is float else "int"), optional and base is int
    if base is str:
        return "str", False
    return "object", False


def _column(values, kind):
    """1-D ndarray of ``values`` for a field of ``kind`` (see :func:`_field_kind`)."""
    if kind == "float":
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if kind in ("int", "bool", "str") and all(v is not None for v in values):
        try:
            return np.array([str(v) for v in values] if kind == "str" else values,
                            dtype={"int": np.int64, "bool": bool, "str": str}[kind])
        except (TypeError, ValueError, OverflowError):
            pass
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):                  # element-wise: keeps tuples and arrays
        arr[i] = v
    return arr


def _field_property(f):
    kind, _ = _field_kind(f)
    dtype = {"float": "float64", "int": "int64", "bool": "bool", "str": "str"}.get(kind,
                                                                                  "object")

    def get(self):
        return _column([getattr(h, f.name) for h in self.heads], kind).reshape(
            self.batch_shape)

    get.__name__ = f.name
    get.__doc__ = (f"Per head, {_FIELD_DOCS.get(f.name, f'the field ``{f.name}``')}: "
                   f"ndarray of shape ``batch_shape``, dtype {dtype}.")
    return property(get)


for _f in fields(HeadPlan):
    setattr(AttentionInfo, _f.name, _field_property(_f))
del _f


def _plain(v):
    """A field value as a plain Python value (JSON-serialisable)."""
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    return v


def _short_e(x):
    """Short scientific notation: 1e-3, 2.5e-4."""
    try:
        m, ex = f"{float(x):.2e}".split("e")
    except ValueError:                              # inf, nan
        return str(x)
    return f"{m.rstrip('0').rstrip('.')}e{int(ex)}"


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _cell(name, v):
    """Text of one field value in the HTML tables."""
    if v is None:
        return "—"
    if name.startswith("memory"):
        return _bytes(v)
    if name == "radius":
        return f"{v:.3f}"
    if name == "features":
        return f"{v:.3g}"
    if isinstance(v, float):
        return f"{v:.2e}"
    return str(v)


def _elide(items, max_rows):
    """``items``, or its first and last ``max_rows // 2`` with ``None`` between them."""
    if max_rows is None or len(items) <= max_rows:
        return list(items)
    half = max(max_rows // 2, 1)
    return list(items[:half]) + [None] + list(items[-half:])


def _omitted(items, max_rows):
    """How many of ``items`` :func:`_elide` leaves out."""
    return len(items) - (len(_elide(items, max_rows)) - 1)


def _pairs(n, S, causal, offset):
    """(query, key) pairs the exact kernel visits: n·S, or the causal ones."""
    if not causal:
        return float(n) * S
    if S == n and offset == 0:
        return n * (n + 1) / 2
    return float(np.clip(np.arange(n) + offset + 1, 0, S).sum())


def predict_exact(n, E, Ev, general, causal, precision="float64", S=None, offset=0):
    """Predicted seconds of the exact streaming kernel for one head (all threads);
    n query rows against S key rows (default n), query 0 at position ``offset``."""
    S = n if S is None else S
    return algorithms.get("streaming").predict(HeadSpec(
        (), n, S, E, Ev, 0.0, 0.0, 0.0, general=general, compute_dtype=precision,
        pairs=_pairs(n, S, causal, offset)))


def _gamma(k, u):
    """Higham's γ_k = k·u / (1 − k·u) (Accuracy and Stability of Numerical Algorithms, §3.1)."""
    ku = k * u
    return ku / (1.0 - ku) if ku < 1 else np.inf


def exact_error_bound(n, E, radius, radius1, vmax, precision="float64", general=False,
                      has_bias=False, key_block=None, logit_error=0.0):
    """Bound on ``max|out − o|`` of the exact kernel, o the mathematical value.

    Parameters
    ----------
    n, E : int
        Sequence length and head_dim.
    radius : float
        Proven logit radius R >= max |s·q_iᵀW_t k_j| (not a caller's guess).
    radius1 : float
        ``s·max‖q‖·max‖W‖_F·max‖k‖`` (>= Σ_ab |s q_a W_ab k_b|); R for W = I.
    vmax : float
        max|V| of the head.
    precision : {"float64", "float32"}
        Compute precision of logits, exp and the P·V product (unit roundoff u).
    general, has_bias : bool
    key_block : int, optional
        Keys per block (default ``_config.EXACT_KEY_BLOCK``).
    logit_error : float, optional
        Absolute error of the logits from the inputs' preparation before the
        kernel, e.g. the float64 rotation (:func:`numbarope.rotary.rotation_logit_error`).

    Returns
    -------
    float
        ``2ρ/(1−ρ)·vmax + (γ_kb(u) + u + γ_{n/kb}(u₆₄) + 2u₆₄)·vmax``; ρ bounds the
        error of the weights relative to their sum (see Notes). Excludes the final
        rounding of a float32 result (added by the caller).

    Notes
    -----
    With x_ij = L_ij − m_i (the logit, bias shifted per row, minus the running
    maximum; |m_i| <= R because the shifted bias is 0 at the row's largest
    visible bias and <= 0 elsewhere):

    * the logit's dot product, the rounding of rotated inputs to the compute
      dtype and the scale: ``|ΔL| <= γ_{E+3}(u)·R₁`` (Higham §3.1; general W:
      γ_{2E+3}); the bias addition, the store and the subtraction of m:
      ``<= 3u(|x| + R + H)``, H = ``exact.EXACT_HEADROOM`` (the running maximum
      may trail the row's by up to H);
    * exp: ``EXP_ULPS·u`` relative (numbarope.exact);
    * hence each weight ``e^x`` is computed within ``e^x·(ρ₀)`` plus
      ``3u|x|e^x``; Σ_j |x_j|e^{x_j} <= 1.37·(ln n + 1)·Σ_j e^{x_j}, so the
      weights' total error is ``<= ρ·Σ_j e^{x_j}`` with
      ``ρ = ρ₀ + 4.2u(ln n + 1)(1 + ρ₀) + n·e^{EXP_FLUSH} + γ_{n+n/kb}(u₆₄) + 3(n/kb)u₆₄``
      (flushed weights, float64 sums and block rescalings);
    * the value product in the compute dtype adds ``γ_kb(u)·vmax`` per block,
      the value rounding ``u·vmax``, the float64 accumulation ``γ_{n/kb}(u₆₄)``.

    A perturbation of the weights by at most ``ρ`` times their sum moves a
    ratio ``Σ w v / Σ w`` by at most ``2ρ/(1−ρ)·max|v|``.
    """
    from .exact import EXACT_HEADROOM, EXP_FLUSH, EXP_ULPS
    if n == 0 or vmax == 0.0:
        return 0.0
    dt = np.dtype(precision)
    u = 2.0 ** -24 if dt == np.float32 else 2.0 ** -53
    u64 = 2.0 ** -53
    kb = int(key_block or _config.EXACT_KEY_BLOCK)
    nb = -(-n // kb)
    R = min(float(radius), 1e300)
    R1 = min(max(float(radius1), R), 1e300)
    # the running maximum may trail the row's by up to EXACT_HEADROOM (blocks whose
    # Cauchy–Schwarz bound is within it skip the maximum pass): 3u·headroom more
    dlogit = (_gamma((2 * E if general else E) + 3, u) * R1 + 3 * u * (R + EXACT_HEADROOM[dt])
              + float(logit_error))
    if not math.isfinite(dlogit) or dlogit > 1.0:
        return np.inf
    # scalar math (not numpy): this runs once per head of every call
    rho0 = math.expm1(2 * dlogit) + EXP_ULPS[dt] * u * math.exp(2 * dlogit)
    rho = (rho0 + 4.2 * u * (math.log(n) + 1) * (1 + rho0) + n * math.exp(EXP_FLUSH[dt])
           + _gamma(n + nb, u64) + 3 * nb * u64)
    if not rho < 1:
        return np.inf
    return float(vmax * (2 * rho / (1 - rho) + _gamma(kb, u) + u + _gamma(nb, u64)
                         + 2 * u64))


def exact_memory(n, E, Ev):
    """Working memory (bytes) of the exact path for one head: float64 copies of q, k, v,
    the output, and per-thread row/key-block buffers."""
    return algorithms.get("streaming").memory(HeadSpec((), n, n, E, Ev, 0.0, 0.0, 0.0))


def predict_fast(algorithm, n, E, Ev, degree, S=None, heads=1):
    """Predicted seconds of fast algorithm ``algorithm`` for one head (same units as
    predict_exact): n query rows against S key rows (default n); with ``heads`` query
    heads sharing one key/value head, the group's time divided by ``heads``."""
    S = n if S is None else S
    return algorithms.get(algorithm).predict(
        HeadSpec((), n, S, E, Ev, 0.0, 0.0, 0.0, heads=heads), degree)


#: Relative spacing of the grid the logit radius is rounded up to before a
#: polynomial is certified: the bound then holds on a slightly larger interval
#: [−R', R'] ⊇ [−R, R] (R' <= 1.02 R), and heads or calls with close radii share
#: one certification (10–50 ms each) through the cache.
RADIUS_GRID = 1.02

_FAILED = {}


def _grid_radius(radius):
    """Smallest point of the geometric grid RADIUS_GRID^k that is >= radius (0 stays 0)."""
    if radius <= 0.0:
        return 0.0
    k = np.ceil(np.log(radius) / np.log(RADIUS_GRID) - 1e-12)
    r = float(RADIUS_GRID ** k)
    return r if r >= radius else float(RADIUS_GRID ** (k + 1))


def _polynomial(radius, target, degree, approx):
    """Certified approximant on [−R', R'] (R' = grid radius), or (None, reason); cached."""
    r = _grid_radius(radius)
    key = (r, target, degree, approx, _config.MAX_DEGREE)
    if key in _FAILED:
        return None, _FAILED[key]
    try:
        if degree is not None:
            return exp_approximation(r, degree=degree, kind=approx), None
        return exp_approximation(r, eps=target, kind=approx), None
    except ValueError as exc:
        why = (str(exc) if degree is not None else
               f"no {approx} polynomial of degree <= MAX_DEGREE={_config.MAX_DEGREE} "
               f"certifies eps at R={radius:.3g}")
        _FAILED[key] = why
        return None, why


@functools.lru_cache(maxsize=4096)
def _start_degree(radius, target, approx):
    """polynomial._start_degree, cached: radii are on the RADIUS_GRID, so calls hit."""
    from .polynomial import _start_degree as start
    return start(radius, target, approx)


def _screen(h, target, approx, candidates, t_exact):
    """A :class:`Reason` to pick exact without certifying (auto only), or None.

    ``_start_degree`` is a lower bound of the degree the certification would find
    (rigorous for Taylor, verified over the tested range for Chebyshev), so if
    even that degree is beyond the limits or every candidate is slower than exact
    there, auto picks exact without spending 10–50 ms on a certification.
    """
    g = _start_degree(_grid_radius(h.radius), target, approx)
    if g > _config.MAX_DEGREE:
        return Reason("degree-limit", f"fast infeasible: degree >= {g} needed at R="
                                      f"{h.radius:.3g} > MAX_DEGREE={_config.MAX_DEGREE}")
    feats = min(a.features(h.E, g) for a in candidates)
    if feats > _config.MAX_FEATURES:
        return Reason("feature-limit", f"fast infeasible: degree >= {g} needs >= "
                                       f"{feats:.3g} features > MAX_FEATURES="
                                       f"{_config.MAX_FEATURES:.3g}")
    t_fast = min(a.predict(h, g) for a in candidates)
    if t_fast >= t_exact:
        return Reason("exact-cheaper", f"exact {t_fast / t_exact:.1f}x cheaper than fast "
                                       f"even at degree >= {g} ({feats:.3g} features)")
    return None


def _evaluate(alg, h, approx_obj, eps, degree, method):
    """Bound, time, memory of one fast algorithm at this polynomial, and why it fails
    (a Reason) or None."""
    g = approx_obj.degree
    feats = alg.features(h.E, g)
    mem = alg.memory(h, g)
    delta = approx_obj.error_bound
    # the algorithm's floating-point allowance, plus the logits' error from the inputs'
    # preparation (rotation): each weight is then within a factor e^{±logit_error}
    rnd = alg.rounding(h, approx_obj.coef, delta) + math.expm1(h.logit_error)
    dtot = delta + rnd
    bound = (2 * dtot / (1 - dtot) * h.vmax if dtot < 1 else np.inf) + h.out_rounding
    why = None
    if g > _config.MAX_DEGREE:
        why = Reason("degree-limit", f"degree {g} > MAX_DEGREE={_config.MAX_DEGREE}")
    elif feats > _config.MAX_FEATURES:
        why = Reason("feature-limit", f"degree {g} needs {feats:.3g} features > "
                                      f"MAX_FEATURES={_config.MAX_FEATURES:.3g}")
    elif _config.exceeds_memory(mem):
        why = Reason("memory-limit", f"needs {mem / 2**30:.2f} GiB > limit "
                                     f"{_config.memory_limit() / 2**30:.2f} GiB")
    elif h.vmax > 0 and bound > eps * h.vmax * (1 + 1e-12) and not (
            degree is not None and method == "fast"):    # an explicit degree is honoured
        if h.out_rounding > eps * h.vmax:
            why = Reason("output-rounding", f"float32 output rounding alone (2^-24·max|V| = "
                                            f"{h.out_rounding:.2e}) exceeds eps·max|V| = "
                                            f"{eps * h.vmax:.2e}: pass float64 inputs")
        elif not dtot < 1 and rnd >= 1 and h.row_mass < 1:
            why = Reason("row-mass", f"the rounding allowance relative to the smallest row "
                                     f"mass (min_i Σ_j exp(b − max b) = {h.row_mass:.2e}) "
                                     f"exceeds 1: a bias spanning this many orders of "
                                     f"magnitude leaves the FFT no certified accuracy; use "
                                     f"method='exact' (or a Decay/Window structure)")
        else:
            why = Reason("misses-eps", f"degree {g} certifies {bound:.2e} > eps·max|V| = "
                                       f"{eps * h.vmax:.2e}")
    kind = ("certified (polynomial) + estimated FFT rounding"
            if alg.bound_kind == "estimated" else "certified")
    fields_ = dict(algorithm=alg.name, degree=g, features=feats, delta=delta,
                   time_fast=alg.predict(h, g), memory_fast=mem, rounding=rnd,
                   bound_kind=kind, coef=approx_obj.coef, error_bound=bound)
    return fields_, why


def plan_head(h, *, method, eps, degree, approx):
    """Choose the method and algorithm of one head; returns a :class:`HeadPlan`.

    Parameters
    ----------
    h : numbarope.algorithms.HeadSpec
        The head (sizes, structure, radius, value range, row mass, dtype).
    method, eps, degree, approx
        As :func:`numbarope.rope_attention`.

    Every registered fast algorithm that can serve the head (by structure) is
    evaluated at the certified polynomial; the cheapest by predicted time that
    meets ``eps`` and the limits of ``_config`` is the fast candidate. ``"auto"``
    takes it when it is predicted ``AUTO_MARGIN`` times cheaper than exact.

    Raises
    ------
    ValueError
        With ``method="fast"``, when no algorithm can serve the head, no degree
        <= ``_config.MAX_DEGREE`` meets ``eps`` at this radius, or the memory
        needed exceeds the limit.
    """
    ex = algorithms.get("streaming")
    t_exact = ex.predict(h)
    common = dict(head=h.head, radius=float(h.radius), time_exact=t_exact,
                  memory_exact=ex.memory(h), radius_given=bool(h.radius_given),
                  precision=h.compute_dtype)

    def exact_only(reason, **fast_fields):
        return HeadPlan(**{**dict(degree=None, features=None, delta=None, time_fast=None,
                                  memory_fast=None), **fast_fields, **common,
                           "method": "exact", "algorithm": "streaming",
                           "error_bound": h.exact_bound, "reason": reason.text,
                           "code": reason.code})

    if h.n == 0 or h.S == 0 or h.Ev == 0:
        return exact_only(Reason("empty", "empty sequence (n = 0)" if h.n == 0 else
                                 "no keys (S = 0)" if h.S == 0 else "no value columns"))
    if t_exact == 0.0:
        return exact_only(Reason("no-visible-key", "no query sees a key (causal, "
                                                   "query_offset < -L + 1)"))
    if method == "exact":
        return exact_only(Reason("exact-requested", "method='exact' requested"))
    candidates, refused = [], []
    for alg in algorithms.fast_algorithms():
        why = alg.unavailable(h)
        (refused if why else candidates).append((alg, why))
    candidates = [a for a, _ in candidates]
    if not candidates:
        why = [w for _, ws in refused for w in ws if w.code != "structure"] or refused[0][1]
        if method == "fast":
            raise FastPathError(f"method='fast' cannot serve head {h.head}: {why[0].text}; "
                                f"use method='exact' or 'auto'", why[0].code, h.head,
                                why[0].text)
        return exact_only(Reason(why[0].code, f"fast infeasible: {why[0].text}"))
    target = 0.9 * eps / (2.0 + eps)
    if method == "auto" and degree is None:
        screened = _screen(h, target, approx, candidates, t_exact)
        if screened is not None:
            return exact_only(screened)
    # ---- polynomial, then every candidate at it
    approx_obj, why_text = _polynomial(h.radius, target, degree, approx)
    if approx_obj is None:
        why, fast_fields = Reason("degree-limit", why_text), {}
    else:
        results = [_evaluate(a, h, approx_obj, eps, degree, method) for a in candidates]
        ok = [r for r in results if r[1] is None]
        fast_fields, why = min(ok or results, key=lambda r: r[0]["time_fast"])
    shared = f"key side shared by {h.heads} query heads" if h.heads > 1 else ""
    if method == "fast":
        if why is not None:
            raise FastPathError(
                f"method='fast' cannot serve head {h.head}: R={h.radius:.4g}, eps={eps:g}: "
                f"{why.text}. Use method='exact' or 'auto', a larger eps, or smaller "
                f"logits (scale, or a tighter radius=).", why.code, h.head, why.text)
        return HeadPlan(**common, method="fast", **fast_fields,
                        reason="method='fast' requested" + (f" ({shared})" if shared else ""),
                        code="fast-requested", shared_heads=h.heads)
    # auto
    exact_fields = {k: v for k, v in fast_fields.items()
                    if k not in ("algorithm", "error_bound", "bound_kind", "rounding")}
    if why is not None:
        return exact_only(Reason(why.code, f"fast infeasible: {why.text}"), **exact_fields)
    t_fast = fast_fields["time_fast"]
    if t_fast * _config.AUTO_MARGIN < t_exact:
        return HeadPlan(**common, method="fast", **fast_fields, code="fast-cheaper",
                        shared_heads=h.heads,
                        reason=f"fast {t_exact / t_fast:.1f}x cheaper (degree "
                               f"{fast_fields['degree']}, bound {fast_fields['error_bound']:.1e}"
                               + (f", {shared})" if shared else ")"))
    return exact_only(Reason("exact-cheaper", f"exact {t_fast / t_exact:.1f}x cheaper than "
                                              f"fast (degree {fast_fields['degree']}, "
                                              f"{fast_fields['features']} features)"),
                      **exact_fields)


def _median_time(fn, repeat=3):
    import time
    fn()                                      # warm (compile, caches)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def calibrate(update=True, seed=0, progress=None):
    """Measure the cost-model constants on this machine.

    Times small runs of each kernel the planner models (median of 3, after a
    warm-up that also compiles) and derives seconds per operation for
    :data:`COST_CONSTANTS`. Takes a few seconds.

    Parameters
    ----------
    update : bool, optional
        Store the measured constants in :data:`COST_CONSTANTS` (this process
        only) so that ``method="auto"`` and :func:`numbarope.plan` use them.
    seed : int, optional
        Seed of the random test data.
    progress : bool, optional
        Show a tqdm progress bar on stderr (default: when stderr is a terminal).

    Returns
    -------
    dict
        The measured constants (seconds per operation), keys as COST_CONSTANTS.

    Examples
    --------
    >>> import numbarope
    >>> consts = numbarope.calibrate(update=False)   # doctest: +SKIP
    """
    import scipy.fft as sfft

    from ._monomials import feature_weights, features, symmetric_power
    from .exact import exact_attention
    from .fast import fast_separable

    import sys

    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = tqdm(total=8, desc="calibrate", leave=False, disable=not show)
    rng = np.random.default_rng(seed)
    c = {}
    # exact kernel: t = pairs·(pair + flop·(E + Ev)) at two widths, per precision
    n = 4096
    for dt, sfx in ((np.float64, ""), (np.float32, "32")):
        ts = {}
        for w in (8, 64):
            q, k, v = (rng.standard_normal((1, n, w)).astype(dt) for _ in range(3))
            ts[w] = _median_time(lambda: exact_attention(q, k, v, 0.1)) / (n * n)
        c["exact_flop" + sfx] = max((ts[64] - ts[8]) / (2 * 64 - 2 * 8), 1e-13)
        c["exact_pair" + sfx] = max(ts[8] - c["exact_flop" + sfx] * 16, 1e-12)
        bar.update()
    # general W: the per-pair bilinear forms (E² + E multiply-adds) on top
    ng, Eg = 512, 4
    q, k, v = (rng.standard_normal((1, ng, Eg)) for _ in range(3))
    W = rng.standard_normal((1, 2 * ng - 1, Eg, Eg))
    tg = _median_time(lambda: exact_attention(q, k, v, 0.1, relative=W,
                                              ridx=np.zeros(1, np.int64))) / (ng * ng)
    c["exact_general_flop"] = max((tg - c["exact_pair"] - c["exact_flop"] * 2 * Eg)
                                  / (Eg * Eg + Eg), 1e-12)
    bar.update()
    # separable fast path as run (threads, fused feature blocks + BLAS): features of both
    # sides alone, then the whole gemm path (features + products) and the whole prefix
    # path (+ intra-chunk logits, Horner and products) at E = Ev = 16, degree 3
    E, g, rows, ev = 16, 3, 16384, 16
    x = rng.standard_normal((rows, E)) * 0.25
    vv = rng.standard_normal((rows, ev))
    coef = 1.0 / np.array([1.0, 1.0, 2.0, 6.0])
    wphi, _ = feature_weights(coef, E, g)
    m = wphi.size
    out = np.empty((m, rows))
    c["feature"] = _median_time(lambda: features(x, E, g, wphi, out)) / out.size
    bar.update()
    t_gemm = _median_time(lambda: fast_separable(x, x, vv, 1.0, coef))
    c["gemm_flop"] = max((t_gemm - c["feature"] * 2 * rows * m) / (2 * rows * m * (ev + 1)),
                         1e-13)
    t_prefix = _median_time(lambda: fast_separable(x, x, vv, 1.0, coef, causal=True))
    ch = min(prefix_chunk(m), rows)
    intra = max(t_prefix - t_gemm - c["gemm_flop"] * rows * ch * (E + ev + 1), 0.0)
    # elementwise: per (query, key) pair of a chunk and degree, Horner and mask (numba)
    c["elementwise"] = max(intra / (rows * ch * (2 * g + 3)), 1e-13)
    bar.update()
    # FFT per unit N·log2 N per column
    N, cols = 8192, 64
    u = rng.standard_normal((N, cols))
    c["fft_flop"] = _median_time(
        lambda: sfft.irfft(sfft.rfft(u, axis=0), n=N, axis=0)) / (2 * cols * N * np.log2(N))
    bar.update()
    # complex block products per frequency
    F, mk, ev1 = 1025, 20, 17
    A = rng.standard_normal((F, mk, mk)) + 1j
    B = rng.standard_normal((F, mk, ev1)) + 1j
    c["cmul"] = _median_time(lambda: np.matmul(A, B)) / (4 * F * mk * mk * ev1)
    bar.update()
    # symmetric powers
    W = rng.standard_normal((2047, 4, 4))
    t = _median_time(lambda: symmetric_power(W, 3))
    c["sympow"] = t / (2047 * (10 * 4 + 20 * 10) * 4)
    bar.update()
    bar.close()
    if update:
        COST_CONSTANTS.update(c)
    return c
