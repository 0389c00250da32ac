"""Image preprocessing and batched, frozen-backbone embedding extraction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from medfed.embed.backbones import BackboneInfo

if TYPE_CHECKING:
    import torch

__all__ = ["embed_images", "preprocess"]


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray):
        raise ValueError(
            f"images must be a numpy array, got {type(images).__name__}; pass np.asarray(images)."
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 (0..255), got {images.dtype}; convert floats in [0, 1] with "
            f"(images * 255).round().astype(np.uint8)."
        )
    ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    if not ok:
        raise ValueError(
            f"images must have shape (N, H, W) (greyscale) or (N, H, W, 3) (RGB, channels last), "
            f"got {images.shape}; move channels last with np.moveaxis(images, 1, -1)."
        )
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise ValueError(f"images have an empty spatial size {images.shape[1:3]}.")


def preprocess(images: np.ndarray, info: BackboneInfo) -> torch.Tensor:
    """uint8 ``(N,H,W)`` / ``(N,H,W,3)`` -> normalised float ``(N,3,img_size,img_size)``.

    Scales to [0, 1], repeats greyscale to 3 channels, resizes (bicubic, antialiased,
    ``align_corners=False``, clamped to [0, 1]) and normalises with ``info.mean``/``info.std``.
    """
    import torch
    import torch.nn.functional as F

    _check_images(images)
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    if x.ndim == 3:
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    else:
        x = x.permute(0, 3, 1, 2)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
    size = int(info.img_size)
    if tuple(x.shape[-2:]) != (size, size) and x.shape[0] > 0:
        x = F.interpolate(
            x.contiguous(), size=(size, size), mode="bicubic", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous()


def embed_images(
    model: torch.nn.Module,
    info: BackboneInfo,
    images: np.ndarray,
    batch_size: int = 64,
    progress: bool = True,
    description: str = "embedding",
) -> np.ndarray:
    """Embed uint8 images with a frozen backbone -> float32 ``(N, info.embed_dim)``.

    Images are preprocessed one batch at a time (memory stays bounded at 224 px) under
    ``torch.inference_mode()``; a rich progress bar is shown when ``progress`` is True.
    """
    import torch

    _check_images(images)
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)
    n = int(images.shape[0])
    out = np.empty((n, int(info.embed_dim)), dtype=np.float32)
    if n == 0:
        return out
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")

    def run(advance=None) -> None:
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                x = preprocess(images[start:stop], info).to(device)
                feats = model(x)
                if feats.ndim != 2 or feats.shape[1] != info.embed_dim:
                    raise ValueError(
                        f"backbone {info.name} returned shape {tuple(feats.shape)}, expected "
                        f"(batch, {info.embed_dim}); build it with create_backbone (num_classes=0)."
                    )
                out[start:stop] = feats.float().cpu().numpy()
                if advance is not None:
                    advance(stop - start)

    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(description, total=n)
            run(lambda k: bar.advance(task, k))
    else:
        run()

    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise ValueError(
            f"{bad} of {n} embeddings from {info.name} are not finite (NaN/Inf); check the "
            f"weights file ({info.weights}) and that images are valid uint8 arrays."
        )
    return out
