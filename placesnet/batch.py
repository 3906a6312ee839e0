"""Batch prediction over a photo collection with Ray Data (rayjobs/batch_predict.py): the inputs
listed, cut into shards, decoded in CPU tasks on any node, predicted by a pool of model actors,
and written one output file per shard, so that a run killed at any point resumes with only the
missing shards and every input ends up in the output exactly once.

The flow, streaming (memory stays flat as the input grows)::

    chunks of CHUNK paths  --map_batches(decode_chunk), CPU tasks-->  uint8 images (the
    checkpoint's eval transform, the same as predict.py and Serve)  --map_batches(Predictor),
    actor pool-->  prediction rows  --driver-->  part-<shard>.parquet|csv, written whole

A shard (SHARD inputs, by position in the sorted input list) is written by the driver once all of
its rows are in, to a temporary name then renamed (one PUT on object storage), so a part file is
either complete or absent. ``_batch_predict.json`` in the output records what the parts came from
(the checkpoint's weights, the inputs, top-k, the format); a rerun with other settings is refused.
(Ray Data 2.60's own resumable writes, ``DataContext.checkpoint_config``, are beta and hold the
finished ids in actors of 1 GiB each; the shards need neither.)

With overlays (``--cam DIR``), the model actors also draw each predicted image's class activation
map for its top-1 class over the view they predicted from (placesnet/cam.py), and the driver writes
each as a PNG into DIR as its batch comes in, before its shard's part: a part in place means its
overlays are too.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass

from pyarrow import fs as pafs

from placesnet.config import UserError
from placesnet.images import MAX_PIXELS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # any case
SHARD = 1024  # inputs per output file by default (--shard-size): the unit a killed run redoes
CHUNK = 32  # inputs per decode task's batch
DECODE_MEMORY = 4 * MAX_PIXELS * 3  # bytes: the largest photo decode_image takes, RGB, and copies
MANIFEST = "_batch_predict.json"
SUBMISSION = "places365_submission.txt"
FORMATS = ("parquet", "csv", "places365")


@dataclass(frozen=True)
class Inputs:
    """What to predict: ``paths`` as the decode tasks open them (local paths or URIs) and
    ``names`` as the output's ``path`` column shows them, in the same (sorted) order."""

    paths: list[str]
    names: list[str]
    source: str

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.names).encode()).hexdigest()


def _has_image_suffix(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _open(spec: str) -> tuple[pafs.FileSystem, str]:
    """A local path or any URI pyarrow opens (``s3://``, ``gs://``, ``file://``)."""
    if "://" in spec:
        try:
            return pafs.FileSystem.from_uri(spec)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a bad URI
            raise UserError(f"--input {spec}: cannot open it ({str(e).splitlines()[0][:200]})") from None
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec))


