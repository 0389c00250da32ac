"""What every mode's driver does the same way: provision hospitals into a temporary workspace
and run the federation under a progress bar, pool the hospitals' private evaluations, score
the yardsticks, map hospital names to indices, and write the run files.

Like the mode modules, nothing here imports torch, TenSEAL or Flower at module level.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medfed.config import ConfigError, SimulationConfig
from medfed.modes.base import Prepared

if TYPE_CHECKING:
    from medfed.fl.faults import Fault
    from medfed.fl.launch import FederationApps
    from medfed.fl.workspace import HospitalData, HospitalProvision
    from medfed.privacy.mechanisms import HospitalDP


@dataclass(frozen=True)
class Federation:
    """What :func:`run_in_workspace` brings back from one federation."""

    fed: dict[str, Any]  # the aggregator's record (bytes, rounds, exclusions, ...)
    evaluations: list[dict[str, Any] | None]  # each hospital's eval.json (None: wrote none)
    seconds: float  # the federation's own wall time


def check_count(cfg: SimulationConfig, hospitals: Sequence[HospitalData]) -> None:
    """``cfg.hospitals`` must be the number of hospitals given."""
    if len(hospitals) != cfg.hospitals:
        raise ConfigError(f"expected {cfg.hospitals} hospitals, got {len(hospitals)}")


def indices(hospitals: Sequence[HospitalData], names: Iterable[str]) -> list[int]:
    """Indices, in ``hospitals``' order, of the hospitals named in ``names``."""
    kept = set(names)
    return [i for i, h in enumerate(hospitals) if h.name in kept]


def run_in_workspace(
    cfg: SimulationConfig,
    hospitals: Sequence[HospitalData],
    settings: Any,
    provisions: Sequence[HospitalProvision],
    shared_key: str | None,
    *,
    label: str,
    unit: str,
    steps: int,
    apps: FederationApps,
    backend: str | None = None,
    faults: Sequence[Fault] = (),
    on_exit: Callable[[Path], None] | None = None,
) -> Federation:
    """Provision every hospital (its data, ``provisions[i]`` and, with ``shared_key`` (a
    CKKS preset name; None: no provisioned key), the run's shared CKKS key) into a temporary
    workspace, run the federation under a progress bar of ``steps`` ``unit`` (one per
    aggregator step) with the mode's ``apps``, read the hospitals' evaluations and delete the
    workspace. ``faults`` are injected besides ``cfg.inject`` (mode "updates"'
    ``--dropouts``). ``on_exit(workspace)`` runs after the federation, even on failure.

    The harness is also the run's signing authority: it makes a random run id and an Ed25519
    key pair per party (:func:`~medfed.crypto.signing.provision_keys`), writes each hospital's
    private key into its workspace and every public key into each hospital's provisioning,
    and gives the aggregator's key (with the same public keys) to ``settings.signing`` only.

    Backend "deploy" (:func:`medfed.fl.deploy.run_deployment`) provisions only the data here:
    every party makes its own keys in its own process, and the lead hospital the shared key.
    """
    from medfed.experiments.results import progress_bar
    from medfed.fl.faults import parse_faults
    from medfed.fl.workspace import read_evaluations

    backend = backend or cfg.backend
    faults = (*parse_faults(cfg.inject), *faults)
    with tempfile.TemporaryDirectory(prefix="medfed-hospitals-") as ws:
        workspace = Path(ws)
        t_fed = time.perf_counter()
        try:
            with progress_bar(label, cfg.progress) as progress:
                task = progress.add_task(unit, total=steps)
                on_step = lambda step: progress.advance(task)  # noqa: E731
                if backend == "deploy":
                    fed = _deploy(
                        cfg, workspace, hospitals, settings, provisions, shared_key, faults, on_step
                    )
                else:
                    fed = _simulate(
                        cfg,
                        workspace,
                        hospitals,
                        settings,
                        provisions,
                        shared_key,
                        faults,
                        on_step,
                        backend,
                        apps,
                    )
        finally:
            if on_exit is not None:
                on_exit(workspace)
        seconds = time.perf_counter() - t_fed
        evaluations = read_evaluations(workspace, cfg.hospitals)
    return Federation(fed, evaluations, seconds)


