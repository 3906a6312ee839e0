r"""Predict a photo collection with Ray Data: decoding in CPU tasks on any node of the cluster, the
model in a pool of actors (one per GPU, or --num-workers on CPUs), one output file per 1,024
inputs, streaming (memory stays flat however many photos), resumable (the same command after a
crash predicts only what is missing).

    # every image under a directory (recursive), Parquet out:
    python rayjobs/batch_predict.py --checkpoint latest --input ~/photos --out ~/photos-scenes
    # Places365's test list, its challenge file too (places365_submission.txt):
    python rayjobs/batch_predict.py --checkpoint RUN_DIR --input /data/places365/test.txt \
        --root /data/places365/test_256 --format places365 --out /shared/p365-test --gpu
    # on a cluster, as a Ray job (inputs and --out on shared storage or s3://):
    ray job submit --working-dir . -- python rayjobs/batch_predict.py --checkpoint s3://b/run \
        --input s3://b/photos --out s3://b/photos-scenes
    # and where the model looks: one overlay PNG per image (its top-1 class's Grad-CAM map)
    python rayjobs/batch_predict.py --checkpoint latest --input ~/photos --out ~/photos-scenes \
        --cam ~/photos-cams

--input: a directory, a text file of paths (one per line, or Places365's `path label` lines,
relative to --root, default the file's directory), or a URI (s3://, gs://) of either. The output
(a directory, local or a URI) holds part-NNNNNN.parquet (or .csv) files, one row per input: path,
label and probability (top-1), labels / class_indices / probabilities (top-k), environment
(indoor/outdoor, for Places365's 365 classes), checkpoint, and error (a file that could not be
read or decoded: no prediction in its row; the run goes on and counts them). Each image goes
through the checkpoint's eval transform and the decoding rules of predict.py and Serve, so the
top-k are predict.py's. Running the same command again resumes; a finished output is reported as
complete; --overwrite starts again.

--cam DIR (a directory, local or a URI): for each predicted image, NNNNNN-<file name>.png, its
view (as the model saw it) blended with the class activation map of its top-1 class (Grad-CAM:
where the evidence for the class is), NNNNNN its index in the input list; computed by the model
actors, written by the driver before its shard's part. An image that could not be read has none.
"""

from __future__ import annotations

import argparse
import os
import time

from placesnet.cli import positive_float, positive_int, ray_init, run_cli
from placesnet.config import UserError


def parse_args(argv=None) -> argparse.Namespace:
    from placesnet.batch import FORMATS, SHARD

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint dir, run dir, summary.json / best.json, 'latest', or a URI (s3://...)",
    )
    p.add_argument("--input", required=True, help="a directory, a list file, or a URI of either")
    p.add_argument(
        "--out", required=True, help="the output directory (new, or this command's to resume), or a URI"
    )
    p.add_argument(
        "--root", help="what a list file's relative paths are relative to (default: its directory)"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="parquet",
        help="part files: parquet or csv; places365: parquet plus the challenge's submission "
        "file (default: %(default)s)",
    )
    p.add_argument("--top-k", type=positive_int, default=5, help="classes per image (default: %(default)s)")
    p.add_argument(
        "--batch-size", type=positive_int, default=64, help="images per model call (default: %(default)s)"
    )
    p.add_argument(
        "--num-workers",
        type=positive_int,
        help="model actors (default: one per GPU with --gpu; on CPUs, one per 2 CPUs the decode tasks leave)",
    )
    p.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        help="CPUs per model actor on CPUs, fractions allowed (default: the CPUs the decode "
        "tasks leave, a quarter of the cluster's and at least one, shared by the actors)",
    )
    p.add_argument("--gpu", action="store_true", help="one model actor per GPU")
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=SHARD,
        help="inputs per output file: the unit a killed run predicts again (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the predictions already in --out")
    p.add_argument(
        "--cam",
        metavar="DIR",
        help="also write each predicted image's top-1 class activation map over it, one PNG "
        "each, into DIR (a directory or a URI)",
    )
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else start a local Ray)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from placesnet.batch import MANIFEST, SUBMISSION, Progress, list_inputs, open_output, open_overlays
    from placesnet.checkpoint import load_checkpoint, locate_checkpoint
    from placesnet.checkpoint_files import model_fingerprint
    from placesnet.environment import io_labels

    # Everything that can be checked is, before Ray starts: the inputs, the checkpoint, --out.
    inputs = list_inputs(args.input, args.root)
    checkpoint = locate_checkpoint(args.checkpoint)
    loaded = load_checkpoint(checkpoint)
    top_k = min(args.top_k, len(loaded.classes))
    if args.format == "places365" and top_k < 5:
        raise UserError(f"--format places365 needs the top 5 classes; this model has {len(loaded.classes)}")
    manifest = {
        "checkpoint": checkpoint,
        "model_sha256": model_fingerprint(loaded.meta),
        "inputs": len(inputs.paths),
        "inputs_sha256": inputs.digest(),
        "top_k": top_k,
        "format": args.format,
        "shard_size": args.shard_size,
    }
    if args.cam:  # only then: an output written without overlays keeps its manifest
        manifest["cam"] = args.cam if "://" in args.cam else os.path.abspath(os.path.expanduser(args.cam))
    overlays = open_overlays(args.cam) if args.cam else None
    out, resuming = open_output(args.out, args.format, manifest, args.overwrite)
    total, environment = len(inputs.paths), io_labels(loaded.classes) is not None
    done = _done_images(out, total)
    if done == total:
        return _finish(out, loaded, args, 0.0, set(), complete=True)
    if resuming:
        print(f"resuming {args.out}: {done:,} of {total:,} images already predicted ({MANIFEST})")

    ray_init(args.address)
    import ray

    actors, cpus_per_actor = _actors(args, ray.cluster_resources())
    print(
        f"batch predict: {total:,} images from {args.input} with {loaded.config.model} "
        f"({len(loaded.classes)} classes), {actors} model actor(s) x "
        f"{'1 GPU' if args.gpu else f'{cpus_per_actor:g} CPU'}, batch {args.batch_size}, "
        f"top-{top_k} -> {args.out}" + (f", overlays -> {args.cam}" if args.cam else "")
    )
    from placesnet.batch import predict_shards

    start = time.monotonic()
    nodes = predict_shards(
        inputs,
        out,
        checkpoint=checkpoint,
        config=loaded.config.to_dict(),
        top_k=top_k,
        environment=environment,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        use_gpu=args.gpu,
        batch_size=args.batch_size,
        progress=Progress(total, done),
        overlays=overlays,
    )
    if args.format == "places365":
        from placesnet.batch import submission

        out.write(SUBMISSION, submission(out))
    return _finish(out, loaded, args, time.monotonic() - start, nodes, complete=False, new=total - done)


