"""The report of a call: :class:`HeadPlan` per head, :class:`AttentionInfo` over all.

A ``HeadPlan`` is frozen: verification (``verify=``) writes its observed error
into the report (:meth:`HeadPlan.with_observed`, a new object), never into the
plan the call ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import numpy as np

__all__ = ["HeadPlan", "AttentionInfo"]


@dataclass(frozen=True)
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
    reason, a key of ``numbarope.ops.REASONS``), ``shared_heads``,
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
    code: str = ""                         # machine-readable reason (numbarope.ops.REASONS)
    shared_heads: int = 1                  # query heads sharing this head's fast key side
    radius_given: bool = False             # radius came from the caller (radius=)
    precision: str = "float64"             # compute precision of the exact path

    def with_observed(self, error: float) -> HeadPlan:
        """This plan with ``observed_error`` set (what ``verify=`` found)."""
        return replace(self, observed_error=float(error))

    def to_dict(self) -> dict:
        """This head's plan as a dict of plain Python values, one key per field.

        ``head`` is a tuple, ``coef`` a list of floats, every other value a
        ``str``, ``int``, ``float``, ``bool`` or ``None`` (no fast-path value):
        ready for ``json.dumps``.
        """
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    def __repr__(self) -> str:
        """The dataclass repr with plain numbers: ``error_bound=4.07e-05``, not
        ``np.float64(4.07e-05)`` (numpy >= 2 shows its scalars' type)."""
        parts = ", ".join(f"{f.name}={_plain(getattr(self, f.name))!r}"
                          for f in fields(self) if f.repr)
        return f"{type(self).__name__}({parts})"

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
            nowrap = ";" + _NOWRAP if _numeric(v) or f.name == "head" else ""
            rows.append(f"<tr><th style=\"text-align:left\">{html.escape(f.name)}</th>"
                        f"<td style=\"text-align:left{nowrap}\">{html.escape(text)}</td></tr>")
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

    @property
    def gradient_bound(self):
        """Certified bounds on the fast backward's gradient errors, filled when the
        backward of the call has run (None before it, and when no head was computed
        fast).

        An ndarray of shape ``batch_shape + (3,)``, float64: per query head, bounds on
        ``max|dq − dq_exact|``, ``max|dk − dk_exact|``, ``max|dv − dv_exact|`` of that
        head's contributions, in the units of the gradients with respect to the rotated
        query and key (see ``Algorithm.gradient_bound``, e.g.
        :func:`numbarope.ops._bounds.gradient_bound`); NaN on heads computed exactly.
        The gradient of a key/value head shared by G query heads is the sum of their
        contributions (so its error at most the sum of their bounds); rotating back to
        the unrotated inputs multiplies an entry's bound by at most √2 (each entry is
        ``cos·a ± sin·b`` of two rotated ones). The last backward's values are kept.
        Source: the gradients of the exact attention with the forward's polynomial
        weights (Chen et al., arXiv:2412.17316, §4–5), bounded in the docstring of
        :func:`numbarope.ops._bounds.gradient_bound`.
        """
        return self.extra.get("gradient_bound")

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
                f"{'features':>9} {'bound':>9}{obs} {'pred_exact':>10} {'pred_fast':>9}  reason")
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
                obs = "-" if h.observed_error is None else f"{h.observed_error:9.2e}"
                ob = " " + obs.rjust(9)
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
                ("time_exact", "predicted exact (s)"), ("time_fast", "predicted fast (s)"),
                ("memory_fast", "predicted memory fast"), ("reason", "reason")]
        left = {"head", "method", "algorithm", "reason"}

        def style(name, cell=True):
            # numbers and head indices never wrap (a narrow column would break "2.49e-04"
            # after the "-"); the headers and reasons may
            return (f' style="text-align:{"left" if name in left else "right"}'
                    f'{";" + _NOWRAP if cell and (name not in left or name == "head") else ""}"')

        head = "".join(f"<th{style(c, cell=False)}>{html.escape(t)}</th>" for c, t in cols)
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
    "code": "machine-readable reason (a key of ``numbarope.ops.REASONS``)",
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


#: CSS of the numeric cells of the HTML tables: a number is never broken across lines.
_NOWRAP = "white-space:nowrap"


def _numeric(v):
    """Whether a field value is shown as a number (its HTML cell must not wrap)."""
    return isinstance(v, (int, float, np.number)) and not isinstance(v, (bool, np.bool_))


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
