#!/usr/bin/env bash
# Create or update the Python 3.10 OpenFHE environment (.venv-threshold) and run the
# threshold tests in it. Idempotent; pytest's exit code is propagated (exit 5, "no tests
# collected", fails the run: it would mean OpenFHE did not import).
#
# OpenFHE publishes wheels only for CPython 3.10 (*.0.22.4) and 3.12 (*.0.24.4, which needs a
# newer libstdc++ than Debian 12 has), so the main 3.11 environment cannot run these tests.
# medfed is installed with --no-deps: its main dependencies (tenseal 0.3.18, numpy 2.4.6) do
# not exist for 3.10. medfed.crypto.threshold needs only numpy, openfhe and cryptography; mode
# "updates" with threshold keys and --features adds flwr (1.30: flwr 1.41 needs Python 3.11;
# same Message API), pyyaml, rich and scikit-learn (the yardsticks of every result; what
# `pip install -e ".[threshold]"` gives on 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."

OPENFHE_VERSION="1.6.1.0.22.4"
FLWR_VERSION="1.30.0"
VENV=".venv-threshold"
PY310="${PY310:-}"
if [[ -z "$PY310" ]]; then
  if command -v pyenv >/dev/null 2>&1 && [[ -x "$(pyenv root)/versions/3.10.13/bin/python" ]]; then
    PY310="$(pyenv root)/versions/3.10.13/bin/python"
  elif command -v python3.10 >/dev/null 2>&1; then
    PY310="$(command -v python3.10)"
  else
    echo "threshold_env: no CPython 3.10 found (pyenv 3.10.13 or python3.10); set PY310=" >&2
    exit 2
  fi
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY310" -m venv "$VENV"
fi
versions() {
  "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("openfhe"), m.version("flwr"))'
}
if ! "$VENV/bin/python" -c "import openfhe, numpy, cryptography, flwr, ray, yaml, rich, sklearn, pytest, hypothesis" \
    2>/dev/null || [[ "$(versions 2>/dev/null)" != "$OPENFHE_VERSION $FLWR_VERSION" ]]; then
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "openfhe==$OPENFHE_VERSION" "flwr[simulation]==$FLWR_VERSION" numpy cryptography pyyaml rich \
    "scikit-learn>=1.5" pytest hypothesis
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps -e .

# --confcutdir keeps pytest from loading tests/conftest.py (it imports tenseal).
"$VENV/bin/python" -m pytest tests/threshold -m openfhe -q --confcutdir=tests/threshold "$@"
