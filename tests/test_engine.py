"""Ray-free epoch functions and the checkpoint format."""

import json
import pickle

import pytest
import torch
from torch.utils.data import DataLoader

from placesnet.checkpoint import load_checkpoint, load_train_state, resolve_checkpoint, save_checkpoint
from placesnet.config import UserError
from placesnet.data.places import class_names, open_split
from placesnet.model import build_model
from placesnet.train import engine, optim
from placesnet.train.step import StepSettings, to_device

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained(tiny_config, tiny_root):
    """A tiny model trained for a few epochs with the plain-torch loop (no Ray)."""
    torch.manual_seed(0)
    train, val = open_split(tiny_config, "train", tiny_root), open_split(tiny_config, "val", tiny_root)
    classes = class_names(train)
    model = build_model(tiny_config, len(classes))
    opt = optim.build_optimizer(model, tiny_config.lr, 0.9, 5e-4, CPU)
    loader = DataLoader(train, 32, shuffle=True)
    sched = optim.build_scheduler(opt, "cosine", 5 * len(loader), warmup_steps=2)
    history = []
    for epoch in range(5):
        row = engine.train_one_epoch(model, loader, opt, CPU, scheduler=sched)
        row.update(engine.evaluate(model, DataLoader(val, 64), CPU, num_classes=len(classes)))
        history.append({"epoch": epoch + 1, **row})
    return model, opt, sched, classes, history


def test_plain_torch_loop_learns(trained):
    *_, classes, history = trained
    assert history[-1]["val_top1"] >= 0.6  # chance is 0.25
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_images"] == 48 and history[-1]["train_images"] >= 128


def test_evaluate_counts_and_confusion(trained, tiny_config, tiny_root):
    model, *_ = trained
    val = open_split(tiny_config, "val", tiny_root)
    full = engine.evaluate(model, DataLoader(val, 7), CPU, num_classes=4, confusion=True)
    assert full["confusion"].sum() == 48
    assert full["confusion"].diagonal().sum() / 48 == pytest.approx(full["val_top1"])
    assert full["val_top5"] == 1.0  # top-5 of 4 classes


def test_a_diverging_loss_stops_training(tiny_config, tiny_root):
    torch.manual_seed(0)
    train = open_split(tiny_config, "train", tiny_root)
    model = build_model(tiny_config, 4)
    opt = optim.build_optimizer(model, 1e4, 0.9, 0.0, CPU)  # absurd: NaN within a few steps
    with pytest.raises(engine.TrainingDiverged, match=r"loss is nan at epoch 3, step \d/5 \(lr 10000\)"):
        engine.train_one_epoch(model, DataLoader(train, 32, shuffle=True), opt, CPU, epoch=3)


def _ddp_rank(rank: int, port: int, out: str) -> None:
    """One DDP rank on gloo; rank 1's second batch holds a NaN pixel, rank 0's batches are fine."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(4)]
    if rank == 1:
        batches[1][0][0, 0, 0, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        engine.train_one_epoch(model, batches, opt, CPU, epoch=1)
        result = "trained on"
    except engine.TrainingDiverged as e:
        result = str(e)
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)
    dist.destroy_process_group()


def test_divergence_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """No rank may train on (or wait forever in an all-reduce) when another rank's loss is NaN."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_ddp_rank, args=(r, port, str(tmp_path / "rank"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung and all(p.exitcode == 0 for p in procs)
    results = [(tmp_path / f"rank.{r}").read_text() for r in (0, 1)]
    assert results[0] == results[1] and "loss is nan at epoch 1, step 2/4" in results[0]


