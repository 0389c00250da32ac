"""The public API: ``import medfed`` is cheap, and federate() runs any mode on prepared data."""

import subprocess
import sys

import pytest

import medfed
from tests.conftest import synthetic_hospitals


def test_import_medfed_loads_neither_torch_nor_tenseal():
    code = (
        "import sys, medfed; medfed.SimulationConfig; "
        "print('torch' in sys.modules, 'tenseal' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_every_export_resolves_and_unknown_names_fail():
    for name in medfed.__all__:
        assert getattr(medfed, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        medfed.nope  # noqa: B018


@pytest.mark.parametrize("mode", medfed.list_modes())
def test_federate_takes_the_hospital_count_and_classes_from_the_data(mode):
    hospitals = synthetic_hospitals(n_hospitals=3, n=150, d=8, n_classes=2)
    cfg = medfed.SimulationConfig(
        mode=mode, keys="shared", epochs=3, rounds=2, backend="local", progress=False
    )
    m = medfed.federate(cfg, hospitals)  # cfg says 5 hospitals; the data have 3
    assert m["hospitals"] == 3 and m["n_classes"] == 2 and m["mode"] == mode
    assert m["accuracy"] > m["majority_accuracy"]
    medfed.print_summary(m)
