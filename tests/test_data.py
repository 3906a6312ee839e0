"""The sample generator writes the real Places365 layout, read by torchvision's own class."""

import hashlib
import os
import shutil

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets import Places365

from placesnet.config import TrainConfig, UserError
from placesnet.data import (Places365Copy, ShardSampler, class_names, eval_transform, open_split,
                            resolve_data_root)
from placesnet.sample import digest, official_categories, write_sample


def test_bundled_categories_are_the_official_file():
    from importlib import resources

    data = resources.files("placesnet.assets").joinpath("categories_places365.txt").read_bytes()
    assert hashlib.md5(data).hexdigest() == "06c963b85866bd0649f97cb43dd16673"
    assert len(official_categories()) == 365


def test_layout_read_by_torchvision_places365(tiny_root, tiny_config):
    for rel in ["categories_places365.txt", "places365_train_standard.txt", "places365_val.txt",
                "data_256_standard/b/beach/00000001.jpg", "val_256/Places365_val_00000001.jpg"]:
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
    assert (a / "val_256/Places365_val_00000003.jpg").read_bytes() == \
        (b / "val_256/Places365_val_00000003.jpg").read_bytes()


def test_eval_transform_matches_the_workshop_pipeline(tiny_root):
    workshop = T.Compose([T.Resize(256), T.ToTensor(), T.Normalize((0.5,), (0.5,))])
    img = Image.open(tiny_root / "val_256/Places365_val_00000001.jpg").convert("RGB")
    torch.testing.assert_close(eval_transform(256)(img), workshop(img))


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
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "placesnet", "assets",
                             "categories_places365.txt"), root / "categories_places365.txt")
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
