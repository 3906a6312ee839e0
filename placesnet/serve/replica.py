"""One Serve replica's work, with no HTTP or gRPC in it: the checkpoint's model on the replica's
device and its swap for another (:meth:`Replica.use_checkpoint`), decoding uploads (CPU threads,
or nvJPEG on a GPU replica), batching, and :meth:`Replica.predict`, the one predict for a list of
uploads that HTTP and gRPC both call (with ``explain``, also each image's class activation map:
POST /explain).

Ray-free but for Serve's batch queue (``@serve.batch``), which also runs outside a replica, so
tests build a Replica directly."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from ray import serve

from placesnet.images import BadImage
from placesnet.serve.auth import check_bearer, read_api_key
from placesnet.serve.errors import ClientError
from placesnet.serve.metrics import EndpointMetrics
from placesnet.serve.options import ServeOptions
from placesnet.serve.served import ServedModel

logger = logging.getLogger("ray.serve")  # a replica's log file and the driver's console
EMPTY_FIELD = "empty 'file' field"
TOP_1 = -1  # Replica.predict's ``explain``: each image's map is of its own most probable class


class Upload(NamedTuple):
    """One image of a request: a name for its answer (a filename, ``body``, ``image<n>``) and its
    bytes as sent."""

    name: str
    data: bytes


@dataclass(frozen=True)
class ImageResult:
    """One upload's answer: its top-k ``predictions`` (best first) and, for a model of Places365's
    classes, its ``environment`` ('indoor' or 'outdoor'); when a map was asked for, the class it
    explains (``explained``: ``{label, class_index, probability}``) and the ``overlay``, the
    image as the model saw it blended with the map, as PNG bytes; or the ``status`` and ``error``
    message of why it has none (what a ClientError for it would carry)."""

    name: str
    predictions: list[dict] | None = None
    status: int = 200
    error: str | None = None
    reason: str | None = None
    environment: str | None = None
    explained: dict | None = None
    overlay: bytes | None = None

    @classmethod
    def answered(
        cls,
        name: str,
        model: ServedModel,
        probs: torch.Tensor,
        k: int,
        cam: tuple[torch.Tensor, torch.Tensor, int] | None = None,
    ) -> ImageResult:
        """The answer of ``model``'s class ``probs`` for the upload ``name``, with ``k`` classes;
        with ``cam`` (the upload's uint8 view, its heatmap, the class index the map is of), that
        class and the overlay PNG too (CPU work: call it off the event loop)."""
        if cam is None:
            return cls(name, model.top_k(probs, k), environment=model.environment(probs))
        from placesnet.plots import overlay_png

        view, heatmap, target = cam
        return cls(
            name,
            model.top_k(probs, k),
            environment=model.environment(probs),
            explained={
                "label": model.labels[target],
                "class_index": target,
                "probability": probs[target].item(),
            },
            overlay=overlay_png(view, heatmap),
        )

    @classmethod
    def refused(cls, name: str, e: ClientError) -> ImageResult:
        return cls(name, status=e.status, error=e.message, reason=e.reason)

    def answer(self) -> dict:
        """An answered upload as JSON: ``predictions``, and ``environment`` when the model has one."""
        return {
            "predictions": self.predictions,
            **({"environment": self.environment} if self.environment else {}),
        }


@dataclass(frozen=True)
class Answer:
    """:meth:`Replica.predict`'s answer: a result per upload, in order, all from ``model``; how
    many images shared the forward pass (0 if none ran); whether it went through Serve's batch
    queue."""

    results: list[ImageResult]
    batch_size: int
    queued: bool
    model: ServedModel


class Replica:
    """A model on this process's GPU if it has one, else the CPU, answering with ``options`` (its
    limits, batching and token). Its model is ``checkpoint``'s, or, with None (a Serve replica,
    whose checkpoint comes in its user_config), the one :meth:`use_checkpoint` loads.
    ``api_key``: the key itself when the app builder found it (see serving/app.py), else the
    replica reads it where ``options`` say."""

    def __init__(self, checkpoint: str | None, options: ServeOptions, api_key: str | None = None) -> None:
        self.options = options
        self.metrics = EndpointMetrics()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: ServedModel | None = None
        self.rejected: dict[str, str] | None = None  # the last checkpoint refused while serving
        self._swap = asyncio.Lock()
        # the key stays in this replica's memory
        self.api_key = api_key or read_api_key(options.api_key_env, options.api_key_file)
        self.in_flight = 0  # predict() calls between their uploads and their answer
        # Decoding runs in threads (PIL releases the GIL), as many as the CPUs this replica was
        # given: more would only compete with the model's threads for the same cores.
        threads = max(1, math.ceil(options.num_cpus))
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        # On a GPU replica, JPEGs are decoded by nvJPEG on the GPU, a request's images in one batch
        # (about 14x a CPU thread on an H200, see docs/benchmarks.md); other formats on the CPU.
        self.gpu_decode = options.gpu_decode and self.device.type == "cuda"
        self.predict_batch.set_max_batch_size(options.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        if checkpoint is not None:
            self.model = ServedModel.load(checkpoint, self.device)  # probed: fails here, not later

    # --- the model: loaded, verified and probed before it answers -----------------------------

    async def use_checkpoint(self, checkpoint: str) -> None:
        """Make ``checkpoint`` (a directory, run directory or summary/best JSON; not ``latest``,
        which the app builder and serving/promote.py resolve once for every replica) the model
        that answers. One swap at a time (a lock); the new model is verified, loaded and probed
        off the event loop while the current one keeps answering, then replaces it in one
        assignment: a request in flight finishes on the model it started with, and every answer
        names its checkpoint. A checkpoint that cannot be served raises UserError while this
        replica has no model (it then fails to start, with that line); later, the current model
        keeps serving, the refusal is logged in one line and shown by /model (``rejected``)."""
        from placesnet.checkpoint_files import is_latest
        from placesnet.config import UserError

        async with self._swap:
            current = self.model
            try:
                if is_latest(checkpoint):
                    raise UserError(
                        f"checkpoint {checkpoint!r} in a replica's user_config: give a path "
                        "(serving/promote.py resolves latest once, for every replica)"
                    )
                model = await asyncio.to_thread(ServedModel.load, checkpoint, self.device)
            except Exception as e:  # UserError: what is wrong with it; others: e.g. out of memory
                self.metrics.checkpoint("rejected")
                if current is None:
                    raise
                self.rejected = {"checkpoint": checkpoint, "error": str(e)}
                logger.error(
                    f"placesnet: refused checkpoint {checkpoint}: {e}; still serving {current.checkpoint}"
                )
                return
            if current is not None and model.checkpoint == current.checkpoint:
                self.rejected = None
                return
            self.model, self.rejected = model, None
            self.metrics.checkpoint("loaded")
            logger.info(
                f"placesnet: serving {model.checkpoint}" + (f" (was {current.checkpoint})" if current else "")
            )

    def current(self) -> ServedModel:
        """The model a new request is answered by, from its first check to its answer."""
        if self.model is None:  # Serve routes no request to a replica before its reconfigure
            raise RuntimeError("this replica has no model yet")
        return self.model

    # --- what a request is checked against, before its images are decoded --------------------

    def authorize(self, authorization: str) -> None:
        """With a key set: ``authorization`` must be ``Bearer <key>``, else ClientError 401."""
        check_bearer(authorization, self.api_key)

    def check_class(self, name: str | None, model: ServedModel) -> int:
        """The class a map is asked of: TOP_1 for None, else the index of ``name`` as /classes
        or the checkpoint name it; ClientError 400 for a class ``model`` does not have."""
        from placesnet.evaluation import class_index

        if name is None:
            return TOP_1
        try:
            return class_index(model.loaded.classes, name)
        except ValueError as e:
            raise ClientError(400, str(e), reason="unknown_class") from None

    def check_top_k(self, requested: int | None, model: ServedModel) -> int:
        """The classes to answer with: ``requested``, or the ``top_k`` option (at most the model's
        classes) when None; ClientError 422 outside 1..``model``'s number of classes."""
        classes = len(model.labels)
        k = min(self.options.top_k, classes) if requested is None else requested
        if not 1 <= k <= classes:
            raise ClientError(422, f"top_k must be between 1 and {classes}, got {k}", reason="bad_top_k")
        return k

    # --- predict: the one path for HTTP and gRPC ------------------------------------------------

    async def predict(
        self, uploads: list[Upload], k: int, model: ServedModel | None = None, explain: int | None = None
    ) -> Answer:
        """The top ``k`` classes of each upload by ``model`` (default: the current one), in order;
        an upload that is no usable image gets its status and error instead. One upload goes
        through the batch queue, where it shares forward passes with other requests' (or runs at
        once when alone, see ``_infer``); several are decoded together (one nvJPEG batch on a GPU
        replica, else in parallel in the decode threads) and run ``max_batch_size`` per forward
        pass, without the batch queue's wait. ``explain``: also each answered upload's class
        activation map (ImageResult's ``explained`` and ``overlay``) of this class index, or of
        its own top-1 class with TOP_1; images explained share passes only with each other."""
        model = model or self.current()
        self.in_flight += 1
        try:
            if len(uploads) == 1:
                answer = await self._predict_alone(uploads[0], k, model, explain)
            else:
                answer = await self._predict_together(uploads, k, model, explain)
            for result in answer.results:
                if result.error is None:
                    self.metrics.classified(result.predictions[0]["label"])
                else:
                    self.metrics.refused(result.status, result.reason)
            return answer
        finally:
            self.in_flight -= 1

    async def _predict_alone(self, upload: Upload, k: int, model: ServedModel, explain: int | None) -> Answer:
        item = await self._in_decode_threads(self._prepare, upload, model)
        if isinstance(item, ImageResult):
            return Answer([item], batch_size=0, queued=False, model=model)
        probs, heatmap, size, queued = await self._infer(item, model, explain)
        results = [await self._answered(upload.name, model, item, probs, heatmap, k, explain)]
        return Answer(results, batch_size=size, queued=queued, model=model)

    async def _answered(
        self,
        name: str,
        model: ServedModel,
        view: torch.Tensor,
        probs: torch.Tensor,
        heatmap: torch.Tensor | None,
        k: int,
        explain: int | None,
    ) -> ImageResult:
        """ImageResult.answered, its overlay (if any) drawn in the decode threads."""
        if heatmap is None:
            return ImageResult.answered(name, model, probs, k)
        cam = (view, heatmap, _explained_class(explain, probs))
        return await self._in_decode_threads(ImageResult.answered, name, model, probs, k, cam)

    async def _predict_together(
        self, uploads: list[Upload], k: int, model: ServedModel, explain: int | None
    ) -> Answer:
        if self.gpu_decode:  # one nvJPEG batch for the request's images (empty ones refused below)
            images = [u.data for u in uploads if u.data]
            decoded = iter(await asyncio.to_thread(self._decode_on_device, images, model))
            prepared = [
                _attempt(u, _usable, next(decoded)) if u.data else self._prepare(u, model) for u in uploads
            ]
        else:  # in parallel in the replica's decode threads
            prepared = await asyncio.gather(
                *(self._in_decode_threads(self._prepare, u, model) for u in uploads)
            )
        good = [item for item in prepared if not isinstance(item, ImageResult)]
        passes = iter(await asyncio.to_thread(self._run_chunks, good, model, explain) if good else [])
        results = await asyncio.gather(
            *(
                _done(item)
                if isinstance(item, ImageResult)
                else self._answered(upload.name, model, item, *next(passes), k, explain)
                for upload, item in zip(uploads, prepared)
            )
        )
        size = min(len(good), self.options.max_batch_size)
        return Answer(results, batch_size=size, queued=False, model=model)

    # --- decoding ---------------------------------------------------------------------------------

    async def _in_decode_threads(self, fn, *args):
        """``fn(*args)`` in this replica's decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def _prepare(self, upload: Upload, model: ServedModel) -> torch.Tensor | ImageResult:
        """The upload as ``model``'s input, or its refusal as its result."""
        return _attempt(upload, self._preprocess, upload.data, model)

    def _preprocess(self, data: bytes, model: ServedModel | None = None) -> torch.Tensor:
        """One image's bytes as ``model``'s (default: the current one's) uint8 (3, S, S) input;
        ClientError if they are none."""
        from placesnet.images import decode_image

        model = model or self.current()
        if not data:
            raise ClientError(400, EMPTY_FIELD, reason="empty_field")
        if self.gpu_decode:
            return _usable(self._decode_on_device([data], model)[0])
        start = time.perf_counter()
        try:
            image = decode_image(data, self.options.max_pixels)
        except BadImage as e:
            raise ClientError.bad_image(e) from None
        tensor = model.transform(image)
        self.metrics.decoded(time.perf_counter() - start)
        return tensor

    def _decode_on_device(self, uploads: list[bytes], model: ServedModel) -> list[torch.Tensor | BadImage]:
        """nvJPEG on this replica's GPU, all of ``uploads`` at once: a (3, S, S) uint8 tensor on
        the GPU or the BadImage that says why not, per upload (see gpudecode.decode_uploads).
        Each decoded image counts the batch's seconds divided by its uploads."""
        from placesnet.data.gpudecode import decode_uploads

        start = time.perf_counter()
        out = decode_uploads(uploads, self.device, model.transform, self.options.max_pixels)
        share = (time.perf_counter() - start) / max(1, len(uploads))
        for item in out:
            if not isinstance(item, BadImage):
                self.metrics.decoded(share)
        return out

    # --- inference ----------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(
        self, items: list[tuple[ServedModel, torch.Tensor, int | None]]
    ) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
        """Dynamic batching: requests arriving together share one forward pass of the model each
        was started on (during a swap, a batch may hold images for the old and the new one: one
        pass each), images to explain (the item's class index or TOP_1, else None) one pass of
        their own, so that a prediction never waits for a map. Each answer is (probabilities, the
        heatmap or None, the size of the pass it was in)."""
        passes: dict[tuple[int, bool], tuple[ServedModel, list[int]]] = {}
        for i, (model, _, explain) in enumerate(items):
            passes.setdefault((id(model), explain is not None), (model, []))[1].append(i)
        answers: list[tuple[torch.Tensor, torch.Tensor | None, int]] = [None] * len(items)  # type: ignore[list-item]
        for (_, explaining), (model, indices) in passes.items():
            batch = torch.stack([items[i][1] for i in indices])
            explain = [items[i][2] for i in indices] if explaining else None
            outputs = await asyncio.to_thread(self._forward, model, batch, explain)
            for i, (probs, heatmap) in zip(indices, outputs):
                answers[i] = (probs, heatmap, len(indices))
        return answers

    async def _infer(
        self, tensor: torch.Tensor, model: ServedModel, explain: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, int, bool]:
        """Probabilities and (with ``explain``) the heatmap for one preprocessed image, the
        forward pass's batch size, and whether it went through the batch queue. Serve's batching
        holds the first request of a batch for ``batch_wait_timeout_s`` even when nothing else is
        coming; with ``adaptive_batching`` a request that is the only one in flight on this
        replica runs at once, and requests that arrive together still share forward passes."""
        if self.options.adaptive_batching and self.in_flight == 1:
            explains = None if explain is None else [explain]
            ((probs, heatmap),) = await asyncio.to_thread(self._forward, model, tensor[None], explains)
            return probs, heatmap, 1, False
        probs, heatmap, size = await self.predict_batch((model, tensor, explain))
        return probs, heatmap, size, True

    def _run_chunks(
        self, tensors: list[torch.Tensor], model: ServedModel, explain: int | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        size, out = self.options.max_batch_size, []
        for start in range(0, len(tensors), size):
            chunk = tensors[start : start + size]
            explains = None if explain is None else [explain] * len(chunk)
            out += self._forward(model, torch.stack(chunk), explains)
        return out

    def _forward(
        self, model: ServedModel, batch: torch.Tensor, explain: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``model.run(batch)`` for requests (never a probe), counted and timed: (probabilities,
        heatmap) per image; the heatmap of each image's class in ``explain`` (TOP_1: its top-1),
        or None without ``explain``."""
        start = time.perf_counter()
        probs = model.run(batch)
        if explain is None:
            heatmaps = [None] * len(batch)
        else:
            heatmaps = model.heatmaps(batch, [_explained_class(e, p) for e, p in zip(explain, probs)])
        self.metrics.forward_pass(len(batch), time.perf_counter() - start)
        return list(zip(probs, heatmaps))

    # --- what the info routes show ------------------------------------------------------------

    def check_health(self) -> None:
        """Raises if the model cannot run (Serve then replaces the replica)."""
        self.current().probe()

    def classes(self) -> dict[str, str]:
        return {str(i): name for i, name in enumerate(self.current().labels)}

    def info(self) -> dict[str, Any]:
        """The checkpoint, its training config and validation accuracy, how this replica runs,
        and ``rejected``: the last checkpoint it refused to swap in, and why (null if none)."""
        return {
            **self.current().info(),
            "rejected": self.rejected,
            "device": str(self.device),
            "max_batch_size": self.options.max_batch_size,
            "decode_threads": self.decode_pool._max_workers,
            "decode": "nvjpeg" if self.gpu_decode else "cpu",
        }


def _explained_class(explain: int, probs: torch.Tensor) -> int:
    """The class index an image's map is of: ``explain``, or its most probable class for TOP_1."""
    return int(probs.argmax()) if explain == TOP_1 else explain


async def _done(result: ImageResult) -> ImageResult:
    """An image refused before the model ran, as an awaitable next to those being answered."""
    return result


def _usable(item: torch.Tensor | BadImage) -> torch.Tensor:
    """A decode_uploads outcome as the tensor, or the ClientError to raise for it."""
    if isinstance(item, BadImage):
        raise ClientError.bad_image(item)
    return item


def _attempt(upload: Upload, step, *args) -> torch.Tensor | ImageResult:
    """``step(*args)``, or, if it raises ClientError, the upload's result that says so."""
    try:
        return step(*args)
    except ClientError as e:
        return ImageResult.refused(upload.name, e)
