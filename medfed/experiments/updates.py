"""What only mode "updates" adds to a run: the dropout plan and the stages of its setup phase
(the run driver is :mod:`medfed.modes.updates`; its hospitals come from
:mod:`medfed.experiments.prepare`, from a features file or the embeddings pipeline).

Nothing here imports TenSEAL, torch or timm: with ``--features`` and threshold keys the run
works in the Python 3.10 OpenFHE environment.
"""

from __future__ import annotations

import numpy as np

from medfed.config import SimulationConfig

#: Stages of the key setup and the statistics round (the rest is the training phase).
SETUP_STAGES = ("key-", "public-context", "stats")


def dropout_plan(cfg: SimulationConfig) -> dict[int, int]:
    """``--dropouts K``: K hospitals (seeded choice) stop answering from round ``rounds // 2``.

    Hospital index -> FedAvg round; :func:`medfed.fl.faults.dropout_faults` makes the plan
    ``dropout`` faults of those hospitals, the one way a simulated hospital drops out.
    """
    if not cfg.dropouts:
        return {}
    chosen = np.random.default_rng(cfg.seed).choice(cfg.hospitals, cfg.dropouts, replace=False)
    return {int(i): cfg.rounds // 2 for i in sorted(chosen)}
