"""The Serve endpoint against a real local Ray + Serve (not local testing mode): predictions,
parity with rayjobs/predict.py, every bad input's 4xx, concurrency, `serve run`, and /explain's
class activation maps through the same checks and batch queue."""

import asyncio
import base64
import io
import json
import os
from pathlib import Path

import httpx
import pytest
from conftest import REPO, _free_port, run_script
from PIL import Image
from test_images import _png_header_only

pytestmark = pytest.mark.slow

MAX_BODY = 300_000
GRPC_SERVICER = "serving.scene_pb2_grpc.add_SceneClassifierServicer_to_server"


def _grpc_target() -> str:
    """HOST:PORT of the running Serve instance's gRPC proxy (its port is the OS's choice)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    return f"127.0.0.1:{ray.get(controller.get_grpc_config.remote()).port}"


@pytest.fixture(scope="module")
def endpoint(ray_head, trained_run):
    """The app deployed on the session head; yields its base URL."""
    import ray
    from ray import serve

    run_dir, _ = trained_run
    ray.init(
        address=ray_head.address,
        logging_level="WARNING",
        log_to_driver=False,
        runtime_env={"py_modules": [str(REPO / "placesnet"), str(REPO / "serving")]},
    )
    port = _free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        grpc_options={"port": _free_port(), "grpc_servicer_functions": [GRPC_SERVICER]},
    )
    from serving.app import build_app

    app = build_app(
        {
            "checkpoint": str(run_dir),
            "max_body_bytes": MAX_BODY,
            "min_replicas": 1,
            "max_replicas": 1,
            "num_cpus": 0.5,
            "max_batch_size": 8,
        }
    )
    serve.run(app, name="placesnet", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    try:
        yield base, run_dir, port
    finally:
        serve.shutdown()  # the whole Serve instance: test_serve_cli starts its own
        ray.shutdown()


def _jpeg(path, **kw):
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _check(body, n_classes=4, k=4):
    preds = body["predictions"]
    assert len(preds) == k
    probs = [p["probability"] for p in preds]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    labels = {"beach", "desert/sand", "field/wild", "forest/broadleaf"}
    assert all(p["label"] in labels and 0 <= p["class_index"] < n_classes for p in preds)
    assert body["model"].startswith("deepcnn:")
    assert "knows only its 4 classes" in body["note"]  # a sample-data model says so


def test_raw_and_multipart_queries(endpoint, tiny_root):
    base, *_ = endpoint
    jpeg = _jpeg(tiny_root / "val_256/Places365_val_00000001.jpg")
    r = httpx.post(f"{base}/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    _check(r.json())
    png = _png(Image.open(tiny_root / "val_256/Places365_val_00000002.jpg").convert("RGBA"))
    r = httpx.post(f"{base}/predict?top_k=2", files={"file": ("x.png", png, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    _check(r.json(), k=2)


def test_info_routes(endpoint):
    base, run_dir, _ = endpoint
    assert httpx.get(f"{base}/healthz", timeout=30).json()["status"] == "ok"
    classes = httpx.get(f"{base}/classes", timeout=30).json()["classes"]
    assert classes == {"0": "beach", "1": "desert/sand", "2": "field/wild", "3": "forest/broadleaf"}
    model = httpx.get(f"{base}/model", timeout=30).json()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert model["checkpoint"] == summary["best_checkpoint"]
    assert model["val_top1"] == pytest.approx(summary["val_top1"])
    assert model["decode_threads"] == 1  # num_cpus=0.5: one decode thread, not one per machine CPU
    assert model["note"].startswith(
        "this model was trained on the embedded sample data and knows only its 4 classes"
    )
    body = httpx.get(f"{base}/openapi.json", timeout=30).json()["paths"]["/predict"]["post"]["requestBody"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(body["content"])  # /docs can send one
    assert body["content"]["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert httpx.get(f"{base}/docs", timeout=30).status_code == 200


def test_same_answer_as_predict_cli(endpoint, tiny_root):
    base, run_dir, _ = endpoint
    images = [tiny_root / f"val_256/Places365_val_{i:08d}.jpg" for i in range(1, 9)]
    cli = run_script("rayjobs/predict.py", "--checkpoint", run_dir, "--json", *images)
    assert cli.returncode == 0, cli.stderr
    for image, result in zip(images, json.loads(cli.stdout)["results"]):
        r = httpx.post(
            f"{base}/predict", content=image.read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        served = r.json()["predictions"][0]
        assert served["label"] == result["predictions"][0]["label"]
        assert served["probability"] == pytest.approx(result["predictions"][0]["probability"], abs=1e-4)


def _bad_requests(jpeg):
    big = os.urandom(MAX_BODY + 10)
    return [
        ("empty body", dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400),
        ("not an image", dict(content=b"hello world" * 10, headers={"Content-Type": "image/png"}), 415),
        ("truncated jpeg", dict(content=jpeg[: len(jpeg) // 2], headers={"Content-Type": "image/jpeg"}), 400),
        ("unsupported type", dict(content=b'{"a": 1}', headers={"Content-Type": "application/json"}), 415),
        ("too large", dict(content=big, headers={"Content-Type": "image/jpeg"}), 413),
        (
            "too large, chunked: no Content-Length",
            dict(content=iter([big[:200_000], big[200_000:]]), headers={"Content-Type": "image/jpeg"}),
            413,
        ),
        (
            "malformed multipart",
            dict(
                content=b"--x\r\nnot a part header\r\n--x",
                headers={"Content-Type": "multipart/form-data; boundary=x"},
            ),
            400,
        ),
        (
            "decompression bomb",
            dict(content=_png_header_only(100_000, 100_000), headers={"Content-Type": "image/png"}),
            400,
        ),
        ("multipart without file", dict(data={"other": "x"}, files={"nope": ("a.jpg", jpeg)}), 422),
        ("top_k zero", dict(content=jpeg, headers={"Content-Type": "image/jpeg"}, params={"top_k": 0}), 422),
        (
            "top_k too big",
            dict(content=jpeg, headers={"Content-Type": "image/jpeg"}, params={"top_k": 99}),
            422,
        ),
        (
            "top_k not a number",
            dict(content=jpeg, headers={"Content-Type": "image/jpeg"}, params={"top_k": "abc"}),
            422,
        ),
    ]


def test_bad_input_answers_4xx_and_the_replica_keeps_serving(endpoint, tiny_root):
    base, *_ = endpoint
    jpeg = _jpeg(tiny_root / "val_256/Places365_val_00000001.jpg")
    for name, kwargs, status in _bad_requests(jpeg):
        r = httpx.post(f"{base}/predict", timeout=60, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert isinstance(r.json().get("error"), str) and r.json()["error"], name
        ok = httpx.post(f"{base}/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert ok.status_code == 200, (name, ok.text)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_unusual_modes_are_converted(endpoint, mode):
    base, *_ = endpoint
    img = (
        Image.new("RGB", (90, 70), (40, 120, 200)).convert(mode)
        if mode != "I;16"
        else Image.new("I;16", (90, 70), 30000)
    )
    buf = io.BytesIO()
    img.save(buf, "JPEG" if mode == "CMYK" else "PNG")
    r = httpx.post(
        f"{base}/predict",
        content=buf.getvalue(),
        timeout=60,
        headers={"Content-Type": "image/jpeg" if mode == "CMYK" else "image/png"},
    )
    assert r.status_code == 200, r.text
    _check(r.json())  # a full, well-formed answer, not only a 200
    # the same pixels as the project's decoder gives for that file: the answer of predict_images
    from placesnet.checkpoint import load_checkpoint
    from placesnet.evaluation import predict_images
    from placesnet.images import decode_image

    _, run_dir, _ = endpoint
    expected = predict_images(load_checkpoint(run_dir), [decode_image(buf.getvalue())], top_k=4)[0]
    assert [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in expected]


def test_200_concurrent_requests(endpoint, tiny_root):
    base, *_ = endpoint
    payloads = [(tiny_root / f"val_256/Places365_val_{i % 48 + 1:08d}.jpg").read_bytes() for i in range(200)]

    async def go():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *[
                    client.post(f"{base}/predict", content=p, headers={"Content-Type": "image/jpeg"})
                    for p in payloads
                ]
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 200
    for r in responses:
        _check(r.json())
    # under load, requests share forward passes: batches form, up to max_batch_size (8 here)
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    assert all(r.headers["X-Batch-Queued"] == "yes" for r, n in zip(responses, sizes) if n > 1)


def test_a_lone_request_is_not_held_for_the_batch_wait(endpoint, tiny_root):
    """One request at a time (concurrency 1): each runs at once, alone, instead of waiting
    batch_wait_timeout_s in Serve's batch queue for requests that are not coming."""
    base, *_ = endpoint
    for i in range(1, 6):
        r = httpx.post(
            f"{base}/predict",
            content=(tiny_root / f"val_256/Places365_val_{i:08d}.jpg").read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert (r.headers["X-Batch-Queued"], r.headers["X-Batch-Size"]) == ("no", "1")


def test_bad_build_args_are_clear(tmp_path):
    from serving.app import build_app

    with pytest.raises(ValueError, match="not found"):
        build_app({"checkpoint": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="missing checkpoint"):
        build_app({})
    with pytest.raises(ValueError, match="unknown option"):
        build_app({"checkpoint": "x", "replicas": 3})


def test_build_args_reach_the_deployment(trained_run):
    """docs/serving.md: replicas autoscale between min_replicas and max_replicas on ongoing requests, with
    the CPUs/GPUs given, and accept enough requests for a batch to fill. (This checks that Serve
    gets the options; test_faults.py watches it scale up under load.)"""
    from serving.app import build_app

    run_dir, _ = trained_run
    app = build_app(
        {
            "checkpoint": str(run_dir),
            "min_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 4,
            "num_cpus": 0.5,
            "num_gpus": 0.25,
            "max_batch_size": 24,
            "upscale_delay_s": 5,
            "downscale_delay_s": 0,
        }
    )
    deployment = app._bound_deployment
    scaling = deployment._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 3, 4)
    assert (scaling.upscale_delay_s, scaling.downscale_delay_s) == (5, 0)
    assert deployment.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert deployment.max_ongoing_requests == 48  # two batches of 24 may be in flight


def test_client_directory_summary(endpoint, tiny_root, tmp_path):
    base, *_ = endpoint
    proc = run_script(
        "serving/client.py", tiny_root / "val_256", "--url", base, "--concurrency", 8, "--top-k", 1
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.endswith("%")]
    assert len(lines) == 48
    assert "48 images in" in proc.stdout and "p99" in proc.stdout and "0 error(s)" in proc.stdout
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "good.jpg").write_bytes((tiny_root / "val_256/Places365_val_00000001.jpg").read_bytes())
    mixed = run_script("serving/client.py", tmp_path, "--url", base, "--json")
    assert mixed.returncode == 1
    doc = json.loads(mixed.stdout)
    statuses = {Path(r["image"]).name: r["status"] for r in doc["results"]}
    assert statuses == {"bad.jpg": 415, "good.jpg": 200} and doc["summary"]["errors"] == 1
    # --per-request 5: the same 48 answers from 10 multipart requests (the last one of 3 images)
    grouped = run_script(
        "serving/client.py", tiny_root / "val_256", "--url", base, "--per-request", 5, "--top-k", 1
    )
    assert grouped.returncode == 0, grouped.stderr
    assert [line for line in grouped.stdout.splitlines() if line.endswith("%")] == lines
    assert "48 images in" in grouped.stdout and "5 per request" in grouped.stdout
    many = run_script("serving/client.py", tmp_path, "--url", base, "--json", "--per-request", 2)
    assert {Path(r["image"]).name: r["status"] for r in json.loads(many.stdout)["results"]} == statuses


