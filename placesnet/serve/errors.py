"""ClientError: a request (or one image of it) the endpoint refuses, raised where the problem is
found with its HTTP status and a short ``reason``; GRPC_CODES maps that status to the gRPC status a
gRPC client gets, so both hear the same verdict with the same message, and REASONS lists every
reason (the ``reason`` tag of the ``placesnet_client_errors`` metric) with its status."""

from __future__ import annotations

import grpc
from PIL import UnidentifiedImageError

from placesnet.images import BadImage

# Every status a ClientError may carry, and what gRPC says for it.
GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,  # a malformed body, an empty or broken image
    401: grpc.StatusCode.UNAUTHENTICATED,  # no or a wrong bearer token
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,  # over max_body_bytes or max_images_per_request
    415: grpc.StatusCode.INVALID_ARGUMENT,  # bytes in no image format, or a non-image Content-Type
    422: grpc.StatusCode.INVALID_ARGUMENT,  # a well-formed request with a bad value (top_k, no file)
}

# Every reason a ClientError may give, and its status: a closed set, so that the metric's `reason`
# tag has a known handful of values. The first reason of each status is its default, for a
# ClientError raised without one.
REASONS: dict[str, int] = {
    "bad_request": 400,  # the default 400
    "empty_body": 400,  # a raw body of no bytes
    "malformed_multipart": 400,  # no boundary, a part without a name, a parser error
    "empty_field": 400,  # a multipart `file` field (or gRPC image) of no bytes
    "bad_image": 400,  # an image format, but truncated, corrupt or over max_pixels
    "no_images": 400,  # a gRPC request with no images
    "unknown_class": 400,  # /explain's `class`: not one of the model's classes
    "unauthorized": 401,  # no or a wrong bearer token
    "too_large": 413,  # the default 413
    "body_too_large": 413,  # over max_body_bytes
    "too_many_images": 413,  # over max_images_per_request
    "unsupported_media_type": 415,  # the default 415
    "not_an_image": 415,  # bytes in no image format
    "unsupported_content_type": 415,  # a Content-Type that is neither image/* nor multipart
    "invalid_request": 422,  # the default 422
    "no_file_field": 422,  # a multipart form without a `file` field
    "bad_top_k": 422,  # top_k outside 1..the model's classes
    "bad_format": 422,  # /explain's `format`: neither png nor json
}
DEFAULT_REASONS: dict[int, str] = {
    status: next(r for r, s in REASONS.items() if s == status) for status in GRPC_CODES
}


class ClientError(Exception):
    """The client's mistake: ``status`` (a key of GRPC_CODES), a one-line ``message``, HTTP headers
    to send with it (``WWW-Authenticate`` for a 401), and ``reason``, a key of REASONS whose status
    is ``status`` (default: the status's first, e.g. ``bad_request`` for a 400). Always raised; an
    image of a multi-image request that is refused becomes its own result instead
    (replica.ImageResult)."""

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, *, reason: str | None = None
    ) -> None:
        if status not in GRPC_CODES:  # a new status needs its gRPC code first
            raise ValueError(f"ClientError status {status} has no gRPC code in GRPC_CODES")
        reason = reason or DEFAULT_REASONS[status]
        if REASONS.get(reason) != status:  # a new reason goes into REASONS, with its status
            raise ValueError(f"ClientError reason {reason!r} is not a reason for status {status} in REASONS")
        super().__init__(message)
        self.status, self.message, self.headers, self.reason = status, message, headers, reason

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES[self.status]

    @classmethod
    def bad_image(cls, e: BadImage) -> ClientError:
        """The error to raise for an image :func:`placesnet.images.decode_image` refused: 415
        ``not_an_image`` for bytes in no image format at all, 400 ``bad_image`` for the rest (empty,
        truncated, corrupt, too many pixels). decode_image raises BadImage while handling PIL's
        UnidentifiedImageError for the former, so the cause's type decides, never the message."""
        if isinstance(e.__context__, UnidentifiedImageError):
            return cls(415, str(e), reason="not_an_image")
        return cls(400, str(e), reason="bad_image")
