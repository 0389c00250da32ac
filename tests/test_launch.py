"""How run_federation starts Flower's simulation engine (run_simulation is faked: no Ray)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from medfed.fl import launch
from medfed.fl.faults import parse_fault
from medfed.fl.messages import FederationError


@pytest.fixture
def flower(monkeypatch):
    """What run_federation hands the app factories and Flower's run_simulation."""
    import flwr.simulation

    import medfed.fl.aggregator
    import medfed.fl.hospital

    seen: dict = {}

    def hospital_app(workspace, mods=None):
        seen["mods"] = mods
        return "client-app"

    monkeypatch.setattr(medfed.fl.hospital, "make_hospital_app", hospital_app)
    monkeypatch.setattr(medfed.fl.aggregator, "make_aggregator_app", lambda *a, **k: "server-app")
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kw: seen.update(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return seen


def _run(faults=()):
    settings = SimpleNamespace(mode="embeddings", workers=0)
    with pytest.raises(FederationError, match="returned no result"):  # the fake returns nothing
        launch.run_federation("ws", settings, 3, backend="flower", faults=faults)


def test_faults_are_a_mod_of_the_hospital_app_not_a_patch(flower):
    _run()
    assert flower["mods"] == [] and flower["client_app"] == "client-app"
    _run([parse_fault("crash:hospital=1,round=upload")])
    assert len(flower["mods"]) == 1 and flower["mods"][0].__qualname__ == "fault_mod.<locals>.mod"


def test_actor_output_is_not_forwarded_to_the_console_unless_verbose(flower, caplog):
    """Ray's log_to_driver: the actors only print Flower's 'Manually terminating
    ClientAppActor' there; their failures reach the driver as task errors."""
    caplog.set_level(logging.INFO, logger="medfed")
    _run()
    init_args = flower["backend_config"]["init_args"]
    assert init_args["log_to_driver"] is False and init_args["address"] == "local"
    caplog.set_level(logging.DEBUG, logger="medfed")  # what -v sets
    _run()
    assert flower["backend_config"]["init_args"]["log_to_driver"] is True
