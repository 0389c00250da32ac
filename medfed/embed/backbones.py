"""A small registry of frozen timm DeiT backbones.

:func:`create_backbone` returns a frozen (eval mode, ``requires_grad=False``) timm model with
its classifier removed, so its forward pass yields pooled ``embed_dim`` embeddings. Weights
come from, in order: an explicit ``weights`` file, the Hugging Face hub (when allowed and
``HF_HUB_OFFLINE`` is not set), or a deterministic random initialisation that is announced
loudly with :class:`UntrainedBackboneWarning`.

``torch`` and ``timm`` are imported lazily inside functions so ``import medfed.embed`` is cheap.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import socket
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from medfed.errors import MedfedError, without_unsafe_advice

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKBONES",
    "BackboneError",
    "BackboneInfo",
    "UntrainedBackboneWarning",
    "create_backbone",
    "default_img_size",
    "hub_enabled",
    "resolve_backbone_name",
]

logger = logging.getLogger(__name__)

BACKBONES: dict[str, str] = {
    "deit_tiny": "deit_tiny_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_base": "deit_base_patch16_224",
}
"""Short name -> timm model name. Full timm names are accepted too."""

_TRUTHY = {"1", "true", "yes", "on"}
_SIZE_SUFFIX = re.compile(r"_(?P<size>\d{2,4})(?:\.[\w-]+)?$")
_TIMM_BUILDER_LOGGER = "timm.models._builder"


class BackboneError(MedfedError, ValueError):
    """A backbone could not be resolved or loaded; the message names the fix."""


class UntrainedBackboneWarning(UserWarning):
    """The backbone has random weights, so its embeddings are not pretrained DeiT features."""


@dataclass(frozen=True)
class BackboneInfo:
    """What was built: timm name, weight source and preprocessing constants."""

    name: str
    pretrained: bool
    weights: str  # "hub", a weights file path, or "random-init"
    embed_dim: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def hub_enabled(allow_hub: bool = True) -> bool:
    """True when a hub download may be attempted (``allow_hub`` and ``HF_HUB_OFFLINE`` unset)."""
    return allow_hub and os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in _TRUTHY


def resolve_backbone_name(name: str) -> str:
    """Map a short name (``deit_tiny``) or a timm model name to the timm model name."""
    key = str(name).strip()
    if key in BACKBONES:
        return BACKBONES[key]
    if key in BACKBONES.values():
        return key
    import timm

    if key and timm.is_model(key):
        return key
    candidates = list(dict.fromkeys([*BACKBONES, *BACKBONES.values(), *timm.list_models("deit*")]))
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(
        f"Unknown backbone {name!r}.{hint} Valid short names: {', '.join(BACKBONES)} "
        f"(or a timm model name such as {BACKBONES['deit_tiny']!r})."
    )


def default_img_size(name: str) -> int:
    """The native input size of a timm model, without building it (``..._224`` -> 224)."""
    timm_name = resolve_backbone_name(name)
    match = _SIZE_SUFFIX.search(timm_name)
    if match:
        return int(match.group("size"))
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name, allow_unregistered=True)
    if cfg is not None and cfg.input_size:
        return int(cfg.input_size[-1])
    return 224


@contextlib.contextmanager
def _capture_timm_load_log() -> Iterator[list[logging.LogRecord]]:
    """Collect timm's weight-loading log records (it reports missing keys only at INFO)."""
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    timm_logger = logging.getLogger(_TIMM_BUILDER_LOGGER)
    old_level, old_propagate = timm_logger.level, timm_logger.propagate
    handler = _Collect(logging.INFO)
    timm_logger.addHandler(handler)
    timm_logger.setLevel(logging.INFO)
    timm_logger.propagate = False
    try:
        yield records
    finally:
        timm_logger.removeHandler(handler)
        timm_logger.setLevel(old_level)
        timm_logger.propagate = old_propagate


def _replay(records: list[logging.LogRecord]) -> None:
    """Re-emit captured timm records that the caller's logging setup would have shown."""
    timm_logger = logging.getLogger(_TIMM_BUILDER_LOGGER)
    for record in records:
        if timm_logger.isEnabledFor(record.levelno):
            timm_logger.handle(record)


