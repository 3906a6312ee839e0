"""The Serve deployment, :class:`SceneClassifier`: its FastAPI ``app`` (routes and error handlers,
so that every error, 404 and 500 included, is ``{"error": "..."}`` JSON, a ClientError's status as
raised; /predict, and /explain with a class activation map over each image; the web page at
``/``, see page.py; the security headers on every answer) and the gRPC method (grpc_api, predict
only), both answered by one Replica, whose checkpoint comes in the deployment's
``user_config`` (``{"checkpoint": PATH}``): a new one is swapped in place by ``reconfigure``,
without restarting the replica."""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types at runtime.
import asyncio
import base64
import json

from fastapi import FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from placesnet.serve.auth import Secret
from placesnet.serve.body import read_uploads
from placesnet.serve.errors import ClientError
from placesnet.serve.grpc_api import GrpcServicer
from placesnet.serve.options import ServeOptions
from placesnet.serve.page import NO_CACHE, SECURITY_HEADERS, SecurityHeaders, index_html, static_file
from placesnet.serve.replica import Answer, ImageResult, Replica

app = FastAPI(
    title="placesnet scene classifier",
    description=(
        "Places365 scene classification with DeepCNN. POST an image to /predict; to /explain for "
        "where the model looks (a class activation map over it)."
    ),
)
app.add_middleware(SecurityHeaders, exempt=(app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url))


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
    # Starlette answers this one outside the app's middleware: it gets the headers here.
    return JSONResponse(
        {"error": f"internal error: {type(exc).__name__}: {str(exc)[:200]}"},
        status_code=500,
        headers=SECURITY_HEADERS,
    )


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
    return {"file": result.name, **result.answer()}


CHECKPOINT_HEADER = "X-Checkpoint"  # on every /predict answer: the checkpoint that produced it
EXPLAIN_FORMATS = ("png", "json")  # /explain's `format`: one image's overlay itself, or JSON
EXPLAIN_RESPONSES = {
    200: {
        "description": (
            "One image, format=png: the overlay (the image as the model saw it, blended with the "
            "map), its predictions in the X-Predictions header and the class the map is of in "
            "X-Explained-Class (compact JSON each). format=json, or several images: JSON."
        ),
        "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}, "application/json": {}},
    }
}


def _explained_json(result: ImageResult) -> dict:
    """One image of an /explain answer, as JSON: the map's class and its probability, the
    predictions, the overlay PNG in base64; or its error."""
    if result.error is not None:
        return _result_json(result)
    return {
        "file": result.name,
        "class": result.explained["label"],
        "class_index": result.explained["class_index"],
        "probability": result.explained["probability"],
        **result.answer(),
        "overlay_png_base64": base64.b64encode(result.overlay).decode(),
    }


def _compact(value: object) -> str:
    """``value`` as one line of ASCII JSON: a header's value."""
    return json.dumps(value, separators=(",", ":"))


def _check_format(value: str) -> str:
    if value not in EXPLAIN_FORMATS:
        raise ClientError(422, f"format must be png or json, got {value!r}", reason="bad_format")
    return value


def _checkpoint_of(config: object) -> str:
    """The checkpoint path of the deployment's user_config, or ValueError saying what it must be."""
    checkpoint = config.get("checkpoint") if isinstance(config, dict) else None
    if not isinstance(checkpoint, str) or not checkpoint or set(config) != {"checkpoint"}:
        raise ValueError(f"user_config must be {{'checkpoint': PATH}}, got {config!r}")
    return checkpoint


# The routes are methods of the decorated class itself, not of an importable base class: Serve
# pickles the app with the deployment, and the routes' rewritten signatures (``self`` injected)
# reach the replica only with functions pickled by value; a base class's methods would be pickled
# by reference and answer 422 "query.self: Field required" there. Pickled by value, they carry only
# the module's names defined before the class: helpers they call go above it.
def _refuse_single(result: ImageResult, model) -> None:
    """The request of one image is refused as its image was (status, message, reason)."""
    if result.error is not None:
        raise ClientError(
            result.status,
            result.error,
            headers={CHECKPOINT_HEADER: str(model.checkpoint)},
            reason=result.reason,
        )


