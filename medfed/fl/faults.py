"""Fault injection for robustness experiments: ``--inject KIND:key=value,...``.

A fault is a frozen :class:`Fault`, parsed from a spec such as::

    dropout:hospital=2,round=upload     hospital 2 answers nothing from the upload round on
    crash:hospital=1,round=sum-3        from epoch 3 on, hospital 1 does the work of the first
                                        round it is asked for, then dies before replying; it
                                        answers nothing after that
    corrupt:hospital=3,round=upload     hospital 3's reply has bytes flipped in its ciphertexts
    slow:hospital=4,seconds=2           hospital 4 waits 2 s before every reply
    slow:hospital=4,seconds=2,round=final   ... only in the final round

``hospital`` is the hospital's index (``hospital-<i>``, 0-based). ``round`` names a stage as
the aggregator does: ``stats``, ``public-context``, ``upload``, ``sum-<epoch>`` (the masked-sum
round of that epoch; only the hospital asked to hold it sees it), ``sum`` (every masked-sum
round) and ``final``; in mode "updates" ``stats``, ``train-<r>``, ``partial-<r>`` (threshold
keys), ``final`` and the key-setup rounds (``key-setup``, ``key-join``, ...); round r's
``partial-<r>`` comes before its ``train-<r>``. ``dropout`` and ``crash`` apply from their
round on, ``corrupt`` and ``slow`` only at it (a bare ``sum`` or ``train`` means every such
round). ``corrupt`` takes ``bytes=N`` (bytes flipped per ciphertext, default 8).

This is the one way a hospital drops out of a simulated run: mode "updates"' ``--dropouts K``
becomes K ``dropout`` faults at ``partial-<r>`` (:func:`dropout_faults`), i.e. from the first
message of FedAvg round r on, with or without threshold keys.

The faults are applied by :func:`fault_mod`, a Flower client-side mod passed to the hospital's
ClientApp through its factory's ``mods=`` argument (:func:`fault_mods` builds that list): the
hospital's protocol code knows nothing about them. The mod reads the hospital index from the
node config and the stage from the message the aggregator sent (``messages.STAGE``), so it works
for every mode and backend. A hospital that dropped out or crashed stays down; that state lives
in the node's ``Context.state``, which Flower keeps between messages. A silent hospital is
represented by a reply carrying Flower's ``NODE_UNAVAILABLE`` error code
(:data:`medfed.fl.messages.NODE_UNAVAILABLE`), which the aggregator handles exactly like a
missing reply after a timeout (so runs do not sit out timeouts); a crash replies
:data:`medfed.fl.messages.APP_CRASHED`.

Nothing here imports Flower at module level: the config validates specs without it.
"""

from __future__ import annotations

import difflib
import logging
import random
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from medfed.errors import MedfedError

log = logging.getLogger(__name__)

KINDS = ("dropout", "crash", "corrupt", "slow")
#: The stages of mode "embeddings" (``sum-<t>`` for epochs t = 0 .. epochs-1).
EMBEDDINGS_STAGES = ("stats", "public-context", "upload", "sum", "sum-<epoch>", "final")
EXAMPLE = "--inject crash:hospital=1,round=sum-3"
_KEYS = {
    "dropout": {"hospital", "round"},
    "crash": {"hospital", "round"},
    "corrupt": {"hospital", "round", "bytes"},
    "slow": {"hospital", "round", "seconds"},
}
_REQUIRED = {
    "dropout": {"hospital", "round"},
    "crash": {"hospital", "round"},
    "corrupt": {"hospital", "round"},
    "slow": {"hospital", "seconds"},
}
_ROUND = re.compile(r"^[a-z][a-z-]*(-\d+)?$")
#: Within one numbered round, the order of its stage families: mode "updates" decrypts the
#: aggregate (``partial-<r>``, threshold keys) before it trains (``train-<r>``).
_FAMILY_ORDER = {"element": -1, "sum": 0, "partial": 0, "train": 1}
STATE_KEY = "medfed.faults"  # ConfigRecord in the node's Context.state


def stage_rank(stage: str) -> tuple[int, str, int] | None:
    """Where a stage falls in a run: ``(phase, family, n)``; None for a name not ordered here.

    Phases: stats, public-context, upload, then the numbered rounds (``sum-<t>`` in mode
    "embeddings", ``partial-<r>``/``train-<r>`` in mode "updates"; a bare family name such as
    ``sum`` stands for its first round), then final.
    """
    fixed = {"stats": 0, "public-context": 1, "upload": 2, "final": 9}
    if stage in fixed:
        return (fixed[stage], "", 0)
    m = re.fullmatch(r"(element|sum|train|partial)(?:-(\d+))?", stage)
    if m is not None:
        return (3, m.group(1), int(m.group(2) or 0))
    return None  # e.g. the key-setup rounds of mode "updates": matched by name only


