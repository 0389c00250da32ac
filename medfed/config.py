"""The run configuration: one frozen dataclass, loadable from YAML, validated at the boundary."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

MODES = ("embeddings",)
KEY_SETUPS = ("shared",)
SPLITS = ("iid", "dirichlet")


class ConfigError(ValueError):
    """An invalid or unknown configuration value; the message names the key and the fix."""


@dataclass(frozen=True)
class SimulationConfig:
    """Every knob of one federation run (CLI flags and YAML keys share these names)."""

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
    epochs: int = 30
    lr: float = 2.0
    sigmoid_degree: int = 3
    sigmoid_radius: float = 8.0
    bucket: int = 32
    feature_scale: float = 1.0
    backend: str = "flower"
    client_cpus: float = 1.0
    workers: int = 0
    ray_address: str | None = None
    cache_dir: str | None = None
    out: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        _validate(self)

    def replace(self, **changes: Any) -> SimulationConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SimulationConfig:
        data = {k.replace("-", "_"): v for k, v in (data or {}).items()}
        names = cls.field_names()
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"{source}: unknown key(s) {', '.join(hints)}; valid keys: {', '.join(names)}."
            )
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SimulationConfig:
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
    positive_int("seed", c.seed, low=0)
    positive_int("workers", c.workers, low=0)
    _choice("mode", c.mode, MODES, " Mode 'updates' is planned (issue 4).")
    _choice("keys", c.keys, KEY_SETUPS, " Threshold keys are planned (issue 4).")
    _choice("split", c.split, SPLITS)
    _choice("backend", c.backend, ("flower", "local"))
    for name in ("alpha", "lr", "sigmoid_radius", "feature_scale", "client_cpus"):
        value = getattr(c, name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"{name} must be a positive number, got {value!r}")
    if c.sigmoid_degree not in (1, 3, 5):
        raise ConfigError(f"sigmoid_degree={c.sigmoid_degree!r} must be 1, 3 or 5")
    _check_ckks(c)
    if c.img_size is not None:
        positive_int("img_size", c.img_size, low=16)


def _check_ckks(c: SimulationConfig) -> None:
    """The preset exists and has the levels one epoch needs (checked before any embedding)."""
    import math

    from medfed.crypto.params import PRESETS, UnsafeParametersError, get_preset

    try:
        params = get_preset(c.ckks)
    except UnsafeParametersError as e:
        raise ConfigError(str(e)) from None
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
