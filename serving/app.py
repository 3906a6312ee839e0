"""Ray Serve endpoint for a DeepCNN checkpoint: autoscaling replicas, dynamic batching, FastAPI.

    serve run serving.app:build_app checkpoint=~/ray_results/deepcnn-sample-20261127-120000
    serve run serving.app:build_app checkpoint=SWEEP_DIR/best.json max_replicas=4 num_gpus=0.5
    serve deploy serving/config.yaml            # the same options in a config file

    curl -X POST --data-binary @photo.jpg -H 'Content-Type: image/jpeg' localhost:8000/predict
    curl -F file=@photo.png 'localhost:8000/predict?top_k=3'
    open http://localhost:8000/docs             # the OpenAPI page

``checkpoint`` is a checkpoint directory, a training run directory (its best checkpoint) or a
JSON file naming ``best_checkpoint`` (a run's summary.json, a sweep's best.json). The model, class
names and image size come from the checkpoint alone; preprocessing is the training's eval
transform, so answers match ``rayjobs/predict.py``.
"""

import asyncio
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from placesnet.images import MAX_PIXELS

DEFAULTS: dict[str, Any] = {
    "min_replicas": 2,  # where the cluster has room (see replicas_with_room); else 1
    "max_replicas": 2,
    "target_ongoing_requests": 8,
    "upscale_delay_s": 30.0,  # Serve's defaults: add a replica after 30 s of sustained load,
    "downscale_delay_s": 600.0,  # remove one after 10 min of less
    "num_cpus": 1.0,
    "num_gpus": 0.0,
    "max_batch_size": 16,
    "batch_wait_timeout_s": 0.01,
    "adaptive_batching": 1,  # 1: a request with no other in flight on its replica skips the wait
    "max_images_per_request": 64,  # multipart requests with several `file` fields
    "gpu_decode": 1,  # 1: a replica with a GPU decodes JPEGs with nvJPEG (0: always the CPU threads)
    "top_k": 5,
    "max_body_bytes": 20 * 1024 * 1024,
    "max_pixels": MAX_PIXELS,
}

app = FastAPI(
    title="placesnet scene classifier",
    description="Places365 scene classification with DeepCNN. POST an image to /predict.",
)


class ClientError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


EMPTY_FIELD = "empty 'file' field"


def _bad_image(e: Exception) -> ClientError:
    """An image the decoder refused: 415 if it is no image format at all, else 400."""
    return ClientError(415 if "not a recognised" in str(e) else 400, str(e))


# --- optional bearer token (api_key_env / api_key_file) ------------------------------------------


def read_api_key(env_name: str = "", key_file: str = "") -> str | None:
    """The endpoint's key: the environment variable ``env_name``, else the file named by
    ``<env_name>_FILE`` (the Docker/Kubernetes secrets convention) or by ``key_file``. None when
    neither option is set; RuntimeError when one is set but yields no key."""
    from pathlib import Path

    if not env_name and not key_file:
        return None
    if env_name and os.environ.get(env_name, "").strip():
        return os.environ[env_name].strip()
    path = key_file or (os.environ.get(f"{env_name}_FILE", "") if env_name else "")
    if not path:
        raise RuntimeError(f"no API key: ${env_name} and ${env_name}_FILE are unset where this replica runs")
    try:
        key = Path(path).read_text().strip()
    except OSError as e:
        raise RuntimeError(f"API key file {path}: {e.strerror}") from None
    if not key:
        raise RuntimeError(f"API key file {path} is empty")
    return key


@app.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 (no such route), 405 (wrong method), ...: the same ``{"error": ...}`` as every other error."""
    return JSONResponse(
        {"error": f"{exc.detail}: {request.method} {request.url.path}"},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug or a failing device on the replica: 500, still as JSON (the traceback goes to the
    replica's log). Requests a crashed replica was holding are answered by Serve's proxy instead,
    in plain text: see docs/reliability.md."""
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}"}, status_code=500)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


