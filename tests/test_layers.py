"""The import layers of issue 19, one way and without cycles: ``lint-imports`` keeps the
contracts in pyproject.toml (``[tool.importlinter]``). Imports inside functions count."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# importlinter.cli has no __main__: call the `lint-imports` entry point's function directly
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def test_the_import_contracts_are_kept():
    args = ["--no-cache", "--no-logo", str(ROOT / "pyproject.toml")]
    r = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "0 broken" in out and "kept" in out, out