def _done_images(out, total: int) -> int:
    from placesnet.batch import shard_sizes

    sizes = shard_sizes(total, out.manifest["shard_size"])
    return sum(sizes[s] for s in out.done() if s in sizes)


def _actors(args, cluster: dict) -> tuple[int, float]:
    """(model actors, CPUs each): GPUs one actor each; on CPUs, the decode tasks keep a quarter of
    the CPUs (at least one) and the actors share the rest. A layout that leaves the decode tasks
    no CPU is refused: it would wait forever."""
    cpus, gpus = cluster.get("CPU", 0), int(cluster.get("GPU", 0))
    if args.gpu:
        if gpus == 0:
            raise UserError("--gpu asked for GPUs but the cluster has none; drop --gpu")
        actors = args.num_workers or gpus
        if actors > gpus:
            raise UserError(f"--num-workers {actors} with --gpu needs {actors} GPUs; the cluster has {gpus}")
        return actors, 1.0
    decoders = max(1.0, cpus // 4)
    actors = args.num_workers or max(1, int((cpus - decoders) // 2))
    share = args.cpus_per_worker or min((cpus - decoders) / actors, 8.0)
    if share <= 0 or actors * share > cpus - 1:
        raise UserError(
            f"{actors} model actor(s) of {share:g} CPU leave the decode tasks less than one of the "
            f"cluster's {cpus:g} CPUs; lower --num-workers or --cpus-per-worker, or use --gpu"
        )
    return actors, share


def _finish(out, loaded, args, seconds: float, nodes: set[str], *, complete: bool, new: int = 0) -> int:
    from placesnet.batch import SUBMISSION, read_parts

    rows = read_parts(out, ["index", "error"])
    errors = int((rows["error"].fillna("") != "").sum())
    where = f"{args.out} ({len(out.done())} {out.suffix} file(s)"
    where += f", {SUBMISSION})" if args.format == "places365" else ")"
    cams = f"; {len(rows) - errors:,} overlays in {args.cam}" if args.cam else ""
    if complete:
        if args.format == "places365" and not out.fs.get_file_info(f"{out.path}/{SUBMISSION}").size:
            from placesnet.batch import submission

            out.write(SUBMISSION, submission(out))
        print(
            f"{where} is complete: {len(rows):,} images ({errors:,} could not be read) from "
            f"{args.checkpoint}{cams}; nothing to do (--overwrite predicts them again)"
        )
        return 0
    rate = new / seconds if seconds else 0.0
    print(
        f"predicted {new:,} images in {seconds:.0f} s ({rate:.0f} images/s), decoded on "
        f"{len(nodes)} node(s); {len(rows):,} in all, {errors:,} could not be read "
        f"(their rows say why): {where}{cams}"
    )
    return 0


if __name__ == "__main__":
    run_cli(main, resumable=True)
