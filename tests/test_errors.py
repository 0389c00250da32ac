"""One error hierarchy (issue 19): every error medfed raises on purpose is a MedfedError, keeps
its builtin base, says what it means, and the CLI turns it into a message and exit status 2."""

import ast
import builtins
import importlib
from pathlib import Path

import pytest

import medfed
from medfed.errors import MedfedError
from medfed.simulate import main

# (module, class, the builtin base it had before MedfedError: `except ValueError` still works)
ERRORS = [
    ("medfed.errors", "ConfigError", ValueError),
    ("medfed.config", "ConfigError", ValueError),
    ("medfed.scale.cluster", "ClusterError", ValueError),
    ("medfed.experiments.sweep.spec", "SweepError", ValueError),
    ("medfed.crypto.params", "UnsafeParametersError", ValueError),
    ("medfed.crypto.errors", "CiphertextError", ValueError),
    ("medfed.crypto.errors", "KeyMaterialError", ValueError),
    ("medfed.crypto.channel", "ChannelError", ValueError),
    ("medfed.crypto.packing", "LayoutError", ValueError),
    ("medfed.crypto.threshold.errors", "ThresholdUnavailableError", RuntimeError),
    ("medfed.crypto.threshold.errors", "ThresholdParamsError", ValueError),
    ("medfed.crypto.threshold.errors", "ThresholdError", ValueError),
    ("medfed.crypto.threshold.errors", "ThresholdBudgetError", ValueError),
    ("medfed.fl.messages", "ProtocolError", ValueError),
    ("medfed.fl.messages", "FederationError", RuntimeError),
    ("medfed.fl.faults", "FaultSpecError", ValueError),
    ("medfed.data.partition", "PartitionError", ValueError),
    ("medfed.data.medmnist", "DatasetError", ValueError),
    ("medfed.embed.backbones", "BackboneError", ValueError),
]

# Internal signals, never shown to a user: a hospital's handler raises and catches them itself.
INTERNAL: set[str] = set()


@pytest.mark.parametrize("module,name,builtin", ERRORS, ids=[e[1] for e in ERRORS])
def test_every_error_is_a_medfed_error_and_keeps_its_builtin_base(module, name, builtin):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, MedfedError) and issubclass(cls, builtin)
    assert (cls.__doc__ or "").strip(), f"{name} has no docstring saying what it means"
    with pytest.raises(builtin):  # existing `except ValueError` code keeps catching it
        raise cls("the fix")


def test_medfed_error_is_public():
    assert medfed.MedfedError is MedfedError and "MedfedError" in medfed.__all__
    assert issubclass(medfed.ConfigError, MedfedError)


def _builtin_exceptions() -> set[str]:
    return {
        n
        for n, v in vars(builtins).items()
        if isinstance(v, type) and issubclass(v, BaseException) and not issubclass(v, Warning)
    }


def test_no_new_error_class_bypasses_the_hierarchy():
    """Every exception class in medfed derives from MedfedError, directly or through another
    medfed error, unless it is one of the internal signals."""
    root = Path(medfed.__file__).parent
    classes = {}  # name -> (base names, file)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                classes[node.name] = (bases, path.relative_to(root))
    medfed_errors = {"MedfedError"}
    while True:  # the closure: classes deriving from a medfed error
        more = {n for n, (bases, _) in classes.items() if bases & medfed_errors} - medfed_errors
        if not more:
            break
        medfed_errors |= more
    builtin = _builtin_exceptions()
    bypassing = {
        n: f
        for n, f in classes.items()
        if f[0] & builtin and n not in medfed_errors and n not in INTERNAL
    }
    assert not bypassing, f"derive these from MedfedError too: {bypassing}"
    assert {e[1] for e in ERRORS} <= medfed_errors


def test_a_preset_too_shallow_for_the_sigmoid_exits_2_naming_one_that_fits(capsys):
    argv = ["--hospitals", "3", "--ckks", "fast", "--sigmoid-degree", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfed: error: ") and "--ckks standard" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "error,status",
    [
        ("medfed.fl.messages.ProtocolError", 2),
        ("medfed.crypto.threshold.errors.ThresholdError", 2),
        ("medfed.crypto.errors.CiphertextError", 2),
        ("medfed.fl.messages.FederationError", 1),  # a run that failed, not a usage error
    ],
)
def test_errors_raised_during_a_run_exit_with_their_status(monkeypatch, capsys, error, status):
    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)

    def run(cfg):
        raise cls("only 1 of 3 hospitals answered; lower --dropouts")

    monkeypatch.setattr("medfed.runner.run", run)
    assert main(["--hospitals", "3", "--backend", "local"]) == status
    err = capsys.readouterr().err
    assert err.startswith("medfed: error: ") and "lower --dropouts" in err


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch):
    def run(cfg):
        raise ValueError("a bug, not a MedfedError")

    monkeypatch.setattr("medfed.runner.run", run)
    with pytest.raises(ValueError, match="a bug"):
        main(["--hospitals", "3", "--backend", "local"])
