"""The sample generator writes the real Places365 layout, read by torchvision's own class."""

import hashlib
import os
import shutil

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import Places365

from placesnet.config import TrainConfig, UserError
from placesnet.data.loaders import LoaderPlan, ShardSampler
from placesnet.data.places import Places365Copy, class_names, open_split, resolve_data_root
from placesnet.data.sample import digest, write_sample
from placesnet.data.scenes import official_categories
from placesnet.data.transforms import eval_transform, normalize, train_transform, workshop_transform


def test_bundled_categories_are_the_official_file():
    from importlib import resources

    data = resources.files("placesnet.assets").joinpath("categories_places365.txt").read_bytes()
    assert hashlib.md5(data).hexdigest() == "06c963b85866bd0649f97cb43dd16673"
    assert len(official_categories()) == 365


def test_layout_read_by_torchvision_places365(tiny_root, tiny_config):
    for rel in [
        "categories_places365.txt",
        "places365_train_standard.txt",
        "places365_val.txt",
        "data_256_standard/b/beach/00000001.jpg",
        "val_256/Places365_val_00000001.jpg",
    ]:
        assert (tiny_root / rel).is_file(), rel
    train = Places365Copy(str(tiny_root), split="train-standard", small=True)
    val = Places365Copy(str(tiny_root), split="val", small=True)
    assert isinstance(train, Places365)  # torchvision's own code path, md5 check relaxed
    assert len(train) == 4 * 40 and len(val) == 4 * 12
    image, target = val[0]
    assert image.size == (256, 256) and image.mode == "RGB"
    assert 0 <= target < 4
    names = class_names(train)
    assert names == ["/b/beach", "/d/desert/sand", "/f/field/wild", "/f/forest/broadleaf"]
    assert set(names) <= set(official_categories())
    assert sorted(set(val.targets)) == [0, 1, 2, 3]


def test_unmodified_torchvision_class_rejects_only_the_list_md5(tiny_root):
    # The categories file passes torchvision's md5 check only if it is byte-identical; ours is a
    # subset, so the plain class stops at it, exactly like a derived copy of Places365 would.
    with pytest.raises(RuntimeError, match="categories_places365.txt"):
        Places365(str(tiny_root), split="val", small=True)


def test_generation_is_deterministic(tmp_path):
    a = write_sample(tmp_path / "a", classes=3, train_per_class=4, val_per_class=2, seed=5)
    b = write_sample(tmp_path / "b", classes=3, train_per_class=4, val_per_class=2, seed=5)
    assert digest(a) == digest(b)
    assert (a / "val_256/Places365_val_00000003.jpg").read_bytes() == (
        b / "val_256/Places365_val_00000003.jpg"
    ).read_bytes()


def _tree(root):
    """Every file under ``root`` with its bytes, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_hard_sample_layout_and_determinism(tmp_path):
    """--sample-difficulty hard: 16 official look-alike categories in the same Places365 layout,
    read by torchvision's class; the same seed gives the same bytes, another seed other images."""
    cfg = TrainConfig(
        sample_difficulty="hard",
        sample_classes=16,
        sample_train_per_class=3,
        sample_val_per_class=2,
        image_size=32,
        data_root=str(tmp_path / "cache"),
    )
    root = resolve_data_root(cfg)
    assert root.name.startswith("hard-v1-c16-t3-v2")
    train, val = open_split(cfg, "train", root), open_split(cfg, "val", root)
    assert isinstance(train, Places365) and len(train) == 48 and len(val) == 32
    names = class_names(train)
    assert len(names) == 16 and set(names) <= set(official_categories()) and names == sorted(names)
    assert {"/b/beach", "/c/coast", "/f/forest_path", "/g/glacier", "/m/mountain_snowy"} <= set(names)
    assert sorted(set(val.targets)) == list(range(16))
    image, _ = val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    again = write_sample(tmp_path / "again", 16, 3, 2, seed=0, difficulty="hard")
    assert _tree(again) == _tree(root)
    other = write_sample(tmp_path / "other", 16, 3, 2, seed=1, difficulty="hard")
    assert _tree(other).keys() == _tree(root).keys() and _tree(other) != _tree(root)
    easy = resolve_data_root(cfg.replace(sample_difficulty="easy", sample_classes=8))
    assert (
        easy != root
        and class_names(open_split(cfg.replace(sample_difficulty="easy", sample_classes=8), "val", easy))
        != names
    )


