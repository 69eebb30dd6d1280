"""Plot the scale of every edge of one or more :class:`~unitscale_fx.report.Report` objects.

    from unitscale_fx.plot import plot_scales
    plot_scales([unitscale_fx.track(model, batch, original=True), unitscale_fx.track(model, batch)],
                "scales.png")

Needs matplotlib (``pip install 'unitscale_fx[plot]'``); it is imported only when plotting.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from .report import Report

__all__ = ["plot_scales", "BANDS", "is_intermediate"]

#: Representable ranges drawn as horizontal bands: (label, log2 smallest subnormal, log2 largest
#: finite value, colour), widest first.
BANDS = (
    ("FP16", -24.0, math.log2(65504.0), "#d9d9d9"),
    ("FP8 E5M2", -16.0, math.log2(57344.0), "#c6dbef"),
    ("FP8 E4M3", -9.0, math.log2(448.0), "#c7e9c0"),
)


def _pyplot():
    try:
        import matplotlib

        if "matplotlib.pyplot" not in __import__("sys").modules:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib: pip install 'unitscale_fx[plot]' (or pip install matplotlib)"
        ) from e
    return plt


def is_intermediate(node: Any, direction: str) -> bool:
    """Whether an edge of a transformed graph is a *pre-scale intermediate*: a value or gradient
    that only exists between an op and the scale the transform put right after it, which no matmul
    consumes and which ``torch.compile`` fuses away:

    * forward: a value the transform scales right after it (``linear -> mul(1/σ)``: the node carries
      a ``fwd`` factor but is not itself an inserted scale), and ``grad_scale`` nodes (the
      identity in the forward pass: a copy of their input);
    * backward: the gradient arriving at a ``grad_scale`` node, before it is multiplied.
    """
    if node.op == "grad_scale":
        return True
    return direction == "fwd" and "fwd" in node.factors and node.role is None


def _series(report: Report, direction: str, source: str,
            which: str = "all") -> tuple[list[int], list[float], list[int]]:
    """(x, log2 sigma, x of inf/nan) of the activation edges of ``report``; ``which``: ``"all"``,
    ``"main"`` (no pre-scale intermediates) or ``"intermediate"``."""
    xs, ys, bad = [], [], []
    for i, node in enumerate(report.edges()):
        if which != "all" and (which == "intermediate") != is_intermediate(node, direction):
            continue
        st = getattr(node, direction)
        v = getattr(st, source) if st is not None else None
        if v is None or v == 0:
            continue
        if not math.isfinite(v) or v < 0:
            bad.append(i)
            continue
        xs.append(i)
        ys.append(math.log2(v))
    return xs, ys, bad


def _in_band(report: Report, direction: str, source: str, which: str) -> tuple[float | None, int]:
    ys = _series(report, direction, source, which)[1]
    return (sum(1 for y in ys if abs(y) <= 1) / len(ys) if ys else None), len(ys)


def _layer_of(stack: list[str]) -> str:
    """The outermost module of the stack that is an item of a layer list (``transformer.h.3``)."""
    for path in stack:
        if path.rsplit(".", 1)[-1].isdigit():
            return path
    return ""


def _blocks(report: Report) -> list[tuple[int, int, str]]:
    """Runs of consecutive edges inside the same repeated layer: (start, end, label)."""
    out: list[tuple[int, int, str]] = []
    for i, node in enumerate(report.edges()):
        top = _layer_of(node.module_stack)
        if out and out[-1][2] == top:
            out[-1] = (out[-1][0], i, top)
        else:
            out.append((i, i, top))
    # absorb stray short runs (a skip connection scaled inside the next layer) into their neighbours
    merged: list[tuple[int, int, str]] = []
    for k, b in enumerate(out):
        short = b[1] - b[0] < 2 and 0 < k < len(out) - 1
        if merged and (merged[-1][2] == b[2] or short):
            merged[-1] = (merged[-1][0], b[1], merged[-1][2])
        else:
            merged.append(b)
    return [b for b in merged if b[2]]


def plot_scales(reports: Report | Sequence[Report], path: str | os.PathLike, *, title: str | None = None,
                dpi: int = 120) -> str:
    """Draw log2 σ of every activation edge, forward (top row) and backward (bottom row), one
    column per report (e.g. original and transformed), over the representable ranges of FP8 E4M3,
    FP8 E5M2 and FP16. Measured values are dots, predictions a line; on a transformed graph the
    pre-scale intermediates (:func:`is_intermediate`, e.g. a matmul's output before the ``× 1/σ``
    right after it) are drawn as open grey circles, off the line, and left out of the in-band
    fractions in the titles. Returns ``path``."""
    if isinstance(reports, Report):
        reports = [reports]
    reports = list(reports)
    if not reports:
        raise ValueError("plot_scales needs at least one report")
    plt = _pyplot()

    all_y: list[float] = []
    for r in reports:
        for d in ("fwd", "bwd"):
            for src in ("predicted", "measured"):
                all_y += _series(r, d, src)[1]
    lo = min([*all_y, -12.0]) - 1.0
    hi = max([*all_y, 12.0]) + 1.0
    lo, hi = max(lo, -40.0), min(hi, 40.0)

    ncol = len(reports)
    fig, axes = plt.subplots(2, ncol, figsize=(6.5 * ncol + 1.5, 7.5), sharey=True, squeeze=False)
    for col, r in enumerate(reports):
        blocks = _blocks(r)
        n_edges = len(r.edges())
        for row, (d, label) in enumerate((("fwd", "forward (values)"), ("bwd", "backward (gradients)"))):
            ax = axes[row][col]
            for name, blo, bhi, colour in BANDS:
                ax.axhspan(blo, bhi, color=colour, alpha=0.55, lw=0, zorder=0,
                           label=f"{name} range" if (row == 0 and col == 0) else None)
            ax.axhspan(-1, 1, color="#fdd49e", alpha=0.5, lw=0, zorder=0.5,
                       label="σ in [1/2, 2]" if (row == 0 and col == 0) else None)
            ax.axhline(0.0, color="black", lw=0.8, ls="--", zorder=1)
            for k, (b0, b1, name) in enumerate(blocks):
                if k % 2 == 0:
                    ax.axvspan(b0 - 0.5, b1 + 0.5, color="black", alpha=0.04, lw=0, zorder=0.6)
                if row == 0 and b1 - b0 >= max(3, n_edges // 40):
                    ax.text((b0 + b1) / 2, lo + 0.3, ".".join(name.split(".")[-2:]),
                            ha="center", va="bottom", fontsize=7, color="0.35", clip_on=True)
            has_inter = bool(_series(r, d, "predicted", "intermediate")[0] or
                             (r.measured and _series(r, d, "measured", "intermediate")[0]))
            src_inter = "measured" if r.measured else "predicted"
            xi, yi, _ = _series(r, d, src_inter, "intermediate")
            if xi:
                ax.scatter(xi, yi, s=10, facecolors="none", edgecolors="0.55", linewidths=0.6, zorder=2,
                           label="before an inserted scale (fused away)")
            xs, ys, _ = _series(r, d, "predicted", "main")
            if xs:
                ax.plot(xs, ys, color="0.25", lw=0.9, alpha=0.9, zorder=2, label="predicted")
            if r.measured:
                xs, ys, bad = _series(r, d, "measured", "main")
                colour = "tab:blue" if d == "fwd" else "tab:red"
                ax.scatter(xs, ys, s=9, color=colour, zorder=3, label="measured")
                bad += _series(r, d, "measured", "intermediate")[2]
                if bad:
                    ax.scatter(bad, [hi - 0.5] * len(bad), marker="^", color="black", s=20, zorder=4,
                               label="inf / nan")
            ax.set_ylim(lo, hi)
            ax.set_xlim(-1, max(n_edges, 1))
            ax.grid(True, axis="y", alpha=0.3)
            if col == 0:
                ax.set_ylabel(f"{label}\nlog2 σ (RMS)")
            if row == 1:
                ax.set_xlabel("edge index along the graph (activations, graph order)")
            if row == 0:
                src = "measured" if r.measured else "predicted"
                pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
                (fb, nf), (bb, nb) = _in_band(r, "fwd", src, "main"), _in_band(r, "bwd", src, "main")
                ax.set_title(f"{r.model}: {r.graph} graph ({src})\n"
                             f"σ in [1/2, 2]: fwd {pct(fb)} of {nf}, bwd {pct(bb)} of {nb} edges"
                             + (" (open circles left out)" if has_inter else ""), fontsize=10)
    # one legend for the whole figure, above it (the axes stay clear for the data)
    seen: dict[str, Any] = {}
    for row in axes:
        for ax in row:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab == "measured":
                    lab = "measured (fwd)" if ax in axes[0] else "measured (bwd)"
                seen.setdefault(lab, h)
    order = ["FP16 range", "FP8 E5M2 range", "FP8 E4M3 range", "σ in [1/2, 2]", "predicted", "measured (fwd)",
             "measured (bwd)", "before an inserted scale (fused away)", "inf / nan"]
    labels = [lab for lab in order if lab in seen]
    fig.legend([seen[lab] for lab in labels], labels, loc="upper center", ncol=min(len(labels), 5), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title or "", y=1.02 if title else None)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    out = os.fspath(path)
    fig.savefig(out, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return out


_ = Any