def test_plain_fit_runs_the_default_recipe(tiny_config, tiny_root):
    """engine.fit (benchmarks, notebooks) trains with the config's per-step schedule: the lr
    climbs through the warmup, peaks at config.lr and decays to near zero by the last step."""
    torch.manual_seed(0)
    train, val = open_split(tiny_config, "train", tiny_root), open_split(tiny_config, "val", tiny_root)
    cfg = tiny_config.replace(epochs=3, warmup_steps=4)
    history = list(
        engine.fit(
            build_model(cfg, 4),
            DataLoader(train, 32, shuffle=True),
            DataLoader(val, 64),
            cfg,
            CPU,
            num_classes=4,
        )
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    lrs = [h["lr"] for h in history]  # the last step's lr of each epoch (5 steps per epoch)
    assert lrs == pytest.approx([cfg.lr * optim.lr_factor(s, 15, 4, "cosine") for s in (4, 9, 14)])
    assert history[-1]["val_top1"] > 0.25  # chance


def test_checkpoint_round_trip(trained, tiny_config, tmp_path):
    model, opt, sched, classes, history = trained
    d = save_checkpoint(
        tmp_path / "checkpoint_000",
        model=model,
        config=tiny_config,
        classes=classes,
        epoch=4,
        metrics=history[-1],
        history=history,
        optimizer=opt,
        scheduler=sched,
    )
    loaded = load_checkpoint(d)
    assert loaded.config == tiny_config and loaded.classes == classes and loaded.epoch == 4
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x))
    assert load_train_state(d)["optimizer"]["state"]  # momentum buffers travel too
    assert resolve_checkpoint(tmp_path) == d  # a run dir means its best checkpoint
    (tmp_path / "summary.json").write_text(json.dumps({"best_checkpoint": str(d)}))
    assert resolve_checkpoint(tmp_path / "summary.json") == d


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "model.pt").write_bytes((d / "model.pt").read_bytes()[:100]), "corrupt"),
        (lambda d: (d / "model.pt").write_bytes(b"garbage"), "corrupt"),
        (lambda d: (d / "model.pt").write_bytes(pickle.dumps(Evil())), "corrupt"),  # weights_only
        # checked against meta.json's sizes and sha256 first (weights that do not fit intact files:
        # test_serve_core.py::test_every_load_verifies_the_checkpoint)
        (lambda d: torch.save({"fc9.weight": torch.zeros(1)}, d / "model.pt"), "model.pt has"),
        (lambda d: (d / "meta.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
    ],
)
def test_corrupt_checkpoints_are_refused(trained, tiny_config, tmp_path, damage, message):
    model, opt, sched, classes, history = trained
    d = save_checkpoint(
        tmp_path / "ckpt",
        model=model,
        config=tiny_config,
        classes=classes,
        epoch=0,
        metrics=history[0],
        history=history[:1],
    )
    damage(d)
    with pytest.raises(UserError, match=message):
        load_checkpoint(d)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(UserError, match="no checkpoint"):
        load_checkpoint(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fast_path_trains(tiny_config, tiny_root):
    """bf16/fp16 autocast + channels_last + fused SGD on a GPU: the loss goes down."""
    device = torch.device("cuda")
    train = open_split(tiny_config, "train", tiny_root)
    settings = StepSettings.from_config(tiny_config.replace(amp=True, channels_last=True), device)
    assert settings.amp_dtype in (torch.bfloat16, torch.float16) and settings.channels_last
    model = settings.prepare_model(build_model(tiny_config, 4).to(device))
    opt = optim.build_optimizer(model, 0.05, 0.9, 5e-4, device)
    scaler = settings.make_scaler(device)
    loader = DataLoader(train, 32, shuffle=True, pin_memory=True)
    first = engine.train_one_epoch(model, loader, opt, device, settings=settings, scaler=scaler)
    for _ in range(3):
        last = engine.train_one_epoch(model, loader, opt, device, settings=settings, scaler=scaler)
    assert last["train_loss"] < first["train_loss"]


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_like_the_plain_one(tiny_config, tiny_root, tmp_path):
    """--compile compiles in place: the epoch code runs it unchanged, and its checkpoint has the
    plain model's keys, so evaluate/predict/serve load it without torch.compile."""
    torch.manual_seed(0)
    train = open_split(tiny_config, "train", tiny_root)
    model = build_model(tiny_config, 4)
    model.compile()
    opt = optim.build_optimizer(model, 0.05, 0.9, 5e-4, CPU)
    loader = DataLoader(train, 32, shuffle=True, drop_last=True)
    rows = [engine.train_one_epoch(model, loader, opt, CPU) for _ in range(3)]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    save_checkpoint(
        tmp_path,
        model=model,
        config=tiny_config.replace(compile=True),
        classes=class_names(train),
        epoch=2,
        metrics=rows[-1],
        history=rows,
    )
    loaded = load_checkpoint(tmp_path)
    assert not hasattr(loaded.model, "_compiled_call_impl") or loaded.model._compiled_call_impl is None
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    model.eval()
    with torch.inference_mode():
        from placesnet.data.transforms import normalize

        torch.testing.assert_close(
            loaded.model(normalize(images)), model(normalize(images)), rtol=1e-4, atol=1e-4
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_uint8_batches_are_pinned_and_normalised_on_the_gpu(tiny_root):
    """The loader hands over pinned uint8 batches; normalising them on the GPU gives the
    workshop's values."""
    from PIL import Image

    from placesnet.config import TrainConfig
    from placesnet.data.loaders import LoaderPlan
    from placesnet.data.transforms import normalize, workshop_transform

    ds = open_split(TrainConfig(image_size=256), "val", tiny_root)
    loader = DataLoader(ds, batch_size=8, **LoaderPlan.for_worker(2, on_gpu=True).kwargs())
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8 and images.is_pinned()
    on_gpu = to_device(images, torch.zeros(8, dtype=torch.long), torch.device("cuda"), channels_last=True)[0]
    assert on_gpu.is_contiguous(memory_format=torch.channels_last)
    expected = torch.stack([workshop_transform(256)(Image.open(p).convert("RGB")) for p, _ in ds.imgs[:8]])
    torch.testing.assert_close(on_gpu.cpu(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(normalize(images), expected, rtol=0, atol=0)
