"""ClientError: a request (or one image of it) the endpoint refuses, raised where the problem is
found with its HTTP status; GRPC_CODES maps that status to the gRPC status a gRPC client gets, so
both hear the same verdict with the same message."""

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


class ClientError(Exception):
    """The client's mistake: ``status`` (a key of GRPC_CODES), a one-line ``message``, and HTTP
    headers to send with it (``WWW-Authenticate`` for a 401). Always raised; an image of a
    multi-image request that is refused becomes its own result instead (replica.ImageResult)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        if status not in GRPC_CODES:  # a new status needs its gRPC code first
            raise ValueError(f"ClientError status {status} has no gRPC code in GRPC_CODES")
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return GRPC_CODES[self.status]

    @classmethod
    def bad_image(cls, e: BadImage) -> ClientError:
        """The error to raise for an image :func:`placesnet.images.decode_image` refused: 415 for
        bytes in no image format at all, 400 for the rest (empty, truncated, corrupt, too many
        pixels). decode_image raises BadImage while handling PIL's UnidentifiedImageError for the
        former, so the cause's type decides, never the message."""
        return cls(415 if isinstance(e.__context__, UnidentifiedImageError) else 400, str(e))
