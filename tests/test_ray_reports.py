"""A hospital process that dies under Flower's Ray engine: Ray restarts it, and what Ray and
Flower report about it goes to a file, not the console (no Ray cluster is started here)."""

from __future__ import annotations

import logging

import pytest

from medfed.fl import launch
from medfed.fl.server_app import error_reason
from medfed.scale import cluster


@pytest.fixture
def console(caplog, tmp_path, monkeypatch):
    """The medfed logger's records (what the CLI's console handler prints); the reports go to
    ``tmp_path`` (Ray's session log directory when Ray runs)."""
    monkeypatch.setattr(cluster, "ray_logs_dir", lambda: tmp_path)
    caplog.set_level(logging.INFO, logger="medfed")
    return caplog


def test_flower_passes_the_recovery_options_to_the_hospitals_actors(monkeypatch):
    """Flower's simulation engine hands ``client_resources`` to ``ClientAppActor.options``:
    that is how the actors get ``max_restarts`` and ``max_task_retries``."""
    from flwr.simulation.ray_transport import ray_actor

    seen = {}

    class Actor:
        @staticmethod
        def options(**kw):
            seen.update(kw)
            return Actor

        @staticmethod
        def remote(**kw):
            return "actor"

    monkeypatch.setattr(ray_actor, "pool_size_from_resources", lambda resources: 2)
    resources = {"num_cpus": 1.0, "num_gpus": 0.0, **launch.ACTOR_RECOVERY}
    pool = ray_actor.BasicActorPool(Actor, resources, actor_kwargs={})
    pool.add_actors_to_pool(1)
    assert seen == resources and seen["max_restarts"] > 0 and seen["max_task_retries"] == 1


def test_flower_errors_go_to_the_file_and_one_line_says_where(tmp_path, console, capsys):
    flwr = logging.getLogger("flwr")
    with cluster.ray_reports_to_file() as reports:
        flwr.error("Traceback (most recent call last): ... ray.exceptions.ActorDiedError")
        flwr.error("a second report")
        flwr.warning("below ERROR: not a report")
    assert flwr.propagate  # restored
    assert reports.path == tmp_path / cluster.REPORTS_FILE
    text = reports.path.read_text()
    assert "ActorDiedError" in text and "a second report" in text and "below" not in text
    lines = [r.getMessage() for r in console.records if r.name.startswith("medfed")]
    assert lines == [reports.where()] and str(reports.path) in lines[0]  # one line, once
    assert all("Traceback" not in r.getMessage() for r in console.records)
    assert "Traceback" not in capsys.readouterr().err


def test_raylet_notices_go_to_the_file(console, capsys):
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    notice = {"pid": "raylet", "is_err": False, "lines": ["Raylet is terminated.", "[C++] x.cc:1"]}
    actor = {"pid": 7, "is_err": False, "lines": ["an actor's own line"], "actor_name": "A"}
    with cluster.ray_reports_to_file() as reports:
        ray_worker.print_to_stdstream(notice, ignore_prefix=False)
        ray_worker.print_to_stdstream(actor, ignore_prefix=False)  # log_to_driver's: untouched
    assert ray_worker.print_to_stdstream is original  # restored
    out = capsys.readouterr().out
    assert "Raylet is terminated" not in out and "an actor's own line" in out
    assert "Raylet is terminated.\n[C++] x.cc:1" in reports.path.read_text()
    assert reports.count == 1


def test_an_actor_told_to_exit_is_not_a_failure(console, capsys):
    """What the raylet says when Flower stops its ClientApp actors at the end of a run."""
    import ray._private.worker as ray_worker

    bye = (
        "Task ClientAppActor.terminate failed. There are 1 retries remaining, so the task will "
        "be retried. Error: The actor is temporarily unavailable: IntentionalSystemExit: "
        "Worker exits with an exit code 0. exit_actor() is called"
    )
    with cluster.ray_reports_to_file() as reports:
        ray_worker.print_to_stdstream({"pid": "raylet", "lines": [bye]}, ignore_prefix=False)
    assert reports.count == 0 and reports.path is None and not console.records
    assert "IntentionalSystemExit" not in capsys.readouterr().out
    with cluster.ray_reports_to_file() as reports:  # a real death beside it is still reported
        ray_worker.print_to_stdstream(
            {"pid": "raylet", "lines": [bye, "A worker died"]}, ignore_prefix=False
        )
    assert reports.count == 1


def test_verbose_keeps_the_reports_on_the_console_too(console, capsys):
    import ray._private.worker as ray_worker

    with cluster.ray_reports_to_file(console=True) as reports:
        ray_worker.print_to_stdstream(
            {"pid": "raylet", "is_err": False, "lines": ["A worker died"]}, ignore_prefix=False
        )
        assert logging.getLogger("flwr").propagate
    assert "A worker died" in capsys.readouterr().out and reports.count == 1


def test_no_failure_no_file_and_no_line(console):
    with cluster.ray_reports_to_file() as reports:
        logging.getLogger("flwr").info("the simulation starts")
    assert reports.path is None and not console.records


def test_a_dead_process_is_one_sentence_in_the_ledger():
    flower = (
        "<class 'ray.exceptions.OutOfMemoryError'>:<'1 worker(s) were killed due to the node "
        "running low on memory. Memory on the node (IP: 10.0.0.1) was 22GB / 23GB (0.96) ...'>"
    )
    assert error_reason(flower) == (
        "the hospital's process died mid-round, killed for lack of memory (Ray: "
        "OutOfMemoryError; see Ray's logs)"
    )
    died = "<class 'ray.exceptions.ActorDiedError'>:<'The actor died unexpectedly ...'>"
    assert error_reason(died).startswith("the hospital's process died mid-round (Ray: ActorDied")
    assert error_reason("hospital-1: upload failed") == "hospital-1: upload failed"