# /predict reads its body itself (raw bytes or a multipart form, with streaming size limits), so
# FastAPI cannot infer it: this documents both forms, and /docs' "Try it out" can send an image.
_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": (
            "The image: its raw bytes (Content-Type image/jpeg, image/png, image/webp, ...) or a "
            "multipart form whose field `file` holds it."
        ),
        "content": {
            "image/jpeg": _BINARY,
            "image/png": _BINARY,
            "image/webp": _BINARY,
            "application/octet-stream": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}


@serve.deployment(name="SceneClassifier", max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(app)
class SceneClassifier:
    """One replica: the model on its GPU if it has one, requests batched for inference."""

    def __init__(self, checkpoint: str, options: dict) -> None:
        import torch

        from placesnet.checkpoint import load_checkpoint
        from placesnet.config import pretty
        from placesnet.data.transforms import eval_transform, normalize

        self.torch = torch
        self.normalize = normalize
        self.options = {**DEFAULTS, **options}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_checkpoint(checkpoint, self.device)
        self.transform = eval_transform(self.loaded.config.image_size)
        self.labels = [pretty(c) for c in self.loaded.classes]
        self.model_id = f"{self.loaded.config.model}:{self.loaded.path.parent.name}/{self.loaded.path.name}"
        # the key stays in this replica's memory; /healthz is left open for probes
        self.api_key = read_api_key(self.options.get("api_key_env", ""), self.options.get("api_key_file", ""))
        self.in_flight = 0  # /predict requests of this replica between their body and their answer
        # Decoding runs in threads (PIL releases the GIL), as many as the CPUs this replica was
        # given: more would only compete with the model's threads for the same cores.
        threads = max(1, math.ceil(float(self.options["num_cpus"])))
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        # On a GPU replica, JPEGs are decoded by nvJPEG on the GPU, a request's images in one batch
        # (about 14x a CPU thread on an H200, see docs/benchmarks.md); other formats on the CPU.
        self.gpu_decode = bool(self.options["gpu_decode"]) and self.device.type == "cuda"
        self.predict_batch.set_max_batch_size(int(self.options["max_batch_size"]))
        self.predict_batch.set_batch_wait_timeout_s(float(self.options["batch_wait_timeout_s"]))
        self._run_model(self._probe())  # fail at start-up, not on the first request

    # --- inference ---------------------------------------------------------------------------

    def _probe(self):
        size = self.loaded.config.image_size
        return self.torch.zeros(1, 3, size, size, dtype=self.torch.uint8)

    def _run_model(self, batch):
        with self.torch.inference_mode():
            # uint8 until here: normalised on the replica's device, as in training
            logits = self.loaded.model(self.normalize(batch.to(self.device, non_blocking=True)))
            return self.torch.softmax(logits.float(), dim=1).cpu()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list) -> list:
        """Dynamic batching: requests arriving together share one forward pass. Each answer is
        (probabilities, the size of the batch it was in)."""
        probs = await asyncio.to_thread(self._run_model, self.torch.stack(images))
        return [(p, len(images)) for p in probs]

    async def _infer(self, tensor) -> tuple[Any, int, bool]:
        """Probabilities for one preprocessed image, the forward pass's batch size, and whether it
        went through the batch queue. Serve's batching holds the first request of a batch for
        ``batch_wait_timeout_s`` even when nothing else is coming; with ``adaptive_batching``
        a request that is the only one in flight on this replica runs at once, and requests that
        arrive together still share forward passes."""
        if self.options["adaptive_batching"] and self.in_flight == 1:
            probs = await asyncio.to_thread(self._run_model, tensor[None])
            return probs[0], 1, False
        probs, size = await self.predict_batch(tensor)
        return probs, size, True

    async def _decode(self, fn, data: bytes):
        """``fn(data)`` in this replica's decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, data)

    def _preprocess(self, data: bytes):
        from placesnet.images import BadImage, decode_image

        if self.gpu_decode:
            item = self._preprocess_on_device([data])[0]
            if isinstance(item, ClientError):
                raise item
            return item
        try:
            image = decode_image(data, int(self.options["max_pixels"]))
        except BadImage as e:
            raise _bad_image(e) from None
        return self.transform(image)

    def _preprocess_on_device(self, uploads: list[bytes]) -> list:
        """nvJPEG on this replica's GPU, all of ``uploads`` at once: a (3, S, S) uint8 tensor on
        the GPU or a ClientError per upload (see gpudecode.decode_uploads)."""
        from placesnet.data.gpudecode import decode_uploads

        out = decode_uploads(uploads, self.device, self.transform, int(self.options["max_pixels"]))
        return [_bad_image(item) if isinstance(item, Exception) else item for item in out]

    # --- HTTP API -----------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        """With a key set: ``Authorization: Bearer <key>`` or a 401, before anything else is read."""
        self._authorize_token(request.headers.get("authorization", ""))

    def _authorize_token(self, header: str) -> None:
        import hmac

        if self.api_key is None:
            return
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ClientError(
                401,
                "missing or wrong bearer token: send Authorization: Bearer <key>",
                headers={"WWW-Authenticate": "Bearer"},
            )

    @app.post(
        "/predict", summary="Top-k scene classes for one image, or for several", openapi_extra=PREDICT_BODY
    )
    async def predict(
        self,
        request: Request,
        response: Response,
        top_k: int | None = Query(None, description="classes to return (default 5)"),
    ) -> dict:
        """Send the image as the raw body (Content-Type image/jpeg, image/png, ...) or as the
        multipart form field ``file``; repeat ``file`` for several images in one request (up to
        ``max_images_per_request``, ``max_body_bytes`` in all): the answer then has ``results``,
        one per file in the same order, each with ``predictions`` or its own ``error``.

        Headers: ``X-Batch-Size``, how many images shared its forward pass; ``X-Batch-Queued``,
        ``yes`` if it went through the batch queue (which may wait ``batch_wait_timeout_s`` for
        company), ``no`` if it ran at once."""
        self._authorize(request)
        k = self._check_top_k(self.options["top_k"] if top_k is None else top_k)
        files = await self._read_images(request)
        self.in_flight += 1
        try:
            if len(files) == 1:
                tensor = await self._decode(self._preprocess, files[0][1])
                probs, batch_size, queued = await self._infer(tensor)
            else:
                return await self._predict_many(files, k, response)
        finally:
            self.in_flight -= 1
        response.headers["X-Batch-Size"] = str(batch_size)
        response.headers["X-Batch-Queued"] = "yes" if queued else "no"
        return {"predictions": self._top_k(probs, k), "model": self.model_id, "note": self.loaded.note}

    def _check_top_k(self, k: int) -> int:
        if not 1 <= k <= len(self.labels):
            raise ClientError(422, f"top_k must be between 1 and {len(self.labels)}, got {k}")
        return k

    def _check_count_and_size(self, count: int, size: int) -> None:
        most, limit = int(self.options["max_images_per_request"]), int(self.options["max_body_bytes"])
        if count > most:
            raise ClientError(
                413, f"{count} images in one request, over the limit of {most} (max_images_per_request)"
            )
        if size > limit:
            raise ClientError(413, f"request body is {size} bytes, over the limit of {limit}")

    def _top_k(self, probs, k: int) -> list[dict]:
        values, indices = probs.topk(min(k, len(self.labels)))
        return [
            {"label": self.labels[i], "class_index": i, "probability": p}
            for p, i in zip(values.tolist(), indices.tolist())
        ]

    def _preprocess_or_error(self, data: bytes):
        try:
            return self._preprocess(data) if data else ClientError(400, EMPTY_FIELD)
        except ClientError as e:
            return e

    def _run_chunks(self, tensors: list) -> list:
        size = int(self.options["max_batch_size"])
        out = []
        for start in range(0, len(tensors), size):
            out += list(self._run_model(self.torch.stack(tensors[start : start + size])))
        return out

    async def _predict_many(
        self, files: list[tuple[str, bytes]], k: int, response: Response | None = None
    ) -> dict:
        """Several images of one request: decoded together (nvJPEG on a GPU replica, else in
        parallel in the replica's decode threads), then run together, ``max_batch_size`` per
        forward pass, without the batch queue's wait."""
        if self.gpu_decode:  # one nvJPEG batch for the request's JPEGs
            decoded = iter(
                await asyncio.to_thread(self._preprocess_on_device, [data for _, data in files if data])
            )
            prepared = [next(decoded) if data else ClientError(400, EMPTY_FIELD) for _, data in files]
        else:  # in parallel in the replica's decode threads
            prepared = await asyncio.gather(
                *(self._decode(self._preprocess_or_error, data) for _, data in files)
            )
        good = [t for t in prepared if not isinstance(t, ClientError)]
        probs = iter(await asyncio.to_thread(self._run_chunks, good) if good else [])
        results = []
        for (name, _), item in zip(files, prepared):
            if isinstance(item, ClientError):
                results.append({"file": name, "error": item.message, "status": item.status})
            else:
                results.append({"file": name, "predictions": self._top_k(next(probs), k)})
        if response is not None:
            response.headers["X-Batch-Size"] = str(min(len(good), int(self.options["max_batch_size"])))
            response.headers["X-Batch-Queued"] = "no"
        return {"results": results, "model": self.model_id, "note": self.loaded.note}

    async def _read_images(self, request: Request) -> list[tuple[str, bytes]]:
        """(name, bytes) of each image in the request: the raw body, or every multipart `file`."""
        limit = int(self.options["max_body_bytes"])
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ClientError(413, f"request body is {declared} bytes, over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ClientError(413, f"request body is over the limit of {limit} bytes")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            return await self._file_fields(request, bytes(body))
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise ClientError(
                415,
                f"unsupported Content-Type {ctype!r}: send image/* bytes or a "
                "multipart form with a 'file' field",
            )
        if not body:
            raise ClientError(400, "empty request body: send the image bytes")
        return [("body", bytes(body))]

    async def _file_fields(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        from starlette.datastructures import UploadFile
        from starlette.requests import Request as StarletteRequest

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        most = int(self.options["max_images_per_request"])
        try:
            form = await StarletteRequest(request.scope, receive).form(max_files=most + 1)
        except Exception as e:  # malformed multipart, or more files than max_files
            if "Too many files" in str(e):
                raise ClientError(
                    413, f"more than {most} images in one request (max_images_per_request)"
                ) from None
            raise ClientError(400, f"malformed multipart body: {e}") from None
        uploads = [u for u in form.getlist("file") if isinstance(u, UploadFile)]
        if not uploads:
            raise ClientError(422, "multipart form has no 'file' field with an image")
        self._check_count_and_size(len(uploads), 0)
        files = [(u.filename or f"file{i}", await u.read()) for i, u in enumerate(uploads, start=1)]
        if len(files) == 1 and not files[0][1]:
            raise ClientError(400, EMPTY_FIELD)
        return files

    # --- gRPC API (serving/scene.proto; Serve's gRPC proxy calls the method of the RPC's name) ------

    async def Predict(self, request, grpc_context):  # noqa: N802 (the RPC's name in scene.proto)
        """placesnet.SceneClassifier/Predict: the images' bytes in, one result per image out, in
        order; the same limits, token and answers as a multi-image POST /predict. A client's
        mistake sets a gRPC status (UNAUTHENTICATED, INVALID_ARGUMENT, RESOURCE_EXHAUSTED) with
        the same message as the HTTP error, and an empty reply."""
        import grpc

        from serving.scene_pb2 import ImageResult, Prediction, PredictReply

        try:
            self._authorize_token(dict(grpc_context.invocation_metadata()).get("authorization", ""))
            k = self._check_top_k(request.top_k or self.options["top_k"])
            images = list(request.images)
            self._check_count_and_size(len(images), sum(map(len, images)))
            if not images:
                raise ClientError(400, "no images in the request: fill PredictRequest.images")
        except ClientError as e:
            code = {401: grpc.StatusCode.UNAUTHENTICATED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}
            grpc_context.set_code(code.get(e.status, grpc.StatusCode.INVALID_ARGUMENT))
            grpc_context.set_details(e.message)
            return PredictReply()
        self.in_flight += 1
        try:
            if len(images) == 1:  # through the batch queue, as a single-image POST /predict
                answers = [await self._predict_one(images[0], k)]
            else:
                named = [(f"image{i}", data) for i, data in enumerate(images, 1)]
                answers = (await self._predict_many(named, k))["results"]
        finally:
            self.in_flight -= 1
        results = [
            ImageResult(predictions=[Prediction(**p) for p in a["predictions"]])
            if "predictions" in a
            else ImageResult(error=a["error"])
            for a in answers
        ]
        return PredictReply(results=results, model=self.model_id, note=self.loaded.note)

    async def _predict_one(self, data: bytes, k: int) -> dict:
        item = await self._decode(self._preprocess_or_error, data)
        if isinstance(item, ClientError):
            return {"error": item.message, "status": item.status}
        probs, _, _ = await self._infer(item)
        return {"predictions": self._top_k(probs, k)}

    @app.get("/healthz", summary="200 when this replica can predict")
    async def healthz(self) -> dict:
        await asyncio.to_thread(self._run_model, self._probe())
        return {"status": "ok", "model": self.model_id, "device": str(self.device)}

    @app.get("/classes", summary="Class index -> name")
    async def classes(self, request: Request) -> dict:
        self._authorize(request)
        return {"classes": {str(i): name for i, name in enumerate(self.labels)}}

    @app.get("/model", summary="Checkpoint, training config and validation accuracy")
    async def model(self, request: Request) -> dict:
        self._authorize(request)
        meta = self.loaded.meta
        return {
            "model": self.model_id,
            "checkpoint": str(self.loaded.path),
            "note": self.loaded.note,
            "epoch": meta["epoch"] + 1,
            "val_top1": meta["metrics"].get("val_top1"),
            "val_top5": meta["metrics"].get("val_top5"),
            "num_classes": len(self.labels),
            "image_size": self.loaded.config.image_size,
            "config": self.loaded.config.to_dict(),
            "device": str(self.device),
            "max_batch_size": self.options["max_batch_size"],
            "decode_threads": self.decode_pool._max_workers,
            "decode": "nvjpeg" if self.gpu_decode else "cpu",
        }

    def check_health(self) -> None:
        """Serve's own health check: a replica whose model cannot run is replaced."""
        self._run_model(self._probe())


SECRETS = ("api_key_env", "api_key_file")  # where the key is; never the key itself


def _secret_options(args: dict) -> dict:
    import re

    env_name, key_file = str(args.get("api_key_env") or ""), str(args.get("api_key_file") or "")
    if env_name and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", env_name):
        raise ValueError(f"api_key_env must name an environment variable, got {env_name!r}")
    if key_file and not os.path.isabs(os.path.expanduser(key_file)):
        raise ValueError(f"api_key_file must be an absolute path, got {key_file!r}")
    return {"api_key_env": env_name, "api_key_file": os.path.expanduser(key_file)}


def _number(args: dict, key: str, kind):
    try:
        value = kind(args.get(key, DEFAULTS[key]))
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a {kind.__name__}, got {args.get(key)!r}") from None
    if value < 0 or (
        value == 0
        and key
        not in (
            "num_gpus",
            "batch_wait_timeout_s",
            "min_replicas",
            "adaptive_batching",
            "gpu_decode",
            "upscale_delay_s",
            "downscale_delay_s",
        )
    ):
        raise ValueError(f"{key} must be positive, got {value}")
    return value


def replicas_with_room(opts: dict, resources: dict | None = None) -> int:
    """``opts["min_replicas"]`` (default 2, so a crashed replica costs ~0.1 s instead of seconds
    of outage), lowered to what fits: the connected cluster's CPUs and GPUs, or, before Ray is
    connected (``serve run`` builds the app first), this machine's CPUs. At least 1."""
    if resources is None:
        import ray

        resources = (
            ray.cluster_resources()
            if ray.is_initialized()
            else {"CPU": float(os.cpu_count() or 1), "GPU": float(opts["num_gpus"] and 1e9)}
        )
    fits = resources.get("CPU", 0) // opts["num_cpus"] if opts["num_cpus"] else 10**9
    if opts["num_gpus"]:
        fits = min(fits, resources.get("GPU", 0) // opts["num_gpus"])
    return int(max(1, min(opts["min_replicas"], opts["max_replicas"], fits)))


def build_app(args: dict) -> Application:
    """Serve's app builder: ``serve run serving.app:build_app checkpoint=PATH [key=value ...]``.

    Keys: checkpoint (required); autoscaling: min_replicas (default: 2 where the cluster has
    room), max_replicas, target_ongoing_requests, upscale_delay_s, downscale_delay_s; num_cpus,
    num_gpus (fractions allowed), max_batch_size, batch_wait_timeout_s, adaptive_batching,
    max_images_per_request, top_k, max_body_bytes, max_pixels, gpu_decode; and for a bearer token
    api_key_env=NAME (the replicas read the key from $NAME or the file in $NAME_FILE) or
    api_key_file=/abs/path (never the key itself). Raises ValueError with a clear message for a
    missing/corrupt checkpoint or bad values.
    """
    from placesnet.checkpoint import load_checkpoint, resolve_checkpoint
    from placesnet.config import UserError

    unknown = set(args) - set(DEFAULTS) - {"checkpoint", *SECRETS}
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)}; known: checkpoint, {', '.join([*DEFAULTS, *SECRETS])}"
        )
    if not args.get("checkpoint"):
        raise ValueError("missing checkpoint=PATH (a checkpoint dir, a run dir or a best.json)")
    opts = {k: _number(args, k, type(v)) for k, v in DEFAULTS.items()}
    opts.update(_secret_options(args))
    if "min_replicas" not in args:
        opts["min_replicas"] = replicas_with_room(opts)
    if opts["min_replicas"] > opts["max_replicas"]:
        raise ValueError(f"min_replicas {opts['min_replicas']} > max_replicas {opts['max_replicas']}")
    try:
        path = resolve_checkpoint(os.path.expanduser(str(args["checkpoint"])))
        classes = load_checkpoint(path).classes  # fail here, clearly, not in every replica
    except UserError as e:
        raise ValueError(str(e)) from None
    if opts["top_k"] > len(classes):
        opts["top_k"] = len(classes)
    deployment = SceneClassifier.options(
        autoscaling_config={
            "min_replicas": opts["min_replicas"],
            "max_replicas": opts["max_replicas"],
            "target_ongoing_requests": opts["target_ongoing_requests"],
            "upscale_delay_s": opts["upscale_delay_s"],
            "downscale_delay_s": opts["downscale_delay_s"],
        },
        ray_actor_options={"num_cpus": opts["num_cpus"], "num_gpus": opts["num_gpus"]},
        # batches can only fill if a replica accepts at least a batch's worth of requests
        max_ongoing_requests=max(32, 2 * opts["max_batch_size"]),
    )
    return deployment.bind(str(path), opts)
