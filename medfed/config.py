"""The run configuration: one frozen dataclass, loadable from YAML, validated at the boundary."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from medfed.errors import ConfigError, unknown_keys  # ConfigError: re-exported (public)

SPLITS = ("iid", "dirichlet")
MIN_BUCKET = 32  # the smallest bucket accepted without allow_small_bucket


#: Where a federation runs: Flower's simulation engine, in-process, or a local deployment.
BACKENDS = ("flower", "local", "deploy")


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of one federation run (CLI flags and YAML keys share these names).

    Frozen and validated when built: an invalid value raises :class:`ConfigError` naming the
    fix. Build one directly, with :meth:`from_dict` or :meth:`from_yaml`; derive one with
    :meth:`replace`.

    Attributes:
        hospitals: number of hospitals the data is split over.
        mode: "embeddings" (the aggregator trains a head on encrypted embeddings), "updates"
            (hospitals train locally, the aggregator adds encrypted updates) or a registered
            mode (:func:`medfed.list_modes`).
        keys: key setup: "shared" (one CKKS key every hospital holds), "threshold" (OpenFHE
            t-of-n keys: no hospital can decrypt alone) or "none" (mode "updates": plain
            FedAvg).
        dataset: MedMNIST flag (e.g. "breastmnist") or path to a MedMNIST-layout ``.npz``.
        data_root: folder holding the MedMNIST ``.npz`` files.
        model: frozen backbone: "deit_tiny", "deit_small" or "deit_base".
        weights: local pretrained-weights file for the backbone.
        img_size: backbone input size (None: the backbone's default).
        split: how samples are spread over hospitals: "iid" or "dirichlet" (label skew).
        alpha: Dirichlet concentration of ``split="dirichlet"`` (smaller: more skew).
        seed: partition seed.
        ckks: CKKS parameter preset of the TenSEAL keys (:data:`medfed.PRESETS`), e.g. "fast".
        epochs: mode "embeddings": full-batch epochs of encrypted training.
        lr: learning rate.
        l2: L2 penalty on the head's weights (not the bias); ``lr * l2`` must be below 1.
        components: PCA-whitened width the head trains on (0: standardize only).
        samples_per_component: keep one component per this many pooled training samples, at
            least 96 (0: keep all).
        rounds: mode "updates": FedAvg rounds.
        local_epochs: mode "updates": full-batch epochs per hospital per round.
        dropouts: hospitals that stop answering mid-training (mode "embeddings": with
            threshold keys).
        features: precomputed embeddings (``.npz``) instead of ``dataset`` and ``model``;
            needs no torch.
        dp_epsilon: record-level differential privacy of the released head and of everything
            the hospitals decrypt, at this epsilon (``dp_delta``); the noise is calibrated to
            it (:mod:`medfed.privacy`; mode "embeddings" also sets the schedule the bound
            needs). None: no DP.
        dp_noise: the noise multiplier instead of ``dp_epsilon``.
        dp_delta: the delta of ``dp_epsilon``.
        dp_clip: mode "updates": the per-sample gradient norm bound of differentially private
            local training; mode "embeddings": the norm bound of every trained feature row.
        sigmoid_degree: mode "embeddings": degree of the polynomial sigmoid (1, 3 or 5).
        sigmoid_radius: mode "embeddings": the sigmoid is fitted on ``[-radius, radius]``.
        bucket: mode "embeddings": sample-count padding granularity (hospitals announce
            buckets, not sample counts); below 32 only with ``allow_small_bucket``.
        allow_small_bucket: accept a ``bucket`` below 32 (it reveals sample counts to within it).
        feature_scale: scale of the normalized features.
        backend: "flower" (Flower's Ray simulation engine), "local" (in-process) or "deploy"
            (a local Flower deployment: SuperLink, SuperNodes and ServerApp as separate
            processes, TLS, SuperNode authentication; ``python -m medfed.deploy``).
        audit: backend "deploy": also list the files the aggregator's process opened and scan
            its memory for the hospitals' secrets at the end (``metrics.json`` ``deployment``).
        client_cpus: CPUs per simulated hospital.
        workers: mode "embeddings": Ray encrypted batch workers (0: in-process).
        ray_address: GCS address of a running Ray cluster (default: ``$RAY_ADDRESS``).
        cache_dir: embedding cache folder (default: ``$MEDFED_CACHE_DIR`` or
            ``~/.cache/medfed/features``).
        out: folder to write ``config.yaml``, ``rounds.jsonl`` and ``metrics.json`` to.
        progress: show progress bars.
        inject: fault specs for robustness runs (``medfed.fl.faults``), e.g.
            ``"crash:hospital=1,round=upload"``.
    """

    hospitals: int = 5
    mode: str = "embeddings"
    keys: str = "shared"
    dataset: str = "breastmnist"
    data_root: str | None = None
    model: str = "deit_tiny"
    weights: str | None = None
    img_size: int | None = None
    split: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    ckks: str = "fast"
    epochs: int = 20
    lr: float = 1.0
    l2: float = 0.02  # L2 penalty on the head's weights (not the bias)
    components: int = 192  # PCA-whitened width the head trains on (0: standardize only)
    samples_per_component: int = 64  # components kept: pooled samples / this, >= 96 (0: all)
    rounds: int = 10  # mode "updates": FedAvg rounds
    local_epochs: int = 5  # mode "updates": full-batch epochs per hospital per round
    dropouts: int = 0  # hospitals that stop answering mid-training
    features: str | None = None  # precomputed embeddings (.npz)
    dp_epsilon: float | None = None  # record-level differential privacy at this epsilon
    dp_noise: float | None = None  # the noise multiplier instead of dp_epsilon
    dp_delta: float = 1e-5
    dp_clip: float = 1.0  # updates: per-sample gradient norm bound; embeddings: feature norm
    sigmoid_degree: int = 3
    sigmoid_radius: float = 24.0
    bucket: int = 32
    allow_small_bucket: bool = False  # bucket < MIN_BUCKET reveals near-exact sample counts
    feature_scale: float = 1.0
    backend: str = "flower"
    audit: bool = False  # backend "deploy": the aggregator's opened files and memory, checked
    client_cpus: float = 1.0
    workers: int = 0
    ray_address: str | None = None
    cache_dir: str | None = None
    out: str | None = None
    progress: bool = True
    inject: tuple[str, ...] = ()  # fault specs (--inject, medfed.fl.faults), for robustness runs

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> SimulationConfig:
        """A copy with ``changes`` (field names to new values) applied and validated again."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown config field(s) {', '.join(unknown)}; valid fields: "
                f"{', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (the form ``from_dict`` and the YAML files take)."""
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of every field, in declaration order: the valid config keys."""
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SimulationConfig:
        """Build and validate a config from a mapping of keys to values.

        Args:
            data: field names to values; dashes in keys are read as underscores (CLI spelling).
            source: where ``data`` came from, named in error messages.

        Raises:
            ConfigError: an unknown key (with the closest valid one) or an invalid value.
        """
        data = {k.replace("-", "_"): v for k, v in (data or {}).items()}
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) {unknown_keys(unknown, names)}; valid keys: "
                f"{', '.join(names)}."
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulationConfig:
        """Load and validate a config from a YAML file holding a mapping of keys to values.

        Raises:
            ConfigError: the file is missing, not YAML, not a mapping, or holds a bad key/value.
        """
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        return cls.from_dict(data or {}, source=str(path))


def _choice(name: str, value: str, allowed: tuple[str, ...], extra: str = "") -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}.{extra}")


def _validate(c: SimulationConfig) -> None:
    def positive_int(name: str, value: Any, low: int = 1) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")

    positive_int("hospitals", c.hospitals)
    positive_int("epochs", c.epochs)
    positive_int("bucket", c.bucket)
    _check_bucket(c)
    positive_int("seed", c.seed, low=0)
    positive_int("workers", c.workers, low=0)
    positive_int("rounds", c.rounds)
    positive_int("local_epochs", c.local_epochs)
    positive_int("dropouts", c.dropouts, low=0)
    positive_int("components", c.components, low=0)
    positive_int("samples_per_component", c.samples_per_component, low=0)
    mode = _check_mode(c)
    _choice("split", c.split, SPLITS)
    _choice("backend", c.backend, BACKENDS)
    if not isinstance(c.audit, bool):
        raise ConfigError(f"audit must be true or false, got {c.audit!r}")
    if c.audit and c.backend != "deploy":
        raise ConfigError("audit checks a deployment's processes: use it with --backend deploy")
    if c.backend == "deploy" and c.workers:
        raise ConfigError("workers (Ray batch workers) are not part of a deployment: use 0")
    for name in ("alpha", "lr", "sigmoid_radius", "feature_scale", "client_cpus"):
        value = getattr(c, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(c.l2, int | float) or isinstance(c.l2, bool) or not c.l2 >= 0:
        raise ConfigError(f"l2 must be a number >= 0, got {c.l2!r}")
    if c.lr * c.l2 >= 1:
        raise ConfigError(
            f"lr * l2 = {c.lr * c.l2:g} must be below 1 (each epoch multiplies the weights by "
            "1 - lr * l2); lower --l2 or --lr"
        )
    if c.sigmoid_degree not in (1, 3, 5):
        raise ConfigError(f"sigmoid_degree={c.sigmoid_degree!r} must be 1, 3 or 5")
    _check_ckks(c)
    if mode.check is not None:
        mode.check(c)
    if c.img_size is not None:
        positive_int("img_size", c.img_size, low=16)
    _check_inject(c, mode.fault_stages() if mode.fault_stages else ())


def _check_bucket(c: SimulationConfig) -> None:
    """A bucket below :data:`MIN_BUCKET` reveals (near-)exact sample counts: opt-in only."""
    if not isinstance(c.allow_small_bucket, bool):
        raise ConfigError(f"allow_small_bucket must be true or false, got {c.allow_small_bucket!r}")
    if c.bucket < MIN_BUCKET and not c.allow_small_bucket:
        raise ConfigError(
            f"bucket={c.bucket} is below {MIN_BUCKET}: hospitals announce ceil(n / bucket), so the "
            "aggregator (and, via the layout, every hospital) learns each hospital's sample count "
            f"{'exactly' if c.bucket == 1 else f'to within {c.bucket}'}. Use --bucket {MIN_BUCKET} "
            "or more, or accept that leak with --allow-small-bucket (allow_small_bucket: true)."
        )


def _check_mode(c: SimulationConfig) -> ModeSpec:
    """``c.mode`` is a known mode that accepts ``c.keys``; options of other modes are unset."""
    _choice("mode", c.mode, mode_names())
    specs = [_MODES[name] for name in mode_names()]
    _choice("keys", c.keys, tuple(sorted({k for spec in specs for k in spec.keys})))
    spec = _MODES[c.mode]
    _choice("keys", c.keys, spec.keys, f" Mode {c.mode!r} supports keys {', '.join(spec.keys)}.")
    for name, default in {n: v for other in specs for n, v in other.options.items()}.items():
        if name not in spec.options and getattr(c, name) != default:
            owners = [other.name for other in specs if name in other.options]
            raise ConfigError(
                f"{name} applies to mode {' or '.join(map(repr, owners))} only "
                f"(use --mode {owners[0]})"
            )
    return spec


def _check_inject(c: SimulationConfig, stages: tuple[str, ...] = ()) -> None:
    """Parse and check the fault specs; store them in canonical form (a tuple of strings)."""
    from medfed.fl.faults import FaultSpecError, check_faults, parse_faults

    raw = () if c.inject is None else c.inject
    if isinstance(raw, str):
        raw = (raw,)
    if not isinstance(raw, list | tuple):
        raise ConfigError(
            f"inject must be a list of fault specs such as 'crash:hospital=1,round=upload', "
            f"got {raw!r}"
        )
    try:
        faults = parse_faults(raw)
        check_faults(faults, c.hospitals, c.epochs, stages)
    except FaultSpecError as e:
        raise ConfigError(str(e)) from None
    object.__setattr__(c, "inject", tuple(str(f) for f in faults))


def _check_ckks(c: SimulationConfig) -> None:
    """The preset exists and is safe (each mode checks the depth it needs, before any work)."""
    from medfed.crypto.params import UnsafeParametersError, get_preset

    try:
        get_preset(c.ckks)
    except UnsafeParametersError as e:
        raise ConfigError(str(e)) from None


# --- the modes' static data -------------------------------------------------------------------


def _check_dp(c: SimulationConfig) -> None:
    """The DP knobs: one of epsilon or noise, a delta, and a step that keeps the bound."""
    if not isinstance(c.dp_delta, float | int) or not 0 < c.dp_delta < 1:
        raise ConfigError(f"dp_delta must be in (0, 1), got {c.dp_delta!r}")
    if c.dp_epsilon is None and c.dp_noise is None:
        return
    if c.dp_epsilon is not None and c.dp_noise is not None:
        raise ConfigError("give --dp-epsilon or --dp-noise, not both")
    for name in ("dp_epsilon", "dp_noise"):
        value = getattr(c, name)
        if value is not None and (isinstance(value, bool) or not value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if isinstance(c.dp_clip, bool) or not isinstance(c.dp_clip, int | float) or not c.dp_clip > 0:
        raise ConfigError(f"dp_clip must be a positive number, got {c.dp_clip!r}")


def _check_updates(c: SimulationConfig) -> None:
    """Mode "updates": no Ray batch workers, dropouts within what the keys tolerate, DP."""
    _check_dp(c)
    if c.workers:
        raise ConfigError("workers (Ray encrypted batch workers) apply to mode 'embeddings' only")
    if c.keys == "threshold" and c.hospitals < 2:
        raise ConfigError("keys='threshold' needs at least 2 hospitals; use --keys shared")
    if c.dropouts:
        if c.rounds < 2:
            raise ConfigError("dropouts happen mid-training: use --rounds 2 or more")
        if c.keys == "threshold":
            t = c.hospitals // 2 + 1
            if c.dropouts > c.hospitals - t:
                raise ConfigError(
                    f"dropouts={c.dropouts}: with {c.hospitals} hospitals the threshold setup "
                    f"is {t}-of-{c.hospitals} and tolerates at most {c.hospitals - t} dropouts"
                )
        elif c.dropouts >= c.hospitals:
            raise ConfigError(
                f"dropouts={c.dropouts} must leave at least one of the {c.hospitals} hospitals"
            )


def _check_embeddings(c: SimulationConfig) -> None:
    """Mode "embeddings": the preset has the CKKS levels one epoch needs (mode "updates" only
    adds ciphertexts: any preset has the depth)."""
    from medfed.crypto.params import PRESETS, get_preset

    _check_dp(c)
    if c.keys == "threshold":
        _check_embeddings_threshold(c)
        return
    if c.dropouts:
        raise ConfigError(
            "dropouts in mode 'embeddings' need --keys threshold (the others recover a "
            "hospital's key share); with a shared key use --inject dropout:hospital=I,round=STAGE"
        )
    params = get_preset(c.ckks)
    needed = 2 + math.ceil(math.log2(c.sigmoid_degree + 1))
    if needed > params.depth:
        fits = sorted(
            (p.poly_modulus_degree, p.depth, n) for n, p in PRESETS.items() if p.depth >= needed
        )
        raise ConfigError(
            f"a degree-{c.sigmoid_degree} sigmoid needs {needed} CKKS levels per epoch, but "
            f"preset {c.ckks!r} has {params.depth}; use --ckks {fits[0][2]} or a lower "
            "--sigmoid-degree."
        )


def _check_embeddings_threshold(c: SimulationConfig) -> None:
    """Mode "embeddings" under threshold keys: OpenFHE's training preset (depth 6) fits a
    degree-3 sigmoid; dropouts within n - t; no DP or Ray batch workers yet."""
    if c.hospitals < 2:
        raise ConfigError("keys='threshold' needs at least 2 hospitals; use --keys shared")
    if c.sigmoid_degree > 3:
        raise ConfigError(
            f"sigmoid_degree={c.sigmoid_degree}: the threshold training preset has the levels "
            "of a degree-3 sigmoid; use --sigmoid-degree 3 or 1"
        )
    if c.workers:
        raise ConfigError("workers (Ray encrypted batch workers) need --keys shared")
    if c.dp_epsilon is not None or c.dp_noise is not None:
        raise ConfigError(
            "differential privacy in mode 'embeddings' needs --keys shared for now (the "
            "threshold path adds no noise to the head); use --keys shared or mode 'updates'"
        )
    if c.dropouts:
        if c.epochs < 2:
            raise ConfigError("dropouts happen mid-training: use --epochs 2 or more")
        t = c.hospitals // 2 + 1
        if c.dropouts > c.hospitals - t:
            raise ConfigError(
                f"dropouts={c.dropouts}: with {c.hospitals} hospitals the threshold setup is "
                f"{t}-of-{c.hospitals} and tolerates at most {c.hospitals - t} dropouts"
            )


def _embeddings_stages() -> tuple[str, ...]:
    from medfed.fl.faults import EMBEDDINGS_STAGES

    return tuple(EMBEDDINGS_STAGES)


@dataclass(frozen=True)
class ModeSpec:
    """What the configuration knows of a mode, without importing it (see :mod:`medfed.modes`,
    whose ``register_mode`` adds the specs of modes defined elsewhere)."""

    name: str
    module: str  # imported by medfed.modes.get_mode; registers the mode
    keys: tuple[str, ...]  # key setups it accepts ("none": no encryption)
    options: Mapping[str, Any] = field(default_factory=dict)  # fields only it uses: defaults
    check: Callable[[SimulationConfig], None] | None = None  # its own checks (ConfigError)
    fault_stages: Callable[[], tuple[str, ...]] | None = None  # stages --inject may name


#: Differential privacy's options (both built-in modes take them).
_DP_OPTIONS = {"dp_epsilon": None, "dp_noise": None, "dp_delta": 1e-5, "dp_clip": 1.0}

#: The registered modes' specs, the built-in ones first.
_MODES: dict[str, ModeSpec] = {
    "embeddings": ModeSpec(
        "embeddings",
        "medfed.modes.embeddings",
        keys=("shared", "threshold"),
        options={"dropouts": 0, "features": None, **_DP_OPTIONS},
        check=_check_embeddings,
        fault_stages=_embeddings_stages,
    ),
    "updates": ModeSpec(
        "updates",
        "medfed.modes.updates",
        keys=("none", "shared", "threshold"),  # "none": plain FedAvg, the baseline
        options={
            "dropouts": 0,
            "features": None,
            **_DP_OPTIONS,
        },
        check=_check_updates,
    ),
}
#: The built-in modes' specs (:func:`unregister_mode_spec` restores them).
_BUILTIN_MODES = dict(_MODES)


def mode_names() -> tuple[str, ...]:
    """The names of every known mode, built-in first."""
    return tuple(_MODES)


def mode_spec(name: str) -> ModeSpec:
    """The spec of mode ``name``; :class:`ConfigError` lists the known modes."""
    try:
        return _MODES[name]
    except KeyError:
        raise ConfigError(f"mode={name!r} is not one of {', '.join(mode_names())}.") from None


def register_mode_spec(spec: ModeSpec, replace: bool = False) -> None:
    """Make mode ``spec.name`` a valid ``mode`` (``replace``: over an existing spec)."""
    if spec.name in _MODES and not replace and _MODES[spec.name] != spec:
        raise ValueError(f"mode {spec.name!r} is already registered (pass replace=True)")
    _MODES[spec.name] = spec


def unregister_mode_spec(name: str) -> None:
    """Forget a mode registered at run time (a built-in one gets its own spec back)."""
    _MODES.pop(name, None)
    if name in _BUILTIN_MODES:
        _MODES[name] = _BUILTIN_MODES[name]


def __getattr__(name: str) -> Any:
    """``MODES``, ``MODE_KEYS`` and ``KEY_SETUPS``, as they stand now (modes can be added)."""
    if name == "MODES":
        return mode_names()
    if name == "MODE_KEYS":
        return {n: spec.keys for n, spec in _MODES.items()}
    if name == "KEY_SETUPS":
        return tuple(sorted({k for spec in _MODES.values() for k in spec.keys}))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
