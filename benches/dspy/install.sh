#!/usr/bin/env bash
# Install the DSPy baselines' Python environment (pinned), outside the clone:
#   benches/dspy/install.sh            # -> ~/.cache/cantante/dspy-venv
# DSPy talks to `cantante serve` through its OpenAI-compatible client
# (LiteLLM), so no model is downloaded; the package registry is the only
# network access.
set -euo pipefail
VENV="${CANTANTE_DSPY_VENV:-$HOME/.cache/cantante/dspy-venv}"
DSPY_VERSION=3.4.1
PY="${PYTHON:-python3.11}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import dspy, optuna, gepa, sys; sys.exit(dspy.__version__ != '$DSPY_VERSION')" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "dspy[optuna]==$DSPY_VERSION"
fi
"$VENV/bin/python" -c "import dspy; print('dspy', dspy.__version__, 'in $VENV')"
