"""A short Markdown report of a sweep: grid, progress, key metrics, plots, failed cells.

Built only from the sweep file and the cell records, so rerunning a finished sweep rewrites
the very same report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.experiments.results import atomic_write_text

if TYPE_CHECKING:
    from medfed.experiments.sweep.spec import SweepSpec
    from medfed.experiments.sweep.table import SweepOutcome

#: (metric, column header, multiplier, format) of the key-metrics table.
KEY_METRICS = (
    ("accuracy", "accuracy", 1.0, "{:.4f}"),
    ("auc", "AUC", 1.0, "{:.4f}"),
    ("reference_accuracy", "reference acc.", 1.0, "{:.4f}"),
    ("majority_accuracy", "majority acc.", 1.0, "{:.4f}"),
    ("encryption_cost_pp", "enc. cost (pp)", 1.0, "{:+.2f}"),
    ("plaintext_accuracy", "same-schedule acc.", 1.0, "{:.4f}"),
    ("approximation_gap_pp", "approx. gap (pp)", 1.0, "{:+.2f}"),
    ("epsilon", "epsilon", 1.0, "{:.2f}"),
    ("mia_auc", "attack AUC", 1.0, "{:.3f}"),
    ("mia_tpr_at_1fpr", "attack TPR@1%FPR", 1.0, "{:.3f}"),
    ("wall_seconds", "wall (s)", 1.0, "{:.1f}"),
    ("bytes_up", "up (MB)", 1 / 2**20, "{:.1f}"),
    ("bytes_down", "down (MB)", 1 / 2**20, "{:.1f}"),
)
AVERAGED = ("seed",)  # knobs the key-metrics table averages over
#: One line per column of the key-metrics table, printed under it.
KEY_NOTES = (
    "accuracy, AUC: the trained (encrypted) head on the evaluating hospitals' test samples "
    "(AUC: binary ROC AUC, or macro one-vs-rest AUC of the softmax of the scores)",
    "reference acc.: a tuned plaintext model (StandardScaler + LogisticRegressionCV) on the "
    "pooled plaintext train embeddings of the hospitals trained on, same test samples",
    "majority acc.: always predicting the most frequent train label",
    "enc. cost (pp): reference acc. - accuracy, in percentage points: what encryption and "
    "the federated schedule cost (the headline)",
    "same-schedule acc.: the same training schedule on plaintext (mode updates: plain FedAvg)",
    "approx. gap (pp): accuracy - same-schedule acc.: the CKKS approximation alone (and the "
    "DP noise, in a DP cell: its same-schedule run has no noise; mode updates: plain FedAvg "
    "without DP, mode embeddings: the DP schedule without its noise)",
    "epsilon: the differential privacy the run reached (delta in metrics.json; - : no DP)",
    "attack AUC, TPR@1%FPR: a loss-threshold membership attack on the released head, train vs "
    "held-out samples (0.5 and 0.01 are chance)",
)


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines += ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows]
    return lines


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(v):
        return None
    return float(v)


def _summary(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return fmt.format(m)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return f"{fmt.format(m)} ± {fmt.format(sd).lstrip('+')}"


def _first_line(text: str, limit: int = 300) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def render(spec: SweepSpec, outcome: SweepOutcome) -> str:
    """The sweep's Markdown report: grid, progress, key metrics, plots and failed cells."""
    cells, records = outcome.cells, outcome.records
    done = [c for c in cells if records.get(c.cell_id, {}).get("status") == "done"]
    failed = [c for c in cells if records.get(c.cell_id, {}).get("status") == "failed"]
    missing = [c for c in cells if c.cell_id not in records]
    out: list[str] = [f"# Sweep `{spec.name}`", ""]
    if spec.description:
        out += [spec.description, ""]
    out += [
        f"- sweep file: `{spec.source}`; rerun or resume with "
        f"`python -m medfed.sweep {spec.source} --out {outcome.out}`",
        f"- cells: {len(cells)} — done {len(done)}, failed {len(failed)}, not run {len(missing)}",
        "- results: [results.csv](results.csv) (a row per cell, every knob and metric), "
        "[results.jsonl](results.jsonl); per cell: `cells/<id>.json`, `runs/<id>/`",
    ]
    total = sum(_num(records[c.cell_id].get("seconds")) or 0.0 for c in done + failed)
    if total:
        out.append(f"- compute: {total:,.0f} cell-seconds")
    untrained = [
        c for c in done if (records[c.cell_id]["metrics"] or {}).get("backbone_pretrained") is False
    ]
    if untrained:
        out.append(
            f"- **{len(untrained)} cell(s) used an untrained (random-init) backbone**: their "
            "absolute accuracy is not representative; the encryption gap still is."
        )
    out += ["", "## Grid", ""]
    grid_rows = [[k, ", ".join(map(str, v))] for k, v in spec.grid.items()]
    out += _table(["knob", "values"], grid_rows) if grid_rows else ["(no grid: one cell)"]
    if spec.base:
        out += ["", "Fixed: " + ", ".join(f"`{k}={v}`" for k, v in spec.base.items())]
    if spec.exclude:
        excl = "; ".join(", ".join(f"{k}={v}" for k, v in e.items()) for e in spec.exclude)
        out += ["", f"Excluded combinations: {excl}"]

    out += ["", "## Key metrics", ""]
    if done:
        out += _key_metrics(spec, done, records)
    else:
        out.append("No cell has finished yet.")

    tradeoff = _tradeoff(done, records)
    if tradeoff:
        out += ["", "## Privacy / accuracy trade-off", "", *tradeoff]

    written = [p for p in outcome.plots if p.path is not None]
    skipped = [p for p in outcome.plots if p.path is None]
    out += ["", "## Plots", ""]
    for p in written:
        rel = Path(p.path).relative_to(outcome.out).as_posix()
        out += [f"![{p.title}]({rel})", ""]
    if not written:
        out += ["No plot: the grid varies none of the plotted knobs.", ""]
    if skipped:
        out.append("Skipped: " + "; ".join(f"{p.name} ({p.skipped})" for p in skipped) + ".")

    if failed:
        out += ["", "## Failed cells", ""]
        rows = [
            [f"`{c.cell_id}`", c.label(), _first_line(records[c.cell_id]["error"])] for c in failed
        ]
        out += _table(["cell", "knobs", "error"], rows)
        out += ["", "Full tracebacks: `cells/<id>.json`. Rerunning the sweep retries them."]
    if missing:
        out += ["", f"Not run yet: {len(missing)} cell(s); rerun the command above to resume."]
    return "\n".join(out).rstrip() + "\n"


