"""Per-head facts, computed once: a :class:`~numbarope.ops.HeadSpec` per head.

From a :class:`~numbarope._pipeline.inputs.Problem`: the logit radius R (and R₁
for the rounding terms) from the row norms of q and of the keys each head sees,
max|v| over those keys, the compute precision (float32 upgraded to float64 where
the logits could overflow), the head's canonical structure
(:meth:`numbarope.bias.Structure.canonical` of its own parameters; ``Causal()``
only where the causal mask hides a real key), the Toeplitz weights
``T = exp(b − max b)`` of a relative bias and the smallest row mass, the exact
path's certified bound, and which query heads may share a key side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bias import Causal, Decay, Dense, NoBias
from ..ops import HeadSpec
from ..ops._common import visible_keys
from ..ops.streaming import exact_error_bound, pairs_visited, row_norms
from ..rotary import rotation_logit_error

__all__ = ["Heads", "head_facts", "separable_head_spec"]


def _causal_cut(L, S, off):
    """Entries ``e = i − j + S − 1`` of a generating sequence with j > i + off (masked
    by is_causal) are ``e < S − 1 − off``; returns that count, clipped to 0 .. L+S−1."""
    return int(min(max(S - 1 - off, 0), L + S - 1))


def _visible_entries(p, b):
    """(L+S−1,) bool: entries e = i − j + S − 1 of the bias that some query row of head b
    sees, i.e. with a real key j (key padding) and, with is_causal, j <= i + offset; or
    None when every entry is seen."""
    L, S = p.n, p.S
    w = _key_weights(p, b)
    cut = _causal_cut(L, S, p.offset) if p.causal else 0
    if w is None and not cut:
        return None
    vis = np.ones(L + S - 1, bool)
    if w is not None:     # entry e is seen iff a real key lies in j = S-1-e .. S-1-e+L-1
        cs = np.concatenate([[0], np.cumsum(w > 0)])
        e = np.arange(L + S - 1)
        j0 = np.clip(S - 1 - e, 0, S)
        j1 = np.clip(S - 1 - e + L, 0, S)
        vis = cs[j1] - cs[j0] > 0
    vis[:cut] = False
    return vis


def _toeplitz_weights(p, b):
    """``(T, max b)``: T[i − j + S − 1] = exp(b_t − max b) with the causal zeros (None
    when T ≡ 1) and the shift max b (0 then), the maximum taken over the entries some
    row sees (real keys, the causal cut): a padded key's large bias must not make the
    real keys' weights underflow. Entries no row sees are 0."""
    L, S = p.n, p.S
    if L == 0 or S == 0 or (p.bias is None and not (p.causal and p.relative is not None)):
        return None, 0.0
    cut = _causal_cut(L, S, p.offset) if p.causal else 0
    T = np.ones(L + S - 1)
    shift = 0.0
    if p.bias is not None:
        bt = p.bias[p.bidx[b]]
        vis = _visible_entries(p, b)
        if vis is not None:
            bt = np.where(vis, bt, -np.inf)
        finite = np.isfinite(bt)
        shift = float(bt[finite].max()) if finite.any() else 0.0
        T = np.exp(bt - shift) if finite.any() else np.zeros_like(bt)
    else:
        T[:cut] = 0.0
    return T, shift


def _key_weights(p, b):
    """(S,) float64 1/0 weights of head b's real/padded keys, or None (no padding)."""
    if p.kmask is None:
        return None
    w = np.isfinite(p.kmask[p.kidx[b]]).astype(np.float64)
    return None if w.all() else w


def _row_masses(T, L, S=None, w=None):
    """``Σ_j T(i − j)·w_j`` for every row i (T normalised so that max T = 1).

    Without key weights ``w`` the sums are exact prefix-sum differences. With them
    they are one FFT convolution, returned as a lower bound: the convolution minus
    its rounding allowance ``8u·log2(N)·‖T‖₂‖w‖₂`` (Higham 2002, §24.1), clipped at 0.
    """
    S = L if S is None else S
    if w is None:
        cs = np.concatenate([[0.0], np.cumsum(T)])
        i = np.arange(L)
        return cs[i + S] - cs[i]          # T[i .. i+S−1] holds the row's S offsets
    from scipy.signal import fftconvolve
    full = fftconvolve(T, w)[S - 1:S - 1 + L]
    N = L + 2 * S - 2
    err = 8 * 2.0 ** -53 * np.log2(max(N, 2)) * np.linalg.norm(T) * np.linalg.norm(w)
    return np.maximum(full - err, 0.0)


