"""Write a features file for ``--mode updates --features FILE`` from the embeddings pipeline.

Runs the pipeline's own ``prepare()`` (dataset resolution, validation, frozen-backbone
embedding with the on-disk feature cache), then saves the full train and test splits::

    python simulations/export_features.py --dataset breastmnist --out runs/features/breast.npz
    python simulations/export_features.py --dataset ../shared/data/medmnist/retinamnist.npz \
        --out runs/features/retina.npz

The ``.npz`` holds ``train_features`` / ``test_features`` (float32, one row per image),
``train_labels`` / ``test_labels`` (int64), ``n_classes``, ``dataset``, ``backbone``,
``backbone_weights`` and ``backbone_pretrained``. A run on the file partitions the train split
over the hospitals exactly as a run on the dataset does (same ``--split``/``--alpha``/``--seed``),
and needs no torch, so it also works in the Python 3.10 OpenFHE environment.

Options other than ``--out`` are ``python -m medfed.simulate``'s (``--model``, ``--weights``,
``--img-size``, ``--data-root``, ``--cache-dir``, ``--no-progress``).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from medfed.config import SimulationConfig
    from medfed.embed import UntrainedBackboneWarning
    from medfed.errors import MedfedError, format_user_error
    from medfed.experiments.prepare import prepare

    p = argparse.ArgumentParser(
        prog="python simulations/export_features.py",
        description="Embed a MedMNIST dataset with the frozen backbone and write the features "
        "file that --mode updates --features FILE reads.",
    )
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument(
        "--dataset",
        default="breastmnist",
        help="MedMNIST flag or path to a MedMNIST-layout npz (default breastmnist)",
    )
    p.add_argument("--data-root", help="folder with MedMNIST npz files")
    p.add_argument(
        "--model",
        default="deit_tiny",
        metavar="{deit_tiny,deit_small,deit_base}",
        help="frozen backbone (default deit_tiny)",
    )
    p.add_argument("--weights", help="local pretrained weights file for the backbone")
    p.add_argument("--img-size", type=int, help="backbone input size (default 224)")
    p.add_argument("--cache-dir", help="feature cache folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = vars(p.parse_args(argv))
    out = Path(args.pop("out"))
    try:
        cfg = SimulationConfig.from_dict(args, source="command line")
        with warnings.catch_warnings():
            # medfed.embed logs an untrained backbone once per process (and the last line
            # below says so again); its Python warning would repeat it once per call site,
            # so, as in medfed.simulate, only the logged message is shown
            warnings.simplefilter("ignore", UntrainedBackboneWarning)
            data = prepare(cfg)
    except MedfedError as e:
        print(format_user_error(e), file=sys.stderr)
        return 2
    _, train_labels = data.dataset.split("train")
    _, test_labels = data.dataset.split("test")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        train_features=np.asarray(data.train_features, dtype=np.float32),
        train_labels=np.asarray(train_labels, dtype=np.int64),
        test_features=np.asarray(data.test_features, dtype=np.float32),
        test_labels=np.asarray(test_labels, dtype=np.int64),
        n_classes=np.int64(data.dataset.n_classes),
        dataset=data.dataset.name,
        backbone=data.backbone.name,
        backbone_weights=str(data.backbone.weights),
        backbone_pretrained=bool(data.backbone.pretrained),
    )
    print(
        f"wrote {out}: {data.dataset.name}, {len(train_labels)} train / {len(test_labels)} test, "
        f"d={data.train_features.shape[1]}, backbone {data.backbone.name} "
        f"({'pretrained' if data.backbone.pretrained else 'UNTRAINED: random weights'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
