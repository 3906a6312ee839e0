"""--decode gpu (placesnet/data/gpudecode.py): the packing, the fallbacks and the values, on the CPU
(the same code with device="cpu" gives exactly the CPU path's values); nvJPEG itself on a GPU."""

import shutil

import pytest
import torch
from conftest import untrained_checkpoint
from torch.utils.data import DataLoader
from torchvision.io import encode_png, read_file

from placesnet.config import TrainConfig, UserError
from placesnet.data.gpudecode import DeviceDecode, FileBytes, decode_batch, pack, unpack
from placesnet.data.loaders import ShardSampler, make_train_loader
from placesnet.data.places import MarkBadImages, open_split, read_image_uint8
from placesnet.data.transforms import eval_transform, normalize, train_transform
from placesnet.launch.worker import decode_on_gpu

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
    assert [bytes(f.tolist()) for f in unpack(buffer, offsets)] == [
        open(ds.imgs[i][0], "rb").read() for i in (5, 0, 7)
    ]
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
    gpu = DeviceDecode(
        DataLoader(FileBytes(ds), batch_size=8, sampler=ShardSampler(ds, 0, 1), collate_fn=pack, **kw),
        CPU,
        eval_transform(32),
        32,
        notes.append,
    )
    assert len(gpu) == len(cpu)
    for (a, ta), (b, tb) in zip(cpu, gpu, strict=True):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    assert gpu.slow == 8 and len(notes) == 1 and "PNG, CMYK or corrupt" in notes[0]
    train = open_split(tiny_config, "train", tiny_root)
    cpu = make_train_loader(MarkBadImages(train, 32), 32, 1, 2, seed=3, **kw)
    gpu = DeviceDecode(
        make_train_loader(FileBytes(train), 32, 1, 2, seed=3, collate_fn=pack, **kw),
        CPU,
        eval_transform(32),
        32,
    )
    cpu.batch_sampler.set_epoch(1), gpu.batch_sampler.set_epoch(1)
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


@pytest.mark.gpu
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