def _sees_keys(p, b):
    """(L,) bool: rows of head b that see at least one key (mask, bias −inf, causal)."""
    L, S = p.n, p.S
    vis = np.ones(L + S - 1)
    if p.bias is not None:
        vis = np.isfinite(p.bias[p.bidx[b]]).astype(np.float64)
    if p.causal:
        vis[:_causal_cut(L, S, p.offset)] = 0.0
    w = _key_weights(p, b)
    if w is None:
        return _row_masses(vis, L, S) > 0
    from scipy.signal import fftconvolve
    return np.rint(fftconvolve(vis, w)[S - 1:S - 1 + L]) > 0     # counts of 0/1 pairs


def _row_mass(p, b, T):
    """Smallest row mass of head b over rows that see at least one key.

    Returns 0 when a row that sees a key (finite logit) has mass 0 because
    ``exp(b_t − max b)`` underflowed (or, with key padding, its mass is below the
    rounding of the convolution that measures it): the fast path cannot represent
    it, so its bound becomes infinite and the planner refuses it.
    """
    if T is None:
        return 1.0
    mass = _row_masses(T, p.n, p.S, _key_weights(p, b))
    seen = _sees_keys(p, b)
    if np.any(seen & (mass <= 0)):
        return 0.0
    pos = mass[seen]
    return float(pos.min()) if pos.size else 1.0


def _radii(p, radius, qnorms, knorms):
    """``(R, R1, computed R, computed R1)`` of every flattened head: the logit radius R
    (the caller's ``radius=`` where given) and R₁ for the rounding term, and the
    proven ones from the norms (the exact path's bound always uses those)."""
    qn = qnorms.max(axis=1, initial=0.0)
    kn = _visible_maxima(p, knorms)          # over the keys each head sees (not padding)
    if p.relative is not None:
        wn = np.linalg.norm(p.relative, ord=2, axis=(-2, -1)).max(axis=1, initial=0.0)[p.ridx]
        wf = np.sqrt((p.relative ** 2).sum(axis=(2, 3))).max(axis=1, initial=0.0)[p.ridx]
    else:
        wn = wf = np.ones(qn.shape)
    with np.errstate(over="ignore"):     # inf: _compute_dtype refuses, naming it
        R = p.scale * qn * wn * kn
        # Σ_α |φ_α(q)ψ_α(k)| = Σ_k |a_k| (s Σ_e |q_e k_e|)^k <= Σ_k |a_k| R^k
        # (Cauchy–Schwarz); general W: (Σ_ab |q_a W_ab k_b|)^k <= (‖q‖ ‖W‖_F ‖k‖)^k.
        R1 = p.scale * qn * wf * kn
    computed, computed1 = R, R1
    if radius is not None:
        r = np.asarray(radius, dtype=np.float64)
        try:
            R = np.broadcast_to(r, p.batch_shape).reshape(-1)
        except ValueError:
            raise ValueError(f"radius has shape {r.shape}, which does not broadcast to the "
                             f"batch (head) dims {p.batch_shape}; give one radius per "
                             f"head or a scalar") from None
        low, where = _radius_floor(p)
        bad = np.flatnonzero(R < low * (1 - 1e-12))
        if bad.size:
            b = int(bad[0])
            i, j = where[b]
            head = tuple(int(x) for x in np.unravel_index(b, p.batch_shape))
            raise ValueError(
                f"radius={R[b]:.6g} is below a logit of this call: |s·q_iᵀk_j| = "
                f"{low[b]:.6g} at query {i}, key {j} of head {head}; radius= must bound "
                f"every logit (R >= max|s·q_iᵀW k_j|), or the fast path's certificate is "
                f"void. Omit radius= (numbarope computes a proven one) or pass a larger one")
        R1 = np.maximum(R1, R)
    return R, R1, computed, computed1