def test_several_images_in_one_request(endpoint, tiny_root):
    """Repeated multipart `file` fields: one result per file, in order, each as if sent alone;
    a bad file gets its own error; too many files is a 413 with a JSON error."""
    base, *_ = endpoint
    paths = [tiny_root / f"val_256/Places365_val_{i:08d}.jpg" for i in (3, 1, 2)]
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    files.insert(1, ("file", ("broken.jpg", paths[0].read_bytes()[:200], "image/jpeg")))
    r = httpx.post(f"{base}/predict?top_k=2", files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["file"] for x in body["results"]] == [paths[0].name, "broken.jpg", paths[1].name, paths[2].name]
    assert (
        body["results"][1]["status"] == 400
        and body["results"][1]["error"]
        and "predictions" not in body["results"][1]
    )
    assert r.headers["X-Batch-Size"] == "3" and "knows only its 4 classes" in body["note"]
    for path, result in zip(paths, [body["results"][0], *body["results"][2:]]):
        alone = httpx.post(
            f"{base}/predict?top_k=2",
            content=path.read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=60,
        ).json()["predictions"]
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in alone]
        assert [p["probability"] for p in result["predictions"]] == pytest.approx(
            [p["probability"] for p in alone], abs=1e-5
        )
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buf, "JPEG")
    small = buf.getvalue()  # 65 of them stay under max_body_bytes: the count is what is refused
    too_many = httpx.post(
        f"{base}/predict", files=[("file", (f"{i}.jpg", small, "image/jpeg")) for i in range(65)], timeout=60
    )
    assert too_many.status_code == 413 and "images in one request" in too_many.json()["error"]
    assert "max_images_per_request" in too_many.json()["error"] and "64" in too_many.json()["error"]
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # still serving


