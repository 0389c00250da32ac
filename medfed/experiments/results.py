"""Run outputs: metrics.json, the resolved config, per-round records, and the summary table.

Files are written atomically (temp file + rename), so a killed run never leaves a half-written
file that a rerun would trust.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from medfed.result import RunResult, jsonable


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that readers see the old file or the whole new one, never a part.

    The text goes to a hidden temporary file in the same directory (``.<name>.*.tmp``, which
    no reader looks at), is flushed to disk, then renamed over ``path`` (atomic on POSIX). A
    run killed before the rename leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run(
    out: Path, config: dict, metrics: RunResult | Mapping[str, Any], rounds: list[dict]
) -> None:
    """Write ``config.yaml``, ``rounds.jsonl`` and, last, ``metrics.json`` (a RunResult's
    :meth:`~medfed.result.RunResult.to_json`; NaN/Inf as null) into ``out``."""
    out = Path(out)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(out / "rounds.jsonl", "".join(json.dumps(r) + "\n" for r in rounds))
    atomic_write_text(out / "metrics.json", RunResult.from_metrics(metrics).to_json())


_finite = jsonable  # NaN/Inf become null: metrics.json stays standard JSON


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def _num(value: Any, fmt: str) -> str:
    """``fmt`` of a number; "n/a" for None/NaN (a metric that is undefined for this run)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return fmt.format(value)


#: One line per accuracy row of the summary tables (printed as the table's caption).
YARDSTICK_NOTES = (
    "accuracy, AUC: the {head}, on the evaluators' test samples",
    "AUC: binary ROC AUC; several classes: macro one-vs-rest AUC of the softmax",
    "tuned reference: scaled LogisticRegressionCV, pooled plaintext train data",
    "majority class: always predict the most frequent train label",
    "encryption cost: reference accuracy - accuracy, in pp (the headline)",
    "{same_row}: {same}",
    "approximation gap: accuracy - {same_row}, in pp (CKKS alone)",
    "membership attacks: train vs test samples (0.5 / 0.01: chance); ART: trained on half",
)


def _yardstick_rows(t: Table, metrics: dict[str, Any], head: str, same: str) -> None:
    m = metrics
    t.add_row(f"accuracy ({head})", _num(m.get("accuracy"), "{:.4f}"))
    t.add_row(f"AUC ({head})", _num(m.get("auc"), "{:.4f}"))
    t.add_row(
        "tuned plaintext reference (acc. / AUC)",
        f"{_num(m.get('reference_accuracy'), '{:.4f}')} / {_num(m.get('reference_auc'), '{:.4f}')}",
    )
    t.add_row("majority class (acc.)", _num(m.get("majority_accuracy"), "{:.4f}"))
    t.add_row(
        "[bold]encryption cost (pp)[/bold]",
        f"[bold]{_num(m.get('encryption_cost_pp'), '{:+.2f}')}[/bold]",
    )
    t.add_row(
        f"{same} (acc. / AUC)",
        f"{_num(m.get('plaintext_accuracy'), '{:.4f}')} / {_num(m.get('plaintext_auc'), '{:.4f}')}",
    )
    t.add_row("approximation gap (pp)", _num(m.get("approximation_gap_pp"), "{:+.2f}"))


def _caption(head: str, same_row: str, same: str) -> str:
    return "\n".join(n.format(head=head, same_row=same_row, same=same) for n in YARDSTICK_NOTES)


def _mb_or_na(n: Any) -> str:
    return "n/a" if n is None else _mb(int(n))


