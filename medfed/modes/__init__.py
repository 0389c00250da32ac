"""Federation modes, by name: :func:`get_mode`, :func:`list_modes`, :func:`register_mode`.

A mode is a :class:`Mode` (see :mod:`medfed.modes.base`). The built-in ones are imported on
first use: the configuration's static table (:class:`medfed.config.ModeSpec`: name, module,
key setups, options, checks) names each one's module, which ends in
``MODE = register_mode(MyMode())``. So ``import medfed`` and ``medfed.config`` stay free of
torch, TenSEAL and Flower, and the configuration validates a mode without importing it.

Adding a built-in mode: one module here plus its ``ModeSpec`` line in ``medfed.config``.
Outside medfed, ``register_mode(MyMode())`` before the run registers both at once.
"""

from __future__ import annotations

from importlib import import_module

from medfed.config import (
    ConfigError,
    ModeSpec,
    mode_names,
    mode_spec,
    register_mode_spec,
    unregister_mode_spec,
)
from medfed.modes.base import Mode, Prepared
from medfed.result import RunResult

__all__ = [
    "Mode",
    "Prepared",
    "RunResult",
    "UnknownModeError",
    "get_mode",
    "list_modes",
    "register_mode",
    "unregister_mode",
]

_REGISTRY: dict[str, Mode] = {}


class UnknownModeError(ConfigError, KeyError):
    """No mode of that name; the message lists the registered ones."""

    def __str__(self) -> str:  # not KeyError's quoted repr
        return str(self.args[0]) if self.args else ""


def _spec_of(mode: Mode) -> ModeSpec:
    return ModeSpec(
        mode.name,
        type(mode).__module__,
        keys=tuple(mode.keys),
        options=dict(mode.options),
        check=mode.validate,
        fault_stages=mode.fault_stages,
    )


def register_mode(mode: Mode, *, replace: bool = False) -> Mode:
    """Make ``mode`` available as ``SimulationConfig(mode=mode.name)``; returns it.

    A built-in mode keeps the configuration's spec of it; any other mode's name, keys,
    options, :meth:`~Mode.validate` and :meth:`~Mode.fault_stages` become its spec. Raises
    :class:`ValueError` if the name is empty or taken (``replace=True`` overrides).
    """
    if not isinstance(mode, Mode):
        raise TypeError(f"register_mode takes a Mode instance, got {type(mode).__name__}")
    name = mode.name
    if not name or not isinstance(name, str):
        raise ValueError(f"{type(mode).__name__}.name must be a non-empty string")
    if not mode.keys:
        raise ValueError(f"mode {name!r} must accept at least one key setup")
    known = _REGISTRY.get(name)
    if known is not None and known is not mode and not replace:
        raise ValueError(f"mode {name!r} is already registered (pass replace=True)")
    builtin = name in mode_names() and mode_spec(name).module == type(mode).__module__
    if not builtin:
        register_mode_spec(_spec_of(mode), replace=replace)
    _REGISTRY[name] = mode
    return mode


def unregister_mode(name: str) -> None:
    """Forget a registered mode (a built-in one comes back on the next :func:`get_mode`)."""
    _REGISTRY.pop(name, None)
    unregister_mode_spec(name)


def list_modes() -> list[str]:
    """Every mode's name: the built-in ones first, then those registered since."""
    return list(mode_names())


def get_mode(name: str) -> Mode:
    """The mode called ``name``, imported on first use; :class:`UnknownModeError` names the
    choices."""
    mode = _REGISTRY.get(name)
    if mode is None and name in mode_names():  # its module registers MODE on first import
        mode = register_mode(import_module(mode_spec(name).module).MODE)
    if mode is None:
        raise UnknownModeError(f"unknown mode {name!r}; choose one of {', '.join(list_modes())}")
    return mode
