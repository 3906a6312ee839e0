"""The endpoint's refusals and metrics without Ray: every kind of refusal names its reason (the
``reason`` tag of placesnet_client_errors), a ClientError's reason is checked against its status,
and EndpointMetrics records each event under its metric and tags, inside a replica or not.
(tests/test_serve_metrics.py reads the same metrics from a real head's Prometheus endpoint.)"""

import asyncio
import io
import re
import warnings

import httpx
import pytest
from PIL import Image

from placesnet.serve.errors import DEFAULT_REASONS, GRPC_CODES, REASONS, ClientError


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "green").save(buf, "JPEG")
    return buf.getvalue()


def _read_uploads(headers: dict[str, str], body: bytes, **limits):
    """placesnet.serve.body.read_uploads of a POST with ``headers`` and ``body`` (one chunk)."""
    from conftest import post_request

    from placesnet.serve.body import read_uploads
    from placesnet.serve.options import ServeOptions

    return asyncio.run(read_uploads(post_request(headers, body), ServeOptions(**limits)))


def _multipart(n: int) -> tuple[dict[str, str], bytes]:
    built = httpx.Request(
        "POST", "http://x/", files=[("file", (f"f{i}.jpg", _jpeg(), "image/jpeg")) for i in range(n)]
    )
    return dict(built.headers), built.read()


def _verdict(call) -> tuple[int, str]:
    with pytest.raises(ClientError) as refused:
        call()
    return refused.value.status, refused.value.reason


def test_every_kind_of_refusal_names_its_reason():
    from placesnet.images import BadImage, decode_image
    from placesnet.serve.auth import check_bearer
    from placesnet.serve.body import file_fields
    from placesnet.serve.options import ServeOptions

    def bad_image(data: bytes, max_pixels: int = 40_000_000):
        try:
            decode_image(data, max_pixels)
        except BadImage as e:
            raise ClientError.bad_image(e) from None

    raw = {"Content-Type": "image/jpeg"}
    form_headers, form = _multipart(3)
    no_file_headers = {"Content-Type": "multipart/form-data; boundary=b"}
    no_file = b'--b\r\nContent-Disposition: form-data; name="other"\r\n\r\nx\r\n--b--\r\n'
    cases = {
        "declared too large": (
            lambda: _read_uploads({**raw, "Content-Length": "101"}, b"", max_body_bytes=100)
        ),
        "streamed too large": (lambda: _read_uploads(raw, b"x" * 101, max_body_bytes=100)),
        "too many files": (lambda: _read_uploads(form_headers, form, max_images_per_request=2)),
        "form without a file": (lambda: _read_uploads(no_file_headers, no_file)),
        "text/plain": (lambda: _read_uploads({"Content-Type": "text/plain"}, b"hello")),
        "empty raw body": (lambda: _read_uploads(raw, b"")),
        "no boundary": (lambda: file_fields("multipart/form-data", b"--x\r\n\r\n--x--")),
        "parser error": (
            lambda: file_fields("multipart/form-data; boundary=x", b"--x\r\nnot a header\r\n--x")
        ),
        "part without a name": (
            lambda: file_fields(
                "multipart/form-data; boundary=x", b"--x\r\nContent-Type: image/png\r\n\r\nab\r\n--x--\r\n"
            )
        ),
        "wrong token": (lambda: check_bearer("Bearer nope", "s3cret")),
        "gRPC bytes over the limit": (lambda: ServeOptions(max_body_bytes=10).check_request_size(1, 11)),
        "gRPC images over the limit": (
            lambda: ServeOptions(max_images_per_request=2).check_request_size(3, 0)
        ),
        "no image format": (lambda: bad_image(b"not an image at all")),
        "truncated": (lambda: bad_image(_jpeg()[:300])),
        "too many pixels": (lambda: bad_image(_jpeg(), max_pixels=100)),
    }
    verdicts = {name: _verdict(call) for name, call in cases.items()}
    assert verdicts == {
        "declared too large": (413, "body_too_large"),
        "streamed too large": (413, "body_too_large"),
        "too many files": (413, "too_many_images"),
        "form without a file": (422, "no_file_field"),
        "text/plain": (415, "unsupported_content_type"),
        "empty raw body": (400, "empty_body"),
        "no boundary": (400, "malformed_multipart"),
        "parser error": (400, "malformed_multipart"),
        "part without a name": (400, "malformed_multipart"),
        "wrong token": (401, "unauthorized"),
        "gRPC bytes over the limit": (413, "body_too_large"),
        "gRPC images over the limit": (413, "too_many_images"),
        "no image format": (415, "not_an_image"),
        "truncated": (400, "bad_image"),
        "too many pixels": (400, "bad_image"),
    }


