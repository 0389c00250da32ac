"""Sweep plots a paper would use, as PNG files (matplotlib Figure + Agg canvas, no pyplot).

- accuracy vs CKKS preset, vs sigmoid degree, vs alpha: three panels each, (1) absolute test
  accuracy of the encrypted head (solid, markers) with the tuned plaintext reference (dashed)
  and the majority-class rate (dotted) of the same cells, so that a grid where nothing learned
  never looks like "encryption costs nothing"; (2) the encryption cost (pp, reference minus
  encrypted), the headline; (3) the approximation gap (pp, encrypted minus the same-schedule
  plaintext run), which isolates CKKS
- the privacy / accuracy trade-off vs the DP target epsilon (cells without DP as "no DP"):
  accuracy with the same yardsticks, the membership attack's AUC and TPR at 1 % FPR
- accuracy, wall time and bytes per key setup
- wall / federation seconds vs hospitals, bytes up / down vs hospitals

One line per key setup / mode (and per other privacy knob that varies), mean +- sd over every
other varying knob (seeds, ...). A plot whose x knob the grid does not vary is skipped with a
reason, never an error.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.experiments.sweep.spec import knob_names


@dataclass(frozen=True)
class PlotSpec:
    """What one sweep plot shows: knob ``x`` on the x axis, one panel per metric of ``panels``.

    One line per combination of the ``series`` knobs the grid varies; ``where`` keeps only the
    rows with those values, ``overlays`` adds yardstick lines to a panel, and ``categorical`` spaces
    the x values evenly (names such as presets, not numbers).
    """

    name: str
    title: str
    x: str
    x_label: str
    panels: tuple[tuple[str, str, float], ...]  # (metric column, y label, multiplier)
    series: tuple[str, ...]
    categorical: bool = False
    zero_line: bool = False  # a dashed 0 on the panels of differences (metrics "*_pp")
    where: tuple[tuple[str, Any], ...] = ()  # only rows with these values
    # (panel metric, metric, label, line style, marker): more lines on that panel, per series
    overlays: tuple[tuple[str, str, str, str, str], ...] = ()
    none_label: str | None = None  # show rows whose x is unset under this label (else skipped)


@dataclass(frozen=True)
class Plot:
    """A written plot (``path``) or a skipped one (``skipped`` says why)."""

    name: str
    title: str
    path: Path | None = None
    skipped: str | None = None


MB = 1 / 2**20
ACCURACY = (
    ("accuracy", "test accuracy: encrypted (o), reference (--), majority (:)", 1.0),
    ("encryption_cost_pp", "encryption cost (pp), tuned reference - encrypted", 1.0),
    ("approximation_gap_pp", "approximation gap (pp), encrypted - same schedule", 1.0),
)
YARDSTICKS = (
    ("accuracy", "reference_accuracy", "tuned reference", "--", "_"),
    ("accuracy", "majority_accuracy", "majority class", ":", "x"),
)
#: Names of plots earlier versions wrote; a sweep rerun into the same --out removes them.
RETIRED = ("gap_vs_ckks", "gap_vs_sigmoid_degree", "gap_vs_alpha")

PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec(
        "accuracy_vs_ckks",
        "Accuracy and encryption cost vs CKKS parameters",
        "ckks",
        "CKKS preset",
        ACCURACY,
        ("sigmoid_degree", "keys", "mode"),
        categorical=True,
        zero_line=True,
        overlays=YARDSTICKS,
    ),
    PlotSpec(
        "accuracy_vs_sigmoid_degree",
        "Accuracy and encryption cost vs sigmoid polynomial degree",
        "sigmoid_degree",
        "sigmoid approximation degree",
        ACCURACY,
        ("ckks", "keys", "mode"),
        zero_line=True,
        overlays=YARDSTICKS,
    ),
    PlotSpec(
        "accuracy_vs_alpha",
        "Accuracy and encryption cost vs label skew (Dirichlet alpha)",
        "alpha",
        "Dirichlet alpha (smaller = more skew)",
        ACCURACY,
        ("keys", "mode", "ckks"),
        zero_line=True,
        where=(("split", "dirichlet"),),
        overlays=YARDSTICKS,
    ),
    PlotSpec(
        "accuracy_vs_epsilon",
        "Privacy / accuracy trade-off: accuracy and membership attack vs epsilon",
        "dp_epsilon",
        "differential privacy target epsilon (smaller = more private)",
        (
            ("accuracy", "test accuracy: trained (o), reference (--), majority (:)", 1.0),
            ("mia_auc", "membership attack AUC (0.5: chance)", 1.0),
            ("mia_tpr_at_1fpr", "attack TPR at 1% FPR (0.01: chance)", 1.0),
        ),
        ("keys", "mode"),
        categorical=True,
        overlays=YARDSTICKS,
        none_label="no DP",
    ),
    PlotSpec(
        "accuracy_and_cost_vs_keys",
        "Accuracy and cost per key setup",
        "keys",
        "key setup",
        (
            ("accuracy", "test accuracy: trained (o), reference (--), majority (:)", 1.0),
            ("wall_seconds", "wall time per run (s)", 1.0),
            ("bytes_up", "hospitals -> aggregator (MB)", MB),
        ),
        ("mode", "dp_epsilon"),
        categorical=True,
        overlays=YARDSTICKS,
    ),
    PlotSpec(
        "time_vs_hospitals",
        "Time vs hospitals",
        "hospitals",
        "hospitals",
        (
            ("wall_seconds", "wall time per run (s)", 1.0),
            ("federation_seconds", "encrypted federation (s)", 1.0),
        ),
        ("keys", "mode", "ckks"),
    ),
    PlotSpec(
        "bytes_vs_hospitals",
        "Bytes vs hospitals",
        "hospitals",
        "hospitals",
        (
            ("bytes_up", "hospitals -> aggregator (MB)", MB),
            ("bytes_down", "aggregator -> hospitals (MB)", MB),
        ),
        ("keys", "mode", "ckks"),
    ),
)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return None if math.isnan(v) else float(v)


def _distinct(rows: list[dict], key: str) -> list[Any]:
    seen: list[Any] = []
    for r in rows:
        v = r.get(key)
        if v is not None and v != "" and v not in seen:
            seen.append(v)
    return seen


def _mean_sd(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, format="png", metadata={"Software": None})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_one(spec: PlotSpec, rows: list[dict], out_dir: Path) -> Plot:
    """Draw ``spec`` from done rows, or return a skipped :class:`Plot` saying why."""
    rows = [r for r in rows if all(r.get(k) == v for k, v in spec.where)]
    if spec.none_label is not None:
        rows = [
            r if r.get(spec.x) not in (None, "") else {**r, spec.x: spec.none_label} for r in rows
        ]
    xs = _distinct(rows, spec.x)
    if len(xs) < 2:
        why = " with " + ", ".join(f"{k}={v}" for k, v in spec.where) if spec.where else ""
        return Plot(spec.name, spec.title, skipped=f"the grid does not vary {spec.x}{why}")
    panels = [p for p in spec.panels if any(_number(r.get(p[0])) is not None for r in rows)]
    if not panels:
        metrics = ", ".join(p[0] for p in spec.panels)
        return Plot(spec.name, spec.title, skipped=f"no numeric {metrics} in the results")
    if not spec.categorical:
        if any(_number(x) is None for x in xs):
            return Plot(spec.name, spec.title, skipped=f"{spec.x} values are not numeric")
        xs = sorted(xs)
    series = [k for k in spec.series if len(_distinct(rows, k)) > 1]
    averaged = [
        k for k in knob_names() if k != spec.x and k not in series and len(_distinct(rows, k)) > 1
    ]

    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas on save

    fig = Figure(figsize=(5.6 * len(panels), 4.2))
    axes = fig.subplots(1, len(panels), squeeze=False)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in series), []).append(r)
    fixed = ", ".join(f"{k}={rows[0].get(k)}" for k in ("keys", "mode") if k not in series)
    for ax, (metric, label, mult) in zip(axes[0], panels, strict=True):
        extra = [o[1:] for o in spec.overlays if o[0] == metric]
        for skey, members in groups.items():
            name = ", ".join(f"{k}={v}" for k, v in zip(series, skey, strict=True)) or fixed
            name = name or "all cells"
            line = _series(members, spec, xs, metric, mult)
            color = None
            if line:
                drawn = ax.errorbar(*line, marker="o", capsize=3, label=name)
                color = drawn[0].get_color()
            for other, what, style, marker in extra:
                more = _series(members, spec, xs, other, mult)
                if more:
                    ax.errorbar(
                        *more,
                        linestyle=style,
                        marker=marker,
                        markersize=9,
                        color=color,
                        capsize=2,
                        alpha=0.8,
                        label=f"{name}: {what}" if len(groups) > 1 else what,
                    )
        if spec.zero_line and metric.endswith("_pp"):
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        if spec.categorical:
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
            ax.set_xlim(-0.5, len(xs) - 0.5)
        elif all(isinstance(x, int) for x in xs):
            ax.set_xticks(xs)
        ax.set_xlabel(spec.x_label)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    note = f" (mean +- sd over {', '.join(averaged)})" if averaged else ""
    fig.suptitle(spec.title + note, fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / f"{spec.name}.png"
    _save(fig, path)
    return Plot(spec.name, spec.title, path=path)


def _series(
    members: list[dict], spec: PlotSpec, xs: list[Any], metric: str, mult: float
) -> tuple[list, list, list] | None:
    """(x positions, means, sds) of ``metric`` over ``members`` at each x; None if no value."""
    px, py, pe = [], [], []
    for i, x in enumerate(xs):
        ys = [_number(r.get(metric)) for r in members if r.get(spec.x) == x]
        ys = [y * mult for y in ys if y is not None]
        if ys:
            m, sd = _mean_sd(ys)
            px.append(i if spec.categorical else x)
            py.append(m)
            pe.append(sd)
    return (px, py, pe) if px else None


def make_plots(rows: list[dict], out_dir: str | Path) -> list[Plot]:
    """Every plot in :data:`PLOTS` from the done rows of a results table (others are ignored).

    A plot that cannot be drawn is returned as skipped; stale PNGs of skipped plots are removed.
    """
    out_dir = Path(out_dir)
    done = [r for r in rows if r.get("status") == "done"]
    plots = []
    for spec in PLOTS:
        plot = plot_one(spec, done, out_dir)
        if plot.path is None:
            (out_dir / f"{spec.name}.png").unlink(missing_ok=True)
        plots.append(plot)
    for name in RETIRED:
        (out_dir / f"{name}.png").unlink(missing_ok=True)
    return plots
