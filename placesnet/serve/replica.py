"""One Serve replica's work, with no HTTP or gRPC in it: the checkpoint's model on the replica's
device, decoding uploads (CPU threads, or nvJPEG on a GPU replica), batching, and
:meth:`Replica.predict`, the one predict for a list of uploads that HTTP and gRPC both call.

Ray-free but for Serve's batch queue (``@serve.batch``), which also runs outside a replica, so
tests build a Replica directly."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from ray import serve

from placesnet.images import BadImage
from placesnet.serve.auth import check_bearer, read_api_key
from placesnet.serve.errors import ClientError
from placesnet.serve.options import ServeOptions

EMPTY_FIELD = "empty 'file' field"


class Upload(NamedTuple):
    """One image of a request: a name for its answer (a filename, ``body``, ``image<n>``) and its
    bytes as sent."""

    name: str
    data: bytes


@dataclass(frozen=True)
class ImageResult:
    """One upload's answer: its top-k ``predictions`` (best first), or the ``status`` and
    ``error`` message of why it has none (what a ClientError for it would carry)."""

    name: str
    predictions: list[dict] | None = None
    status: int = 200
    error: str | None = None

    @classmethod
    def refused(cls, name: str, e: ClientError) -> ImageResult:
        return cls(name, status=e.status, error=e.message)


@dataclass(frozen=True)
class Answer:
    """:meth:`Replica.predict`'s answer: a result per upload, in order; how many images shared the
    forward pass (0 if none ran); whether it went through Serve's batch queue."""

    results: list[ImageResult]
    batch_size: int
    queued: bool


