"""--decode gpu (placesnet/gpudecode.py): the packing, the fallbacks and the values, on the CPU
(the same code with device="cpu" gives exactly the CPU path's values); nvJPEG itself on a GPU."""

import shutil

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.io import encode_png, read_file

from placesnet.config import TrainConfig, UserError
from placesnet.data import (MarkBadImages, ShardSampler, eval_transform, make_train_loader, open_split,
                            read_image_uint8, train_transform)
from placesnet.gpudecode import DeviceDecode, FileBytes, decode_batch, pack, unpack
from placesnet.worker import decode_on_gpu

CPU = torch.device("cpu")


@pytest.fixture
def mixed_copy(tiny_root, tiny_config, tmp_path):
    """The tiny sample in the Places365 layout with val image 2 a PNG, 3 a corrupt JPEG, 4 empty."""
    root = tmp_path / "p365"
    shutil.copytree(tiny_root, root)
    val = root / "val_256"
    png = read_image_uint8(str(val / "Places365_val_00000002.jpg"))
    (val / "Places365_val_00000002.jpg").write_bytes(bytes(encode_png(png).tolist()))  # named .jpg, is a PNG
    (val / "Places365_val_00000003.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50)
    (val / "Places365_val_00000004.jpg").write_bytes(b"")
    cfg = tiny_config.replace(dataset="places365", skip_verify=True, data_root=str(root))
    return cfg, open_split(cfg, "val", root), png


def test_a_batch_crosses_processes_as_one_buffer_and_unpacks_to_the_files(tiny_root, tiny_config):
    ds = open_split(tiny_config, "val", tiny_root)
    files = FileBytes(ds)
    buffer, offsets, targets, indices = pack([files[i] for i in (5, 0, 7)])
    assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and offsets.tolist()[0] == 0
    assert [bytes(f.tolist()) for f in unpack(buffer, offsets)] == \
        [open(ds.imgs[i][0], "rb").read() for i in (5, 0, 7)]
    assert targets.tolist() == [ds.imgs[i][1] for i in (5, 0, 7)] and indices.tolist() == [5, 0, 7]


@pytest.mark.parametrize("augment", [False, True])
def test_decoding_a_packed_batch_gives_the_cpu_paths_values(tiny_root, tiny_config, augment):
    ds = open_split(tiny_config, "train", tiny_root)
    transform = train_transform(32, augment)
    files = FileBytes(ds)
    torch.manual_seed(1)
    images, targets, slow = decode_batch(*pack([files[i] for i in range(6)]), CPU, transform, 32)
    torch.manual_seed(1)  # the same random crops and flips, drawn in the same order
    expected = torch.stack([transform(read_image_uint8(ds.imgs[i][0])) for i in range(6)])
    assert images.dtype == torch.uint8 and images.shape == (6, 3, 32, 32)
    assert torch.equal(images, expected) and slow == 0
    assert targets.tolist() == [ds.imgs[i][1] for i in range(6)]


def test_non_jpegs_and_broken_files_fall_back_and_only_the_broken_are_marked(mixed_copy):
    cfg, ds, png = mixed_copy
    files = FileBytes(ds)
    images, targets, slow = decode_batch(*pack([files[i] for i in range(6)]), CPU, eval_transform(32), 32)
    assert slow == 6  # the corrupt JPEG failed nvJPEG's batch: every file of it went one by one
    assert targets.tolist()[:1] + targets.tolist()[4:] == [ds.imgs[i][1] for i in (0, 4, 5)]
    assert targets.tolist()[1] == ds.imgs[1][1]  # the PNG decoded on the CPU
    assert torch.equal(images[1], eval_transform(32)(png))
    assert targets.tolist()[2:4] == [-3, -4]  # the corrupt and the empty file: -(index + 1)
    assert not images[2].any() and not images[3].any()
    assert torch.equal(images[0], eval_transform(32)(read_image_uint8(ds.imgs[0][0])))


def test_the_device_loader_yields_what_the_cpu_loader_does(mixed_copy, tiny_root, tiny_config):
    """Through real DataLoader processes: the packed path and the CPU path give the same batches,
    for validation (the bad files marked alike) and for training (the same seeded order)."""
    cfg, ds, _ = mixed_copy
    kw = dict(num_workers=2, persistent_workers=False)
    cpu = DataLoader(MarkBadImages(ds, 32), batch_size=8, sampler=ShardSampler(ds, 0, 1), **kw)
    notes = []
    gpu = DeviceDecode(DataLoader(FileBytes(ds), batch_size=8, sampler=ShardSampler(ds, 0, 1), collate_fn=pack,
                                  **kw), CPU, eval_transform(32), 32, notes.append)
    assert len(gpu) == len(cpu)
    for (a, ta), (b, tb) in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert gpu.slow == 8 and len(notes) == 1 and "PNG, CMYK or corrupt" in notes[0]
    train = open_split(tiny_config, "train", tiny_root)
    cpu = make_train_loader(MarkBadImages(train, 32), 32, 1, 2, seed=3, **kw)
    gpu = DeviceDecode(make_train_loader(FileBytes(train), 32, 1, 2, seed=3, collate_fn=pack, **kw), CPU,
                       eval_transform(32), 32)
    cpu.sampler.set_epoch(1), gpu.sampler.set_epoch(1)
    for (a, ta), (b, tb) in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)


def test_when_the_gpu_decodes():
    cfg = TrainConfig()
    assert not decode_on_gpu(cfg, CPU, None)  # auto on a CPU worker
    assert not decode_on_gpu(cfg.replace(decode="gpu"), CPU, None)
    with pytest.raises(UserError, match="--decode gpu is for --input loader"):
        cfg.replace(decode="gpu", input="ray-data").validate()
    with pytest.raises(UserError, match="unknown --decode"):
        cfg.replace(decode="nvjpeg").validate()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_matches_the_cpu_decoder_within_one_intensity_level(tiny_root, tiny_config):
    ds = open_split(tiny_config, "val", tiny_root)
    cuda = torch.device("cuda")
    assert decode_on_gpu(tiny_config, cuda, open_split(tiny_config, "train", tiny_root))  # auto: JPEGs
    files = FileBytes(ds)
    images, targets, slow = decode_batch(*pack([files[i] for i in range(16)]), cuda, eval_transform(256), 256)
    assert images.device.type == "cuda" and slow == 0
    expected = torch.stack([read_image_uint8(ds.imgs[i][0]) for i in range(16)])
    diff = (images.cpu().int() - expected.int()).abs()
    assert diff.max() <= 1, (diff.max(), diff.float().mean())
    assert read_file(ds.imgs[0][0]).numel() > 0
