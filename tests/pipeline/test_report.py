"""numbarope._pipeline.report: what people look at — ``AttentionInfo``'s repr, HTML
table, per-field properties and exports on exact and fast heads, and ``HeadPlan``.
(``numbarope --version`` and the command line's help text: tests/test_cli.py.)"""

import dataclasses
import json
import sys

import numpy as np
import pytest

import numbarope
from numbarope import AttentionInfo, HeadPlan

FIELDS = [f.name for f in dataclasses.fields(HeadPlan)]
#: numeric fields that are None on heads without a fast-path value (or without verify)
OPTIONAL_NUMBERS = ("degree", "features", "delta", "time_fast", "memory_fast",
                    "observed_error")


@pytest.fixture(scope="module")
def mixed():
    """Planned, not computed: head 0 fast (R = 0.25), head 1 exact (R = 100, no degree)."""
    q = np.stack([np.full((4096, 4), 0.25), np.full((4096, 4), 5.0)])
    return numbarope.plan(q, q, q, rotary=True, scale=1.0)


@pytest.fixture(scope="module")
def computed():
    """Computed with verify: (2, 3) heads, small logits, all fast, observed errors."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 48, 4)) * 0.3 for _ in range(3))
    out, info = numbarope.rope_attention(q, k, v, rotary=True, method="fast", eps=1e-4,
                                         verify=3, return_info=True)
    return out, info


def test_properties_are_explicit(mixed):
    for name in FIELDS:
        assert name in dir(mixed), name
        assert isinstance(getattr(AttentionInfo, name), property), name
        assert getattr(AttentionInfo, name).__doc__, name
    with pytest.raises(AttributeError):
        mixed.no_such_field


def test_property_values_on_exact_and_fast_heads(mixed):
    assert mixed.method.tolist() == ["fast", "exact"]
    assert mixed.method.dtype.kind == "U" and mixed.algorithm.dtype.kind == "U"
    assert mixed.head.tolist() == [(0,), (1,)]
    for name in OPTIONAL_NUMBERS:
        arr = getattr(mixed, name)
        assert arr.dtype == np.float64 and arr.shape == (2,), name
        for value, h in zip(arr, mixed.heads):
            got = getattr(h, name)
            assert np.isnan(value) if got is None else value == got, name
    assert np.isnan(mixed.degree[1]) and mixed.degree[0] == mixed.heads[0].degree
    assert mixed.error_bound.dtype == np.float64 and mixed.radius.dtype == np.float64
    assert mixed.memory_exact.dtype == np.int64 and mixed.shared_heads.dtype == np.int64
    assert mixed.radius_given.dtype == bool
    assert mixed.coef.dtype == object and isinstance(mixed.coef[0], np.ndarray)
    assert mixed.coef[1] is None


def test_properties_have_batch_shape(computed):
    out, info = computed
    assert info.batch_shape == (2, 3)
    for name in FIELDS:
        assert getattr(info, name).shape == (2, 3), name
    assert info.head[1, 2] == (1, 2)
    assert np.all(info.method == "fast")
    obs = info.observed_error
    assert obs.dtype == np.float64 and np.all(obs <= info.error_bound)
    single = numbarope.plan(np.full((64, 4), 0.1), np.full((64, 4), 0.1),
                            np.ones((64, 4)), rotary=True)
    assert single.batch_shape == () and single.method.shape == ()
    assert single.method[()] in ("exact", "fast")


def test_repr_summary_and_table(mixed, computed):
    text = repr(mixed)
    first = text.splitlines()[0]
    assert first.startswith("AttentionInfo(2 heads: 1 fast (gemm), 1 exact (streaming); "
                            "max bound ") and first.endswith("; eps 1e-3)")
    assert mixed.table() in text and str(mixed) == mixed.table()
    assert "max observed" in computed[1].summary()
    assert "batch_shape (2, 3)" in computed[1].summary()


def test_repr_leaves_out_the_middle_of_many_heads():
    q = np.full((30, 64, 4), 0.1)
    info = numbarope.plan(q, q, q, rotary=True)
    text = repr(info)
    assert "(10 more heads)" in text and "(all 30 heads: print(info)" in text
    assert "(29,)" in text and "(15,)" not in text
    assert len(info.table().splitlines()) == 31
    assert len(info.table(max_rows=4).splitlines()) == 1 + 4 + 1
    html = info._repr_html_()
    assert html.count("<tr>") == 1 + 30          # under html_rows: every head
    empty = AttentionInfo([], (0,))
    assert repr(empty) == "AttentionInfo(0 heads; eps 1e-3)"
    assert empty.to_dict()["method"] == []


def test_html_table_is_escaped(mixed):
    html = mixed._repr_html_()
    assert html.count("<table>") == 1 and html.count("<tr>") == 1 + 2
    assert "fast infeasible: " in html and "every R &gt; " in html   # the reason, escaped
    evil = dataclasses.replace(mixed.heads[0], reason="<script>alert(1)</script> & co",
                               algorithm="<evil>")
    info = AttentionInfo([evil], (1,))
    html = info._repr_html_()
    assert "<script>" not in html and "<evil>" not in html and "&lt;evil&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in html
    head_html = evil._repr_html_()
    assert "<script>" not in head_html and "coefficients" in head_html


def test_to_dict_columns_and_records(mixed, computed):
    cols = mixed.to_dict()
    assert list(cols) == FIELDS
    assert all(len(v) == 2 for v in cols.values())
    assert cols["method"] == ["fast", "exact"]
    assert cols["degree"][1] is None and isinstance(cols["degree"][0], int)
    assert cols["head"] == [(0,), (1,)]
    assert isinstance(cols["coef"][0], list) and cols["coef"][1] is None
    json.dumps(cols)
    records = computed[1].to_dict(orient="records")
    assert len(records) == 6 and records[5]["head"] == (1, 2)
    assert all(isinstance(r["observed_error"], float) for r in records)
    assert records[0] == computed[1].heads[0].to_dict()
    json.dumps(records)
    with pytest.raises(ValueError, match="orient"):
        mixed.to_dict(orient="index")


def test_to_dataframe(mixed, computed):
    pd = pytest.importorskip("pandas")
    df = mixed.to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == [f for f in FIELDS if f != "coef"] and len(df) == 2
    assert str(df["degree"].dtype) == "Int64" and df["degree"].isna().tolist() == [False, True]
    assert df["time_fast"].dtype == np.float64 and np.isnan(df["time_fast"][1])
    assert df["method"].tolist() == ["fast", "exact"] and df["head"].tolist() == [(0,), (1,)]
    assert df.attrs == {"batch_shape": (2,), "eps": 1e-3}
    df6 = computed[1].to_dataframe()
    assert len(df6) == 6 and df6["head"].tolist()[-1] == (1, 2)


def test_to_dataframe_without_pandas(mixed, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)       # import pandas -> ImportError
    with pytest.raises(ImportError, match="pip install pandas"):
        mixed.to_dataframe()


def test_headplan_repr_prints_plain_numbers(mixed):
    """New-user report: the dataclass repr showed ``error_bound=np.float64(4.07e-05)``."""
    h = dataclasses.replace(mixed.heads[0], error_bound=np.float64(4.5e-05),
                            radius=np.float64(0.25), degree=np.int64(2), features=np.int64(15),
                            rounding=np.float32(0.5), head=(np.int64(0),))
    text = repr(h)
    assert "np." not in text and "float64(" not in text and "int64(" not in text, text
    assert text.startswith("HeadPlan(head=(0,), method='fast'")
    assert "error_bound=4.5e-05" in text and "degree=2," in text and "rounding=0.5," in text
    assert "coef=" not in text                     # repr=False, as before
    # every real plan: no numpy scalar type in the repr
    assert all("np." not in repr(hp) for hp in mixed.heads)


def test_html_numbers_do_not_wrap(mixed):
    """New-user report: narrow HTML cells broke '2.49e-04' into '2.49e-' / '04'."""
    import re
    html = mixed._repr_html_()
    cells = re.findall(r'<td style="([^"]*)">([^<]*)</td>', html)
    numeric = [(style, text) for style, text in cells
               if re.fullmatch(r"[-+0-9.e]+( [KMG]?i?B)?", text)]
    assert numeric and all("white-space:nowrap" in style for style, _ in numeric), numeric
    # the reason column still wraps; the headers too
    reasons = [style for style, text in cells if text.startswith("fast")]
    assert reasons and not any("nowrap" in s for s in reasons)
    assert "nowrap" not in "".join(re.findall(r"<th[^>]*>", html))
    head_html = mixed.heads[0]._repr_html_()
    bound = re.search(r'<th[^>]*>error_bound</th><td style="([^"]*)">', head_html)
    assert bound and "white-space:nowrap" in bound[1]
    method = re.search(r'<th[^>]*>method</th><td style="([^"]*)">', head_html)
    assert method and "nowrap" not in method[1]