def test_a_reason_is_a_known_word_for_its_status_and_defaults_by_status():
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", reason) for reason in REASONS), sorted(REASONS)
    assert set(REASONS.values()) == set(GRPC_CODES)  # every status has reasons, every reason a gRPC code
    assert DEFAULT_REASONS == {
        400: "bad_request",
        401: "unauthorized",
        413: "too_large",
        415: "unsupported_media_type",
        422: "invalid_request",
    }
    error = ClientError(401, "no", headers={"WWW-Authenticate": "Bearer"})  # an un-annotated call site
    assert (error.status, error.reason, error.message, error.headers) == (
        401,
        "unauthorized",
        "no",
        {"WWW-Authenticate": "Bearer"},
    )
    assert error.grpc_code == GRPC_CODES[401]
    assert ClientError(422, "top_k", reason="bad_top_k").reason == "bad_top_k"
    assert ClientError(400, "empty", reason="empty_field").reason == "empty_field"
    with pytest.raises(ValueError, match="ClientError reason 'bad_top_k' is not a reason for status 400"):
        ClientError(400, "x", reason="bad_top_k")
    with pytest.raises(ValueError, match="ClientError reason 'teapot' is not a reason for status 400"):
        ClientError(400, "x", reason="teapot")
    with pytest.raises(ValueError, match="ClientError status 404 has no gRPC code"):
        ClientError(404, "x", reason="bad_request")  # the status is checked first


# --- EndpointMetrics ------------------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch):
    """Every value Serve's Counter and Histogram are given while the test runs: (metric name,
    value, tags), after Ray's own checks of the tags (the recorders are Ray's classes)."""
    from ray.serve import metrics as serve_metrics

    records = []

    class Counter(serve_metrics.Counter):
        def inc(self, value=1.0, tags=None):
            super().inc(value, tags)
            records.append((self._name, value, tags or {}))

    class Histogram(serve_metrics.Histogram):
        def observe(self, value, tags=None):
            super().observe(value, tags)
            records.append((self._name, value, tags or {}))

    monkeypatch.setattr(serve_metrics, "Counter", Counter)
    monkeypatch.setattr(serve_metrics, "Histogram", Histogram)
    return records


def test_each_event_is_recorded_under_its_metric_and_tags(recorded):
    from placesnet.serve.metrics import EndpointMetrics

    metrics = EndpointMetrics()
    metrics.classified("desert/sand")
    metrics.refused(415, "not_an_image")
    metrics.forward_pass(3, 0.02)
    metrics.decoded(0.004)
    metrics.checkpoint("loaded")
    metrics.checkpoint("rejected")
    assert recorded == [
        ("placesnet_images_classified", 1.0, {}),
        ("placesnet_top1_class", 1.0, {"label": "desert/sand"}),
        ("placesnet_client_errors", 1.0, {"status": "415", "reason": "not_an_image"}),
        ("placesnet_images_per_forward_pass", 3, {}),
        ("placesnet_model_seconds", 0.02, {}),
        ("placesnet_decode_seconds", 0.004, {}),
        ("placesnet_checkpoint_loads", 1.0, {"outcome": "loaded"}),
        ("placesnet_checkpoint_loads", 1.0, {"outcome": "rejected"}),
    ]
    with pytest.raises(ValueError, match="checkpoint outcome must be one of"):
        metrics.checkpoint("swapped")


def test_metrics_work_outside_a_replica_with_ray_not_started():
    """What unit tests that build a Replica directly do: Ray's metrics record without a Ray
    instance and without a replica context, silently (no invalid-name warning), and start none."""
    import ray

    from placesnet.serve.metrics import EndpointMetrics

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # a second replica in the same process registers the same names again
            metrics = EndpointMetrics()
            metrics.classified("beach")
            metrics.refused(401, "unauthorized")
            metrics.forward_pass(1, 0.001)
            metrics.decoded(0.0001)
            metrics.checkpoint("loaded")
    assert not [w for w in caught if "metric" in str(w.message).lower()], [str(w.message) for w in caught]
    assert not ray.is_initialized()