def _tradeoff(done: list, records: dict) -> list[str]:
    """The trade-off in plain words, per mode and key setup: accuracy and the membership
    attack without DP and at each epsilon (means over the other knobs)."""
    groups: dict[tuple, dict[Any, list[dict]]] = {}
    for c in done:
        m = records[c.cell_id]["metrics"] or {}
        if m.get("mia_auc") is None:
            continue
        target = c.knobs.get("dp_epsilon")
        groups.setdefault((m.get("mode"), m.get("keys")), {}).setdefault(target, []).append(m)
    lines = []
    for (mode, keys), by_eps in groups.items():
        if len(by_eps) < 2:
            continue

        def mean(ms: list[dict], key: str) -> float:
            vals = [_num(m.get(key)) for m in ms]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        order = sorted(by_eps, key=lambda e: -math.inf if e is None else -float(e))
        parts = []
        for eps in order:
            ms = by_eps[eps]
            what = "without DP" if eps is None else f"at epsilon {mean(ms, 'epsilon'):.2f}"
            parts.append(
                f"{what} accuracy {mean(ms, 'accuracy'):.3f}, attack AUC {mean(ms, 'mia_auc'):.3f}"
            )
        first, last = by_eps[order[0]], by_eps[order[-1]]
        cost = 100 * (mean(first, "accuracy") - mean(last, "accuracy"))
        lines.append(
            f"- mode {mode}, keys {keys}: " + "; ".join(parts) + f". Going from the first to "
            f"the last costs {cost:+.1f} pp of accuracy and moves the attack's AUC from "
            f"{mean(first, 'mia_auc'):.3f} to {mean(last, 'mia_auc'):.3f} (0.5 means the "
            "attack cannot tell members from non-members)."
        )
    if lines:
        lines += [
            "",
            "Smaller epsilon means more noise: the head protects each training record better "
            "and learns less. Encryption protects the data from the aggregator in every cell; "
            "only differential privacy protects it from whoever receives the head.",
        ]
    return lines


def _key_metrics(spec: SweepSpec, done: list, records: dict) -> list[str]:
    shown = [k for k in spec.varying if k not in AVERAGED]
    averaged = [k for k in spec.varying if k in AVERAGED]
    groups: dict[tuple, list] = {}
    for c in done:
        groups.setdefault(tuple(c.knobs.get(k) for k in shown), []).append(c)
    single = all(len(g) == 1 for g in groups.values())
    header = [*shown, "cell" if single else "cells"] + [h for _, h, _, _ in KEY_METRICS]
    rows = []
    for key, members in groups.items():
        row: list[Any] = list(key)
        row.append(f"`{members[0].cell_id}`" if single else len(members))
        for metric, _, mult, fmt in KEY_METRICS:
            vals = [_num((records[c.cell_id]["metrics"] or {}).get(metric)) for c in members]
            row.append(_summary([v * mult for v in vals if v is not None], fmt))
        rows.append(row)
    lines = _table(header, rows)
    if averaged and not single:
        lines += ["", f"Mean ± sd over {', '.join(averaged)}."]
    lines += ["", *(f"- {note}" for note in KEY_NOTES)]
    return lines


def write_report(path: str | Path, spec: SweepSpec, outcome: SweepOutcome) -> Path:
    """Write :func:`render`'s report to ``path`` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render(spec, outcome))
    return path
