"""The endpoint's own Prometheus metrics, read where a user scrapes them: the metrics export port
of a real Ray head, after known requests. Every count is exact: images classified and their
top-1 classes as the answers said, refusals by status and reason, one forward pass per pass the
answers' X-Batch-Size headers imply, one decode per image, one checkpoint loaded per replica."""

import io
import math
import re
import time
import urllib.request
from collections import Counter

import httpx
import numpy as np
import pytest
from conftest import REPO, _free_port, start_head, untrained_checkpoint
from PIL import Image

pytestmark = pytest.mark.slow

KEY = "metrics-test-key"
MAX_BODY = 300_000
MAX_IMAGES = 4
MAX_BATCH = 8
# Ray's replicas export every metrics_report_interval_ms (10 s by default); it is a system
# config, read by each worker from the environment of `ray start`, not of the driver.
REPORT_INTERVAL_MS = 1000
HEALTH_CHECK_PERIOD_S = 10  # the deployment's: a health check must not count as a forward pass


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_config):
    """A head of its own with a metrics export port, and the app on it (1 replica, a key):
    (base URL, metrics URL, when the replica was ready)."""
    import ray
    from ray import serve

    head = start_head(
        tmp_path_factory,
        num_cpus=2,
        metrics_export_port=_free_port(),
        env={"RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_MS)},
    )
    tmp = tmp_path_factory.mktemp("metrics")
    (tmp / "key").write_text(KEY)
    try:
        ray.init(
            address=head.address,
            logging_level="WARNING",
            log_to_driver=False,
            runtime_env={"py_modules": [str(REPO / "placesnet"), str(REPO / "serving")]},
        )
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from serving.app import build_app

        app = build_app(
            {
                "checkpoint": str(untrained_checkpoint(tmp / "ckpt", tiny_config)),
                "min_replicas": 1,
                "max_replicas": 1,
                "num_cpus": 0.5,
                "max_batch_size": MAX_BATCH,
                "max_images_per_request": MAX_IMAGES,
                "max_body_bytes": MAX_BODY,
                "api_key_file": str(tmp / "key"),
            }
        )
        serve.run(app, name="placesnet", route_prefix="/")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{head.metrics_export_port}/metrics", time.time()
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
        head.stop()


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``name`` (as exported) that the placesnet app's replicas sent: (labels, value)."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and match[1] == name:
            labels = dict(_LABEL.findall(match[2] or ""))
            if labels.get("application") == "placesnet":
                out.append((labels, float(match[3])))
    return out


def _total(text: str, name: str, **labels: str) -> float:
    return sum(v for ls, v in _samples(text, name) if all(ls.get(k) == want for k, want in labels.items()))


def _by(text: str, name: str, *keys: str) -> dict:
    counts = Counter()
    for labels, value in _samples(text, name):
        counts[tuple(labels[k] for k in keys) if len(keys) > 1 else labels[keys[0]]] += value
    return {k: v for k, v in counts.items() if v}


def _observed(text: str) -> dict:
    """What the metrics endpoint says of this app, in the shape of the test's expectations."""
    per_pass = "ray_placesnet_images_per_forward_pass"
    return {
        "classified": _total(text, "ray_placesnet_images_classified_total"),
        "top1": _by(text, "ray_placesnet_top1_class_total", "label"),
        "refused": _by(text, "ray_placesnet_client_errors_total", "status", "reason"),
        "passes": _total(text, f"{per_pass}_count"),
        "passes_of_at_most": {le: _total(text, f"{per_pass}_bucket", le=f"{le:.1f}") for le in (1, 2, 4, 8)},
        "model_seconds": _total(text, "ray_placesnet_model_seconds_count"),
        "decodes": _total(text, "ray_placesnet_decode_seconds_count"),
        "checkpoints": _by(text, "ray_placesnet_checkpoint_loads_total", "outcome"),
    }


def _scrape(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_the_metrics_endpoint_counts_exactly_what_was_sent(served):
    base, metrics_url, ready = served
    auth = {"Authorization": f"Bearer {KEY}"}
    raw = {**auth, "Content-Type": "image/jpeg"}
    post = lambda **kw: httpx.post(f"{base}/predict", timeout=60, **kw)  # noqa: E731

    # One request at a time: each single image then runs alone, in a forward pass of its own.
    labels, passes = [], []
    for seed in range(3):
        r = post(content=_jpeg(seed), headers=raw)
        assert r.status_code == 200 and r.headers["x-batch-queued"] == "no", r.text
        labels.append(r.json()["predictions"][0]["label"])
        passes.append(int(r.headers["x-batch-size"]))
    good = [_jpeg(10), _jpeg(11)]
    files = [good[0], _jpeg(12)[:300], good[1], b""]  # 2 good, 1 truncated, 1 empty
    r = post(
        files=[("file", (f"f{i}.jpg", data, "image/jpeg")) for i, data in enumerate(files)], headers=auth
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x.get("status") for x in results] == [None, 400, None, 400], results
    labels += [x["predictions"][0]["label"] for x in results if "predictions" in x]
    chunks = math.ceil(len(good) / MAX_BATCH)  # a request's images run MAX_BATCH per pass
    passes += [min(MAX_BATCH, len(good) - i * MAX_BATCH) for i in range(chunks)]
    assert int(r.headers["x-batch-size"]) == passes[-chunks]

    refusals = [
        (dict(content=b"not an image at all", headers=raw), 415),
        (dict(content=_jpeg(0), headers={**raw, "Authorization": "Bearer wrong"}), 401),
        (dict(content=_jpeg(0), headers=raw, params={"top_k": 99}), 422),
        (dict(content=b"", headers=raw), 400),
        (
            dict(
                files=[("file", (f"f{i}", _jpeg(0), "image/jpeg")) for i in range(MAX_IMAGES + 1)],
                headers=auth,
            ),
            413,
        ),
        (dict(content=b"hello", headers={**auth, "Content-Type": "text/plain"}), 415),
        (dict(content=b"\xff" * (MAX_BODY + 1), headers=raw), 413),
    ]
    for kwargs, status in refusals:
        r = post(**kwargs)
        assert r.status_code == status, (status, r.status_code, r.text)

    expected = {
        "classified": 5,
        "top1": dict(Counter(labels)),
        "refused": {
            ("400", "bad_image"): 1,  # the truncated file of the multi-image request
            ("400", "empty_field"): 1,  # its empty file
            ("415", "not_an_image"): 1,
            ("401", "unauthorized"): 1,
            ("422", "bad_top_k"): 1,
            ("400", "empty_body"): 1,
            ("413", "too_many_images"): 1,
            ("415", "unsupported_content_type"): 1,
            ("413", "body_too_large"): 1,
        },
        "passes": len(passes),
        "passes_of_at_most": {le: sum(p <= le for p in passes) for le in (1, 2, 4, 8)},
        "model_seconds": len(passes),
        "decodes": 5,
        "checkpoints": {"loaded": 1},
    }
    assert sum(expected["top1"].values()) == 5 and passes == [1, 1, 1, 2]

    # Exported every REPORT_INTERVAL_MS; read until it all arrived, then once more after a health
    # check has surely run and been reported, so that a count that keeps growing is caught too.
    deadline = time.time() + 60
    while (observed := _observed(_scrape(metrics_url))) != expected and time.time() < deadline:
        time.sleep(0.5)
    assert observed == expected
    time.sleep(max(0.0, ready + HEALTH_CHECK_PERIOD_S + 3 * REPORT_INTERVAL_MS / 1000 - time.time()))
    text = _scrape(metrics_url)
    assert _observed(text) == expected

    # Ray tags each series with the replica that sent it, beside Serve's built-in metrics.
    (classified_labels, _), *more = _samples(text, "ray_placesnet_images_classified_total")
    assert not more and classified_labels["deployment"] == "SceneClassifier" and classified_labels["replica"]
    assert _total(text, "ray_serve_num_http_requests_total") >= 4 + len(refusals)