def test_workshop_notebook_runs_end_to_end(endpoint, ray_head, tmp_path, monkeypatch):
    """notebooks/workshop.ipynb, executed by a real Jupyter kernel on tiny settings: every cell
    runs without error, trains through Ray Train on the session's cluster, shows its pictures
    and queries this module's endpoint."""
    import nbformat
    from nbclient import NotebookClient

    base, _, _ = endpoint
    for key, value in {
        "WORKSHOP_SMOKE": "1",
        "WORKSHOP_STORAGE": str(tmp_path),
        "PLACESNET_ENDPOINT": base,
        "RAY_ADDRESS": ray_head.address,
        "RAY_USAGE_STATS_ENABLED": "0",
    }.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    nb = nbformat.read(REPO / "notebooks" / "workshop.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()  # raises on a cell error

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    pictures = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pictures >= 6, pictures  # samples grid, curves, 3 evaluation plots, predictions
    assert "total: " in text and "GFLOPs per image" in text  # the model summary
    (run,) = [d for d in tmp_path.iterdir() if d.name.startswith("workshop-")]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and f"best checkpoint: {summary['best_checkpoint']}" in text
    assert (run / "evaluation" / "misclassified.png").is_file()
    assert "note: this model was trained on the embedded sample data" in text
    assert "served model: deepcnn:" in text  # the endpoint answered the notebook


def test_bearer_token_lets_in_only_who_should(endpoint, tiny_root, tmp_path):
    """api_key_file: every route but /healthz needs the bearer token; a request without it is a
    401 before its body is looked at (a garbage body is not a 415)."""
    from ray import serve

    from serving.app import build_app

    _, run_dir, port = endpoint
    key = tmp_path / "key"
    key.write_text("s3cret-token\n")
    serve.run(
        build_app(
            {
                "checkpoint": str(run_dir),
                "api_key_file": str(key),
                "min_replicas": 1,
                "max_replicas": 1,
                "num_cpus": 0.25,
            }
        ),
        name="secure",
        route_prefix="/secure",
    )
    try:
        url = f"http://127.0.0.1:{port}/secure"
        jpeg = (tiny_root / "val_256/Places365_val_00000001.jpg").read_bytes()
        assert httpx.get(f"{url}/healthz", timeout=30).status_code == 200  # probes stay open
        for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            for route in ("predict", "explain"):
                r = httpx.post(
                    f"{url}/{route}",
                    content=b"not an image",
                    timeout=30,
                    headers={"Content-Type": "image/jpeg", **auth},
                )
                assert r.status_code == 401 and "bearer token" in r.json()["error"], (route, auth, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/model", timeout=30).status_code == 401
        ok = httpx.post(
            f"{url}/predict",
            content=jpeg,
            timeout=60,
            headers={"Content-Type": "image/jpeg", "Authorization": "Bearer s3cret-token"},
        )
        assert ok.status_code == 200 and ok.json()["predictions"]
        explained = httpx.post(
            f"{url}/explain",
            content=jpeg,
            timeout=60,
            headers={"Content-Type": "image/jpeg", "Authorization": "Bearer s3cret-token"},
        )
        assert explained.status_code == 200 and explained.headers["content-type"] == "image/png"
        # gRPC: the same key in the `authorization` metadata
        import grpc

        from serving.grpc_client import predict
        from serving.scene_pb2_grpc import SceneClassifierStub

        with grpc.insecure_channel(_grpc_target()) as channel:
            stub = SceneClassifierStub(channel)
            for key_sent in (None, "wrong"):
                with pytest.raises(grpc.RpcError) as refused:
                    predict(stub, [b"not an image"], api_key=key_sent, application="secure")
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in refused.value.details()
            reply = predict(stub, [jpeg], api_key="s3cret-token", application="secure")
            assert reply.results[0].predictions
    finally:
        serve.delete("secure")
    with pytest.raises(ValueError, match="api_key_file must be an absolute path"):
        build_app({"checkpoint": str(run_dir), "api_key_file": "key.txt"})


def test_grpc_predict_answers_like_http(endpoint, tiny_root):
    """serving/scene.proto through Serve's gRPC proxy: one result per image in order, the same
    classes and probabilities as POST /predict, a bad image gets its own error, and a client's
    mistake is a gRPC status with the HTTP error's message (the replica keeps serving)."""
    import grpc

    from serving.grpc_client import predict
    from serving.scene_pb2_grpc import SceneClassifierStub

    base, *_ = endpoint
    paths = [tiny_root / f"val_256/Places365_val_{i:08d}.jpg" for i in (2, 5)]
    images = [paths[0].read_bytes(), b"not an image", paths[1].read_bytes()]
    with grpc.insecure_channel(_grpc_target()) as channel:
        stub = SceneClassifierStub(channel)
        reply = predict(stub, images, top_k=2)
        assert len(reply.results) == 3 and reply.model.startswith("deepcnn:")
        assert "knows only its 4 classes" in reply.note
        assert "not a recognised image" in reply.results[1].error and not reply.results[1].predictions
        for path, result in zip(paths, [reply.results[0], reply.results[2]]):
            http = httpx.post(
                f"{base}/predict?top_k=2",
                content=path.read_bytes(),
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            ).json()["predictions"]
            assert [p.label for p in result.predictions] == [p["label"] for p in http]
            assert [p.class_index for p in result.predictions] == [p["class_index"] for p in http]
            assert [p.probability for p in result.predictions] == pytest.approx(
                [p["probability"] for p in http], abs=1e-5
            )
        alone = predict(stub, [paths[0].read_bytes()])  # one image: the batch queue, default top_k
        assert len(alone.results[0].predictions) == 4
        refusals = [
            ([], 0, grpc.StatusCode.INVALID_ARGUMENT, "no images in the request"),
            (images[:1], 9, grpc.StatusCode.INVALID_ARGUMENT, "top_k must be between 1 and 4, got 9"),
            (images[:1] * 65, 0, grpc.StatusCode.RESOURCE_EXHAUSTED, "65 images in one request"),
            ([b"x" * (MAX_BODY + 1)], 0, grpc.StatusCode.RESOURCE_EXHAUSTED, "over the limit of 300000"),
        ]
        for batch, k, code, message in refusals:
            with pytest.raises(grpc.RpcError) as refused:
                predict(stub, batch, top_k=k)
            assert refused.value.code() == code and message in refused.value.details(), refused.value
        assert len(predict(stub, images[:1]).results) == 1  # still serving
    # the command-line client: exit 1 because one file is not an image, answers for the others
    (tiny_root.parent / "grpc_in").mkdir(exist_ok=True)
    bad = tiny_root.parent / "grpc_in" / "broken.jpg"
    bad.write_bytes(b"not an image")
    proc = run_script("serving/grpc_client.py", paths[0], bad, "--target", _grpc_target(), "--top-k", 1)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        proc.stdout.count(": ") >= 2
        and f"{paths[0]}: " in proc.stdout
        and "broken.jpg: error:" in proc.stderr
    )


def _overlay_pixels(png: bytes):
    import numpy as np

    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG" and img.size == (32, 32)  # the view: the model's input
        return np.asarray(img, dtype=np.int16)


def test_explain_through_serve(endpoint, tiny_root):
    """POST /explain through Serve's proxy: one image's overlay PNG of the view's size with
    /predict's predictions in X-Predictions and its top-1 class (or ?class=) in
    X-Explained-Class; format=json; several images as JSON in order; 48 requests at once go
    through the batch queue and share passes, each answered as if alone."""
    base, *_ = endpoint
    paths = [tiny_root / f"val_256/Places365_val_{i:08d}.jpg" for i in range(1, 13)]
    raw = {"Content-Type": "image/jpeg"}
    predicted = httpx.post(
        f"{base}/predict?top_k=4", content=paths[0].read_bytes(), headers=raw, timeout=60
    ).json()["predictions"]
    r = httpx.post(f"{base}/explain?top_k=4", content=paths[0].read_bytes(), headers=raw, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    _overlay_pixels(r.content)
    assert json.loads(r.headers["X-Predictions"]) == predicted  # the same forward pass
    explained = json.loads(r.headers["X-Explained-Class"])
    assert explained["class_index"] == predicted[0]["class_index"]
    assert explained["probability"] == pytest.approx(predicted[0]["probability"], abs=1e-6)
    last = predicted[-1]
    other = httpx.post(
        f"{base}/explain",
        params={"class": last["label"], "format": "json"},
        content=paths[0].read_bytes(),
        headers=raw,
        timeout=60,
    ).json()
    assert (other["class"], other["class_index"]) == (last["label"], last["class_index"])
    assert other["probability"] == pytest.approx(last["probability"], abs=1e-6)
    assert (
        abs(_overlay_pixels(base64.b64decode(other["overlay_png_base64"])) - _overlay_pixels(r.content)).max()
        > 0
    )
    files = [("file", (p.name, p.read_bytes(), "image/jpeg")) for p in paths[:3]]
    files.insert(1, ("file", ("broken.jpg", b"not an image", "image/jpeg")))
    several = httpx.post(f"{base}/explain", files=files, timeout=60)
    assert several.status_code == 200, several.text
    results = several.json()["results"]
    assert [x["file"] for x in results] == [paths[0].name, "broken.jpg", paths[1].name, paths[2].name]
    assert results[1]["status"] == 415 and "overlay_png_base64" not in results[1]
    assert results[0]["class_index"] == predicted[0]["class_index"]

    alone = {}
    for path in paths:
        for cls in (None, "beach"):
            one = httpx.post(
                f"{base}/explain",
                params={"class": cls} if cls else {},
                content=path.read_bytes(),
                headers=raw,
                timeout=60,
            )
            assert one.status_code == 200, (one.status_code, one.text[:300])
            alone[path, cls] = (one.headers["X-Explained-Class"], _overlay_pixels(one.content))

    async def go():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=48)) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        f"{base}/explain",
                        params={"class": cls} if cls else {},
                        content=path.read_bytes(),
                        headers=raw,
                    )
                    for path in paths
                    for cls in (None, "beach")
                    for _ in range(2)
                ]
            )

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * 48
    asked = [(path, cls) for path in paths for cls in (None, "beach") for _ in range(2)]
    for key, r in zip(asked, responses):
        assert (
            json.loads(r.headers["X-Explained-Class"])["class_index"]
            == json.loads(alone[key][0])["class_index"]
        )
        assert abs(_overlay_pixels(r.content) - alone[key][1]).max() <= 2, key
    sizes = [int(r.headers["X-Batch-Size"]) for r in responses]
    assert max(sizes) > 1 and max(sizes) <= 8, sizes  # passes shared, up to max_batch_size
    assert all(r.headers["X-Batch-Queued"] == "yes" for r, n in zip(responses, sizes) if n > 1)


