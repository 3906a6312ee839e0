#!/usr/bin/env bash
# Regenerate serving/scene_pb2.py and serving/scene_pb2_grpc.py from serving/scene.proto.
# grpcio-tools goes to a throwaway folder, not the project's venv: only the generated code (which
# needs grpcio and protobuf, both already there through Ray) is part of the product.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-$HOME/.cache/places365-ray/venv}"
TOOLS="${GRPC_TOOLS_DIR:-$HOME/.cache/places365-ray/grpc-tools}"
if [ ! -d "$TOOLS/grpc_tools" ]; then
    "$VENV/bin/python" -m pip install --quiet --target "$TOOLS" grpcio-tools==1.85.1
fi
PYTHONPATH="$TOOLS" "$VENV/bin/python" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. \
    --grpc_python_out=. serving/scene.proto
echo "generated serving/scene_pb2.py, serving/scene_pb2.pyi, serving/scene_pb2_grpc.py"
