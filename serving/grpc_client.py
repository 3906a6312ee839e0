"""Query the scene classifier over gRPC (serving/scene.proto, Serve's gRPC proxy).

    python serving/grpc_client.py photo.jpg other.png                  # one request, both images
    python serving/grpc_client.py ~/photos --per-request 16 --target gpu-node:9000
    python serving/grpc_client.py photo.jpg --top-k 3 --json

The endpoint must run with Serve's gRPC proxy on (serving/config.yaml's grpc_options, or
``serve start --grpc-port 9000 --grpc-servicer-functions SERVICER`` before ``serve run``, where
SERVICER is serving.scene_pb2_grpc.add_SceneClassifierServicer_to_server). With a key set
(api_key_env/api_key_file) the client sends ``authorization: Bearer $PLACESNET_API_KEY``.
Exit code 1 if any image failed, 2 for a refused request (the gRPC status and its message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from serving.client import collect, positive_int
from serving.scene_pb2 import PredictRequest
from serving.scene_pb2_grpc import SceneClassifierStub

APPLICATION = "placesnet"  # the Serve application's name (serving/config.yaml)


def metadata(api_key: str | None, application: str = APPLICATION) -> list[tuple[str, str]]:
    """gRPC metadata of a request: which Serve app, and the bearer token when there is one."""
    return [("application", application)] + ([("authorization", f"Bearer {api_key}")] if api_key else [])


def predict(
    stub: SceneClassifierStub,
    images: list[bytes],
    top_k: int = 0,
    api_key: str | None = None,
    timeout: float = 60.0,
    application: str = APPLICATION,
):
    """One Predict call: the reply (one result per image, in order). Raises grpc.RpcError."""
    return stub.Predict(
        PredictRequest(images=images, top_k=top_k), metadata=metadata(api_key, application), timeout=timeout
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--target", default="127.0.0.1:9000", help="gRPC HOST:PORT (default: %(default)s)")
    p.add_argument(
        "--top-k", type=positive_int, default=0, help="classes per image (default: the endpoint's)"
    )
    p.add_argument(
        "--per-request", type=positive_int, default=16, help="images per Predict call (default: %(default)s)"
    )
    p.add_argument("--application", default=APPLICATION, help="Serve application (default: %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default: %(default)s)")
    p.add_argument(
        "--api-key-env",
        default="PLACESNET_API_KEY",
        metavar="NAME",
        help="send the bearer token in $NAME when it is set (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="one JSON document with every answer")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    files, _ = collect(args.paths)
    api_key = os.environ.get(args.api_key_env) or None
    results, notes = [], set()
    with grpc.insecure_channel(args.target) as channel:
        stub = SceneClassifierStub(channel)
        for start in range(0, len(files), args.per_request):
            group = files[start : start + args.per_request]
            try:
                reply = predict(
                    stub, [p.read_bytes() for p in group], args.top_k, api_key, args.timeout, args.application
                )
            except grpc.RpcError as e:
                print(f"grpc_client.py: error: {e.code().name}: {e.details()}", file=sys.stderr)
                return 2
            notes.add(reply.note)
            for path, r in zip(group, reply.results):
                results.append(
                    {
                        "image": str(path),
                        "error": r.error or None,
                        "predictions": [
                            {"label": p.label, "class_index": p.class_index, "probability": p.probability}
                            for p in r.predictions
                        ],
                    }
                )
    if args.json:
        print(json.dumps({"results": results, "notes": sorted(n for n in notes if n)}, indent=2))
    else:
        for note in sorted(n for n in notes if n):
            print(f"note: {note}")
        for r in results:
            if r["error"]:
                print(f"{r['image']}: error: {r['error']}", file=sys.stderr)
            else:
                print(
                    f"{r['image']}: "
                    + ", ".join(f"{p['label']} {p['probability']:.1%}" for p in r["predictions"])
                )
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