def test_explain_refuses_what_predict_refuses(endpoint, tiny_root):
    """Every bad request /predict answers with a 4xx gets the same status and error from
    /explain (Serve's proxy in between), a class the model lacks a 400, too many files a 413;
    the replica keeps serving."""
    base, *_ = endpoint
    jpeg = _jpeg(tiny_root / "val_256/Places365_val_00000001.jpg")
    for (name, kwargs, status), (_, again, _) in zip(_bad_requests(jpeg), _bad_requests(jpeg)):
        predicted = httpx.post(f"{base}/predict", timeout=60, **kwargs)
        explained = httpx.post(f"{base}/explain", timeout=60, **again)  # a chunked body is sent once
        assert predicted.status_code == explained.status_code == status, (name, explained.text)
        assert explained.json() == predicted.json(), name
        assert isinstance(explained.json().get("error"), str) and explained.json()["error"], name
    r = httpx.post(
        f"{base}/explain?class=lighthouse", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert r.status_code == 400 and r.json()["error"].startswith("unknown class 'lighthouse'")
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), "green").save(buf, "JPEG")
    too_many = httpx.post(
        f"{base}/explain",
        files=[("file", (f"{i}.jpg", buf.getvalue(), "image/jpeg")) for i in range(65)],
        timeout=60,
    )
    assert too_many.status_code == 413 and "max_images_per_request" in too_many.json()["error"]
    ok = httpx.post(f"{base}/explain", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