def _simulate(
    cfg, workspace, hospitals, settings, provisions, shared_key, faults, on_step, backend, apps
) -> dict[str, Any]:
    """The harness provisions every key (it plays every party), then Flower's simulation or
    the in-process grid runs the federation."""
    from medfed.crypto.signing import provision_keys
    from medfed.fl.launch import run_federation
    from medfed.fl.workspace import provision

    secret = None
    if shared_key is not None:
        from medfed.crypto.context import make_secret_context, secret_context_bytes
        from medfed.crypto.params import get_preset

        secret = secret_context_bytes(make_secret_context(get_preset(shared_key)))
    keys = provision_keys([h.name for h in hospitals])
    settings = dataclasses.replace(settings, signing=keys.aggregator)
    for i, (h, meta) in enumerate(zip(hospitals, provisions, strict=True)):
        provision(workspace, i, h, secret, meta, signing=keys.hospitals[i])
    del secret, keys  # the hospitals hold their keys now; the harness keeps no copy
    return run_federation(
        workspace,
        settings,
        cfg.hospitals,
        backend=backend,
        client_cpus=cfg.client_cpus,
        ray_address=cfg.ray_address,
        on_step=on_step,
        faults=faults,
        apps=apps,
    )


def _deploy(cfg, workspace, hospitals, settings, provisions, shared_key, faults, on_step):
    """The harness writes each hospital's data partition only; the parties provision their
    keys themselves and run as separate processes (:mod:`medfed.fl.deploy`)."""
    from medfed.fl.deploy import run_deployment
    from medfed.fl.workspace import provision

    for i, (h, meta) in enumerate(zip(hospitals, provisions, strict=True)):
        provision(workspace, i, h, None, meta)
    logs = Path(cfg.out) / "deployment" if cfg.out else None
    return run_deployment(
        workspace,
        settings,
        [h.name for h in hospitals],
        mode=f"{cfg.mode}/{cfg.keys}",  # the protocol: the mode's, under its key setup
        shared_key=shared_key,
        faults=faults,
        on_step=on_step,
        logs=logs,
        audit=cfg.audit,
    )


def pooled_accuracy(evaluations: Iterable[dict[str, Any]]) -> tuple[int, float]:
    """(test samples, accuracy) pooled over hospitals' evaluations (NaN for no samples)."""
    done = list(evaluations)
    total = sum(e["total"] for e in done)
    correct = sum(e["correct"] for e in done)
    return total, correct / total if total else float("nan")


def yardsticks(
    cfg: SimulationConfig,
    hospitals: Sequence[HospitalData],
    evaluations: list[dict[str, Any]],
    reference: Mapping[str, Any],
    *,
    trained_on: Sequence[int],
    accuracy: float,
    n_classes: int,
) -> dict[str, Any]:
    """The accuracy block of metrics.json (:data:`~medfed.experiments.yardsticks.YARDSTICK_KEYS`)
    on the federation's own split: the tuned reference pools the train data of the hospitals
    ``trained_on``; every score is on the test samples of ``evaluations``. ``reference`` is
    the same-schedule plaintext run (``plaintext_accuracy``/``_weights``/``_test``). With it,
    the membership-inference attack on the released head
    (:data:`~medfed.experiments.membership.MEMBERSHIP_KEYS`): the train samples of
    ``trained_on`` against the evaluators' test samples."""
    from medfed.experiments.membership import membership_metrics
    from medfed.experiments.yardsticks import federation_yardsticks

    attack = membership_metrics(evaluations, [hospitals[i].name for i in trained_on])
    return attack | federation_yardsticks(
        hospitals,
        evaluations,
        trained_on=trained_on,
        accuracy=accuracy,
        plaintext_accuracy=reference["plaintext_accuracy"],
        plaintext_weights=reference["plaintext_weights"],
        plaintext_test=reference["plaintext_test"],
        n_classes=n_classes,
        seed=cfg.seed,
    )


def described_run(
    cfg: SimulationConfig, described: Mapping[str, Any], n_classes: int, embed_dim: int
) -> dict[str, Any]:
    """The keys every metrics.json starts with: the mode, keys, hospitals and the data."""
    return {
        "mode": cfg.mode,
        "keys": cfg.keys,
        "hospitals": cfg.hospitals,
        **described,
        "n_classes": n_classes,
        "embed_dim": embed_dim,
    }


def bytes_per_sample(
    parties: Mapping[str, Mapping[str, int]], hospitals: Sequence[HospitalData]
) -> dict[str, dict[str, float]]:
    """Each party's bytes sent and received per training sample: a hospital's per its own
    samples, the aggregator's per all hospitals' (what the run's traffic costs per sample)."""
    own = {h.name: len(h.train_features) for h in hospitals}
    total = sum(own.values())
    out = {}
    for name, v in parties.items():
        n = total if name == "aggregator" else own.get(name, 0)
        if n:
            out[name] = {"sent": v["sent"] / n, "received": v["received"] / n}
    return out


