"""A POST /predict (or /explain) body -> its uploads: the raw body (one image), or every multipart
``file`` field. The body is refused (413) as soon as it outgrows ``max_body_bytes``, while it
streams in; a multipart body's ``file`` fields are counted as they are parsed (python-multipart's
parser, fed the body in memory), so too many of them is a 413 found where they are counted."""

from __future__ import annotations

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from placesnet.serve.errors import ClientError
from placesnet.serve.options import ServeOptions
from placesnet.serve.replica import Upload


async def read_uploads(request: Request, options: ServeOptions) -> list[Upload]:
    """The request's images: ``[Upload("body", bytes)]`` for a raw body (Content-Type image/* or
    application/octet-stream), or one Upload per multipart ``file`` field, in order, named by
    its filename. ClientError: 413 over max_body_bytes or max_images_per_request, 415 for another
    Content-Type, 400 for an empty or malformed body, 422 for a form with no ``file`` field."""
    limit = options.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ClientError(
            413, f"request body is {declared} bytes, over the limit of {limit}", reason="body_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ClientError(
                413, f"request body is over the limit of {limit} bytes", reason="body_too_large"
            )
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        uploads = file_fields(content_type, bytes(body))
        if not uploads:
            raise ClientError(422, "multipart form has no 'file' field with an image", reason="no_file_field")
        options.check_request_size(len(uploads), 0)  # the size was checked as it streamed in
        return uploads
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ClientError(
            415,
            f"unsupported Content-Type {ctype!r}: send image/* bytes or a multipart form with a 'file' field",
            reason="unsupported_content_type",
        )
    if not body:
        raise ClientError(400, "empty request body: send the image bytes", reason="empty_body")
    return [Upload("body", bytes(body))]


def file_fields(content_type: str, body: bytes) -> list[Upload]:
    """Every part of a multipart/form-data ``body`` named ``file`` that has a filename, in order,
    as ``Upload(filename or "file<n>", its bytes)``; other parts are skipped, not kept.
    ClientError 400 if the body is not well-formed multipart."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ClientError(
            400, "malformed multipart body: no boundary in its Content-Type", reason="malformed_multipart"
        )
    form = _FileParts()
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": form.on_part_begin,
            "on_header_field": form.on_header_field,
            "on_header_value": form.on_header_value,
            "on_header_end": form.on_header_end,
            "on_headers_finished": form.on_headers_finished,
            "on_part_data": form.on_part_data,
            "on_part_end": form.on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise ClientError(400, f"malformed multipart body: {e}", reason="malformed_multipart") from None
    return [Upload(name or f"file{i}", data) for i, (name, data) in enumerate(form.files, start=1)]


class _FileParts:
    """python-multipart callbacks keeping the ``file`` parts: (filename, bytes) in ``files``."""

    def __init__(self) -> None:
        self.files: list[tuple[str, bytes]] = []
        self._field, self._value, self._disposition = b"", b"", b""
        self._data: bytearray | None = None  # the current part's bytes, if it is a `file` part
        self._filename = ""

    def on_part_begin(self) -> None:
        self._disposition, self._data = b"", None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        if self._field.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._field, self._value = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        if b"name" not in params:
            raise ClientError(
                400,
                "malformed multipart body: a part has no Content-Disposition name",
                reason="malformed_multipart",
            )
        if params[b"name"] == b"file" and b"filename" in params:
            self._filename, self._data = _text(params[b"filename"]), bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._data is not None:
            self.files.append((self._filename, bytes(self._data)))
            self._data = None


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:  # as Starlette's form parser: a filename is shown, never trusted
        return raw.decode("latin-1")