def run_table(
    metrics: Mapping[str, Any],
    title: str | None = None,
    *,
    head: str = "federated head",
    row_head: str | None = None,
    same: str = "same-schedule plaintext",
    same_note: str = "the same schedule on plaintext",
    before: Sequence[tuple[str, str]] = (),
    between: Sequence[tuple[str, str]] = (),
    after: Sequence[tuple[str, str]] = (),
) -> Table:
    """A run's summary table: the data, ``before``, the accuracy rows (of the ``head``
    against ``same``, the same-schedule plaintext run), ``between``, wall time, traffic and
    ``after`` (extra (metric, value) rows). ``title`` defaults to hospitals, mode and keys."""
    m = metrics
    t = Table(
        title=title or f"medfed: {m['hospitals']} hospitals, mode {m['mode']}, {m['keys']} keys",
        caption=_caption(head, same, same_note),
        caption_justify="left",
    )
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("dataset", f"{m.get('dataset')} ({m.get('n_classes')} classes)")
    t.add_row("backbone", f"{m.get('backbone')} ({m.get('backbone_weights')})")
    for row in small_bucket_rows(m):
        t.add_row(*row)
    for row in before:
        t.add_row(*row)
    _yardstick_rows(t, m, row_head or head, same)
    for row in between:
        t.add_row(*row)
    if m.get("mia_auc") is not None:
        attack = f"{m['mia_auc']:.3f} / {_num(m.get('mia_tpr_at_1fpr'), '{:.3f}')}"
        t.add_row("membership attack, loss threshold (AUC / TPR at 1% FPR)", attack)
    if m.get("mia_blackbox_auc") is not None:
        attack = (
            f"{m['mia_blackbox_auc']:.3f} / {_num(m.get('mia_blackbox_tpr_at_1fpr'), '{:.3f}')}"
        )
        t.add_row("membership attack, ART black box (AUC / TPR at 1% FPR)", attack)
    t.add_row("wall time", _num(m.get("wall_seconds"), "{:.1f} s"))
    t.add_row("bytes up (hospitals -> aggregator)", _mb_or_na(m.get("bytes_up")))
    t.add_row("bytes down (aggregator -> hospitals)", _mb_or_na(m.get("bytes_down")))
    for row in after:
        t.add_row(*row)
    return t


def small_bucket_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The warning row of a run that opted in to a bucket below 32 (``--allow-small-bucket``):
    each hospital's sample count leaked to within the bucket; no row otherwise."""
    from medfed.config import MIN_BUCKET

    bucket = metrics.get("bucket")
    if not metrics.get("allow_small_bucket") or (bucket or 0) >= MIN_BUCKET:
        return []
    leak = "exactly" if bucket == 1 else f"to within {bucket or 'the bucket'}"
    return [
        (
            "[bold red]WARNING: bucket below 32 (--allow-small-bucket)[/bold red]",
            f"[bold red]{bucket}: sample counts revealed {leak}[/bold red]",
        )
    ]


def summary_table(metrics: Mapping[str, Any]) -> Table:
    """Mode "embeddings": the encrypted-trained head against the same loop on plaintext."""
    m = metrics
    th = m.get("threshold")
    if th:  # OpenFHE t-of-n keys: the collective refresh, no masked sums to bound
        title = f"medfed: {m['hospitals']} hospitals, mode {m['mode']}, threshold keys "
        title += f"({th['t']}-of-{th['n']}, OpenFHE)"
        gone = ", ".join(d["hospital"] for d in m.get("dropped", [])) or "none"
        after = [
            ("dropped (key shares recovered)", f"{gone} ({len(th.get('recoveries', []))})"),
            ("seconds per epoch", _num(m.get("seconds_per_epoch"), "{:.2f}")),
            ("refreshed ciphertexts per epoch", _num(m.get("refreshes_per_epoch"), "{:g}")),
        ]
    else:
        title = f"medfed: {m['hospitals']} hospitals, mode {m['mode']}, {m['keys']} key, "
        title += f"CKKS {m['ckks']['name']}"
        after = [("refresh security (bits)", refresh_security_row(m))]
    return run_table(
        m,
        title,
        head="encrypted-trained head",
        row_head="encrypted training",
        same_note="the encrypted loop, layout and polynomial on numpy"
        + (" (DP: without the noise)" if m.get("dp") else ""),
        between=dp_rows(m),
        after=after,
    )


