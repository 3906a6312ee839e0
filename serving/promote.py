"""Promote a checkpoint into the running endpoint, in place: the replicas swap models between
requests, without a restart and without a failed request.

    python serving/promote.py latest                        # the newest finished run or sweep
    python serving/promote.py ~/ray_results/deepcnn-sample-20261206-120000      # its best checkpoint
    python serving/promote.py SWEEP_DIR/best.json --address http://head:8265 --url http://head:8000
    make promote CHECKPOINT=latest

The endpoint must have been started with ``serve deploy serving/config.yaml`` (an app named
placesnet); ``serve run`` apps cannot be updated in place. The checkpoint is resolved here, once
(``latest`` means the newest now), and verified (sizes and sha256, weights_only loading, weights
that fit its architecture) before anything is sent: a broken one is refused and the endpoint
keeps its model. The replicas verify and probe it again before they swap; every answer names its
checkpoint (``checkpoint`` and the X-Checkpoint header). It then waits until every replica
answers from it, and says how long that took. With token auth on, run it with RAY_AUTH_MODE=token
like the serve CLIs (docs/clusters.md). The path must be the same where the replicas run (shared
storage on a cluster).
"""

from __future__ import annotations

import argparse

from placesnet.cli import positive_float, run_cli
from placesnet.serve.rollout import APP, dashboard_address


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint",
        help="a checkpoint dir, a training run dir (its best checkpoint), a summary.json or a "
        "sweep's best.json, or latest[:STORAGE_PATH]",
    )
    p.add_argument(
        "--address",
        help="the Ray dashboard (default: $RAY_DASHBOARD_ADDRESS, else http://127.0.0.1:8265)",
    )
    p.add_argument("--app", default=APP, help="the Serve app to update (default: %(default)s)")
    p.add_argument(
        "--url",
        help="the endpoint, to check that every replica answers from the new checkpoint (default: "
        "the Serve HTTP port on the dashboard's host, at the app's route prefix)",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=120.0,
        help="seconds to wait for every replica to swap (default: %(default)s)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.serve.rollout import promote

    done = promote(
        args.checkpoint,
        address=dashboard_address(args.address),
        app=args.app,
        url=args.url,
        timeout=args.timeout,
    )
    print(
        f"promote: every replica ({done.replicas}) of {args.app} answers from {done.checkpoint}, "
        f"{done.seconds:.1f} s after the request"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