def stage_reached(stage: str, start: str) -> bool:
    """``stage`` comes at or after ``start`` (False when either is not ordered)."""
    a, b = stage_rank(stage), stage_rank(start)
    if a is None or b is None:
        return stage == start
    if a[0] != b[0] or a[0] != 3:
        return a[0] >= b[0]
    return (a[2], _FAMILY_ORDER[a[1]]) >= (b[2], _FAMILY_ORDER[b[1]])


class FaultSpecError(MedfedError, ValueError):
    """An ``--inject`` spec that cannot be parsed or does not fit the run; names the fix."""


@dataclass(frozen=True)
class Fault:
    """One injected fault: what happens to which hospital, at which round."""

    kind: str
    hospital: int
    round: str | None = None  # None: every round (slow only)
    seconds: float = 0.0  # slow
    n_bytes: int = 8  # corrupt: bytes flipped per ciphertext

    def matches(self, stage: str) -> bool:
        """This fault applies to a message of ``stage``.

        ``dropout`` and ``crash`` apply from their round on (the first message the hospital
        gets at or after it, e.g. ``sum-3`` also fires at ``sum-5`` or ``final`` when another
        hospital held ``sum-3``); ``corrupt`` and ``slow`` only at their round.
        """
        if self.round is None or self.round == stage:
            return True
        if re.fullmatch(rf"{re.escape(self.round)}-\d+", stage):  # "sum": every sum-<t>
            return True
        return self.kind in ("dropout", "crash") and stage_reached(stage, self.round)

    def __str__(self) -> str:
        parts = [f"hospital={self.hospital}"]
        if self.round is not None:
            parts.append(f"round={self.round}")
        if self.kind == "slow":
            parts.append(f"seconds={self.seconds:g}")
        if self.kind == "corrupt" and self.n_bytes != 8:
            parts.append(f"bytes={self.n_bytes}")
        return f"{self.kind}:{','.join(parts)}"


def _fail(spec: str, problem: str) -> FaultSpecError:
    return FaultSpecError(
        f"--inject {spec!r}: {problem}. Write KIND:hospital=I,round=STAGE with KIND one of "
        f"{', '.join(KINDS)}, e.g. {EXAMPLE} or --inject slow:hospital=4,seconds=2."
    )


