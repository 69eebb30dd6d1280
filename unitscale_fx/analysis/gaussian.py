"""Gaussian statistics of elementwise functions (forward value, gradient, token correlation).

The scale analysis models every tensor as Gaussian elements with a given RMS and a correlation
``corr`` between two different tokens of a sequence. For an elementwise function ``f`` (any torch
callable: ``F.gelu``, ``torch.tanh``, a hand-written tanh-GELU subgraph, ``x * sigmoid(1.702 x)``...)
this module computes, for ``x ~ N(mean, sigma^2)``:

* ``rms = sqrt(E[f(x)^2])`` and ``mean = E[f(x)]``;
* ``grad_rms = sqrt(E[f'(x)^2])``, the factor by which ``f`` scales an independent gradient;
* ``corr = E[f(x) f(y)] / E[f(x)^2]`` and ``grad_corr = E[f'(x) f'(y)] / E[f'(x)^2]`` for a pair
  ``(x, y)`` of the same marginal with Gaussian correlation coefficient ``corr``.

Numerics. Plain Gauss–Hermite quadrature (:func:`hermite_nodes`) is spectrally accurate for smooth
``f`` but converges slowly when ``f`` (or ``f'``) has kinks or jumps (relu, abs, clamp, hardtanh,
or a smooth function whose transition is much narrower than ``sigma``, e.g. gelu at sigma=1000).
:func:`pointwise_moments` therefore:

1. samples ``f`` and ``f'`` on a fine grid of the standardised variable ``z = (x - mean) / sigma``,
   flags points where ``f`` or ``f'`` is not resolved by the grid (large second differences),
   and locates each such point to machine precision by batched bisection;
2. integrates against the normal density with composite Gauss–Legendre panels (16 nodes each)
   split exactly at those break points, with panels graded geometrically towards them;
3. computes the two-point moments by conditioning: ``E[f(x) f(y)] = E_x[f(x) E[f(y) | x]]``,
   where the inner conditional expectation uses, for every outer node, a mesh split at the break
   points mapped into its own coordinates.

``f'`` is what autograd computes (so it is the gradient backprop would see; relu'(0) = 0 is
irrelevant, a set of measure zero). If ``f`` is not differentiable by autograd (its output does not
require grad, or backward raises) central finite differences are used instead.

Everything runs in float64 on CPU; results are typically accurate to ~1e-10 relative.
"""
from __future__ import annotations

import functools
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "hermite_nodes",
    "hermite_nodes_2d",
    "gauss_legendre_nodes",
    "PointwiseMoments",
    "pointwise_moments",
    "LRUCache",
    "clear_cache",
    "STANDARD",
    "pointwise_rms_function",
    "pointwise_grad_rms_function",
]

_DT = torch.float64
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------
# Quadrature rules (Golub–Welsch)
# --------------------------------------------------------------------------------------------------


def _golub_welsch(off_diag: Tensor, mu0: float) -> tuple[Tensor, Tensor]:
    """Nodes/weights of the Gauss rule whose symmetric Jacobi matrix has zero diagonal."""
    n = off_diag.numel() + 1
    jac = torch.zeros(n, n, dtype=_DT)
    if n > 1:
        idx = torch.arange(n - 1)
        jac[idx, idx + 1] = off_diag
        jac[idx + 1, idx] = off_diag
    evals, evecs = torch.linalg.eigh(jac)
    weights = mu0 * evecs[0, :] ** 2
    # The rules used here are symmetric: symmetrise to remove eigen-solver round-off.
    nodes = 0.5 * (evals - evals.flip(0))
    weights = 0.5 * (weights + weights.flip(0))
    return nodes, weights


@functools.lru_cache(maxsize=64)
def _hermite_cached(n: int) -> tuple[Tensor, Tensor]:
    k = torch.arange(1, n, dtype=_DT)
    nodes, weights = _golub_welsch(torch.sqrt(k), 1.0)
    return nodes, weights / weights.sum()