def list_inputs(src: str, root: str | None = None) -> Inputs:
    """The images under a directory (recursive, image suffixes in any case), or those a text file
    lists (one per line, or Places365's ``path label`` lines), relative to ``root`` (default: the
    list's directory; Places365's leading ``/`` is relative to it too). Raises UserError for a
    missing source or one with no images."""
    fs, path = _open(src)
    remote = "://" in src
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"--input {src} does not exist")
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        found = sorted(
            i.path for i in infos if i.type == pafs.FileType.File and _has_image_suffix(i.base_name)
        )
        if not found:
            raise UserError(f"--input {src} holds no images ({', '.join(IMAGE_SUFFIXES)}, in any case)")
        prefix = src.split("://", 1)[0] + "://" if remote else ""
        return Inputs([prefix + p for p in found], [prefix + p for p in found], src)
    with fs.open_input_stream(path) as f:
        try:
            lines = f.read().decode().splitlines()
        except UnicodeDecodeError:
            raise UserError(f"--input {src} is neither a directory nor a text list of image paths") from None
    entries = [line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise UserError(f"--input {src} lists no images")
    base = root if root is not None else posixpath.dirname(path) if remote else os.path.dirname(path)
    if root is not None and "://" not in root:
        base = os.path.abspath(os.path.expanduser(root))
    paths = []
    for entry in entries:
        if "://" in entry or (os.path.isabs(entry) and root is None and not remote):
            paths.append(entry)
        elif "://" in str(base) or remote:
            joined = posixpath.join(str(base), entry.lstrip("/"))
            paths.append(joined if "://" in joined else src.split("://", 1)[0] + "://" + joined)
        else:
            paths.append(os.path.join(base, entry.lstrip("/")))
    return Inputs(paths, entries, src)


def read_bytes(path: str) -> bytes:
    """The bytes of a local file or a URI (on the node of the task that reads it)."""
    if "://" in path:
        fs, inner = pafs.FileSystem.from_uri(path)
        with fs.open_input_stream(inner) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def decode_chunk(batch: dict, config: dict) -> dict:
    """Ray Data map_batches function: one chunk row (its shard, input indices and paths) -> one
    row per image, with the image as a uint8 (3, S, S) array through the checkpoint's eval
    transform, or its ``error`` (unreadable, not an image, too large: the same rules as
    predict.py and Serve, :func:`placesnet.images.decode_image`)."""
    import numpy as np
    import ray

    from placesnet.config import TrainConfig
    from placesnet.data.views import single_view
    from placesnet.images import BadImage, decode_image

    transform = single_view(TrainConfig.from_dict(config))
    node = ray.get_runtime_context().get_node_id()
    size = TrainConfig.from_dict(config).image_size
    out = {k: [] for k in ("shard", "index", "path", "name", "image", "error", "node")}
    for shard, indices, paths, names in zip(batch["shard"], batch["index"], batch["path"], batch["name"]):
        for index, path, name in zip(indices, paths, names):
            try:
                try:
                    data = read_bytes(path)
                except (OSError, ValueError) as e:
                    raise BadImage(f"cannot read it: {str(e).splitlines()[0][:200]}") from None
                image = transform(decode_image(data)).numpy()
                error = ""
            except BadImage as e:
                image, error = np.zeros((3, size, size), np.uint8), str(e)
            for key, value in (
                ("shard", int(shard)),
                ("index", int(index)),
                ("path", path),
                ("name", name),
                ("image", image),
                ("error", error),
                ("node", node),
            ):
                out[key].append(value)
    return {k: (np.stack(v) if k == "image" else np.array(v)) for k, v in out.items()}


class Predictor:
    """Ray Data actor: the checkpoint loaded once (verified, weights only), then the top-k of
    each decoded image, as flat columns ``label_1..k``, ``class_1..k``, ``probability_1..k``
    (and ``environment`` for Places365's classes); a row with an ``error`` passes through with
    empty ones. With the ``cam`` setting, ``overlay`` holds each predicted image's view blended
    with the Grad-CAM heatmap of its top-1 class, as PNG bytes (empty for an error row)."""

    settings: dict = {}  # checkpoint, top_k, use_gpu, threads, cam: set on a subclass (predict_shards)

    def __init__(self) -> None:
        import torch

        from placesnet.checkpoint import load_checkpoint
        from placesnet.environment import io_labels

        checkpoint, top_k, use_gpu, threads = (
            self.settings[k] for k in ("checkpoint", "top_k", "use_gpu", "threads")
        )
        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.loaded = load_checkpoint(checkpoint, self.device)
        self.top_k = top_k
        self.cam = self.settings.get("cam", False)
        self.labels = io_labels(self.loaded.classes)

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from placesnet.environment import environment
        from placesnet.evaluation import batch_probabilities, ranked

        ok = np.array([not e for e in batch["error"]], dtype=bool)
        n, k = len(ok), self.top_k
        out = {key: batch[key] for key in ("shard", "index", "name", "error", "node")}
        labels = np.full((n, k), "", dtype=object)
        classes, values = np.full((n, k), -1, dtype=np.int64), np.full((n, k), np.nan)
        env = np.full(n, "", dtype=object)
        overlays = np.full(n, b"", dtype=object)
        if ok.any():
            views = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            probs = batch_probabilities(self.loaded, views, self.device)
            if self.cam:
                from placesnet.evaluation import batch_heatmaps
                from placesnet.plots import overlay_png

                heatmaps = batch_heatmaps(self.loaded, views, probs.argmax(1).tolist(), self.device)
                for row, view, heatmap in zip(np.flatnonzero(ok), views, heatmaps):
                    overlays[row] = overlay_png(view, heatmap)
            for row, p in zip(np.flatnonzero(ok), probs):
                for j, top in enumerate(ranked(p, self.loaded.classes, k)):
                    labels[row, j], classes[row, j], values[row, j] = (
                        top["label"],
                        top["class_index"],
                        top["probability"],
                    )
                if self.labels is not None:
                    env[row] = environment(p, self.labels)
        for j in range(k):
            out[f"label_{j + 1}"], out[f"class_{j + 1}"], out[f"probability_{j + 1}"] = (
                labels[:, j],
                classes[:, j],
                values[:, j],
            )
        out["environment"] = env
        if self.cam:
            out["overlay"] = overlays
        return out


@dataclass(frozen=True)
class Output:
    """The output directory (local or a URI) and what its parts hold (the manifest); or the
    directory of ``--cam``'s overlays (no manifest)."""

    fs: pafs.FileSystem
    path: str
    label: str  # as the user wrote it
    fmt: str
    manifest: dict

    @property
    def suffix(self) -> str:
        return "csv" if self.fmt == "csv" else "parquet"

    def part(self, shard: int) -> str:
        return posixpath.join(self.path, f"part-{shard:06d}.{self.suffix}")

    def done(self) -> set[int]:
        """The shards whose part file is in place (a part is written whole, or not at all)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        names = (i.base_name for i in infos if i.type == pafs.FileType.File)
        tail = f".{self.suffix}"
        return {
            int(n[5 : -len(tail)])
            for n in names
            if n.startswith("part-") and n.endswith(tail) and n[5 : -len(tail)].isdigit()
        }

    def write(self, name: str, data: bytes) -> None:
        """``name`` in the output, whole or not at all: a temporary name renamed on a local
        filesystem; one PUT on object storage (which never shows a partial object)."""
        final = posixpath.join(self.path, name)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = posixpath.join(self.path, f".{name}.tmp-{os.getpid()}")
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, final)
        else:
            with self.fs.open_output_stream(final) as f:
                f.write(data)


def _writable(spec: str, flag: str, fmt: str, manifest: dict) -> Output:
    """The directory ``spec`` (local or a URI) as an Output, created if missing and checked
    writable; UserError naming ``flag`` if it is a file or cannot be written."""
    fs, path = (
        _open(spec) if "://" in spec else (pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(spec)))
    )
    out = Output(fs, path, spec, fmt, manifest)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise UserError(f"{flag} {spec} is a file; give a directory (new or this tool's)")
        fs.create_dir(path, recursive=True)
        out.write(".write-test", b"")
        fs.delete_file(posixpath.join(path, ".write-test"))
    except OSError as e:
        raise UserError(f"cannot write to {flag} {spec}: {str(e).splitlines()[0][:200]}") from None
    return out


def open_overlays(spec: str) -> Output:
    """The directory of ``--cam``'s overlay PNGs (local or a URI), created if missing and checked
    writable before any work. Overlays already there are kept; a rerun writes the same names."""
    return _writable(spec, "--cam", "png", {})


def overlay_name(index: int, name: str) -> str:
    """The overlay PNG's name for input ``index`` named ``name``: ``000123-photo.jpg.png``."""
    return f"{index:06d}-{posixpath.basename(name)}.png"


def open_output(spec: str, fmt: str, manifest: dict, overwrite: bool) -> tuple[Output, bool]:
    """The output directory, checked writable before any work: created if missing; a directory
    of another run's parts (another checkpoint, inputs, top-k, format or overlay directory) is
    refused unless ``overwrite``, which removes this tool's files there first. Returns (output,
    resuming)."""
    out = _writable(spec, "--out", fmt, manifest)
    fs, path = out.fs, out.path
    infos = fs.get_file_info(pafs.FileSelector(path))
    ours = [
        i
        for i in infos
        if i.base_name == MANIFEST or i.base_name.startswith(("part-", ".part-")) or i.base_name == SUBMISSION
    ]
    others = [i for i in infos if i not in ours and not i.base_name.startswith(".")]
    if others and not any(i.base_name == MANIFEST for i in ours):
        raise UserError(
            f"--out {spec} holds other files ({others[0].base_name}, ...); give a new or empty directory"
        )
    for i in infos:  # a temporary file of a run that was killed mid-write
        if ".tmp-" in i.base_name and i.type == pafs.FileType.File:
            fs.delete_file(i.path)
    previous = _read_manifest(fs, posixpath.join(path, MANIFEST))
    if previous is not None and previous != manifest and not overwrite:
        changed = [k for k in {**manifest, **previous} if previous.get(k) != manifest.get(k)]
        raise UserError(
            f"--out {spec} holds predictions of another run (its {', '.join(changed)} differ); "
            "pass --overwrite to replace them, or give another --out"
        )
    if overwrite:
        for i in ours:
            if i.type == pafs.FileType.File:
                fs.delete_file(i.path)
        previous = None
    if previous is None:
        out.write(MANIFEST, json.dumps(manifest, indent=2).encode())
    return out, previous is not None


def _read_manifest(fs: pafs.FileSystem, path: str) -> dict | None:
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def frame(rows, top_k: int, checkpoint: str, environment: bool):
    """The output rows of a shard, in input order: ``path``, ``label`` and ``probability`` (the
    top-1), ``labels``, ``class_indices``, ``probabilities`` (the top-k), ``environment`` (for
    Places365's classes), ``checkpoint`` and ``error`` (empty for a predicted image)."""
    import pandas as pd

    rows = rows.sort_values("index")
    ok = rows["error"] == ""
    k = range(1, top_k + 1)
    labels = rows[[f"label_{j}" for j in k]].values.tolist()
    classes = rows[[f"class_{j}" for j in k]].values.tolist()
    probs = rows[[f"probability_{j}" for j in k]].values.tolist()
    out = pd.DataFrame(
        {
            "index": rows["index"].astype("int64").values,
            "path": rows["name"].values,
            "label": [v[0] if good else None for v, good in zip(labels, ok)],
            "probability": [float(v[0]) if good else None for v, good in zip(probs, ok)],
            "labels": [list(v) if good else None for v, good in zip(labels, ok)],
            "class_indices": [[int(c) for c in v] if good else None for v, good in zip(classes, ok)],
            "probabilities": [[float(p) for p in v] if good else None for v, good in zip(probs, ok)],
        }
    )
    if environment:
        out["environment"] = [e if good else None for e, good in zip(rows["environment"].values, ok)]
    out["checkpoint"] = checkpoint
    out["error"] = [e or None for e in rows["error"].values]
    return out


def encode(df, fmt: str) -> bytes:
    """A part file's bytes: Parquet (list columns as lists) or CSV (lists as JSON arrays)."""
    import io

    buf = io.BytesIO()
    if fmt == "csv":
        df = df.copy()
        for col in ("labels", "class_indices", "probabilities"):
            df[col] = [json.dumps(v) if v is not None else "" for v in df[col]]
        df.to_csv(buf, index=False)
    else:
        df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_parts(out: Output, columns: list[str] | None = None):
    """Every part's rows, in input order (for the summary and the submission file)."""
    import io

    import pandas as pd

    frames = []
    for shard in sorted(out.done()):
        with out.fs.open_input_stream(out.part(shard)) as f:
            data = io.BytesIO(f.read())
        frames.append(
            pd.read_csv(data, keep_default_na=False)
            if out.suffix == "csv"
            else pd.read_parquet(data, columns=columns)
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or [])


def submission(out: Output) -> bytes:
    """Places365's challenge file: ``<file name> <l1> <l2> <l3> <l4> <l5>`` per predicted image,
    in the input list's order (an image that could not be read has no line)."""
    rows = read_parts(out, ["index", "path", "class_indices", "error"]).sort_values("index")
    lines = [
        f"{posixpath.basename(str(path))} {' '.join(str(int(c)) for c in list(classes)[:5])}"
        for path, classes, error in zip(rows["path"], rows["class_indices"], rows["error"])
        if not error
    ]
    return ("\n".join(lines) + "\n").encode()


def plan_chunks(inputs: Inputs, shards: list[int], shard_size: int) -> list[dict]:
    """The decode tasks' rows for ``shards``: CHUNK inputs each, never across shards."""
    chunks = []
    for shard in shards:
        end = min((shard + 1) * shard_size, len(inputs.paths))
        for start in range(shard * shard_size, end, CHUNK):
            stop = min(start + CHUNK, end)
            chunks.append(
                {
                    "shard": shard,
                    "index": list(range(start, stop)),
                    "path": inputs.paths[start:stop],
                    "name": inputs.names[start:stop],
                }
            )
    return chunks


def shard_sizes(total: int, shard_size: int) -> dict[int, int]:
    """{shard: its number of inputs} for ``total`` inputs."""
    return {s: min(shard_size, total - s * shard_size) for s in range(-(-total // shard_size))}


class Progress:
    """One line every ``every`` seconds: images done of the total, images/s, ETA."""

    def __init__(self, total: int, done: int, every: float = 5.0, out=None) -> None:
        self.total, self.done, self.every, self.out = total, done, every, out or sys.stdout
        self.start = self.last = time.monotonic()
        self.new = 0

    def add(self, n: int) -> None:
        self.done, self.new = self.done + n, self.new + n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = self.new / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            print(
                f"batch predict: {self.done:,}/{self.total:,} images ({self.done / self.total:.0%}), "
                f"{rate:.0f} images/s, ETA {_duration(eta)}",
                file=self.out,
                flush=True,
            )


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, s = divmod(int(seconds + 0.5), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def predict_shards(
    inputs: Inputs,
    out: Output,
    *,
    checkpoint: str,
    config: dict,
    top_k: int,
    environment: bool,
    actors: int,
    cpus_per_actor: float,
    use_gpu: bool,
    batch_size: int,
    progress: Progress,
    overlays: Output | None = None,
) -> set[str]:
    """Predict the shards missing from ``out`` with Ray Data on the connected cluster, writing
    each part as soon as all its rows are in; with ``overlays``, each predicted image's top-1
    class activation map over its view too (:func:`overlay_name`), written before its shard's
    part. Returns the ids of the nodes that decoded."""
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd
    import ray.data

    sizes = shard_sizes(len(inputs.paths), out.manifest["shard_size"])
    missing = sorted(set(sizes) - out.done())
    if not missing:
        return set()
    from placesnet.data.raydata import quiet_context

    quiet_context()  # Progress says it, one line every few seconds
    # The settings ride on the class, not as constructor arguments: Ray warns about restartable
    # actors whose arguments sit in the object store.
    settings = {
        "checkpoint": checkpoint,
        "top_k": top_k,
        "use_gpu": use_gpu,
        "threads": int(cpus_per_actor),
        "cam": overlays is not None,
    }
    predictor = type("Predictor", (Predictor,), {"settings": settings})
    ds = ray.data.from_items(plan_chunks(inputs, missing, out.manifest["shard_size"]))
    # Decode tasks go to every node (Ray Data spreads tasks by default). Each reserves the memory
    # of the largest image it may decode (MAX_PIXELS, RGB), which also keeps Ray Data from fusing
    # them into the model actors, where they would run on the actors' nodes only.
    ds = ds.map_batches(
        decode_chunk, batch_size=1, fn_kwargs={"config": config}, num_cpus=1, memory=DECODE_MEMORY
    )
    ds = ds.map_batches(
        predictor,
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    pending: dict[int, list] = {}
    nodes: set[str] = set()
    # Overlays are written by a few threads (on object storage each is a PUT of tens of ms);
    # a shard's part waits for its overlays, so a part in place means they are too.
    writers = ThreadPoolExecutor(8, thread_name_prefix="overlay") if overlays else None
    written: dict[int, list] = {}  # shard -> its overlays' writes
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            nodes.update(batch["node"].unique())
            if writers is not None:
                for shard, index, name, png in zip(
                    batch["shard"], batch["index"], batch["name"], batch.pop("overlay")
                ):
                    if len(png):  # an error row has none
                        written.setdefault(int(shard), []).append(
                            writers.submit(overlays.write, overlay_name(int(index), name), png)
                        )
            for shard, rows in batch.groupby("shard"):
                pending.setdefault(int(shard), []).append(rows)
                have = sum(len(r) for r in pending[int(shard)])
                if have == sizes[int(shard)]:
                    for write in written.pop(int(shard), []):
                        write.result()  # raises the write's error, if any
                    df = frame(pd.concat(pending.pop(int(shard))), top_k, checkpoint, environment)
                    out.write(posixpath.basename(out.part(int(shard))), encode(df, out.fmt))
            progress.add(len(batch))
    finally:
        if writers is not None:
            writers.shutdown(cancel_futures=True)
    if pending:  # cannot happen unless Ray Data lost rows: say so instead of a silent gap
        raise RuntimeError(f"shards {sorted(pending)} came back incomplete")
    return nodes