@serve.deployment(name="SceneClassifier", max_ongoing_requests=32, health_check_period_s=10)
@serve.ingress(app)
class SceneClassifier(GrpcServicer):
    """One replica: the HTTP routes and the gRPC method (GrpcServicer), both answered by
    ``self.replica``. /healthz and the web page (``/`` and its files, which ask for the key when
    the endpoint has one) are open; with a key set, every other route needs the bearer token,
    checked before anything else of the request is read. ``build_app`` in serving/app.py sets the
    options Serve gets, and the first user_config."""

    def __init__(self, options: ServeOptions, api_key: Secret | None = None) -> None:
        self.replica = Replica(None, options, api_key.reveal() if api_key else None)

    async def reconfigure(self, config: dict) -> None:
        """Serve calls this with the user_config at start-up and whenever it changes (a promotion):
        the replica swaps to that checkpoint in place (Replica.use_checkpoint)."""
        await self.replica.use_checkpoint(_checkpoint_of(config))

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
        try:
            replica.authorize(request.headers.get("authorization", ""))
            model = replica.current()  # the whole request is answered by this one
            k = replica.check_top_k(top_k, model)
            uploads = await read_uploads(request, replica.options)
        except ClientError as e:
            replica.metrics.refused(e.status, e.reason)
            raise
        answer: Answer = await replica.predict(uploads, k, model)
        response.headers[CHECKPOINT_HEADER] = str(model.checkpoint)
        if len(uploads) == 1:  # one image: its refusal is the request's
            (result,) = answer.results
            _refuse_single(result, model)
            body = result.answer()
        else:
            body = {"results": [_result_json(r) for r in answer.results]}
        response.headers["X-Batch-Size"] = str(answer.batch_size)
        response.headers["X-Batch-Queued"] = "yes" if answer.queued else "no"
        return {**body, "model": model.model_id, "checkpoint": str(model.checkpoint), "note": model.note}

    @app.post(
        "/explain",
        summary="Where the model looks: a class activation map over one image, or over several",
        openapi_extra=PREDICT_BODY,
        responses=EXPLAIN_RESPONSES,
        response_class=Response,
    )
    async def explain(
        self,
        request: Request,
        top_k: int | None = Query(None, description="classes in the predictions (default 5)"),
        class_name: str | None = Query(
            None,
            alias="class",
            description="the class whose map to draw, as /classes names it (default: each image's top-1)",
        ),
        fmt: str = Query("png", alias="format", description="png (one image: the overlay itself) or json"),
    ) -> Response:
        """The same body, limits, key and errors as /predict. One image: the overlay as
        ``image/png`` (the image as the model saw it, through the checkpoint's eval transform,
        blended with the Grad-CAM heatmap of ``class``, default its top-1 class; red where the
        evidence for the class is), its predictions in the ``X-Predictions`` header and the
        class the map is of in ``X-Explained-Class`` (compact JSON each); with ``format=json``,
        ``{"file", "class", "class_index", "probability", "predictions", "overlay_png_base64"}``.
        Several images: ``results`` in JSON, one per file in order, each as that image alone or
        its own ``error``. A class the model does not have: 400."""
        replica = self.replica
        try:
            replica.authorize(request.headers.get("authorization", ""))
            model = replica.current()  # the whole request is answered by this one
            k = replica.check_top_k(top_k, model)
            target = replica.check_class(class_name, model)
            _check_format(fmt)
            uploads = await read_uploads(request, replica.options)
        except ClientError as e:
            replica.metrics.refused(e.status, e.reason)
            raise
        answer: Answer = await replica.predict(uploads, k, model, explain=target)
        headers = {
            CHECKPOINT_HEADER: str(model.checkpoint),
            "X-Batch-Size": str(answer.batch_size),
            "X-Batch-Queued": "yes" if answer.queued else "no",
        }
        if len(uploads) == 1:  # one image: its refusal is the request's
            (result,) = answer.results
            _refuse_single(result, model)
            if fmt == "png":
                headers["X-Predictions"] = _compact(result.predictions)
                headers["X-Explained-Class"] = _compact(result.explained)
                return Response(result.overlay, media_type="image/png", headers=headers)
            body = _explained_json(result)
        else:
            body = {"results": [_explained_json(r) for r in answer.results]}
        return JSONResponse(
            {**body, "model": model.model_id, "checkpoint": str(model.checkpoint), "note": model.note},
            headers=headers,
        )

    @app.get("/healthz", summary="200 when this replica can predict")
    async def healthz(self) -> dict:
        await asyncio.to_thread(self.replica.check_health)
        model = self.replica.current()
        return {
            "status": "ok",
            "model": model.model_id,
            "checkpoint_sha256": model.fingerprint,  # open to probes: no paths
            "rejected": self.replica.rejected is not None,
            "device": str(self.replica.device),
        }

    @app.get("/classes", summary="Class index -> name")
    async def classes(self, request: Request) -> dict:
        self.replica.authorize(request.headers.get("authorization", ""))
        return {"classes": self.replica.classes()}

    @app.get("/model", summary="Checkpoint, training config and validation accuracy")
    async def model(self, request: Request) -> dict:
        self.replica.authorize(request.headers.get("authorization", ""))
        return self.replica.info()

    @app.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        """The web page: drop photos, see their scenes (placesnet/serve/page.py)."""
        return HTMLResponse(index_html(needs_key=self.replica.api_key is not None), headers=NO_CACHE)

    @app.get("/static/{name}", include_in_schema=False)
    async def page_file(self, name: str) -> Response:
        """The page's script, style and icon."""
        found = static_file(name)
        if found is None:
            raise StarletteHTTPException(404, "no such file")
        content, media_type = found
        return Response(content, media_type=media_type, headers=NO_CACHE)
