"""Ray Serve endpoint for a DeepCNN checkpoint: autoscaling replicas, dynamic batching, FastAPI
and gRPC (the library is placesnet/serve/; this file is the app builder Serve calls).

    serve run serving.app:build_app checkpoint=~/ray_results/deepcnn-sample-20261127-120000
    serve run serving.app:build_app checkpoint=SWEEP_DIR/best.json max_replicas=4 num_gpus=0.5
    serve deploy serving/config.yaml            # the same options in a config file

    curl -X POST --data-binary @photo.jpg -H 'Content-Type: image/jpeg' localhost:8000/predict
    curl -F file=@photo.png 'localhost:8000/predict?top_k=3'
    open http://localhost:8000/docs             # the OpenAPI page

``checkpoint`` is a checkpoint directory, a training run directory (its best checkpoint) or a
JSON file naming ``best_checkpoint`` (a run's summary.json, a sweep's best.json). The model, class
names and image size come from the checkpoint alone; preprocessing is the training's eval
transform, so answers match ``rayjobs/predict.py``. The options: placesnet/serve/options.py.
"""

import os
from dataclasses import replace

from ray.serve import Application

from placesnet.serve.auth import Secret
from placesnet.serve.http_api import SceneClassifier
from placesnet.serve.options import parse_args, replicas_with_room
from placesnet.serve.rollout import Refused, checkpoint_to_serve, refuse_serve_run_over_a_live_endpoint


def build_app(args: dict) -> Application:
    """Serve's app builder: ``serve run serving.app:build_app checkpoint=PATH [key=value ...]``.

    Keys: checkpoint (required) and the fields of placesnet.serve.options.ServeOptions:
    autoscaling (min_replicas, default 2 where the cluster has room; max_replicas,
    target_ongoing_requests, upscale_delay_s, downscale_delay_s), num_cpus, num_gpus (fractions
    allowed), max_batch_size, batch_wait_timeout_s, adaptive_batching, max_images_per_request,
    top_k, max_body_bytes, max_pixels, gpu_decode; and for a bearer token api_key_env=NAME (the
    key is $NAME where the app is built, e.g. the shell of `serve run`, else the replicas read
    $NAME or the file in $NAME_FILE) or api_key_file=/abs/path (never the key itself).

    The checkpoint is resolved (``latest`` included) and verified here, once, and reaches the
    replicas as the deployment's user_config ``{"checkpoint": DIR or URI}`` (a checkpoint on
    object storage: each replica fetches it onto its own node), which serving/promote.py
    changes to swap another in place. Raises Refused (a ValueError) with one line for bad
    options, a missing or corrupt checkpoint, or a `serve run` over a live endpoint, before Ray
    does anything.
    """
    from placesnet.config import UserError

    try:
        checkpoint, options = parse_args(args)
        path = checkpoint_to_serve(checkpoint)  # fail here, clearly, not in every replica
    except (ValueError, UserError) as e:
        raise Refused(str(e)) from None
    refuse_serve_run_over_a_live_endpoint()
    if "min_replicas" not in args:
        options = replace(options, min_replicas=replicas_with_room(options))
    key = os.environ.get(options.api_key_env, "").strip() if options.api_key_env else ""
    deployment = SceneClassifier.options(
        autoscaling_config={
            "min_replicas": options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": options.upscale_delay_s,
            "downscale_delay_s": options.downscale_delay_s,
        },
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        # batches can only fill if a replica accepts at least a batch's worth of requests
        max_ongoing_requests=max(32, 2 * options.max_batch_size),
        user_config={"checkpoint": str(path)},
    )
    return deployment.bind(options, Secret(key) if key else None)
