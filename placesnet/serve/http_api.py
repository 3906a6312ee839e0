"""The Serve deployment, :class:`SceneClassifier`: its FastAPI ``app`` (routes and error handlers,
so that every error, 404 and 500 included, is ``{"error": "..."}`` JSON, a ClientError's status as
raised) and the gRPC method (grpc_api), both answered by one Replica."""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types at runtime.
import asyncio

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from placesnet.serve.body import read_uploads
from placesnet.serve.errors import ClientError
from placesnet.serve.grpc_api import GrpcServicer
from placesnet.serve.options import ServeOptions
from placesnet.serve.replica import ImageResult, Replica

app = FastAPI(
    title="placesnet scene classifier",
    description="Places365 scene classification with DeepCNN. POST an image to /predict.",
)


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


def _result_json(result: ImageResult) -> dict:
    """One image of a multi-image answer, as JSON."""
    if result.error is not None:
        return {"file": result.name, "error": result.error, "status": result.status}
    return {"file": result.name, "predictions": result.predictions}


# The routes are methods of the decorated class itself, not of an importable base class: Serve
# pickles the app with the deployment, and the routes' rewritten signatures (``self`` injected)
# reach the replica only with functions pickled by value; a base class's methods would be pickled
# by reference and answer 422 "query.self: Field required" there. Pickled by value, they carry only
# the module's names defined before the class: helpers they call go above it.
@serve.deployment(name="SceneClassifier", max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(app)
class SceneClassifier(GrpcServicer):
    """One replica: the HTTP routes and the gRPC method (GrpcServicer), both answered by
    ``self.replica``. /healthz is open (for probes); with a key set, every other route needs the
    bearer token, checked before anything else of the request is read. ``build_app`` in
    serving/app.py sets the options Serve gets."""

    def __init__(self, checkpoint: str, options: ServeOptions) -> None:
        self.replica = Replica(checkpoint, options)

    def check_health(self) -> None:
        """Serve's own health check: a replica whose model cannot run is replaced."""
        self.replica.check_health()

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
        replica = self.replica
        replica.authorize(request.headers.get("authorization", ""))
        k = replica.check_top_k(top_k)
        uploads = await read_uploads(request, replica.options)
        answer = await replica.predict(uploads, k)
        if len(uploads) == 1:  # one image: its refusal is the request's
            (result,) = answer.results
            if result.error is not None:
                raise ClientError(result.status, result.error)
            body = {"predictions": result.predictions}
        else:
            body = {"results": [_result_json(r) for r in answer.results]}
        response.headers["X-Batch-Size"] = str(answer.batch_size)
        response.headers["X-Batch-Queued"] = "yes" if answer.queued else "no"
        return {**body, "model": replica.model_id, "note": replica.note}

    @app.get("/healthz", summary="200 when this replica can predict")
    async def healthz(self) -> dict:
        await asyncio.to_thread(self.replica.check_health)
        return {"status": "ok", "model": self.replica.model_id, "device": str(self.replica.device)}

    @app.get("/classes", summary="Class index -> name")
    async def classes(self, request: Request) -> dict:
        self.replica.authorize(request.headers.get("authorization", ""))
        return {"classes": self.replica.classes()}

    @app.get("/model", summary="Checkpoint, training config and validation accuracy")
    async def model(self, request: Request) -> dict:
        self.replica.authorize(request.headers.get("authorization", ""))
        return self.replica.info()
