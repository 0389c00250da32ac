"""From a config to results: data preparation, plaintext yardsticks, outputs and sweeps.

:mod:`~medfed.experiments.prepare` turns a config into hospital datasets, the ``references``,
``updates_reference`` and ``yardsticks`` modules compute the plaintext baselines,
:mod:`~medfed.experiments.results` writes a run's outputs, and :mod:`~medfed.experiments.sweep`
runs grids of configs resumably (with :mod:`~medfed.experiments.plots` and
:mod:`~medfed.experiments.report`).
"""
