"""ServeOptions: the endpoint's options, typed and checked once, in ``build_app``, before Ray does
anything. Serve hands ``build_app`` strings (``serve run ... max_batch_size=32``) or YAML values
(``serve deploy``); every bad one is refused with a line that names it. Each option's default and
meaning live on its field; the request limits they set are checked here too."""

from __future__ import annotations

import math
import os
import re
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from placesnet.images import MAX_PIXELS
from placesnet.serve.errors import ClientError

SECRETS = ("api_key_env", "api_key_file")  # where the key is; never the key itself
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_REQUIREMENTS = {
    (bool, False): "0 or 1 (or true/false)",
    (int, False): "a positive integer",
    (int, True): "an integer >= 0",
    (float, False): "a positive number",
    (float, True): "a number >= 0",
}
_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS |= {"0": False, "false": False, "no": False, "off": False}


def _option(default: Any, doc: str, *, zero_ok: bool = False) -> Any:
    """A field: its default (whose type is the option's type), what it does, and whether 0 is a
    valid value (numbers are otherwise positive)."""
    return field(default=default, metadata={"doc": doc, "zero_ok": zero_ok})


@dataclass(frozen=True)
class ServeOptions:
    """``build_app``'s options, all but ``checkpoint``. Constructing one converts and checks every
    value (``ServeOptions(max_batch_size="32")`` holds the int 32); a bad one is a ValueError
    naming it, all of them in one message."""

    # autoscaling (Serve's autoscaling_config)
    min_replicas: int = _option(
        2,
        "replicas kept running; left out, 2 lowered to what the cluster has room for (see "
        "replicas_with_room): a crashed replica then costs ~0.1 s instead of seconds of outage",
        zero_ok=True,
    )
    max_replicas: int = _option(2, "the most replicas autoscaling starts")
    target_ongoing_requests: int = _option(8, "ongoing requests per replica that autoscaling aims at")
    upscale_delay_s: float = _option(30.0, "load above the target this long adds a replica", zero_ok=True)
    downscale_delay_s: float = _option(600.0, "load below the target this long removes one", zero_ok=True)
    # each replica's resources (fractions allowed)
    num_cpus: float = _option(1.0, "CPUs per replica; its image decode threads are this, rounded up")
    num_gpus: float = _option(0.0, "GPUs per replica, e.g. 0.25 packs four replicas on one GPU", zero_ok=True)
    # batching and decoding
    max_batch_size: int = _option(16, "the most images in one forward pass")
    batch_wait_timeout_s: float = _option(0.01, "how long a batch waits for more requests", zero_ok=True)
    adaptive_batching: bool = _option(True, "a request with no other in flight on its replica skips the wait")
    gpu_decode: bool = _option(True, "a replica with a GPU decodes JPEGs with nvJPEG (off: CPU threads)")
    # requests
    max_images_per_request: int = _option(64, "multipart `file` fields (gRPC images) in one request")
    top_k: int = _option(5, "classes in an answer when the request does not say (at most the model's)")
    max_body_bytes: int = _option(20 * 1024 * 1024, "the largest request body (a gRPC call's images in all)")
    max_pixels: int = _option(MAX_PIXELS, "the largest image, refused before a pixel is decoded")
    # the bearer token: where the replicas find it (see auth.read_api_key)
    api_key_env: str = _option("", "NAME: the key is in $NAME, or in the file named by $NAME_FILE")
    api_key_file: str = _option("", "an absolute path to a file holding the key")

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, _convert(f, getattr(self, f.name)))
            except ValueError as e:
                problems.append(str(e))
        if not problems and self.min_replicas > self.max_replicas:
            problems.append(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if problems:
            raise ValueError("; ".join(problems))

    def check_request_size(self, images: int, size: int) -> None:
        """ClientError 413 for a request of more than ``max_images_per_request`` images or
        ``size`` bytes over ``max_body_bytes``."""
        if images > self.max_images_per_request:
            raise ClientError(
                413,
                f"{images} images in one request, over the limit of {self.max_images_per_request} "
                "(max_images_per_request)",
                reason="too_many_images",
            )
        if size > self.max_body_bytes:
            raise ClientError(
                413,
                f"request body is {size} bytes, over the limit of {self.max_body_bytes}",
                reason="body_too_large",
            )


DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ServeOptions)}


def _convert(f: Field, raw: Any) -> Any:
    """``raw`` (a string from ``serve run``, a YAML or Python value) as the field's type, or a
    ValueError that names the field and says what it takes."""
    kind, zero_ok = type(f.default), f.metadata["zero_ok"]
    if kind is str:
        return _secret(f.name, raw)
    refused = ValueError(f"{f.name} must be {_REQUIREMENTS[kind, zero_ok]}, got {raw!r}")
    if kind is bool:
        value = raw if isinstance(raw, bool) else _BOOLS.get(str(raw).strip().lower())
        if value is None:
            raise refused
        return value
    if isinstance(raw, bool):  # YAML `true` is no count of replicas
        raise refused
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise refused from None
    if not math.isfinite(number) or number < 0 or (number == 0 and not zero_ok):
        raise refused
    if kind is float:
        return number
    if not number.is_integer():  # 1.5 replicas: refused, not rounded down
        raise refused
    return int(number)


def _secret(name: str, raw: Any) -> str:
    """api_key_env: the NAME of an environment variable; api_key_file: an absolute path (``~``
    expanded). Never the key itself: these values end up in Serve's config and logs."""
    value = "" if raw is None else str(raw)
    if name == "api_key_env" and value and not _ENV_NAME.fullmatch(value):
        raise ValueError(f"api_key_env must name an environment variable, got {value!r}")
    if name == "api_key_file" and value:
        value = os.path.expanduser(value)
        if not os.path.isabs(value):
            raise ValueError(f"api_key_file must be an absolute path, got {raw!r}")
    return value


def parse_args(args: dict[str, Any]) -> tuple[str, ServeOptions]:
    """Serve's app arguments -> (``checkpoint`` as given, ServeOptions). ValueError for an unknown
    option, a missing checkpoint or bad values. Without ``min_replicas`` its default is kept
    within ``max_replicas`` (build_app lowers it further to what the cluster has room for)."""
    unknown = set(args) - set(DEFAULTS) - {"checkpoint"}
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; known: checkpoint, {', '.join(DEFAULTS)}")
    if not args.get("checkpoint"):
        raise ValueError("missing checkpoint=PATH (a checkpoint dir, a run dir or a best.json)")
    given = {k: v for k, v in args.items() if k != "checkpoint"}
    options = ServeOptions(**{**given, "min_replicas": given.get("min_replicas", 1)})
    if "min_replicas" not in given:  # 2, within max_replicas; build_app lowers it to what fits
        options = replace(options, min_replicas=min(DEFAULTS["min_replicas"], options.max_replicas))
    return str(args["checkpoint"]), options


def replicas_with_room(options: ServeOptions, resources: dict[str, float] | None = None) -> int:
    """``options.min_replicas`` lowered to what fits: the connected cluster's CPUs and GPUs, or,
    before Ray is connected (``serve run`` builds the app first), this machine's CPUs. At least 1."""
    if resources is None:
        import ray

        resources = (
            ray.cluster_resources()
            if ray.is_initialized()
            else {"CPU": float(os.cpu_count() or 1), "GPU": float(options.num_gpus and 1e9)}
        )
    fits = resources.get("CPU", 0) // options.num_cpus
    if options.num_gpus:
        fits = min(fits, resources.get("GPU", 0) // options.num_gpus)
    return int(max(1, min(options.min_replicas, options.max_replicas, fits)))