def _short_reason(exc: BaseException) -> str:
    """``exc`` in one line of at most 300 characters, without advice to load unsafely."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = without_unsafe_advice(" ".join(lines[:2]))
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _file_problem(path: Path, exc: BaseException) -> str:
    """Why ``path`` could not be loaded, in words that name the file's actual problem: torch's
    own message for a non-checkpoint advises an unsafe retry (``weights_only=False``), which
    medfed never relays."""
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return "the file is empty"
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the weights (fetch them with `git lfs pull`)"
    if path.suffix == ".safetensors":
        return f"it is not a valid safetensors file ({_short_reason(exc)})"
    if head.startswith(b"PK\x03\x04") and "weights_only" not in str(exc):
        return _short_reason(exc)  # a torch.save zip whose tensors do not fit the model
    decoded = head.decode("utf-8", errors="ignore")  # ignore: a character cut at 512 bytes
    if len(decoded) >= len(head) - 3 and all(c.isprintable() or c.isspace() for c in decoded):
        return "it is a text file, not a checkpoint"
    if head.startswith(b"\x93NUMPY"):
        return "it is a NumPy .npy array, not a checkpoint"
    if "weights_only" in str(exc) or "pickle" in type(exc).__name__.lower():
        return (
            "it is not a plain tensor state_dict (it may be a whole pickled model, a training "
            "state with other objects, another format, or a damaged file); medfed loads "
            "tensors only and never unpickles other objects, which can run code from the file"
        )
    return _short_reason(exc)


def _finish(
    model: torch.nn.Module, name: str, pretrained: bool, weights: str, img_size: int | None
) -> tuple[torch.nn.Module, BackboneInfo]:
    from timm.data import resolve_data_config

    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    cfg = resolve_data_config({}, model=model)
    size = int(img_size) if img_size is not None else int(cfg["input_size"][-1])
    info = BackboneInfo(
        name=name,
        pretrained=pretrained,
        weights=weights,
        embed_dim=int(model.num_features),
        img_size=size,
        mean=tuple(float(v) for v in cfg["mean"]),
        std=tuple(float(v) for v in cfg["std"]),
    )
    return model, info


def _load_weights_file(name: str, path: Path, kwargs: dict) -> torch.nn.Module:
    import timm

    if not path.is_file():
        raise BackboneError(
            f"Weights file {str(path)!r} does not exist. Pass --weights with the path of a timm "
            f".safetensors/.pth checkpoint for {name}."
        )
    expects = (
        f"expected a timm checkpoint for {name!r}: a .safetensors file (e.g. model.safetensors "
        f"from timm/{name} on the Hugging Face hub) or a .pth holding only the state_dict, "
        "written with torch.save(model.state_dict(), path)"
    )
    try:
        with _capture_timm_load_log() as records:
            model = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
            )
    except Exception as exc:  # shape mismatch, unreadable file, pickled objects, ...
        raise BackboneError(
            f"Weights file {str(path)!r} does not fit {name}: {_file_problem(path, exc)}. "
            f"Fix: {expects}."
        ) from exc
    for record in records:
        message = record.getMessage()
        if message.startswith("Missing keys"):
            keys = message[message.find("(") + 1 : message.find(")")].split(", ")
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            raise BackboneError(
                f"Weights file {str(path)!r} does not fit {name}: {len(keys)} of its parameters "
                f"are missing from the file ({shown}). Fix: {expects}."
            )
    _replay(records)
    return model


def _warn_untrained(name: str, seed: int) -> None:
    message = (
        f"BACKBONE IS UNTRAINED: {name} uses RANDOM weights (seed {seed}) because no pretrained "
        f"weights were available (no --weights file, and the hub is disabled or unreachable). "
        f"Accuracy is NOT representative of a pretrained DeiT. Fix: pass --weights FILE "
        f"(e.g. a timm .safetensors/.pth checkpoint for {name})."
    )
    warnings.warn(message, UntrainedBackboneWarning, stacklevel=3)
    if name not in _LOGGED_UNTRAINED:  # log once per process; the warning stays per call
        _LOGGED_UNTRAINED.add(name)
        logger.warning(message)


_LOGGED_UNTRAINED: set[str] = set()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Cheap probe of the hub host, so an offline machine does not sit through ~50 s of retries."""
    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(var) for var in proxies):
        return True  # cannot probe through a proxy cheaply; let huggingface_hub try
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_hub_file(name: str) -> Path | None:
    """The model's hub weights if already in the local Hugging Face cache, else None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            return None
        repo_id = cfg.hf_hub_id.split("@")[0]
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else []
        for filename in [*files, "model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    except Exception as exc:  # no huggingface_hub, odd cache layout, ...
        logger.info("could not look up cached hub weights for %s: %s", name, _short_reason(exc))
    return None


def _try_hub(name: str, kwargs: dict) -> torch.nn.Module | None:
    """Hub-pretrained model (online, or from the local HF cache when offline), else None."""
    import timm

    if _hub_reachable():
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # hub error, missing repo, ...
            logger.info("hub weights for %s unavailable (%s)", name, _short_reason(exc))
    cached = _cached_hub_file(name)
    if cached is not None:
        try:
            return _load_weights_file(name, cached, kwargs)
        except BackboneError as exc:
            logger.info("cached hub weights for %s unusable (%s)", name, exc)
    return None


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    img_size: int | None = None,
    allow_hub: bool = True,
    seed: int = 0,
) -> tuple[torch.nn.Module, BackboneInfo]:
    """Build a frozen timm backbone that outputs pooled embeddings.

    Weights: ``weights`` file if given, else the hub when ``allow_hub`` and not
    ``HF_HUB_OFFLINE=1`` (weights already in the local HF cache are used when the hub host is
    unreachable), else a deterministic random init (seeded by ``seed``) with a loud
    :class:`UntrainedBackboneWarning`. ``img_size`` overrides the model's input size.
    """
    timm_name = resolve_backbone_name(name)
    if img_size is not None and (isinstance(img_size, bool) or int(img_size) <= 0):
        raise BackboneError(f"img_size must be a positive integer, got {img_size!r}.")
    kwargs: dict = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = int(img_size)

    if weights is not None:
        path = Path(weights).expanduser()
        model = _load_weights_file(timm_name, path, kwargs)
        return _finish(model, timm_name, True, str(path), img_size)

    import timm
    import torch

    if hub_enabled(allow_hub):
        model = _try_hub(timm_name, kwargs)
        if model is not None:
            return _finish(model, timm_name, True, "hub", img_size)

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(timm_name, pretrained=False, **kwargs)
    except Exception as exc:
        raise BackboneError(
            f"Could not build {timm_name} with img_size={img_size!r}: {exc}. Fix: use an img_size "
            f"that is a multiple of the patch size (e.g. 32 or 224)."
        ) from exc
    _warn_untrained(timm_name, seed)
    return _finish(model, timm_name, False, "random-init", img_size)