class Replica:
    """The model of ``checkpoint`` on this process's GPU if it has one, else the CPU, answering
    with ``options`` (its limits, batching and token)."""

    def __init__(self, checkpoint: str, options: ServeOptions) -> None:
        from placesnet.checkpoint import load_checkpoint
        from placesnet.config import pretty
        from placesnet.data.transforms import eval_transform, normalize

        self.options = options
        self.normalize = normalize
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.loaded = load_checkpoint(checkpoint, self.device)
        self.transform = eval_transform(self.loaded.config.image_size)
        self.labels = [pretty(c) for c in self.loaded.classes]
        self.default_top_k = min(options.top_k, len(self.labels))
        self.model_id = f"{self.loaded.config.model}:{self.loaded.path.parent.name}/{self.loaded.path.name}"
        self.note = self.loaded.note
        # the key stays in this replica's memory
        self.api_key = read_api_key(options.api_key_env, options.api_key_file)
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
        self.check_health()  # fail at start-up, not on the first request

    # --- what a request is checked against, before its images are decoded --------------------

    def authorize(self, authorization: str) -> None:
        """With a key set: ``authorization`` must be ``Bearer <key>``, else ClientError 401."""
        check_bearer(authorization, self.api_key)

    def check_top_k(self, requested: int | None) -> int:
        """The classes to answer with: ``requested``, or the default when None; ClientError 422
        outside 1..number of classes."""
        k = self.default_top_k if requested is None else requested
        if not 1 <= k <= len(self.labels):
            raise ClientError(422, f"top_k must be between 1 and {len(self.labels)}, got {k}")
        return k

    # --- predict: the one path for HTTP and gRPC ------------------------------------------------

    async def predict(self, uploads: list[Upload], k: int) -> Answer:
        """The top ``k`` classes of each upload, in order; an upload that is no usable image gets
        its status and error instead. One upload goes through the batch queue, where it shares
        forward passes with other requests' (or runs at once when alone, see ``_infer``); several
        are decoded together (one nvJPEG batch on a GPU replica, else in parallel in the decode
        threads) and run ``max_batch_size`` per forward pass, without the batch queue's wait."""
        self.in_flight += 1
        try:
            if len(uploads) == 1:
                return await self._predict_alone(uploads[0], k)
            return await self._predict_together(uploads, k)
        finally:
            self.in_flight -= 1

    async def _predict_alone(self, upload: Upload, k: int) -> Answer:
        item = await self._in_decode_threads(self._prepare, upload)
        if isinstance(item, ImageResult):
            return Answer([item], batch_size=0, queued=False)
        probs, size, queued = await self._infer(item)
        return Answer([ImageResult(upload.name, self._top_k(probs, k))], batch_size=size, queued=queued)

    async def _predict_together(self, uploads: list[Upload], k: int) -> Answer:
        if self.gpu_decode:  # one nvJPEG batch for the request's images (empty ones refused below)
            images = [u.data for u in uploads if u.data]
            decoded = iter(await asyncio.to_thread(self._decode_on_device, images))
            prepared = [_attempt(u, _usable, next(decoded)) if u.data else self._prepare(u) for u in uploads]
        else:  # in parallel in the replica's decode threads
            prepared = await asyncio.gather(*(self._in_decode_threads(self._prepare, u) for u in uploads))
        good = [item for item in prepared if not isinstance(item, ImageResult)]
        probs = iter(await asyncio.to_thread(self._run_chunks, good) if good else [])
        results = [
            item if isinstance(item, ImageResult) else ImageResult(upload.name, self._top_k(next(probs), k))
            for upload, item in zip(uploads, prepared)
        ]
        return Answer(results, batch_size=min(len(good), self.options.max_batch_size), queued=False)

    # --- decoding ---------------------------------------------------------------------------------

    async def _in_decode_threads(self, fn, *args):
        """``fn(*args)`` in this replica's decode threads."""
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, fn, *args)

    def _prepare(self, upload: Upload) -> torch.Tensor | ImageResult:
        """The upload as the model's input, or its refusal as its result."""
        return _attempt(upload, self._preprocess, upload.data)

    def _preprocess(self, data: bytes) -> torch.Tensor:
        """One image's bytes as the model's uint8 (3, S, S) input; ClientError if they are none."""
        from placesnet.images import decode_image

        if not data:
            raise ClientError(400, EMPTY_FIELD)
        if self.gpu_decode:
            return _usable(self._decode_on_device([data])[0])
        try:
            image = decode_image(data, self.options.max_pixels)
        except BadImage as e:
            raise ClientError.bad_image(e) from None
        return self.transform(image)

    def _decode_on_device(self, uploads: list[bytes]) -> list[torch.Tensor | BadImage]:
        """nvJPEG on this replica's GPU, all of ``uploads`` at once: a (3, S, S) uint8 tensor on
        the GPU or the BadImage that says why not, per upload (see gpudecode.decode_uploads)."""
        from placesnet.data.gpudecode import decode_uploads

        return decode_uploads(uploads, self.device, self.transform, self.options.max_pixels)

    # --- inference ----------------------------------------------------------------------------

    def _probe(self) -> torch.Tensor:
        size = self.loaded.config.image_size
        return torch.zeros(1, 3, size, size, dtype=torch.uint8)

    def _run_model(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            # uint8 until here: normalised on the replica's device, as in training
            logits = self.loaded.model(self.normalize(batch.to(self.device, non_blocking=True)))
            return torch.softmax(logits.float(), dim=1).cpu()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_batch(self, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """Dynamic batching: requests arriving together share one forward pass. Each answer is
        (probabilities, the size of the batch it was in)."""
        probs = await asyncio.to_thread(self._run_model, torch.stack(images))
        return [(p, len(images)) for p in probs]

    async def _infer(self, tensor: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
        """Probabilities for one preprocessed image, the forward pass's batch size, and whether it
        went through the batch queue. Serve's batching holds the first request of a batch for
        ``batch_wait_timeout_s`` even when nothing else is coming; with ``adaptive_batching``
        a request that is the only one in flight on this replica runs at once, and requests that
        arrive together still share forward passes."""
        if self.options.adaptive_batching and self.in_flight == 1:
            probs = await asyncio.to_thread(self._run_model, tensor[None])
            return probs[0], 1, False
        probs, size = await self.predict_batch(tensor)
        return probs, size, True

    def _run_chunks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        size, out = self.options.max_batch_size, []
        for start in range(0, len(tensors), size):
            out += list(self._run_model(torch.stack(tensors[start : start + size])))
        return out

    def _top_k(self, probs: torch.Tensor, k: int) -> list[dict]:
        values, indices = probs.topk(min(k, len(self.labels)))
        return [
            {"label": self.labels[i], "class_index": i, "probability": p}
            for p, i in zip(values.tolist(), indices.tolist())
        ]

    # --- what the info routes show ------------------------------------------------------------

    def check_health(self) -> None:
        """Raises if the model cannot run (Serve then replaces the replica)."""
        self._run_model(self._probe())

    def classes(self) -> dict[str, str]:
        return {str(i): name for i, name in enumerate(self.labels)}

    def info(self) -> dict[str, Any]:
        """The checkpoint, its training config and validation accuracy, and how this replica runs."""
        meta = self.loaded.meta
        return {
            "model": self.model_id,
            "checkpoint": str(self.loaded.path),
            "note": self.note,
            "epoch": meta["epoch"] + 1,
            "val_top1": meta["metrics"].get("val_top1"),
            "val_top5": meta["metrics"].get("val_top5"),
            "num_classes": len(self.labels),
            "image_size": self.loaded.config.image_size,
            "config": self.loaded.config.to_dict(),
            "device": str(self.device),
            "max_batch_size": self.options.max_batch_size,
            "decode_threads": self.decode_pool._max_workers,
            "decode": "nvjpeg" if self.gpu_decode else "cpu",
        }


def _usable(item: torch.Tensor | BadImage) -> torch.Tensor:
    """A decode_uploads outcome as the tensor, or the ClientError to raise for it."""
    if isinstance(item, BadImage):
        raise ClientError.bad_image(item)
    return item


def _attempt(upload: Upload, step, arg) -> torch.Tensor | ImageResult:
    """``step(arg)``, or, if it raises ClientError, the upload's result that says so."""
    try:
        return step(arg)
    except ClientError as e:
        return ImageResult.refused(upload.name, e)
