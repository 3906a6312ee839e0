"""Promises that a mutation run found unguarded (issue #15), each tested so that the bug it
names fails here: see scripts/mutate.py (`make mutate`) for the mutations and their guards."""

from __future__ import annotations

import json
import math
import pickle
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import untrained_checkpoint

from placesnet.checkpoint import load_checkpoint, save_checkpoint
from placesnet.config import UserError
from placesnet.model import build_model
from placesnet.train import engine, optim

# --- a checkpoint cannot run code ------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a marker file: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["model.pt", "train_state.pt"])
def test_a_pickle_payload_in_a_checkpoint_never_runs(tiny_config, tmp_path, name):
    ckpt = tmp_path / "ckpt"
    model = build_model(tiny_config, 4)
    save_checkpoint(
        ckpt,
        model=model,
        config=tiny_config,
        classes=list("abcd"),
        epoch=0,
        metrics={"epoch": 1, "val_top1": 0.5},
        history=[],
    )
    marker = tmp_path / "pwned"
    torch.save({"weights": _Payload(str(marker))}, ckpt / name, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(UserError, match="corrupt checkpoint"):
        if name == "model.pt":
            load_checkpoint(ckpt)
        else:
            from placesnet.checkpoint import load_train_state

            load_train_state(ckpt)
    assert not marker.exists()  # the payload did not run


# --- divergence on inf, not only NaN -------------------------------------------------------------


def _step_stats(losses: list[float]) -> dict:
    """The epoch loop's device-side sums after these step losses (4 samples, 1 correct each)."""
    sums = engine._StepStats(torch.device("cpu"))
    for step, value in enumerate(losses, start=1):
        sums.add(step, torch.tensor(value), 4, torch.tensor(1))
    return sums.read(steps=5)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_an_infinite_or_nan_loss_stops_training(value):
    """The first non-finite step is found on the device and named when the host looks (at the
    next check point), with that step's lr; later finite or non-finite steps do not move it."""
    stats = _step_stats([2.0, 1.5, value, math.nan, 1.0])
    with pytest.raises(
        engine.TrainingDiverged, match=rf"the loss is {value} at epoch 2, step 3/5 \(lr 0.25\)"
    ):
        engine._check_finite(stats, epoch=2, steps=5, lrs={3: 0.25, 4: 0.1})
    fine = _step_stats([2.0, 1e30, 1.0])
    engine._check_finite(fine, epoch=2, steps=5, lrs={})  # huge is not infinite
    assert fine["peak"] == pytest.approx(1e30) and fine["first"] == 2.0
    assert fine["loss_sum"] == pytest.approx(4 * (3.0 + 1e30)) and fine["correct"] == 3


# --- two ranks give the one-rank numbers, on a split that does not divide evenly ------------------


def _rank(rank: int, world: int, init: str, root: str, ckpt: str, out: str) -> None:
    from torch.utils.data import DataLoader

    from placesnet.data.loaders import ShardSampler
    from placesnet.data.places import open_split
    from placesnet.evaluation import evaluate_checkpoint

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        loaded = load_checkpoint(ckpt)
        result = evaluate_checkpoint(
            loaded,
            __import__("pathlib").Path(root),
            torch.device("cpu"),
            batch_size=5,
            rank=rank,
            world_size=world,
            mistakes=10,
        )
        ds = open_split(loaded.config, "val", __import__("pathlib").Path(root))
        loader = DataLoader(ds, batch_size=4, sampler=ShardSampler(ds, rank, world))
        opt = torch.optim.SGD(loaded.model.parameters(), lr=0.0)
        train = engine.train_one_epoch(loaded.model, loader, opt, torch.device("cpu"))
        if rank == 0:
            result["confusion"] = result["confusion"].tolist()
            result["train"] = {k: train[k] for k in ("train_images", "train_top1", "train_loss")}
            result["targets"] = list(ds.targets)
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp_path, root, ckpt) -> dict:
    out = tmp_path / f"w{world}.json"
    init = f"file://{tmp_path / f'store{world}'}"
    _ranks(_rank, world, init, str(root), str(ckpt), str(out))
    return json.loads(out.read_text())


