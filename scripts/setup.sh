#!/usr/bin/env bash
# Create (or update) the project's virtual environment: the project itself, installed editable
# with its pinned dependencies and the dev tools (`pip install -e .[dev]`, pins in pyproject.toml).
#   VENV: where it lives (default ~/.cache/places365-ray/venv, outside the clone, so every clone
#         and CI run shares one 5.5 GB environment instead of building its own).
#   MOTO_VENV: a small venv of its own (default: next to VENV) with moto's S3 server, which
#         tests/test_object_storage.py starts on 127.0.0.1 (boto3 and Flask stay out of the Ray venv).
# As root, it also installs Debian's chromium and chromium-driver when they are missing: the
# headless browser that tests/test_web_page.py drives (with Selenium, from the dev extras).
# Re-running is cheap: dependencies are reinstalled only when pyproject.toml changed (or, for
# MOTO_VENV, the pins below), and the editable install is pointed at this clone when it points at
# another one (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$HOME/.cache/places365-ray/venv}"
PYTHON="${PYTHON:-python3}"
MOTO_VENV="${MOTO_VENV:-$(dirname "$VENV")/moto-venv}"
# 5.2.6: moto 5.2.1's CompleteMultipartUpload fails with pyarrow 26 (every checkpoint upload)
MOTO_PINS=("moto[s3]==5.2.6" "flask==3.1.3" "flask-cors==6.0.5")
stamp="$VENV/.pyproject.toml"
here="$(pwd -P)"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
if ! cmp -s pyproject.toml "$stamp"; then
  echo "setup: installing the project and its pinned dependencies (first time: torch + Ray, a few minutes, ~6 GB)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[dev]"
  cp pyproject.toml "$stamp"
  echo "setup: done ($("$VENV/bin/python" -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")'))"
fi
# One venv, many clones: the editable install must be this clone's.
installed="$(cd / && "$VENV/bin/python" -c 'import placesnet, pathlib; print(pathlib.Path(placesnet.__file__).resolve().parents[1])' 2>/dev/null || true)"
if [ "$installed" != "$here" ]; then
  echo "setup: pointing the editable install at $here"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e .
fi
# The S3 server for the object-storage tests. Without it (no network, say) those tests are skipped
# with the reason; the rest of the setup does not depend on it.
if [ "$(cat "$MOTO_VENV/.pins" 2>/dev/null)" != "${MOTO_PINS[*]}" ]; then
  echo "setup: installing moto's S3 server into $MOTO_VENV (for tests/test_object_storage.py)"
  if "$PYTHON" -m venv --clear "$MOTO_VENV" \
      && "$MOTO_VENV/bin/python" -m pip install --quiet "${MOTO_PINS[@]}"; then
    echo "${MOTO_PINS[*]}" > "$MOTO_VENV/.pins"
  else
    echo "setup: could not install ${MOTO_PINS[*]} into $MOTO_VENV: the object-storage tests will be skipped" >&2
  fi
fi
# The browser for tests/test_web_page.py: Debian's chromium and its driver (Selenium's own browser
# download cannot work without internet). Without them those tests are skipped with the reason.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing chromium and chromium-driver (for tests/test_web_page.py)"
    log="$(mktemp)"
    if { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; } \
        >"$log" 2>&1; then
      rm -f "$log"
    else
      echo "setup: could not install chromium chromium-driver (see $log): the browser tests will be skipped" >&2
    fi
  else
    echo "setup: no chromium/chromedriver, and only root can apt-get install chromium chromium-driver:" \
      "the browser tests will be skipped" >&2
  fi
fi