def dp_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The differential-privacy row of a summary (none without DP)."""
    dp = metrics.get("dp")
    if not dp:
        return []
    value = f"{dp['epsilon']:.2f}, {dp['delta']:g} (noise x{dp['noise_multiplier']:.2f})"
    return [("differential privacy (epsilon, delta)", value)]


def refresh_security_row(metrics: Mapping[str, Any]) -> str:
    """``-log2`` of the refresh masks' union bound over the run, then per kind of masked
    vector (products, bias); "n/a" where the run reports none."""
    by_kind = metrics.get("refresh_security_bits_by_kind") or {}

    def bits(value: Any) -> str:  # inf: nothing nonzero was masked
        return "inf" if value == math.inf else _num(value, "{:.1f}")

    kinds = ", ".join(f"{kind} {bits(b)}" for kind, b in by_kind.items() if b is not None)
    total = bits(metrics.get("refresh_security_bits"))
    return f"{total} ({kinds})" if kinds else total


def updates_summary_table(metrics: Mapping[str, Any]) -> Table:
    """Mode "updates": federated (encrypted-sum) FedAvg against plain FedAvg."""
    m = metrics
    th = m.get("threshold")
    keys = f"{m['keys']} keys" + (f" ({th['t']}-of-{th['n']})" if th else "")
    between = []
    if m.get("dropouts"):
        gone = ", ".join(d["hospital"] for d in m.get("dropped", [])) or "none"
        between.append(("dropouts (from round)", f"{gone} ({m.get('dropout_round')})"))
    between.extend(dp_rows(m))
    if th and th.get("max_decryptions"):  # each hospital refuses beyond the budget
        used = f"{th.get('decryptions')} / {th['max_decryptions']}"
        between.append(("threshold decryptions (most-used key share / budget)", used))
    per = m["bytes_per_round"]
    return run_table(
        m,
        f"medfed: {m['hospitals']} hospitals, mode updates, {keys}",
        same="plain FedAvg",
        same_note="same split, seed, schedule and participants per round",
        before=[("rounds x local epochs", f"{m['rounds']} x {m['local_epochs']}")],
        between=between,
        after=[
            (
                "per hospital per round (sent/recv)",
                f"{_mb(int(per['sent']))} / {_mb(int(per['received']))}",
            )
        ],
    )


def parties_table(metrics: Mapping[str, Any]) -> Table:
    """Bytes sent and received by each party; with the per-party audit, what it received:
    messages, binary items (ciphertexts, keys, sealed or signed bytes) and plain values."""
    audit = metrics.get("received_by_party") or {}
    keys = (metrics.get("public_parameters") or {}).get("key_by_party") or {}
    t = Table(title="bytes per party")
    t.add_column("party")
    t.add_column("sent", justify="right")
    t.add_column("received", justify="right")
    per_sample = metrics.get("bytes_per_sample") or {}
    if per_sample:
        t.add_column("sent per sample", justify="right")
    if audit:
        t.add_column("received: messages / binary items / plain values", justify="right")
    if keys:
        t.add_column("public key")
    for name, v in metrics["bytes_per_party"].items():
        row = [name, _mb(v["sent"]), _mb(v["received"])]
        if per_sample:
            sent = per_sample.get(name, {}).get("sent")
            row.append(f"{sent / 1e3:.1f} KB" if sent is not None else "-")
        if audit:
            kinds = audit.get(name, {}).values()
            counts = [sum(k[key] for k in kinds) for key in ("messages", "binary", "plain")]
            row.append(" / ".join(str(c) for c in counts))
        if keys:
            row.append(keys.get(name, "-")[:8])
        t.add_row(*row)
    return t


def excluded_table(excluded: list[dict]) -> Table:
    """The contributions the aggregator excluded: stage, hospital, reason."""
    t = Table(title="excluded contributions", title_style="bold yellow")
    for column in ("stage", "hospital", "reason"):
        t.add_column(column, overflow="fold")
    for e in excluded:
        t.add_row(str(e["stage"]), str(e["hospital"]), str(e["reason"]))
    return t


def print_summary(
    metrics: Mapping[str, Any], console: Console | None = None, table: Table | None = None
) -> None:
    """Print a run's summary ``table`` (default: :func:`run_table`; :func:`medfed.print_summary`
    passes the mode's own), the bytes per party, exclusions and warnings."""
    console = console or Console()
    console.print(table if table is not None else run_table(metrics))
    console.print(parties_table(metrics))
    if metrics.get("excluded"):
        console.print(excluded_table(metrics["excluded"]))
    z, radius = metrics.get("max_abs_z"), (metrics.get("sigmoid") or {}).get("radius")
    if z is not None and radius is not None and z > radius:
        console.print(
            f"[bold red]|z| reached {z:.1f} on the training data, beyond the polynomial's range "
            f"[-{radius:g}, {radius:g}]: training may have diverged. Raise --l2 or "
            "--sigmoid-radius, or lower --lr.[/bold red]"
        )
    if not metrics.get("backbone_pretrained", True):
        console.print(
            "[bold red]The backbone is UNTRAINED (random weights): accuracy is not "
            "representative of a pretrained DeiT. Pass --weights FILE.[/bold red]"
        )


def progress_bar(label: str, enabled: bool = True) -> Progress:
    """The bar every long federation stage shows (rounds or epochs done, elapsed time)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
    )


def byte_tally(fed: Mapping[str, Any]) -> tuple[int, int, dict[str, dict[str, int]]]:
    """(bytes up, bytes down, per party sent/received) from the aggregator's ledger."""
    up = int(sum(fed["bytes_up"].values()))
    down = int(sum(fed["bytes_down"].values()))
    parties = {
        name: {"sent": fed["bytes_up"].get(name, 0), "received": fed["bytes_down"].get(name, 0)}
        for name in sorted(set(fed["bytes_up"]) | set(fed["bytes_down"]))
    }
    parties["aggregator"] = {"sent": down, "received": up}
    return up, down, parties
