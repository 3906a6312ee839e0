#!/usr/bin/env bash
# `make notebook`: JupyterLab in its own small venv, with the project's venv as its kernel
# ("placesnet (Ray)"), then open notebooks/workshop.ipynb. JupyterLab stays out of the project's
# venv on purpose: its jupyter_events needs jsonschema's format extras, whose rfc3987-syntax
# builds a grammar on import and adds about 3 s to every `import ray` (every Ray worker).
#   VENV:     the project's venv (make setup)     JUPYTER_VENV: default ~/.cache/places365-ray/jupyter
#   JUPYTER_ARGS: extra arguments for `jupyter lab` (e.g. --no-browser --port 8889)
#   NOTEBOOK_SETUP_ONLY=1: set up and register the kernel, do not start JupyterLab
# On a JupyterHub, only the kernel is needed:
#   ~/.cache/places365-ray/venv/bin/python -m ipykernel install --user --name placesnet --display-name "placesnet (Ray)"
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$HOME/.cache/places365-ray/venv}"
JUPYTER_VENV="${JUPYTER_VENV:-$HOME/.cache/places365-ray/jupyter}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$JUPYTER_VENV/bin/jupyter-lab" ]; then
  echo "notebook: installing JupyterLab into $JUPYTER_VENV"
  "$PYTHON" -m venv "$JUPYTER_VENV"
  "$JUPYTER_VENV/bin/python" -m pip install --quiet jupyterlab==4.6.4
fi
# the kernel runs the project's venv, so the notebook imports placesnet, torch and Ray from there
"$VENV/bin/python" -m ipykernel install --prefix "$JUPYTER_VENV" --name placesnet \
  --display-name "placesnet (Ray)" > /dev/null 2>&1  # (its "may not be found" warning is wrong: JupyterLab of JUPYTER_VENV finds it)
echo "notebook: kernel 'placesnet (Ray)' -> $VENV/bin/python"
if [ "${NOTEBOOK_SETUP_ONLY:-0}" = "1" ]; then
  exit 0
fi
exec "$JUPYTER_VENV/bin/jupyter" lab notebooks/workshop.ipynb ${JUPYTER_ARGS:-}
