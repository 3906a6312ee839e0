"""EndpointMetrics: the endpoint's own Prometheus metrics, beside Serve's built-in ones (requests,
latency, replicas): images classified and their top-1 class, refusals by status and reason, images
per forward pass, decode and model seconds, checkpoint loads. Ray exports them from each node's
metrics export port, named ``ray_<name>`` (counters with ``_total``), tagged with the replica's
``application``, ``deployment`` and ``replica`` besides their own tags (docs/serving.md#metrics)."""

from __future__ import annotations

from ray.serve import metrics as serve_metrics

# Buckets. Ray rebuilds a histogram on the node from its bucket counts, each observation at its
# bucket's midpoint: _count and _bucket are exact, _sum is not (mean images per pass is exact
# from placesnet_images_classified_total / placesnet_images_per_forward_pass_count instead).
IMAGES_PER_PASS = [1, 2, 4, 8, 16, 32, 64, 128]
MODEL_SECONDS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
DECODE_SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
CHECKPOINT_OUTCOMES = ("loaded", "rejected")


class EndpointMetrics:
    """One replica's metrics: create one per replica (per process), and call a method for each
    thing that happened. Inside a Serve replica, Ray adds the ``application``, ``deployment`` and
    ``replica`` tags and exports every value (after up to ``metrics_report_interval_ms``, 10 s by
    default). Outside one (a Replica built directly, in tests) the same calls check their tags and
    record into this process's own registry, which nothing exports unless the process is a
    connected Ray driver, and then without those three tags."""

    def __init__(self) -> None:
        counter, histogram = serve_metrics.Counter, serve_metrics.Histogram
        self._classified = counter("placesnet_images_classified", description="Images answered with classes.")
        self._top1 = counter(
            "placesnet_top1_class",
            description="Images answered, by their top-1 class (the answer's first label).",
            tag_keys=("label",),
        )
        self._refused = counter(
            "placesnet_client_errors",
            description="Refused requests, and refused images of multi-image requests, by HTTP "
            "status and reason (placesnet.serve.errors.REASONS).",
            tag_keys=("status", "reason"),
        )
        self._per_pass = histogram(
            "placesnet_images_per_forward_pass",
            description="Images in each forward pass that answered requests.",
            boundaries=IMAGES_PER_PASS,
        )
        self._model_seconds = histogram(
            "placesnet_model_seconds",
            description="Seconds of each forward pass that answered requests.",
            boundaries=MODEL_SECONDS,
        )
        self._decode_seconds = histogram(
            "placesnet_decode_seconds",
            description="Seconds to turn one image's bytes into the model's input.",
            boundaries=DECODE_SECONDS,
        )
        self._checkpoints = counter(
            "placesnet_checkpoint_loads",
            description="Checkpoints this replica loaded and serves, or refused to serve.",
            tag_keys=("outcome",),
        )

    def classified(self, label: str) -> None:
        """One image answered with classes; ``label`` is its top-1 class as the answer names it."""
        self._classified.inc()
        self._top1.inc(tags={"label": label})

    def refused(self, status: int, reason: str) -> None:
        """One refused request, or one refused image of a multi-image request (its request is
        answered): a ClientError's ``status`` and ``reason``."""
        self._refused.inc(tags={"status": str(status), "reason": reason})

    def forward_pass(self, images: int, seconds: float) -> None:
        """One forward pass that answered requests (not a health check or a load's probe): its
        ``images`` and its wall-clock ``seconds``."""
        self._per_pass.observe(images)
        self._model_seconds.observe(seconds)

    def decoded(self, seconds: float) -> None:
        """One image decoded into the model's input, in ``seconds`` (an nvJPEG batch: its seconds
        divided by its images, once per image)."""
        self._decode_seconds.observe(seconds)

    def checkpoint(self, outcome: str) -> None:
        """One checkpoint ``loaded`` (it now answers; the first one included) or ``rejected`` (it
        cannot be served)."""
        if outcome not in CHECKPOINT_OUTCOMES:
            raise ValueError(f"checkpoint outcome must be one of {CHECKPOINT_OUTCOMES}, got {outcome!r}")
        self._checkpoints.inc(tags={"outcome": outcome})