#: Query rows and keys sampled per head by :func:`_radius_floor` (plus the diagonal
#: and the rows/keys of largest norm).
_FLOOR_SAMPLE = 48


def _radius_floor(p):
    """A free lower bound of each head's true logit radius: ``max |s·q_iᵀW k_j|`` over
    a sample of the pairs it sees — the diagonal, evenly spaced rows and keys, and the
    rows and keys of largest norm — and where it was attained. A caller's ``radius=``
    below it is certainly wrong (issue 24: a too small radius silently voided the
    certificate)."""
    B = p.q.shape[0]
    low = np.zeros(B)
    where = [(0, 0)] * B
    if p.n == 0 or p.S == 0:
        return low, where
    # unrotated (planning only): only the diagonal pairs, where the query and its key
    # sit at one position and the rotation cancels, have their true logits
    diagonal = p.unrotated
    lo, hi = (p.key_ranges if p.key_ranges is not None else
              (np.zeros(p.n, np.int64), np.full(p.n, p.S, np.int64)))
    for b in range(B):
        q = p.q[b]
        k = p.k[p.kvidx[b]]
        rows = np.unique(np.concatenate([
            np.linspace(0, p.n - 1, min(p.n, _FLOOR_SAMPLE)).astype(np.int64),
            [int(np.argmax(np.einsum("ie,ie->i", q, q)))]]))
        keys = np.unique(np.concatenate([
            np.linspace(0, p.S - 1, min(p.S, _FLOOR_SAMPLE)).astype(np.int64),
            [int(np.argmax(np.einsum("je,je->j", k, k)))],
            np.clip(rows + p.offset, 0, p.S - 1)]))            # the diagonal
        qs, ks = q[rows].astype(np.float64), k[keys].astype(np.float64)
        if p.relative is None:
            x = qs @ ks.T
        else:                       # q_iᵀ W_t k_j, W stored at t = i − j + S − 1
            W = p.relative[p.ridx[b]][rows[:, None] - keys[None, :] + p.S - 1]
            x = np.einsum("ie,ijef,jf->ij", qs, W, ks)
        x = np.abs(p.scale * x)
        seen = (keys[None, :] >= lo[rows][:, None]) & (keys[None, :] < hi[rows][:, None])
        if p.kmask is not None:
            seen &= np.isfinite(p.kmask[p.kidx[b]][keys])[None, :]
        if p.bias is not None:
            seen &= np.isfinite(p.bias[p.bidx[b]][rows[:, None] - keys[None, :] + p.S - 1])
        if diagonal:
            seen &= keys[None, :] == rows[:, None] + p.offset
        x = np.where(seen & np.isfinite(x), x, 0.0)
        if x.size:
            r, c = np.unravel_index(int(np.argmax(x)), x.shape)
            low[b], where[b] = float(x[r, c]), (int(rows[r]), int(keys[c]))
    return low, where


#: Logit bounds (s·Σ|q_e k_e|) above which a compute dtype could overflow in the
#: logits, their GEMM's partial sums or exp's argument handling.
_LOGIT_LIMIT = {np.dtype(np.float32): 1e36, np.dtype(np.float64): 1e306}


def _compute_dtype(p, computed1):
    """The exact path's precision: the requested one, else float32 for float32 inputs
    and float64 otherwise; float32 upgraded to float64 (or refused when requested)
    where the logits could overflow it."""
    compute = np.dtype(p.precision if p.precision is not None else
                       ("float32" if p.dtype == np.float32 else "float64"))
    R1 = float(np.max(computed1, initial=0.0))
    if p.n == 0 or not R1 > _LOGIT_LIMIT[compute]:
        return compute
    if compute == np.float32 and R1 <= _LOGIT_LIMIT[np.dtype(np.float64)]:
        if p.precision is not None:                  # float32 was asked for
            raise ValueError(
                f"precision='float32' cannot hold these logits: s·max‖q‖·max‖k‖ = {R1:.3g} "
                f"overflows float32; use precision='float64' (or None) or smaller inputs")
        return np.dtype(np.float64)
    raise ValueError(
        f"the logits of these inputs overflow float64 (s·max‖q‖·max‖k‖ = {R1:.3g}); "
        f"softmax attention has no finite float64 evaluation here: scale query and key "
        f"down (or pass a smaller scale)")