def traffic(fed: Mapping[str, Any]) -> dict[str, Any]:
    """``bytes_up``, ``bytes_down``, ``bytes_per_party`` and ``received_by_party`` (the
    per-party audit: what each party received, by message kind) from the aggregator's ledger;
    mode "embeddings" also ``public_parameters`` (the key each party's ciphertexts are under),
    backend "deploy" also ``deployment`` (its phases, processes and separation evidence)."""
    from medfed.experiments.results import byte_tally

    up, down, parties = byte_tally(fed)
    out = {"bytes_up": up, "bytes_down": down, "bytes_per_party": parties}
    for key in ("received_by_party", "public_parameters", "buckets_by_hospital", "deployment"):
        if key in fed:
            out[key] = fed[key]
    return out


def finish(
    cfg: SimulationConfig, metrics: dict[str, Any], rounds: list[dict[str, Any]]
) -> dict[str, Any]:
    """Add the leakage ledger (:func:`~medfed.experiments.leakage.leakage_ledger`); with
    ``cfg.out`` set, write config.yaml, rounds.jsonl and metrics.json (the run's
    :meth:`~medfed.result.RunResult.to_dict`) there; returns ``metrics``."""
    from medfed.experiments.leakage import leakage_ledger

    metrics.setdefault("epsilon", (metrics.get("dp") or {}).get("epsilon"))  # None: no DP
    metrics["leakage"] = leakage_ledger(metrics)
    if cfg.out:
        from medfed.experiments.results import write_run
        from medfed.result import RunResult

        write_run(Path(cfg.out), cfg.to_dict(), RunResult.from_metrics(metrics), rounds)
    return metrics


def dp_guarantee(
    cfg: SimulationConfig, dp: HospitalDP, *, stats_count: int, later: int, **details: Any
) -> dict[str, Any]:
    """The metrics.json ``dp`` block: the guarantee this run reached, from the statistics'
    release and ``later`` Gaussian mechanisms of ``dp.noise_multiplier`` (mode "updates": one
    per local step of every round; "embeddings": the noisy head). The statistics, if summed
    over fewer than ``dp.contributors`` hospitals (``stats_count``), carried less noise: their
    effective multiplier ``sigma * sqrt(count / contributors)`` is what is accounted."""
    from medfed.privacy.accountant import epsilon, epsilon_of_releases
    from medfed.privacy.mechanisms import STATS_SENSITIVITY

    stats = dp.noise_multiplier * math.sqrt(min(1.0, stats_count / dp.contributors))
    sigmas = [stats] + [dp.noise_multiplier] * later
    return {
        "epsilon": epsilon_of_releases(sigmas, cfg.dp_delta),
        "delta": cfg.dp_delta,
        "target_epsilon": cfg.dp_epsilon,
        "noise_multiplier": dp.noise_multiplier,
        "stats_noise_multiplier": stats,
        "releases": len(sigmas),
        "epsilon_rdp": epsilon(min(sigmas), len(sigmas), cfg.dp_delta, accountant="rdp"),
        "contributors": dp.contributors,
        "clip": dp.clip,
        "adjacency": "replace one training record of one hospital",
        "stats_sensitivity": STATS_SENSITIVITY,
        **details,
        "accountant": "dp-accounting PLD (epsilon_rdp: RDP upper bound)",
    }


def used_subsets(fed: Mapping[str, Any], hospitals: list[HospitalData]) -> dict[str, list[int]]:
    """Hospital indices whose data the federation used: ``normalized_over`` (passed
    ``stats``), ``trained_on`` (passed ``upload``), ``evaluated_on`` (evaluated the head)."""
    names = [h.name for h in hospitals]
    used = fed.get("contributors") or {}
    return {
        "normalized_over": indices(hospitals, used.get("stats", names)),
        "trained_on": indices(hospitals, used.get("upload", names)),
        "evaluated_on": indices(hospitals, fed.get("evaluated_by", names)),
    }


def prepared_hospitals(cfg: SimulationConfig) -> Prepared:
    """The built-in modes' data: a features file (``--features``, no torch) or the embeddings
    pipeline; with threshold keys, OpenFHE is checked first (before any data work)."""
    if cfg.keys == "threshold":
        from medfed.crypto.threshold import _require_openfhe

        _require_openfhe()
    from medfed.experiments.prepare import hospitals_from_features, hospitals_from_pipeline

    load = hospitals_from_features if cfg.features else hospitals_from_pipeline
    return Prepared(*load(cfg))