def test_sample_class_counts_are_checked():
    with pytest.raises(UserError, match="2 to 16 for the hard sample, got 17"):
        TrainConfig(sample_difficulty="hard", sample_classes=17).validate()
    with pytest.raises(UserError, match="2 to 8 for the easy sample, got 9"):
        TrainConfig(sample_classes=9).validate()
    TrainConfig(dataset="places365", sample_classes=8).validate()  # ignored for places365


def _workshop_batch(paths, transform):
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def test_uint8_pipeline_matches_the_workshop_pipeline_exactly(tiny_root):
    # Every val image through the project's dataset (uint8 decode, uint8 collation, normalize
    # afterwards) vs the workshop's PIL + ToTensor + Normalize(0.5): bit-identical at 256 px.
    cfg = TrainConfig(image_size=256)
    ds = open_split(cfg, "val", tiny_root)
    images, targets = next(iter(DataLoader(ds, batch_size=len(ds))))
    assert images.dtype == torch.uint8 and images.shape == (48, 3, 256, 256)
    expected = _workshop_batch([p for p, _ in ds.imgs], workshop_transform(256))
    torch.testing.assert_close(normalize(images), expected, rtol=0, atol=0)
    assert images.element_size() * 4 == expected.element_size()  # a quarter of the bytes


def test_uint8_pipeline_matches_pil_resizing_within_one_level(tiny_root, tmp_path):
    # Smaller training sizes resize on uint8 tensors; PIL (the workshop's Resize) agrees to within
    # one intensity level, also for a non-square image that the center crop squares.
    odd = tmp_path / "odd.png"
    Image.open(tiny_root / "val_256/Places365_val_00000002.jpg").resize((300, 200)).save(odd)
    paths = sorted((tiny_root / "val_256").glob("*.jpg"))[:8] + [odd]
    for size in (64, 100):
        reference = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize((0.5,), (0.5,))])
        ours = torch.stack([eval_transform(size)(Image.open(p).convert("RGB")) for p in paths])
        assert ours.dtype == torch.uint8 and ours.shape == (9, 3, size, size)
        diff = (normalize(ours) - _workshop_batch(paths, reference)).abs()
        assert diff.max() <= 2 / 255 + 1e-6 and diff.mean() < 0.5 / 255


def test_augmented_training_batches_stay_uint8(tiny_root):
    ds = open_split(TrainConfig(image_size=48, augment=True), "train", tiny_root)
    assert "RandomResizedCrop" in repr(ds.transform)
    images, _ = next(iter(DataLoader(ds, batch_size=6, shuffle=True)))
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 48, 48)
    assert isinstance(train_transform(48, augment=False), type(eval_transform(48)))


def test_normalize_keeps_channels_last():
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = normalize(x)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(y, x.float() / 127.5 - 1)