def _causal_cuts(p, b, cache):
    """Whether is_causal hides a real key from some query of head b (else, e.g. when
    decoding at the end of a cache, the head is non-causal attention: NoBias)."""
    key = -1 if p.kmask is None else int(p.kidx[b])       # once per key mask
    if key not in cache:
        w = _key_weights(p, b)
        cache[key] = visible_keys(p.n, p.S, p.offset, True,
                                  None if w is None else w > 0) is not None
    return cache[key]


def _head_structure(p, b, dense, cuts):
    """The canonical structure of head b (its own parameters selected)."""
    st = p.structure
    if st is None and p.bias is not None:      # an array bias: Dense, one per bias row
        r = int(p.bidx[b])
        if r not in dense:
            dense[r] = Dense(p.bias[r])
        return dense[r]
    if st is None:
        st = Causal() if p.causal else NoBias()
    st = st.select(int(p.bidx[b]) if p.bidx is not None else 0).canonical()
    if isinstance(st, Causal) and p.relative is None and not _causal_cuts(p, b, cuts):
        return NoBias()
    return st


def head_weights(p, b):
    """``(structure, T, shift)`` of head b as the fast forward received them: its
    canonical structure, the Toeplitz weights ``exp(b_t − shift)`` (None without a
    bias) and the shift (what the backward of a biased head needs)."""
    T, shift = _toeplitz_weights(p, b)
    return _head_structure(p, b, {}, {}), T, shift


def share_groups(p):
    """Query heads that may share one fast key side: same key/value head, key mask
    and bias (so the same keys, values and Toeplitz weights), separable logits."""
    if p.relative is not None or p.n == 0:
        return ()
    groups = {}
    for b in range(p.q.shape[0]):
        key = (int(p.kvidx[b]), -1 if p.kidx is None else int(p.kidx[b]),
               -1 if p.bidx is None else int(p.bidx[b]))
        groups.setdefault(key, []).append(b)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


@dataclass(frozen=True)
class Heads:
    """Per-head facts of one call (see the module docstring).

    ``specs``: one HeadSpec per flattened head; ``compute_dtype``: the exact path's
    precision; ``qnorms`` (B, L), ``knorms`` (Bk, S): upper bounds of the row norms
    (reused by the exact kernel); ``weights``: per flattened head, ``(T, shift)``
    (T None without a relative bias); only computed when the fast path may run;
    ``groups``: query heads that may share a key side.
    """

    specs: tuple
    compute_dtype: np.dtype
    qnorms: np.ndarray
    knorms: np.ndarray
    weights: tuple
    groups: tuple


def head_facts(p, radius=None, *, fast=True):
    """The :class:`Heads` of a problem. ``radius``: the caller's ``radius=`` (or None);
    ``fast``: whether the fast path may run (else the Toeplitz weights and row masses
    are not computed)."""
    qnorms, knorms = row_norms(p.q), row_norms(p.k)
    R, R1, computed, computed1 = _radii(p, radius, qnorms, knorms)
    compute = _compute_dtype(p, computed1)
    vmaxes = (_visible_maxima(p, np.abs(p.v).max(axis=2, initial=0.0))
              if p.kmask is not None else
              np.abs(p.v).max(axis=(1, 2), initial=0.0).astype(np.float64)[p.kvidx])
    pairs = pairs_visited(p.n, p.S, p.offset, p.key_ranges)
    B = p.q.shape[0]
    weights, masses, structures = [], [], []
    cache, dense, cuts = {}, {}, {}
    for b in range(B):
        key = (-1 if p.bidx is None else int(p.bidx[b]), -1 if p.kidx is None else int(p.kidx[b]))
        if fast and key not in cache:
            T, shift = _toeplitz_weights(p, b)
            cache[key] = (T, shift, _row_mass(p, b, T))
        w = cache.get(key, (None, 0.0, 1.0))
        weights.append(w[:2])
        masses.append(w[2])
        structures.append(_head_structure(p, b, dense, cuts))
    specs = []
    general = p.relative is not None
    for b in range(B):
        vmax = float(vmaxes[b])
        out_rounding = p.out_unit * vmax
        rot = rotation_logit_error(computed[b]) if p.rotated else 0.0
        if p.softcap is not None:    # c·tanh(x/c): |d/dx| <= 1 keeps the logit error;
            # tanh within 4 ulp, the division and the product one rounding each (+1),
            # relative to |c·tanh(x/c)| <= min(c, R)
            rot += 6.0 * min(p.softcap, float(computed[b])) * np.finfo(compute).eps / 2
        specs.append(HeadSpec(
            head=tuple(int(i) for i in np.unravel_index(b, p.batch_shape))
            if p.batch_shape else (),
            n=p.n, S=p.S, offset=p.offset, E=p.E, Ev=p.Ev, radius=float(R[b]),
            radius1=float(R1[b]), vmax=vmax, general=general, structure=structures[b],
            row_mass=masses[b], out_rounding=out_rounding,
            exact_bound=exact_error_bound(p.S, p.E, computed[b], computed1[b], vmax,
                                          compute, general, p.bias is not None,
                                          logit_error=rot) + out_rounding,
            radius_given=radius is not None, compute_dtype=compute.name, pairs=pairs,
            logit_error=rot, softcap=p.softcap))
    return Heads(specs=tuple(specs), compute_dtype=compute, qnorms=qnorms, knorms=knorms,
                 weights=tuple(weights), groups=share_groups(p))


