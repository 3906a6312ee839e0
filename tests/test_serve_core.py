"""placesnet/serve without Ray: build_app's options are typed and checked once, every bad one
refused by name; HTTP and gRPC call one predict core and a ClientError's status reaches both
through one table (GRPC_CODES); /explain's overlays (the map of the class asked for, over the
view) through the same checks and refusals as /predict; a multipart body's `file` fields.
(tests/test_serve.py runs the same endpoint under a real Ray Serve.)"""

import asyncio
import base64
import io
import json
import math
import re
from dataclasses import fields
from pathlib import Path

import grpc
import httpx
import pytest
from conftest import post_request, untrained_checkpoint
from PIL import Image

from placesnet.serve.errors import GRPC_CODES, ClientError
from placesnet.serve.options import DEFAULTS, ServeOptions, parse_args

# --- options --------------------------------------------------------------------------------------


# Each option's type and whether 0 is allowed, as documented (docs/serving.md, serving/config.yaml).
KINDS = {
    "min_replicas": (int, True),
    "max_replicas": (int, False),
    "target_ongoing_requests": (int, False),
    "upscale_delay_s": (float, True),
    "downscale_delay_s": (float, True),
    "num_cpus": (float, False),
    "num_gpus": (float, True),
    "max_batch_size": (int, False),
    "batch_wait_timeout_s": (float, True),
    "adaptive_batching": (bool, True),
    "gpu_decode": (bool, True),
    "max_images_per_request": (int, False),
    "top_k": (int, False),
    "max_body_bytes": (int, False),
    "max_pixels": (int, False),
    "api_key_env": (str, True),
    "api_key_file": (str, True),
}


def _bad_values(name: str) -> list:
    kind, zero_ok = KINDS[name]
    if kind is bool:
        return [2, "maybe", 1.0]
    if kind is str:
        return ["MY-KEY", "1ABC"] if name == "api_key_env" else ["key.txt", "./secrets/key"]
    bad = ["abc", "", None, -1, "-1", True, "nan", "inf", math.inf]
    if kind is int:
        bad += [1.5, "2.5"]
    return bad if zero_ok else [*bad, 0, "0"]


_CASES = [(name, bad) for name in KINDS for bad in _bad_values(name)]


def test_every_option_is_covered_with_its_documented_type():
    assert {f.name: type(f.default) for f in fields(ServeOptions)} == {n: k for n, (k, _) in KINDS.items()}
    for name in [n for n, (kind, zero_ok) in KINDS.items() if zero_ok and kind in (int, float)]:
        assert getattr(parse_args({"checkpoint": "x", name: "0"})[1], name) == 0, name  # 0 is allowed


@pytest.mark.parametrize("name, bad", _CASES, ids=[f"{n}={b!r}" for n, b in _CASES])
def test_each_bad_option_is_refused_with_one_line_that_names_it(name, bad):
    with pytest.raises(ValueError) as refused:
        parse_args({"checkpoint": "/ckpt", name: bad})
    message = str(refused.value)
    assert message.startswith(f"{name} must ") and repr(bad) in message and "\n" not in message, message
    assert "; " not in message  # this one option, not a list of others


