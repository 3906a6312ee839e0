#!/usr/bin/env bash
# Tools the benchmarks use besides the venv: wrk (a compiled HTTP load generator, Debian's
# package), so benchmarks/serve.py can tell the endpoint's ceiling from its Python client's.
# `make bench` runs this; without root or apt it says so and the benchmark skips the wrk rows.
set -uo pipefail
if command -v wrk > /dev/null; then
  exit 0
fi
if ! command -v apt-get > /dev/null; then
  echo "bench-tools: no apt-get here: install wrk yourself for the wrk rows of benchmarks/serve.py" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo > /dev/null && sudo -n true 2> /dev/null; then SUDO="sudo -n"; else
    echo "bench-tools: not root and no passwordless sudo: install wrk (apt-get install wrk) for the wrk rows" >&2
    exit 0
  fi
fi
echo "bench-tools: installing wrk (apt-get)"
$SUDO apt-get install -y -q wrk > /dev/null 2>&1 || { $SUDO apt-get update -q > /dev/null 2>&1 && $SUDO apt-get install -y -q wrk > /dev/null 2>&1; } \
  || echo "bench-tools: could not install wrk; benchmarks/serve.py skips its wrk rows" >&2
exit 0