def test_corrupt_dataset_image_names_the_file(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    bad = root / "val_256/Places365_val_00000003.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    ds = open_split(TrainConfig(dataset="places365", data_root=str(root), skip_verify=True), "val")
    with pytest.raises(UserError, match="Places365_val_00000003.jpg"):
        ds[2]


@pytest.mark.parametrize(
    "cpus, on_gpu, override, workers, threads",
    [
        (1, False, None, 0, 1),
        (2, False, None, 0, 2),
        (8, False, None, 2, 6),
        (1, True, None, 0, 1),
        (8, True, None, 7, 8),
        (4, False, 3, 3, 1),
        (8, True, 0, 0, 8),
    ],
)
def test_loader_plan_follows_the_cpus_ray_gives(cpus, on_gpu, override, workers, threads):
    plan = LoaderPlan.for_worker(cpus, on_gpu, override)
    assert (plan.workers, plan.threads, plan.pin_memory) == (workers, threads, on_gpu)
    kw = plan.kwargs()
    assert kw["num_workers"] == workers and kw["pin_memory"] == on_gpu
    if workers:  # processes survive epochs and keep about 8 batches in flight
        assert kw["persistent_workers"] and kw["prefetch_factor"] * workers >= 8
    else:
        assert "prefetch_factor" not in kw


@pytest.mark.parametrize(
    "images, batch, world, steps",
    [
        (1200, 256, 1, 5),  # 176 left over (0.69 of a batch): trained, not dropped
        (1200, 256, 2, 5),  # per rank: 600 in batches of 128, 88 left over
        (1030, 256, 1, 4),  # 6 left over: dropped
        (160, 32, 2, 5),
        (20, 32, 1, 1),  # fewer images than one batch: one small batch
    ],
)
def test_train_loader_drops_only_a_small_last_batch(images, batch, world, steps):
    from torch.utils.data import TensorDataset

    from placesnet.data.loaders import make_train_loader

    ds = TensorDataset(torch.arange(images))
    loaders = [make_train_loader(ds, batch, rank, world, seed=0) for rank in range(world)]
    assert {len(loader) for loader in loaders} == {steps}
    seen = torch.cat([b[0] for loader in loaders for b in loader])
    assert len(seen) == len(seen.unique()) >= images - batch / 2  # nothing twice, little left out


def test_shard_sampler_counts_every_sample_once():
    data = list(range(10))
    for world in (1, 2, 3, 4):
        seen = sorted(i for r in range(world) for i in ShardSampler(data, r, world))
        assert seen == data


def _copy(root, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_errors_name_the_missing_file(tiny_root, tmp_path):
    cfg = TrainConfig(dataset="places365", data_root=str(tmp_path / "nope"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_data_root(cfg)
    root = _copy(tiny_root, tmp_path)
    cfg = TrainConfig(dataset="places365", data_root=str(root), skip_verify=True)
    assert len(open_split(cfg, "val")) == 48  # a derived copy loads with --skip-verify
    with pytest.raises(UserError, match="unknown split"):
        open_split(cfg, "test-challenge")
    os.remove(root / "places365_val.txt")
    with pytest.raises(UserError, match="places365_val.txt"):
        open_split(cfg, "val")
    shutil.rmtree(root / "data_256_standard")
    with pytest.raises(UserError, match="data_256_standard"):
        open_split(cfg, "train")


def test_official_check_suggests_skip_verify(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    shutil.copy(
        os.path.join(os.path.dirname(__file__), "..", "placesnet", "assets", "categories_places365.txt"),
        root / "categories_places365.txt",
    )
    cfg = TrainConfig(dataset="places365", data_root=str(root))
    with pytest.raises(UserError, match="--skip-verify"):
        open_split(cfg, "val")


def test_malformed_list_file(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    (root / "places365_val.txt").write_text("no-index-here\n")
    cfg = TrainConfig(dataset="places365", data_root=str(root), skip_verify=True)
    with pytest.raises(UserError, match="malformed"):
        open_split(cfg, "val")


def test_missing_image_is_named(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    os.remove(root / "val_256/Places365_val_00000001.jpg")
    cfg = TrainConfig(dataset="places365", data_root=str(root), skip_verify=True)
    with pytest.raises(UserError, match="Places365_val_00000001.jpg"):
        open_split(cfg, "val")


@pytest.mark.parametrize("images,batch", [(161, 32), (1200, 256), (1030, 256), (20, 32), (100, 7)])
def test_global_batches_are_the_same_for_every_worker_count(images, batch):
    """The epoch plan does not depend on the worker count: the same global batches (as sets of
    images), the same number of steps, nothing repeated; shares differ by at most one image and
    their loss weights make each global batch's mean."""
    from placesnet.data.loaders import GlobalBatches

    plans = {}
    for world in (1, 2, 3, 5):
        ranks = [GlobalBatches(images, batch, rank, world, seed=7) for rank in range(world)]
        for r in ranks:
            r.set_epoch(2)
        assert len({len(r) for r in ranks}) == 1
        steps = [list(zip(*(iter(r) for r in ranks)))][0]
        plans[world] = [sorted(i for share in step for i in share) for step in steps]
        for s, shares in enumerate(steps):
            sizes = [len(share) for share in shares]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
            # DDP's mean of the ranks' weighted mean losses gives every image 1 / (global batch)
            for n in sizes:
                assert ranks[0].loss_weight(s, n) / (world * n) == pytest.approx(1 / sum(sizes))
    assert plans[1] == plans[2] == plans[3] == plans[5]
    seen = [i for step in plans[1] for i in step]
    assert len(seen) == len(set(seen)) >= images - batch / 2
    first = GlobalBatches(images, batch, 0, 1, seed=7)
    assert list(first) != list(GlobalBatches(images, batch, 0, 1, seed=8))  # the seed orders them