def _visible_maxima(p, per_key):
    """Per flattened query head b, the max over the keys it can see (real keys of its
    key mask) of ``per_key[kvidx[b], j]``, a (Bk, S) array (float64; 0 with no key).
    Padded keys hold junk that must not enlarge the logit radius or max|v|."""
    full = per_key.max(axis=1, initial=0.0)
    if p.kmask is None:
        return full[p.kvidx]
    out = np.empty(p.kvidx.shape[0])
    seen = {}
    for b in range(out.size):
        key = (int(p.kvidx[b]), int(p.kidx[b]))
        if key not in seen:
            real = np.isfinite(p.kmask[key[1]])
            seen[key] = (float(per_key[key[0]][real].max(initial=0.0)) if not real.all()
                         else float(full[key[0]]))
        out[b] = seen[key]
    return out


def separable_head_spec(head, n, S, E, Ev, radius, vmax, causal, compute_dtype, out_unit,
                        rate=None, key_mask=None, rotated=False):
    """HeadSpec of a head without W_t, built from its statistics alone.

    For data that is never in one place (one long sequence in blocks on a Dask
    cluster, :mod:`numbarope.backends.long_sequence`): ``radius`` R =
    s·max‖q_i‖·max‖k_j‖ over the rotated blocks (R₁ = R without W_t), ``vmax`` =
    max|v|; n query rows at positions 0..n−1 against S keys at 0..S−1. ``rate``: a
    :class:`~numbarope.bias.Decay` (ALiBi) bias of this rate (square, causal: every
    row sees its own key, so the row mass is 1). ``key_mask``: (S,) bool of real keys
    (no bias). The same fields as :func:`head_facts` gives the in-memory call for
    these inputs.
    """
    cd = np.dtype(compute_dtype)
    out_rounding = out_unit * vmax
    if rate is not None:
        structure = Decay(float(rate), bool(causal)).canonical()
    else:
        cuts = bool(causal) and visible_keys(n, S, 0, True, key_mask) is not None
        structure = Causal() if cuts else NoBias()
    rot = rotation_logit_error(radius) if rotated else 0.0
    ranges = Causal().key_ranges(n, S, 0) if causal else None
    return HeadSpec(head=tuple(head), n=n, S=S, offset=0, E=E, Ev=Ev, radius=float(radius),
                    radius1=float(radius), vmax=float(vmax), general=False,
                    structure=structure, row_mass=1.0, out_rounding=out_rounding,
                    exact_bound=exact_error_bound(S, E, radius, radius, vmax, cd, False,
                                                  rate is not None, logit_error=rot)
                    + out_rounding,
                    compute_dtype=cd.name, pairs=pairs_visited(n, S, 0, ranges),
                    logit_error=rot)