def _ranks(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` ranks: spawned processes, or with one rank in this
    process (a spawned one costs seconds of imports)."""
    if world > 1:
        mp.spawn(fn, args=(world, *args), nprocs=world, join=True)
        return
    threads = torch.get_num_threads()
    try:
        fn(0, world, *args)
    finally:
        torch.set_num_threads(threads)


def test_two_ranks_count_every_sample_once_and_match_one_rank(tiny_config, tiny_root, tmp_path):
    root = tmp_path / "p365"
    shutil.copytree(tiny_root, root)
    lines = (root / "places365_val.txt").read_text().splitlines(keepends=True)
    (root / "places365_val.txt").write_text("".join(lines[:-1]))  # 47 images: shards of 24 and 23
    cfg = tiny_config.replace(dataset="places365", skip_verify=True, data_root=str(root))
    ckpt = untrained_checkpoint(tmp_path / "ckpt", cfg)
    one, two = _run(1, tmp_path, root, ckpt), _run(2, tmp_path, root, ckpt)
    assert one["val_images"] == two["val_images"] == 47  # no padding, nothing dropped
    assert two["val_top1"] == one["val_top1"] and two["val_top5"] == one["val_top5"]
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert two["confusion"] == one["confusion"] and sum(map(sum, two["confusion"])) == 47
    assert two["train"]["train_images"] == one["train"]["train_images"] == 47  # summed over ranks
    # evaluate.py's gallery: the 10 most confident mistakes over all ranks, the same on 1 and 2
    wrong = 47 - sum(one["confusion"][i][i] for i in range(4))
    assert len(one["mistakes"]) == min(10, wrong) and wrong > 0
    assert [(m["index"], m["predicted"]) for m in two["mistakes"]] == [
        (m["index"], m["predicted"]) for m in one["mistakes"]
    ]
    for m in one["mistakes"]:
        assert m["true"] == one["targets"][m["index"]] != m["predicted"]
        assert m["image"].endswith(f"Places365_val_{m['index'] + 1:08d}.jpg")
    probs = [m["probability"] for m in one["mistakes"]]
    assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
    # (train top-1 and loss differ: BatchNorm in train mode sees other batches on 2 ranks)


# --- training does not depend on the worker count ---------------------------------------------------


def _train_rank(rank: int, world: int, init: str, root: str, config: dict, out: str) -> None:
    """Two epochs of the Ray workers' loader (data.make_train_loader) and epoch function under
    DDP on gloo, with a model without BatchNorm or dropout; rank 0 writes the losses and weights."""
    from torch.nn.parallel import DistributedDataParallel

    from placesnet.config import TrainConfig
    from placesnet.data.loaders import make_train_loader
    from placesnet.data.places import MarkBadImages, open_split
    from placesnet.model import DeepCNN

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        cfg = TrainConfig.from_dict(config)
        ds = MarkBadImages(open_split(cfg, "train", __import__("pathlib").Path(root)), cfg.image_size)
        loader = make_train_loader(ds, cfg.batch_size, rank, world, cfg.seed)
        torch.manual_seed(cfg.seed)
        model = DistributedDataParallel(
            DeepCNN(4, (8, 16), fc_hidden=32, grid=2, batchnorm=False, dropout=0.0)
        )
        opt = optim.build_optimizer(model, 0.05, 0.9, 5e-4, torch.device("cpu"))
        losses = []
        for epoch in range(2):
            loader.batch_sampler.set_epoch(epoch)
            row = engine.train_one_epoch(model, loader, opt, torch.device("cpu"))
            losses.append([row["train_loss"], row["train_images"], len(loader)])
        if rank == 0:
            weights = torch.cat([p.detach().flatten() for p in model.module.parameters()])
            with open(out, "w") as f:
                json.dump({"epochs": losses, "weights": weights.tolist()}, f)
    finally:
        dist.destroy_process_group()


def test_one_and_two_workers_train_the_same_weights(tiny_config, tiny_root, tmp_path):
    """docs/training.md: --batch-size is the global batch split over the workers, so results do not
    depend on the worker count. Each global batch holds the same images on 1, 2 and 3 ranks (32
    images: 11 + 11 + 10 on 3), and DDP's gradient mean over the shares, each weighted by its
    size, is the whole batch's: the same losses and weights."""
    runs = {}
    for world in (1, 2, 3):
        out, init = tmp_path / f"t{world}.json", f"file://{tmp_path / f'tstore{world}'}"
        _ranks(_train_rank, world, init, str(tiny_root), tiny_config.to_dict(), str(out))
        runs[world] = json.loads(out.read_text())
    one = runs[1]
    assert one["epochs"][0][0] != one["epochs"][1][0]  # it did train
    for world in (2, 3):
        other = runs[world]
        assert [e[1:] for e in other["epochs"]] == [e[1:] for e in one["epochs"]] == [[160, 5], [160, 5]]
        assert [e[0] for e in other["epochs"]] == pytest.approx([e[0] for e in one["epochs"]], rel=1e-4)
        torch.testing.assert_close(
            torch.tensor(other["weights"]), torch.tensor(one["weights"]), rtol=1e-4, atol=1e-5
        )


# --- Serve: every error is JSON, 2 replicas only where they fit -------------------------------------


def test_json_errors_for_unknown_routes_wrong_methods_and_internal_failures():
    from fastapi.testclient import TestClient

    from placesnet.serve.http_api import app

    if not any(getattr(r, "path", "") == "/_test_boom" for r in app.routes):

        @app.get("/_test_boom")
        async def _boom():
            raise RuntimeError("kaput")

    client = TestClient(app, raise_server_exceptions=False)
    for method, path, status, text in (
        ("GET", "/nope", 404, "Not Found: GET /nope"),
        ("GET", "/predict", 405, "Method Not Allowed: GET /predict"),
        ("GET", "/_test_boom", 500, "internal error: RuntimeError: kaput"),
    ):
        r = client.request(method, path)
        assert r.status_code == status and r.headers["content-type"] == "application/json"
        assert r.json() == {"error": text}


def test_two_replicas_by_default_only_where_they_fit():
    from dataclasses import replace

    from placesnet.serve.options import DEFAULTS, ServeOptions, replicas_with_room

    opts = ServeOptions()
    assert DEFAULTS["min_replicas"] == opts.min_replicas == 2
    assert replicas_with_room(opts, {"CPU": 8}) == 2
    assert replicas_with_room(opts, {"CPU": 1}) == 1  # one replica of 1 CPU fits
    assert replicas_with_room(replace(opts, num_cpus=0.5), {"CPU": 1}) == 2
    assert replicas_with_room(replace(opts, num_gpus=1.0), {"CPU": 8, "GPU": 1}) == 1
    assert replicas_with_room(replace(opts, min_replicas=1, max_replicas=1), {"CPU": 8}) == 1
    assert replicas_with_room(opts, {"CPU": 0}) == 1  # never 0