def hermite_nodes(n: int = 64) -> tuple[Tensor, Tensor]:
    """Probabilists' Gauss–Hermite rule for the standard normal: ``E[g(Z)] ~ sum(w * g(z))``.

    Returns ``(z, w)``, float64 tensors of length ``n`` (weights sum to 1); exact for polynomials of
    degree ``<= 2n - 1``. Computed once per ``n`` (Golub–Welsch on the Jacobi matrix with
    off-diagonal ``sqrt(k)``) and cached; the returned tensors are copies.
    """
    n = int(n)
    if n < 1:
        raise ValueError(f"hermite_nodes: n must be >= 1, got {n}")
    z, w = _hermite_cached(n)
    return z.clone(), w.clone()


@functools.lru_cache(maxsize=256)
def _hermite_2d_cached(rho: float, n: int) -> tuple[Tensor, Tensor, Tensor]:
    z, w = _hermite_cached(n)
    u = z.repeat_interleave(n)
    v = z.repeat(n)
    ww = w.repeat_interleave(n) * w.repeat(n)
    c = math.sqrt(max(0.0, 1.0 - rho * rho))
    return u, rho * u + c * v, ww


def hermite_nodes_2d(rho: float = 0.0, n: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Tensor-product Gauss–Hermite rule for a bivariate standard normal with correlation ``rho``.

    Returns ``(z1, z2, w)`` (float64, length ``n*n``, weights sum to 1) with
    ``E[g(Z1, Z2)] ~ sum(w * g(z1, z2))``: the product rule on independent ``(u, v)`` mapped by the
    Cholesky factor, ``z1 = u``, ``z2 = rho u + sqrt(1 - rho^2) v``. Cached per ``(rho, n)``.
    """
    rho = float(rho)
    n = int(n)
    if not -1.0 <= rho <= 1.0:
        raise ValueError(f"hermite_nodes_2d: rho must lie in [-1, 1], got {rho}")
    if n < 1:
        raise ValueError(f"hermite_nodes_2d: n must be >= 1, got {n}")
    z1, z2, w = _hermite_2d_cached(rho, n)
    return z1.clone(), z2.clone(), w.clone()


@functools.lru_cache(maxsize=16)
def _legendre_cached(n: int) -> tuple[Tensor, Tensor]:
    k = torch.arange(1, n, dtype=_DT)
    return _golub_welsch(k / torch.sqrt(4.0 * k * k - 1.0), 2.0)


def gauss_legendre_nodes(n: int = 16) -> tuple[Tensor, Tensor]:
    """Gauss–Legendre rule on ``[-1, 1]`` (weights sum to 2), float64, cached; returns copies."""
    n = int(n)
    if n < 1:
        raise ValueError(f"gauss_legendre_nodes: n must be >= 1, got {n}")
    t, w = _legendre_cached(n)
    return t.clone(), w.clone()


# --------------------------------------------------------------------------------------------------
# Evaluating f and f' on a tensor of points
# --------------------------------------------------------------------------------------------------


def _as_output(y: Any, x: Tensor) -> Tensor:
    y = torch.as_tensor(y)
    if y.shape != x.shape:
        y = y.expand_as(x)  # e.g. a constant function
    if y.dtype != _DT:
        y = y.to(_DT)
    return y


def _eval(f: Callable, x: Tensor, fd_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(f(x), f'(x))`` elementwise; ``f'`` by autograd, else by central finite differences."""
    xg = x.detach().clone().requires_grad_(True)
    grad = None
    try:
        with torch.enable_grad():
            # f gets a non-leaf copy, so in-place functions (relu_, nn.ReLU(inplace=True)) work
            y = _as_output(f(xg.clone()), xg)
    except RuntimeError:
        with torch.no_grad():
            y = _as_output(f(x.detach().clone()), x)
    with torch.enable_grad():
        if y.requires_grad:
            try:
                (grad,) = torch.autograd.grad(y.sum(), xg, allow_unused=True)
            except RuntimeError:
                grad = None
            else:
                if grad is None:  # output does not depend on the input
                    grad = torch.zeros_like(x)
    y = y.detach()
    if grad is None:
        grad = _finite_difference(f, x, y, fd_scale)
    return y, grad.detach().to(_DT)


def _finite_difference(f: Callable, x: Tensor, y: Tensor, scale: float) -> Tensor:
    """Derivative by central differences; one-sided (2nd order) where ``f`` jumps within 2h."""
    x = x.detach()
    h = 6e-6 * torch.clamp(x.abs(), min=scale)
    with torch.no_grad():  # (each argument is a fresh tensor: in-place f is fine)
        yp, ym = _as_output(f(x + h), x), _as_output(f(x - h), x)
        yp2, ym2 = _as_output(f(x + 2 * h), x), _as_output(f(x - 2 * h), x)
    central = (yp - ym) / (2.0 * h)
    fwd = (4.0 * yp - 3.0 * y - yp2) / (2.0 * h)
    bwd = (3.0 * y - 4.0 * ym + ym2) / (2.0 * h)
    smooth = (fwd - bwd).abs() <= 1e-4 * (fwd.abs() + bwd.abs()) + 1e-8 * y.abs() / h
    # near a kink/jump use the side whose 1st- and 2nd-order estimates agree (f smooth there)
    err_f = (fwd - (yp - y) / h).abs()
    err_b = (bwd - (y - ym) / h).abs()
    one_sided = torch.where(err_f <= err_b, fwd, bwd)
    return torch.where(smooth, central, one_sided)


# --------------------------------------------------------------------------------------------------
# Break-point detection and composite Gauss–Legendre meshes (standardised coordinate z)
# --------------------------------------------------------------------------------------------------

_GL_POINTS = 16          # Gauss–Legendre nodes per panel
_L_START = 12.0          # half-width of the z-domain (phi(12) ~ 1e-32), extended for growing f
_L_MAX = 60.0
_DET_H = 24.0 / 4096     # spacing of the detection grid in z
_GRADE = 4.0 ** -torch.arange(1, 9, dtype=_DT)  # geometric grading towards break points
_MAX_BREAKS = 32
_LEVELS = 2              # refinement levels of the break-point search
_SUB = 64                # sub-cells per refinement level
_FLAG_REL = 1e-3         # second difference / rms threshold for "not resolved by the grid"
_CHUNK = 1 << 20         # elements per function call in the 2-D integral


def _phi(z: Tensor) -> Tensor:
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _mesh_rule(edges: Tensor) -> tuple[Tensor, Tensor]:
    """Composite Gauss–Legendre rule for the standard-normal density over sorted ``edges``.

    ``edges``: ``(..., E)``. Returns ``(z, w)`` of shape ``(..., (E - 1) * 16)`` with ``w``
    including the density; zero-width panels get zero weight.
    """
    t, wt = _legendre_cached(_GL_POINTS)
    a = edges[..., :-1, None]
    b = edges[..., 1:, None]
    half = 0.5 * (b - a)
    z = (0.5 * (a + b) + half * t).flatten(-2)
    w = (half * wt).flatten(-2) * _phi(z)
    return z, w


def _edges(L: float, n_panels: int, breaks: Tensor) -> Tensor:
    """Sorted panel edges: uniform on ``[-L, L]`` plus break points and graded edges around them.

    ``breaks``: ``(..., B)`` break points in z (any, clamped to the domain). Returns ``(..., E)``.
    """
    base = torch.linspace(-L, L, n_panels + 1, dtype=_DT)
    h0 = 2.0 * L / n_panels
    grade = h0 * _GRADE
    extra = torch.cat(
        [breaks, (breaks[..., None] + grade).flatten(-2), (breaks[..., None] - grade).flatten(-2)],
        dim=-1,
    ).clamp(-L, L)
    base = base.expand(*breaks.shape[:-1], base.numel())
    return torch.cat([base, extra], dim=-1).sort(dim=-1).values


def _bisect_jumps(
    f: Callable, m: float, s: float, lo: Tensor, hi: Tensor, use_grad: bool, iters: int = 50
) -> Tensor:
    """Locate, for each bracket ``[lo, hi]`` in z, where ``f`` (or ``f'``) changes the most."""

    def val(z: Tensor) -> Tensor:
        y, g = _eval(f, m + s * z, fd_scale=s)
        return g if use_grad else y

    vlo, vhi = val(lo), val(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        vmid = val(mid)
        left = (vmid - vlo).abs() >= (vhi - vmid).abs()
        hi = torch.where(left, mid, hi)
        vhi = torch.where(left, vmid, vhi)
        lo = torch.where(left, lo, mid)
        vlo = torch.where(left, vlo, vmid)
    return 0.5 * (lo + hi)


def _clusters(v: Tensor, phi: Tensor, rms: float, ev2: float) -> list[tuple[int, int, float]]:
    """Spans ``[a, b]`` of grid indices where ``v`` is not resolved by the (uniform) grid.

    A point is flagged when the second difference of ``v`` is large relative to ``v`` there (or to
    its rms) and the Gaussian weight there is not negligible. Flagged points closer than 3 cells form
    one cluster; its span has a one-cell margin. Returns ``(a, b, importance)`` per cluster.
    """
    if v.numel() < 3:
        return []
    d2 = torch.zeros_like(v)
    d2[1:-1] = v[2:] - 2.0 * v[1:-1] + v[:-2]
    local = torch.zeros_like(v)
    local[1:-1] = torch.maximum(torch.maximum(v[2:].abs(), v[1:-1].abs()), v[:-2].abs())
    relevant = phi * (local + d2.abs()) ** 2 > 1e-20 * ev2
    flag = (d2.abs() > _FLAG_REL * torch.clamp(local, min=rms)) & relevant
    idx = torch.nonzero(flag).flatten().tolist()
    if not idx:
        return []
    jump = (v[1:] - v[:-1]).abs() * phi[:-1].sqrt()
    out = []
    start = prev = idx[0]
    for k in idx[1:] + [None]:
        if k is not None and k <= prev + 3:
            prev = k
            continue
        a, b = max(start - 1, 0), min(prev + 1, v.numel() - 1)
        out.append((a, b, float(jump[a:b].max())))
        if k is not None:
            start = prev = k
    return out


def _locate(
    f: Callable, m: float, s: float, z: Tensor, v: Tensor, use_grad: bool, avoid: Tensor
) -> Tensor:
    """Break points (in z) of ``v`` (``f`` or ``f'``, sampled on the uniform grid ``z``).

    Clusters of unresolved points are re-sampled ``_LEVELS`` times on ``_SUB``-times finer grids
    (which separates nearby jumps, e.g. ``clamp(-0.5, 2)`` at sigma=1000); spans still unresolved
    at the finest level are located by bisection, the others (smooth but narrow features) give
    their centre. Clusters within ``4 * _DET_H`` of a point of ``avoid`` are skipped.
    """
    phi = _phi(z)
    ev2 = float((phi * v * v).sum()) * float(z[1] - z[0])
    if not math.isfinite(ev2) or ev2 <= 0.0:
        return torch.zeros(0, dtype=_DT)
    rms = math.sqrt(ev2)
    cl = _clusters(v, phi, rms, ev2)
    if len(cl) > _MAX_BREAKS:
        warnings.warn(
            f"pointwise_moments: f{chr(39) if use_grad else ''} has {len(cl)} features narrower than "
            f"{_DET_H:.3g} sigma (oscillates too fast?); only the {_MAX_BREAKS} largest are resolved",
            RuntimeWarning,
            stacklevel=4,
        )
    spans = []
    for a, b, imp in cl:
        lo, hi = float(z[a]), float(z[b])
        if avoid.numel() and float((avoid - 0.5 * (lo + hi)).abs().min()) <= 4.0 * _DET_H:
            continue
        spans.append((imp, lo, hi))
    spans = sorted(spans, reverse=True)[:_MAX_BREAKS]
    if not spans:
        return torch.zeros(0, dtype=_DT)
    lo = torch.tensor([c[1] for c in spans], dtype=_DT)
    hi = torch.tensor([c[2] for c in spans], dtype=_DT)
    done: list[Tensor] = []
    t = torch.linspace(0.0, 1.0, _SUB + 1, dtype=_DT)
    for _ in range(_LEVELS):
        zz = lo[:, None] + (hi - lo)[:, None] * t
        y, g = _eval(f, m + s * zz, fd_scale=s)
        vv = g if use_grad else y
        pz = _phi(zz)
        new = []
        for r in range(zz.shape[0]):
            sub = _clusters(vv[r], pz[r], rms, ev2)
            if not sub:
                done.append(0.5 * (lo[r] + hi[r]).reshape(1))
            new.extend((imp, zz[r, a], zz[r, b]) for a, b, imp in sub)
        new = sorted(new, key=lambda c: -c[0])[:_MAX_BREAKS]
        if not new:
            lo = hi = torch.zeros(0, dtype=_DT)
            break
        lo = torch.stack([c[1] for c in new])
        hi = torch.stack([c[2] for c in new])
    if lo.numel():
        done.append(_bisect_jumps(f, m, s, lo, hi, use_grad))
    return torch.cat(done) if done else torch.zeros(0, dtype=_DT)


def _break_points(f: Callable, m: float, s: float, z: Tensor, y: Tensor, g: Tensor) -> Tensor:
    """Break points (in z) of ``f`` and ``f'`` sampled as ``y``, ``g`` on the detection grid ``z``."""
    none = torch.zeros(0, dtype=_DT)
    bg = _locate(f, m, s, z, g, True, none)
    # a kink of f is a jump of f' (located above): from f itself keep only jumps elsewhere
    bf = _locate(f, m, s, z, y, False, bg)
    b = torch.cat([bg, bf]).sort().values
    if b.numel() == 0:
        return b
    keep = torch.ones_like(b, dtype=torch.bool)
    keep[1:] = (b[1:] - b[:-1]) > 1e-12
    b = b[keep]
    return b[:_MAX_BREAKS] if b.numel() > _MAX_BREAKS else b


# --------------------------------------------------------------------------------------------------
# Moments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointwiseMoments:
    """Gaussian statistics of an elementwise function (see :func:`pointwise_moments`)."""

    rms: float
    mean: float
    grad_rms: float
    corr: float
    grad_corr: float


class LRUCache:
    """A small thread-safe LRU cache keyed on any hashable ``key``."""

    def __init__(self, maxsize: int = 4096) -> None:
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key]
            return default

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        missing = object()
        value = self.get(key, missing)
        if value is missing:
            value = compute()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


_MOMENTS_CACHE = LRUCache(4096)


def clear_cache() -> None:
    """Forget all cached :func:`pointwise_moments` results."""
    _MOMENTS_CACHE.clear()


def _round(v: float) -> float:
    v = float(v)
    return float(f"{v:.12g}") if math.isfinite(v) else v


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0.0 else 0.0


def _wsum(w: Tensor, v: Tensor) -> Tensor:
    return torch.where(w > 0, w * v, torch.zeros((), dtype=_DT)).sum(-1)


def pointwise_moments(
    f: Callable,
    sigma: float,
    corr: float = 0.0,
    mean: float = 0.0,
    n: int = 64,
    *,
    key: Hashable | None = None,
) -> PointwiseMoments:
    """Gaussian statistics of the elementwise function ``f`` for ``x ~ N(mean, sigma^2)``.

    Args:
        f: elementwise torch callable (``torch.tanh``, ``F.gelu``, ``nn.SiLU()``, a lambda...).
            It is called on float64 tensors of quadrature nodes.
        sigma: standard deviation of the input (its RMS when ``mean == 0``), ``>= 0``.
        corr: Gaussian correlation coefficient between the inputs ``x`` and ``y`` of two different
            tokens (same mean and sigma), in ``[-1, 1]``. With ``mean == 0`` this is the
            ``E[xy] / E[x^2]`` of :class:`~unitscale_fx.analysis.record.Stat`; with a mean the
            latter is ``(mean^2 + corr sigma^2) / (mean^2 + sigma^2)``.
        mean: mean of the input.
        n: resolution: number of base panels (16 Gauss–Legendre nodes each) on the standardised
            domain ``[-12, 12]``; break points of ``f``/``f'`` add graded panels on top.
        key: hashable identifying ``f`` for the result cache (default: ``f`` itself by identity,
            which keeps ``f`` alive while cached).

    Returns:
        :class:`PointwiseMoments` of python floats: ``rms = sqrt(E f(x)^2)``, ``mean = E f(x)``,
        ``grad_rms = sqrt(E f'(x)^2)``, ``corr = E[f(x) f(y)] / E[f(x)^2]``,
        ``grad_corr = E[f'(x) f'(y)] / E[f'(x)^2]`` (ratios are 0 when the denominator is 0).

    Raises:
        ValueError: bad ``sigma``/``corr``/``n``, or non-finite moments (``f`` overflows or is
            undefined on part of the Gaussian's support, e.g. ``exp`` at very large sigma).
    """
    sigma, corr, mean, n = _round(sigma), _round(corr), _round(mean), int(n)
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(f"pointwise_moments: sigma must be finite and >= 0, got {sigma}")
    if not (math.isfinite(corr) and -1.0 <= corr <= 1.0):
        raise ValueError(f"pointwise_moments: corr must lie in [-1, 1], got {corr}")
    if not math.isfinite(mean):
        raise ValueError(f"pointwise_moments: mean must be finite, got {mean}")
    if n < 4:
        raise ValueError(f"pointwise_moments: n must be >= 4, got {n}")
    fkey = ("key", key) if key is not None else ("id", id(f))
    ckey = (fkey, sigma, corr, mean, n)
    hit = _MOMENTS_CACHE.get(ckey)
    if hit is not None and (key is not None or hit[0] is f):
        return hit[1]
    res = _compute_moments(f, sigma, corr, mean, n)
    _MOMENTS_CACHE.put(ckey, (f if key is None else None, res))
    return res


def _check_finite(name: str, *vals: float) -> None:
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(
            f"pointwise_moments: non-finite {name} moments {vals}; f overflows or is undefined "
            "on part of the Gaussian's support"
        )


def _compute_moments(f: Callable, s: float, rho: float, m: float, n: int) -> PointwiseMoments:
    if s == 0.0:
        y, g = _eval(f, torch.tensor([m], dtype=_DT))
        fy, gy = float(y[0]), float(g[0])
        _check_finite("point", fy, gy)
        return PointwiseMoments(abs(fy), fy, abs(gy), 1.0 if fy != 0 else 0.0, 1.0 if gy != 0 else 0.0)

    # 1) domain: extend L while the integrand still has mass at the ends (growing f, e.g. exp)
    L = _L_START
    while True:
        nd = int(round(2.0 * L / _DET_H)) + 1
        zd = torch.linspace(-L, L, nd, dtype=_DT)
        yd, gd = _eval(f, m + s * zd, fd_scale=s)
        dens = _phi(zd) * (yd * yd + gd * gd)
        dens = torch.where(torch.isfinite(dens), dens, torch.full((), math.inf, dtype=_DT))
        total = float(dens.sum()) * _DET_H
        end = float(torch.maximum(dens[:8].max(), dens[-8:].max()))
        if L >= _L_MAX or not math.isfinite(total) or total == 0.0 or end <= 1e-17 * total:
            break
        L = min(1.5 * L, _L_MAX)
    n_panels = max(n, int(math.ceil(n * L / _L_START)))

    # 2) break points and the 1-D rule
    breaks = _break_points(f, m, s, zd, yd, gd)
    z, w = _mesh_rule(_edges(L, n_panels, breaks))
    y, g = _eval(f, m + s * z, fd_scale=s)
    e_f = float(_wsum(w, y))
    e_f2 = float(_wsum(w, y * y))
    e_g = float(_wsum(w, g))
    e_g2 = float(_wsum(w, g * g))
    _check_finite("first/second", e_f, e_f2, e_g, e_g2)

    # 3) two-point moments
    if rho == 0.0:
        e_ff, e_gg = e_f * e_f, e_g * e_g
    elif rho == 1.0:
        e_ff, e_gg = e_f2, e_g2
    else:
        c = math.sqrt(1.0 - rho * rho)
        # inner conditional expectations E[f(y) | x], E[f'(y) | x] at every outer node
        inner_f = torch.zeros_like(z)
        inner_g = torch.zeros_like(z)
        cols = (n_panels + breaks.numel() * (2 * _GRADE.numel() + 1)) * _GL_POINTS
        rows = max(1, _CHUNK // cols)
        live = (w > 0).nonzero().flatten()
        for start in range(0, live.numel(), rows):
            ridx = live[start : start + rows]
            z1 = z[ridx, None]
            bz = (breaks[None, :] - rho * z1) / c
            z2, w2 = _mesh_rule(_edges(L, n_panels, bz))
            yy, gg = _eval(f, m + s * (rho * z1 + c * z2), fd_scale=s)
            inner_f[ridx] = _wsum(w2, yy)
            inner_g[ridx] = _wsum(w2, gg)
        e_ff = float(_wsum(w, y * inner_f))
        e_gg = float(_wsum(w, g * inner_g))
        _check_finite("two-point", e_ff, e_gg)

    return PointwiseMoments(
        rms=math.sqrt(max(e_f2, 0.0)),
        mean=e_f,
        grad_rms=math.sqrt(max(e_g2, 0.0)),
        corr=_ratio(e_ff, e_f2),
        grad_corr=_ratio(e_gg, e_g2),
    )


# --------------------------------------------------------------------------------------------------
# Standard functions
# --------------------------------------------------------------------------------------------------

STANDARD: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "exp": torch.exp,  # accurate up to sigma ~ 8; beyond, f(x)^2 overflows (ValueError)
    "softplus": F.softplus,
    "mish": F.mish,
    "elu": F.elu,
    "leaky_relu": F.leaky_relu,  # negative slope 0.01
    "hardtanh": F.hardtanh,
    "abs": torch.abs,
    "square": torch.square,
}


# --------------------------------------------------------------------------------------------------
# sympy integration
# --------------------------------------------------------------------------------------------------

_STATS = {"rms": 1, "mean": 1, "grad_rms": 1, "corr": 2, "grad_corr": 2}
_NONNEG = {"rms", "grad_rms"}
_FUNC_REGISTRY: dict[Hashable, tuple[Any, type]] = {}
_FUNC_LOCK = threading.Lock()


def _numeric(arg: sympy.Basic) -> float | None:
    """The float value of a real numeric sympy expression, else ``None``."""
    if not getattr(arg, "is_number", False):
        return None
    try:
        v = complex(sympy.N(arg, 17))
    except (TypeError, ValueError):
        return None
    if abs(v.imag) > 1e-12 * max(1.0, abs(v.real)) or not math.isfinite(v.real):
        return None
    return v.real


def pointwise_rms_function(
    name: str,
    f: Callable,
    stat: str = "rms",
    *,
    mean: float = 0.0,
    key: Hashable | None = None,
    n: int = 64,
) -> type:
    """A sympy ``Function`` class ``<name>_<stat>`` giving one statistic of ``f`` as a function of sigma.

    ``stat`` is one of ``"rms"``, ``"mean"``, ``"grad_rms"`` (called as ``F(sigma)``) or
    ``"corr"``, ``"grad_corr"`` (called as ``F(sigma, corr)``); the input is
    ``x ~ N(mean, sigma^2)``, see :func:`pointwise_moments`. ``F(1)``/``F(0.5)``/``F(sqrt(2))``
    evaluate at construction to a sympy ``Float``; ``F(sigma)`` with a symbol stays symbolic
    (printed ``gelu_rms(sigma)``) and evaluates after ``subs``, with ``.evalf()``, ``float()`` or
    ``sympy.lambdify`` (scalar arguments). ``rms``/``grad_rms`` are known nonnegative.

    Repeated calls with the same ``(name, stat, mean, n)`` and the same ``f`` (or ``key``) return
    the same class, so expressions built in different places compare equal.
    """
    if stat not in _STATS:
        raise ValueError(f"pointwise_rms_function: stat must be one of {sorted(_STATS)}, got {stat!r}")
    nargs = _STATS[stat]
    mean = _round(mean)
    fkey = ("key", key) if key is not None else ("id", id(f))
    reg_key = (name, stat, mean, int(n), fkey)
    with _FUNC_LOCK:
        hit = _FUNC_REGISTRY.get(reg_key)
        if hit is not None and (key is not None or hit[0] is f):
            return hit[1]

    def value(*vals: float) -> float:
        sigma = vals[0]
        if sigma < 0:
            raise ValueError(f"{name}_{stat}: sigma must be >= 0, got {sigma}")
        corr = vals[1] if nargs == 2 else 0.0
        res = pointwise_moments(f, sigma, corr=corr, mean=mean, n=n, key=key)
        return float(getattr(res, stat))

    def eval_(cls, *args):  # noqa: ANN001 - sympy hook
        vals = [_numeric(a) for a in args]
        if any(v is None for v in vals):
            return None
        return sympy.Float(value(*vals))

    def _eval_evalf(self, prec):  # noqa: ANN001 - sympy hook
        vals = [_numeric(a.evalf(prec)) for a in self.args]
        if any(v is None for v in vals):
            return None
        return sympy.Float(value(*vals), prec)

    attrs: dict[str, Any] = {
        "nargs": nargs,
        "eval": classmethod(eval_),
        "_eval_evalf": _eval_evalf,
        "_imp_": staticmethod(lambda *a: value(*(float(v) for v in a))),
        "_eval_is_real": lambda self: True,
        "__module__": __name__,
        "__doc__": f"Gaussian {stat} of {name} as a function of "
        + ("sigma." if nargs == 1 else "(sigma, corr)."),
    }
    if stat in _NONNEG:
        attrs["_eval_is_nonnegative"] = lambda self: True
        attrs["_eval_is_extended_nonnegative"] = lambda self: True
    cls = type(f"{name}_{stat}", (sympy.Function,), attrs)
    with _FUNC_LOCK:
        hit = _FUNC_REGISTRY.get(reg_key)
        if hit is not None and (key is not None or hit[0] is f):
            return hit[1]
        _FUNC_REGISTRY[reg_key] = (f if key is None else None, cls)
    return cls


def pointwise_grad_rms_function(name: str, f: Callable, **kwargs: Any) -> type:
    """``pointwise_rms_function(name, f, "grad_rms", ...)``: the class ``<name>_grad_rms``."""
    return pointwise_rms_function(name, f, "grad_rms", **kwargs)