def parse_fault(spec: str) -> Fault:
    """Parse one spec (see the module docstring); raises :class:`FaultSpecError`."""
    if not isinstance(spec, str):
        raise FaultSpecError(
            f"inject entries must be strings such as {EXAMPLE.split()[1]!r}, got "
            f"{type(spec).__name__} {spec!r}"
        )
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        close = difflib.get_close_matches(kind, KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _fail(spec, f"unknown fault kind {kind!r}{hint}")
    if not sep or not rest.strip():
        raise _fail(spec, f"{kind} needs {', '.join(sorted(_REQUIRED[kind]))}")
    values: dict[str, str] = {}
    for item in rest.split(","):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise _fail(spec, f"{item.strip()!r} is not key=value")
        if key not in _KEYS[kind]:
            close = difflib.get_close_matches(key, _KEYS[kind], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(
                spec,
                f"{kind} takes {', '.join(sorted(_KEYS[kind]))}, not {key!r}{hint}",
            )
        if key in values:
            raise _fail(spec, f"{key!r} is given twice")
        values[key] = value
    missing = _REQUIRED[kind] - set(values)
    if missing:
        raise _fail(spec, f"{kind} needs {', '.join(sorted(missing))}")
    try:
        hospital = int(values["hospital"])
    except ValueError:
        raise _fail(spec, f"hospital={values['hospital']!r} must be a hospital index") from None
    if hospital < 0:
        raise _fail(spec, f"hospital={hospital} must be >= 0 (hospitals are numbered from 0)")
    stage = values.get("round")
    if stage is not None:
        stage = stage.lower()
        if not _ROUND.match(stage):
            raise _fail(spec, f"round={stage!r} is not a stage name such as upload or sum-3")
    seconds = 0.0
    if "seconds" in values:
        try:
            seconds = float(values["seconds"])
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= 3600:
            raise _fail(spec, f"seconds={values['seconds']!r} must be a number in (0, 3600]")
    n_bytes = 8
    if "bytes" in values:
        try:
            n_bytes = int(values["bytes"])
        except ValueError:
            n_bytes = 0
        if not 1 <= n_bytes <= 4096:
            raise _fail(spec, f"bytes={values['bytes']!r} must be an integer in 1..4096")
    return Fault(kind, hospital, stage, seconds, n_bytes)


def parse_faults(specs: Iterable[str] | str | None) -> tuple[Fault, ...]:
    """Parse ``--inject`` specs (one string, several, or None for none)."""
    if specs is None:
        return ()
    if isinstance(specs, str):
        specs = [specs]
    return tuple(parse_fault(s) for s in specs)


def check_faults(
    faults: Sequence[Fault], hospitals: int, epochs: int | None = None, stages: Sequence = ()
) -> None:
    """Each fault names an existing hospital and a stage of this run's mode.

    ``stages`` are the mode's stage names (``sum-<epoch>`` stands for ``sum-0 .. sum-E-1``);
    empty: any well-formed name is accepted (a mode that does not list its stages).
    """
    for f in faults:
        if f.hospital >= hospitals:
            raise FaultSpecError(
                f"--inject {str(f)!r}: there is no hospital {f.hospital} in a run with "
                f"{hospitals} hospitals (indices 0..{hospitals - 1}); pick one of those."
            )
        if f.round is None or not stages:
            continue
        named = [s for s in stages if "<" not in s]
        m = re.fullmatch(r"sum-(\d+)", f.round)
        if f.round in named or (m and "sum-<epoch>" in stages and epochs is None):
            continue
        if m and "sum-<epoch>" in stages:
            if int(m.group(1)) < epochs:
                continue
            raise FaultSpecError(
                f"--inject {str(f)!r}: round {f.round} does not exist with --epochs {epochs} "
                f"(masked-sum rounds are sum-0 .. sum-{epochs - 1})."
            )
        close = difflib.get_close_matches(f.round, named, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise FaultSpecError(
            f"--inject {str(f)!r}: unknown round {f.round!r}{hint}; rounds are {', '.join(stages)}."
        )


# ---------------------------------------------------------------------------- the mod


def _stage_of(msg) -> str:
    from medfed.fl import messages as M

    record = msg.content.config_records.get(M.RECORD)
    if record is not None and M.STAGE in record:
        return str(record[M.STAGE])
    return msg.metadata.message_type.split(".")[-1]


def corrupt_record(record, n_bytes: int, seed: str) -> dict:
    """A copy of a record's values with ``n_bytes`` bytes flipped in every bytes value."""
    out = {}
    for key, value in record.items():
        items = value if isinstance(value, list) else [value]
        flipped = []
        for k, item in enumerate(items):
            if isinstance(item, bytes) and item:
                b = bytearray(item)
                rng = random.Random(f"{seed}/{key}/{k}")
                for _ in range(n_bytes):
                    b[rng.randrange(len(b))] ^= 0xFF
                item = bytes(b)
            flipped.append(item)
        out[key] = flipped if isinstance(value, list) else flipped[0]
    return out


def fault_mod(faults: Sequence[Fault]):
    """A Flower client-side mod ``(msg, context, call_next) -> Message`` injecting ``faults``."""
    faults = tuple(faults)

    def mod(msg, context, call_next):
        from flwr.app import ConfigRecord, Message

        from medfed.fl import messages as M

        index = M.node_index(context)
        mine = [f for f in faults if f.hospital == index]
        if not mine:
            return call_next(msg, context)
        stage = _stage_of(msg)
        state = context.state.config_records.get(STATE_KEY)
        if state is not None and "down" in state:  # dropped out or crashed earlier
            return M.error_reply(msg, M.NODE_UNAVAILABLE, "no reply")

        def go_down(what: str) -> None:
            context.state[STATE_KEY] = ConfigRecord({"down": f"{what} at {stage}"})
            log.info("injected fault: hospital %d %s at %s", index, what, stage)

        for f in mine:
            if f.kind == "slow" and f.matches(stage):
                time.sleep(f.seconds)
        if any(f.kind == "dropout" and f.matches(stage) for f in mine):
            go_down("dropped out")
            return M.error_reply(msg, M.NODE_UNAVAILABLE, "no reply")
        reply = call_next(msg, context)
        if any(f.kind == "crash" and f.matches(stage) for f in mine):
            go_down("crashed")
            reason = f"hospital-{index} crashed mid-round at {stage} (injected fault)"
            return M.error_reply(msg, M.APP_CRASHED, reason)
        corrupt = [f for f in mine if f.kind == "corrupt" and f.matches(stage)]
        if corrupt and not reply.has_error() and M.RECORD in reply.content.config_records:
            values = corrupt_record(
                reply.content.config_records[M.RECORD],
                corrupt[0].n_bytes,
                f"{index}/{stage}",
            )
            log.info("injected fault: hospital %d corrupted its reply at %s", index, stage)
            reply = Message(M.make_content(**values), reply_to=msg)
        return reply

    return mod


def fault_mods(faults: Sequence[Fault], mods: Sequence | None = None) -> list:
    """The ``mods=`` list for a hospital app factory: :func:`fault_mod` (when there are
    faults) outermost, then ``mods``, e.g. ``make_hospital_app(ws, mods=fault_mods(faults))``.

    Outermost, so a fault sees the message as the aggregator sent it and the reply as it
    leaves the hospital (after any other mod, as a fault in transit would).
    """
    return ([fault_mod(faults)] if faults else []) + list(mods or [])


def dropout_faults(plan: Mapping[int, int]) -> tuple[Fault, ...]:
    """Mode "updates"' dropouts as faults: hospital ``i`` answers nothing from FedAvg round
    ``plan[i]`` on (from its ``partial-<r>``, or ``train-<r>`` without threshold keys)."""
    return tuple(Fault("dropout", i, f"partial-{r}") for i, r in sorted(plan.items()))