def test_options_from_strings_are_typed_and_all_bad_ones_are_named_in_one_error():
    checkpoint, options = parse_args(
        {
            "checkpoint": "~/run",
            "max_batch_size": "24",
            "num_cpus": "0.5",
            "upscale_delay_s": 5,
            "adaptive_batching": "0",
            "gpu_decode": True,
            "max_replicas": "3",
            "api_key_env": "PLACESNET_API_KEY",
            "api_key_file": "~/key",
        }
    )
    assert checkpoint == "~/run"  # build_app resolves it
    assert (options.max_batch_size, options.num_cpus, options.upscale_delay_s) == (24, 0.5, 5.0)
    assert type(options.max_batch_size) is int and type(options.upscale_delay_s) is float
    assert (options.adaptive_batching, options.gpu_decode) == (False, True)
    assert (
        options.min_replicas == 2
        and options.api_key_file.endswith("/key")
        and "~" not in options.api_key_file
    )
    assert parse_args({"checkpoint": "x", "max_replicas": 1})[1].min_replicas == 1  # default within max
    with pytest.raises(ValueError) as both:
        parse_args({"checkpoint": "x", "max_batch_size": "abc", "top_k": 0})
    assert (
        str(both.value)
        == "max_batch_size must be a positive integer, got 'abc'; top_k must be a positive integer, got 0"
    )
    for args, message in (
        ({"checkpoint": "x", "min_replicas": 3, "max_replicas": 2}, "min_replicas 3 > max_replicas 2"),
        (
            {"checkpoint": "x", "replicas": 3},
            "unknown option(s) ['replicas']; known: checkpoint, min_replicas",
        ),
        ({"max_batch_size": 4}, "missing checkpoint=PATH"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_args(args)
    assert DEFAULTS["max_batch_size"] == ServeOptions().max_batch_size == 16
    with pytest.raises(ValueError, match="max_batch_size must be a positive integer"):
        ServeOptions(max_batch_size=0)  # the object can never hold a bad value


def test_build_app_refuses_bad_options_before_looking_at_the_checkpoint(tmp_path):
    from serving.app import build_app

    with pytest.raises(ValueError, match=r"^num_gpus must be a number >= 0, got 'half'$"):
        build_app({"checkpoint": str(tmp_path / "nope"), "num_gpus": "half"})  # not "not found"


# --- one predict core, one status table ----------------------------------------------------------


@pytest.fixture(scope="module")
def replica(tiny_config, tmp_path_factory):
    """A Replica (no Serve) of a random-weight 4-class checkpoint, with a bearer token."""
    return _keyed_replica(tmp_path_factory.mktemp("replica"), lambda d: untrained_checkpoint(d, tiny_config))


def _keyed_replica(tmp, write_checkpoint):
    """A Replica of the checkpoint ``write_checkpoint(DIR)`` writes under ``tmp``, with the limits
    and the bearer token ("s3cret") the tests expect."""
    from placesnet.serve.replica import Replica

    write_checkpoint(tmp / "ckpt")
    (tmp / "key").write_text("s3cret\n")
    options = ServeOptions(
        num_cpus=1, max_body_bytes=50_000, max_images_per_request=4, api_key_file=str(tmp / "key")
    )
    return Replica(str(tmp / "ckpt"), options)


class _Context:
    """What Serve's gRPC proxy hands the method: the metadata in, the status out."""

    def __init__(self, authorization: str | None) -> None:
        self.metadata = [("authorization", authorization)] if authorization else []
        self.code, self.details = None, None

    def invocation_metadata(self):
        return self.metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


def _deployment(replica):
    """The Serve deployment's own class (under Serve's wrappers), and a stand-in for one of its
    replicas: its route and RPC methods run as in Serve, from ``replica``."""
    from types import SimpleNamespace

    from placesnet.serve.http_api import SceneClassifier

    return SceneClassifier.func_or_class.__mro__[1], SimpleNamespace(replica=replica)


def _request(images: list[bytes], authorization: str | None, path: str, content_type: str = "image/jpeg"):
    """A Starlette POST ``path`` request of ``images``: one as the raw body of ``content_type``,
    several as multipart `file` fields named image1, image2, ..."""
    files = [("file", (f"image{i}", data, "image/jpeg")) for i, data in enumerate(images, 1)]
    built = (
        httpx.Request("POST", f"http://x{path}", files=files)
        if len(images) != 1
        else httpx.Request(
            "POST", f"http://x{path}", content=images[0], headers={"Content-Type": content_type}
        )
    )
    headers = {**built.headers, **({"authorization": authorization} if authorization else {})}
    return post_request(headers, built.read(), path)


def _http(replica, images: list[bytes], top_k=None, authorization="Bearer s3cret"):
    """POST /predict through the deployment's route method and the app's error handlers:
    (status, JSON body, headers). Several images go as multipart `file` fields."""
    from fastapi import Response

    from placesnet.serve.http_api import app

    request, response = _request(images, authorization, "/predict"), Response()
    deployment, instance = _deployment(replica)

    async def call():
        try:
            return 200, await deployment.predict(instance, request, response, top_k), dict(response.headers)
        except ClientError as e:
            answer = await app.exception_handlers[ClientError](request, e)
            return answer.status_code, json.loads(answer.body), dict(answer.headers)

    return asyncio.run(call())


def _grpc(replica, images: list[bytes], top_k=0, authorization="Bearer s3cret"):
    """placesnet.SceneClassifier/Predict through the deployment's gRPC method: (reply, context)."""
    from serving.scene_pb2 import PredictRequest

    (deployment, instance), context = _deployment(replica), _Context(authorization)
    reply = asyncio.run(deployment.Predict(instance, PredictRequest(images=images, top_k=top_k), context))
    return reply, context


def _explain(
    replica,
    images: list[bytes],
    top_k=None,
    authorization="Bearer s3cret",
    cls: str | None = None,
    fmt: str = "png",
    content_type: str = "image/jpeg",
):
    """POST /explain through the deployment's route method and the app's error handlers:
    (status, body: PNG bytes or JSON, headers)."""
    from placesnet.serve.http_api import app

    request = _request(images, authorization, "/explain", content_type)
    deployment, instance = _deployment(replica)

    async def call():
        try:
            answer = await deployment.explain(instance, request, top_k, cls, fmt)
        except ClientError as e:
            answer = await app.exception_handlers[ClientError](request, e)
        png = answer.media_type == "image/png"
        return answer.status_code, answer.body if png else json.loads(answer.body), dict(answer.headers)

    return asyncio.run(call())


def _jpeg(color="green", size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _refused_requests() -> list[tuple[str, dict, int, grpc.StatusCode]]:
    """Requests the endpoint refuses whole: (name, _http's arguments, HTTP status, gRPC code)."""
    jpeg = _jpeg()
    return [
        ("no token", dict(images=[jpeg], authorization=None), 401, grpc.StatusCode.UNAUTHENTICATED),
        (
            "wrong token",
            dict(images=[jpeg], authorization="Bearer nope"),
            401,
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            "not bearer",
            dict(images=[jpeg], authorization="Basic s3cret"),
            401,
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        ("top_k too big", dict(images=[jpeg], top_k=9), 422, grpc.StatusCode.INVALID_ARGUMENT),
        ("too many images", dict(images=[jpeg] * 5), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("too many bytes", dict(images=[b"\xff" * 60_000]), 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ]


def test_a_refused_request_gets_the_same_verdict_over_http_and_grpc(replica):
    """The same bad requests sent both ways: the HTTP status and the gRPC code are the pair in
    GRPC_CODES (401/UNAUTHENTICATED, 413/RESOURCE_EXHAUSTED, 422/INVALID_ARGUMENT), with the
    same message; the gRPC reply is then empty."""
    for name, kwargs, status, code in _refused_requests():
        http_status, body, headers = _http(replica, **kwargs)
        reply, context = _grpc(replica, **kwargs)
        assert http_status == status and GRPC_CODES[status] == code == context.code, (
            name,
            http_status,
            context.code,
        )
        assert body == {"error": context.details}, (name, body, context.details)
        assert not reply.results and not reply.model, name
        if status == 401:
            assert headers["www-authenticate"] == "Bearer"
    assert body["error"] == "request body is 60000 bytes, over the limit of 50000"


def test_each_image_gets_the_same_answer_over_http_and_grpc(replica):
    """One predict core: an image alone and images together give the same predictions and the
    same per-image errors both ways; an image alone that is refused is the HTTP request's status
    (415 for no image format, 400 for a broken one) and that image's error over gRPC."""
    good, other = _jpeg("green"), _jpeg("navy", (64, 48))
    broken, text = good[: len(good) // 2], b"not an image at all"
    for data, status in ((text, 415), (broken, 400)):
        http_status, body, _ = _http(replica, [data])
        reply, context = _grpc(replica, [data])
        assert http_status == status and context.code is None, (http_status, context.code)
        assert body["error"] == reply.results[0].error and not reply.results[0].predictions
    assert "not a recognised image format" in _http(replica, [text])[1]["error"]
    alone_status, alone, alone_headers = _http(replica, [good], top_k=3)
    assert (
        alone_status == 200
        and alone_headers["x-batch-size"] == "1"
        and alone_headers["x-batch-queued"] == "no"
    )
    reply, _ = _grpc(replica, [good], top_k=3)
    assert [p.label for p in reply.results[0].predictions] == [p["label"] for p in alone["predictions"]]
    images = [good, text, other, b""]
    http_status, body, headers = _http(replica, images, top_k=2)
    reply, context = _grpc(replica, images, top_k=2)
    assert http_status == 200 and context.code is None and headers["x-batch-size"] == "2"
    assert [r["file"] for r in body["results"]] == ["image1", "image2", "image3", "image4"]
    assert [r.get("status") for r in body["results"]] == [None, 415, None, 400]
    assert [r.get("error", "") for r in body["results"]] == [r.error for r in reply.results]
    for http_result, grpc_result in zip(body["results"], reply.results):
        assert [p["label"] for p in http_result.get("predictions", [])] == [
            p.label for p in grpc_result.predictions
        ]
        assert [p["probability"] for p in http_result.get("predictions", [])] == pytest.approx(
            [p.probability for p in grpc_result.predictions], abs=1e-6
        )
    assert body["results"][0]["predictions"][0]["label"] == alone["predictions"][0]["label"]


# --- /explain: where the model looks, through the same checks and predict core ------------------


@pytest.fixture(scope="module")
def explaining(tiny_config, tmp_path_factory):
    """A Replica (no Serve) as ``replica``'s, of a model trained one epoch: its maps show evidence
    for every class (a random model's map of its top-1 class is often empty)."""
    from test_explain import one_epoch_checkpoint

    return _keyed_replica(
        tmp_path_factory.mktemp("explaining"), lambda d: one_epoch_checkpoint(d, tiny_config)
    )


def _pixels(png: bytes):
    import numpy as np

    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        return np.asarray(img, dtype=np.int16)


def _expected_overlay(replica, data: bytes, class_index: int):
    """The overlay plots.overlay draws of the upload's view and its map of ``class_index``,
    computed here, outside the endpoint."""
    import numpy as np

    from placesnet.evaluation import batch_heatmaps
    from placesnet.images import decode_image
    from placesnet.plots import overlay

    model = replica.current()
    view = model.transform(decode_image(data))
    heatmap = batch_heatmaps(model.loaded, view[None], [class_index])[0]
    assert heatmap.max() == 1  # a map with evidence somewhere: comparing with it means something
    return overlay(view, heatmap).astype(np.int16)


def test_explain_answers_one_image_with_its_overlay_and_predictions(explaining, tiny_root):
    """One image: a PNG of the view's size (the model's input, 32 x 32, from a 256 x 256 photo)
    that is the view blended with the map of its top-1 class (or of ?class=, by either name);
    X-Predictions are /predict's, X-Explained-Class names the map's class with /predict's
    probability; format=json holds the same; a class the model lacks is a 400, a format that is
    neither png nor json a 422."""
    photo = (tiny_root / "val_256/Places365_val_00000002.jpg").read_bytes()
    status, predicted, _ = _http(explaining, [photo], top_k=4)
    assert status == 200
    top1, other = predicted["predictions"][0], predicted["predictions"][2]
    status, png, headers = _explain(explaining, [photo], top_k=4)
    assert status == 200 and headers["content-type"] == "image/png", (status, png)
    drawn = _pixels(png)
    assert drawn.shape == (32, 32, 3)
    assert json.loads(headers["x-predictions"]) == predicted["predictions"]
    explained = json.loads(headers["x-explained-class"])
    assert explained == {k: top1[k] for k in ("label", "class_index", "probability")}
    assert abs(drawn - _expected_overlay(explaining, photo, top1["class_index"])).max() <= 2
    for name in (other["label"], explaining.current().loaded.classes[other["class_index"]]):  # "x", "/x/x"
        status, png, headers = _explain(explaining, [photo], top_k=4, cls=name)
        assert status == 200, (name, png)
        assert json.loads(headers["x-explained-class"]) == {
            k: other[k] for k in ("label", "class_index", "probability")
        }
        expected = _expected_overlay(explaining, photo, other["class_index"])
        assert abs(_pixels(png) - expected).max() <= 2
        assert abs(drawn - expected).max() > 20  # another class, another map
    status, body, headers = _explain(explaining, [photo], cls=other["label"], fmt="json")
    assert status == 200 and headers["content-type"] == "application/json"
    assert (body["file"], body["class"], body["class_index"]) == (
        "body",
        other["label"],
        other["class_index"],
    )
    assert body["probability"] == other["probability"] and body["predictions"] == predicted["predictions"]
    assert abs(_pixels(base64.b64decode(body["overlay_png_base64"])) - _pixels(png)).max() == 0
    assert body["model"].startswith("deepcnn:") and "knows only its 4 classes" in body["note"]
    status, body, _ = _explain(explaining, [photo], cls="beech")
    assert status == 400 and body["error"].startswith("unknown class 'beech'"), body
    assert "beach" in body["error"] and "desert/sand" in body["error"]
    status, body, _ = _explain(explaining, [photo], fmt="xml")
    assert status == 422 and body["error"] == "format must be png or json, got 'xml'"


def test_explain_answers_several_images_in_order_each_as_if_alone(explaining, tiny_root):
    """Several images: JSON results in order, each as that image alone gets it (class,
    probability, predictions, overlay), one that is no image or empty its own error."""
    photos = [(tiny_root / f"val_256/Places365_val_{i:08d}.jpg").read_bytes() for i in (3, 1)]
    images = [photos[0], b"not an image at all", photos[1], b""]
    status, body, headers = _explain(explaining, images, top_k=2, cls="field/wild")
    assert status == 200 and headers["x-batch-size"] == "2"
    results = body["results"]
    assert [r["file"] for r in results] == ["image1", "image2", "image3", "image4"]
    assert [r.get("status") for r in results] == [None, 415, None, 400]
    assert "overlay_png_base64" not in results[1] and results[1]["error"]
    for photo, result in zip(photos, (results[0], results[2])):
        _, alone, alone_headers = _explain(explaining, [photo], top_k=2, cls="field/wild")
        assert result["class"] == "field/wild" and result["predictions"] == json.loads(
            alone_headers["x-predictions"]
        )
        assert result["probability"] == json.loads(alone_headers["x-explained-class"])["probability"]
        assert abs(_pixels(base64.b64decode(result["overlay_png_base64"])) - _pixels(alone)).max() <= 2


_EXPLAIN_ONLY = [  # what /explain refuses beyond /predict's refusals: (name, _explain's arguments, status)
    ("not an image", dict(images=[b"not an image at all"]), 415),
    ("truncated image", dict(images=[_jpeg()[:300]]), 400),
    ("empty body", dict(images=[b""]), 400),
    ("unsupported content type", dict(images=[b'{"a": 1}'], content_type="application/json"), 415),
    ("unknown class, no token", dict(images=[_jpeg()], cls="beech", authorization=None), 401),
]


_EXPLAIN_REFUSALS = [
    (name, kwargs, status) for name, kwargs, status, _ in _refused_requests()
] + _EXPLAIN_ONLY


@pytest.mark.parametrize("name, kwargs, status", _EXPLAIN_REFUSALS, ids=[c[0] for c in _EXPLAIN_REFUSALS])
def test_explain_refuses_what_predict_refuses_with_the_same_answer(explaining, name, kwargs, status):
    """Each request /predict refuses (no or a wrong key, a bad top_k, too many images or bytes,
    no image, a broken one, an empty body, another Content-Type) /explain refuses with the same
    status and error; the key is checked before the class."""
    kwargs = dict(kwargs)
    cls, content_type = kwargs.pop("cls", None), kwargs.pop("content_type", "image/jpeg")
    explained = _explain(explaining, **kwargs, cls=cls, content_type=content_type)
    assert explained[0] == status, (name, explained)
    if cls is None and content_type == "image/jpeg":
        assert explained[1] == _http(explaining, **kwargs)[1], name
    if status == 401:
        assert explained[2]["www-authenticate"] == "Bearer"


def test_a_client_error_needs_a_grpc_code_and_bad_images_are_sorted_by_cause_not_message():
    from placesnet.images import BadImage, decode_image

    with pytest.raises(ValueError, match="ClientError status 404 has no gRPC code"):
        ClientError(404, "not here")
    verdicts = {}
    for name, data in {"text": b"not a recognised image format", "empty": b"", "cut": _jpeg()[:300]}.items():
        with pytest.raises(BadImage) as refused:
            decode_image(data)
        verdicts[name] = ClientError.bad_image(refused.value).status
    assert verdicts == {"text": 415, "empty": 400, "cut": 400}
    assert ClientError.bad_image(BadImage("not a recognised image format")).status == 400  # no PIL cause


def test_no_status_is_chosen_by_matching_an_error_message():
    from conftest import REPO

    sources = [*(REPO / "placesnet" / "serve").glob("*.py"), REPO / "serving" / "app.py"]
    offenders = [
        f"{p.name}: {line.strip()}"
        for p in sources
        for line in p.read_text().splitlines()
        if " in str(" in line
    ]
    assert not offenders, offenders


def test_multipart_file_fields_in_order_and_malformed_bodies_refused():
    from placesnet.serve.body import file_fields

    def part(disposition: str, data: bytes) -> bytes:
        return f"--b\r\nContent-Disposition: form-data; {disposition}\r\n\r\n".encode() + data + b"\r\n"

    body = b"".join(
        [
            part('name="file"', b"a text field, not a file"),
            part('name="file"; filename="b.jpg"', b"\xff\xd8 one"),
            part('name="nope"; filename="c.jpg"', b"skipped"),
            part('name="file"; filename=""', b"two"),
            part('name="file"; filename="\u00fc.png"', b""),
            b"--b--\r\n",
        ]
    )
    uploads = file_fields("multipart/form-data; boundary=b", body)
    assert [(u.name, u.data) for u in uploads] == [
        ("b.jpg", b"\xff\xd8 one"),
        ("file2", b"two"),
        ("\u00fc.png", b""),
    ]
    for content_type, body in (
        ("multipart/form-data; boundary=x", b"--x\r\nnot a part header\r\n--x"),
        ("multipart/form-data", b"--x\r\n\r\n--x--"),
        ("multipart/form-data; boundary=x", b"--x\r\nContent-Type: image/png\r\n\r\nab\r\n--x--\r\n"),
    ):
        with pytest.raises(ClientError) as refused:
            file_fields(content_type, body)
        assert refused.value.status == 400 and refused.value.message.startswith("malformed multipart body")


# --- the checkpoint a replica serves: verified, probed, swapped in place --------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_config, tmp_path_factory):
    """a and b (other weights), and what cannot be served: b with flipped bytes (same size),
    truncated, with another architecture's weights, and a model that cannot run at its image size."""
    import shutil
    from dataclasses import replace

    from conftest import flip_bytes, transplant_weights

    tmp = tmp_path_factory.mktemp("swap")
    made = {
        "a": untrained_checkpoint(tmp / "a", tiny_config, seed=0),
        "b": untrained_checkpoint(tmp / "b", tiny_config, seed=1),
        "cannot run": untrained_checkpoint(
            tmp / "tiny", replace(tiny_config, image_size=8, widths=(8, 16, 32, 64))
        ),
    }
    wide = untrained_checkpoint(tmp / "wide", replace(tiny_config, widths=(16, 32, 64)))
    for name in ("flipped", "truncated", "other architecture"):
        made[name] = Path(shutil.copytree(made["b"], tmp / name))
    flip_bytes(made["flipped"] / "model.pt")
    (made["truncated"] / "model.pt").write_bytes((made["truncated"] / "model.pt").read_bytes()[:-1000])
    transplant_weights(made["other architecture"], wide)
    return made


REFUSALS = {
    "flipped": "model.pt does not match its sha256",
    "truncated": "model.pt has",
    "other architecture": "do not fit a deepcnn",
    "cannot run": "cannot run on cpu",
}


@pytest.mark.parametrize("broken", REFUSALS)
def test_every_load_verifies_the_checkpoint(checkpoints, broken):
    """load_checkpoint (evaluate, predict, serve, a training's --init) and a replica's model refuse
    each broken checkpoint with one line that names it; flipped bytes of the same size included."""
    from placesnet.config import UserError
    from placesnet.serve.served import ServedModel

    with pytest.raises(UserError, match=re.escape(REFUSALS[broken])) as refused:
        ServedModel.load(checkpoints[broken], torch_cpu())
    assert str(checkpoints[broken]) in str(refused.value) and "\n" not in str(refused.value)


def torch_cpu():
    import torch

    return torch.device("cpu")


def test_a_replica_swaps_its_checkpoint_in_place_and_refuses_broken_ones(checkpoints, tiny_root):
    """Replica.use_checkpoint: b replaces a; a request that started on a is answered by a, all of
    it; each broken checkpoint is refused while b serves on (and /model's `rejected` says why);
    `latest` is refused (a replica must not resolve it on its own); a good one clears `rejected`.
    A replica with no model yet fails on a broken one (it then never starts)."""
    from placesnet.config import UserError
    from placesnet.serve.replica import Replica, Upload

    uploads = [Upload(p.name, p.read_bytes()) for p in sorted((tiny_root / "val_256").glob("*.jpg"))[:3]]
    replica = Replica(str(checkpoints["a"]), ServeOptions(num_cpus=1))
    model_a = replica.current()
    before = asyncio.run(replica.predict(uploads, 4)).results
    asyncio.run(replica.use_checkpoint(str(checkpoints["b"])))
    assert replica.current().checkpoint == checkpoints["b"] and replica.rejected is None
    late = asyncio.run(replica.predict(uploads, 4, model_a))  # started before the swap
    assert late.model is model_a and late.results == before
    now = asyncio.run(replica.predict(uploads, 4))
    assert now.model.checkpoint == checkpoints["b"] and now.results != before

    for broken, says in [*REFUSALS.items(), ("latest", "serving/promote.py resolves latest")]:
        asyncio.run(replica.use_checkpoint(str(checkpoints.get(broken, broken))))
        assert replica.current().checkpoint == checkpoints["b"], broken
        assert says in replica.info()["rejected"]["error"], (broken, replica.rejected)
    assert asyncio.run(replica.predict(uploads, 4)).results == now.results
    asyncio.run(replica.use_checkpoint(str(checkpoints["a"])))
    assert replica.current() is not model_a and replica.info()["rejected"] is None
    assert asyncio.run(replica.predict(uploads, 4)).results == before

    fresh = Replica(None, ServeOptions(num_cpus=1))
    with pytest.raises(UserError, match="does not match its sha256"):
        asyncio.run(fresh.use_checkpoint(str(checkpoints["flipped"])))