def _serving_uploads(tiny_root) -> dict[str, bytes]:
    """What clients send the endpoint: photos of several sizes and modes, and broken files."""
    import io

    import numpy as np
    from PIL import Image

    def encode(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    # a smooth "photo" (gradients + noise), not square, larger than the model's 32 px
    yy, xx = np.mgrid[0:180, 0:250]
    photo = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1) + rng.integers(0, 40, (180, 250, 3))
    photo = Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8))
    sample = (tiny_root / "val_256/Places365_val_00000001.jpg").read_bytes()
    return {
        "sample": sample,
        "photo": encode(photo, "JPEG", quality=90),
        "progressive": encode(photo, "JPEG", quality=75, progressive=True),
        "gray": encode(photo.convert("L"), "JPEG"),
        "cmyk": encode(photo.convert("CMYK"), "JPEG"),
        "png": encode(photo, "PNG"),
        "truncated": sample[: len(sample) // 2],
        "garbage jpeg": b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50 + b"\xff\xd9",
        "text": b"not an image at all",
        "huge": encode(Image.new("RGB", (400, 300)), "JPEG"),  # over the max_pixels given below
    }


def test_serving_uploads_decode_like_predict_py_and_are_refused_alike(tiny_root):
    """gpudecode.decode_uploads (a GPU replica's decode, here on the CPU): the same (3, S, S)
    uint8 tensors as predict.py's path (PIL decode_image + the eval transform) within one
    intensity level, and the same BadImage messages for what it refuses, in the order given."""
    from placesnet.data.gpudecode import decode_uploads
    from placesnet.images import BadImage, decode_image

    uploads, transform, limit = _serving_uploads(tiny_root), eval_transform(32), 100_000
    got = dict(zip(uploads, decode_uploads(list(uploads.values()), CPU, transform, limit), strict=True))
    for name, data in uploads.items():
        try:
            expected = transform(decode_image(data, limit))
        except BadImage as e:
            assert isinstance(got[name], BadImage) and str(got[name]) == str(e), (name, got[name])
            continue
        assert isinstance(got[name], torch.Tensor) and got[name].shape == (3, 32, 32), (name, got[name])
        assert (got[name].int() - expected.int()).abs().max() <= 1, name
    refused = {name for name, item in got.items() if isinstance(item, BadImage)}
    assert refused == {"truncated", "garbage jpeg", "text", "huge"}
    assert "over the limit" in str(got["huge"]) and "not a recognised" in str(got["text"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serving_uploads_on_the_gpu_match_the_cpu_and_give_the_same_predictions(tiny_root):
    from placesnet.data.gpudecode import decode_uploads
    from placesnet.model import build_model

    uploads, transform = list(_serving_uploads(tiny_root).values()), eval_transform(32)
    cpu = decode_uploads(uploads, CPU, transform, 100_000)
    gpu = decode_uploads(uploads, torch.device("cuda"), transform, 100_000)
    good = [i for i, item in enumerate(cpu) if isinstance(item, torch.Tensor)]
    assert [i for i, item in enumerate(gpu) if isinstance(item, torch.Tensor)] == good
    a, b = torch.stack([cpu[i] for i in good]), torch.stack([gpu[i] for i in good]).cpu()
    assert (a.int() - b.int()).abs().max() <= 3  # nvJPEG's IDCT/upsampling vs libjpeg-turbo's
    torch.manual_seed(0)
    model = build_model(TrainConfig(image_size=32), 365).eval()
    with torch.inference_mode():
        pa, pb = (torch.softmax(model(normalize(x)), 1) for x in (a, b))
    assert torch.allclose(pa, pb, atol=2e-2) and torch.equal(pa.argmax(1), pb.argmax(1))


def test_a_gpu_replica_sends_a_requests_uploads_through_one_device_decode(tiny_config, tiny_root, tmp_path):
    """placesnet/serve/replica.py with gpu_decode on (forced here on a CPU; a replica turns it on
    only with a GPU): a multi-image request's uploads go to decode_uploads as ONE batch, the
    answers come in the request's order and match the CPU replica's, broken files get the CPU
    path's status."""
    import asyncio

    from placesnet.serve.errors import ClientError
    from placesnet.serve.options import ServeOptions
    from placesnet.serve.replica import Replica, Upload

    untrained_checkpoint(tmp_path / "ckpt", tiny_config)
    options = ServeOptions(num_cpus=1, max_pixels=100_000, max_batch_size=4)
    cpu, dev = Replica(str(tmp_path / "ckpt"), options), Replica(str(tmp_path / "ckpt"), options)
    assert not cpu.gpu_decode  # no GPU here
    dev.gpu_decode, batches = True, []
    device_decode = dev._decode_on_device
    dev._decode_on_device = lambda uploads, model: (
        batches.append(len(uploads)) or device_decode(uploads, model)
    )
    files = [Upload(*item) for item in [*_serving_uploads(tiny_root).items(), ("empty", b"")]]
    a, b = (asyncio.run(r.predict(files, 3)) for r in (cpu, dev))
    assert batches == [len(files) - 1]  # every non-empty upload in one device batch
    assert [r.name for r in b.results] == [name for name, _ in files]
    for ra, rb in zip(a.results, b.results, strict=True):
        assert (ra.status, ra.error) == (rb.status, rb.error), (ra, rb)
        if ra.predictions is not None:
            assert [p["label"] for p in ra.predictions] == [p["label"] for p in rb.predictions]
            assert [p["probability"] for p in ra.predictions] == pytest.approx(
                [p["probability"] for p in rb.predictions], abs=1e-3
            )
    assert sum(r.predictions is not None for r in b.results) == 6
    # one image per request: the same route, one upload per device batch
    assert (dev._preprocess(files[1].data).int() - cpu._preprocess(files[1].data).int()).abs().max() <= 1
    with pytest.raises(ClientError) as refused:
        dev._preprocess(b"not an image at all")
    assert refused.value.status == 415 and batches[-1] == 1
