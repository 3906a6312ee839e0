"""``--decode gpu``: loader processes only read file bytes; the training worker decodes each batch
with nvJPEG on its own GPU and resizes/crops there.

On an H200 a CPU thread decodes about 2.1k 256 px JPEGs/s and nvJPEG's batched decode 27-30k/s,
so with CPU decoding the GPU idles more than half of every epoch (issue #11). Bytes cross from the
loader processes as ONE packed uint8 buffer per batch plus offsets (:func:`pack`): a Python list
of small tensors would cost a file descriptor and a shared-memory segment per image, which made
a naive GPU-decode loader no faster than CPU decoding.

Values: nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by at most a few intensity levels
on some pixels; the transforms after it are the CPU path's own (``data.eval_transform`` /
``data.train_transform``) run on the GPU. On a CPU device the same code gives exactly the CPU
path's values (tested), which is how the packing and the fallbacks are tested without a GPU.

Files nvJPEG cannot take: non-JPEG files (PNG, GIF, ...) are decoded on the CPU, per file, and
copied over; if nvJPEG rejects a batch (a corrupt or CMYK JPEG), that batch's files are decoded
one by one, on the device and else on the CPU, so only the broken file is marked bad (target
``-(index + 1)``, as :class:`data.MarkBadImages`) and ``--bad-images`` decides about it.
"""

from __future__ import annotations

import threading

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

JPEG_MAGIC = b"\xff\xd8\xff"
# A Serve replica decodes requests in several threads; its GPU's decoder takes one call at a time
# (the header checks and CPU fallbacks of decode_uploads stay outside the lock).
_DEVICE_DECODE = threading.Lock()


class FileBytes(Dataset):
    """``(bytes as a uint8 tensor, target, index)`` per list row of a Places365 split; an
    unreadable file gives no bytes (and is marked bad after decoding)."""

    def __init__(self, dataset) -> None:
        self.samples = dataset.imgs

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            data = read_file(path)
        except (RuntimeError, OSError):
            data = torch.empty(0, dtype=torch.uint8)
        return data, target, index


def pack(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """DataLoader ``collate_fn``: a batch of :class:`FileBytes` samples as one uint8 buffer, the
    int64 offsets of each file in it (B + 1), the targets and the list indices."""
    sizes = torch.tensor([len(data) for data, _, _ in samples], dtype=torch.int64)
    offsets = torch.zeros(len(samples) + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=offsets[1:])
    buffer = torch.cat([data for data, _, _ in samples]) if samples else torch.empty(0, dtype=torch.uint8)
    targets = torch.tensor([target for _, target, _ in samples], dtype=torch.int64)
    indices = torch.tensor([index for _, _, index in samples], dtype=torch.int64)
    return buffer, offsets, targets, indices


def unpack(buffer: torch.Tensor, offsets: torch.Tensor) -> list[torch.Tensor]:
    """The files of a packed batch, as views into ``buffer``."""
    bounds = offsets.tolist()
    return [buffer[start:end] for start, end in zip(bounds, bounds[1:])]


def is_jpeg(data: torch.Tensor) -> bool:
    return len(data) >= 3 and bytes(data[:3].tolist()) == JPEG_MAGIC


def _decode_on_cpu(data: torch.Tensor) -> torch.Tensor | None:
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    if device.type == "cuda":
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # e.g. a CMYK JPEG nvJPEG does not take: libjpeg-turbo may
    image = _decode_on_cpu(data)
    return None if image is None else image.to(device)


def decode_files(files: list[torch.Tensor], device: torch.device) -> tuple[list[torch.Tensor | None], int]:
    """Each file decoded to a uint8 (3, H, W) RGB image on ``device`` (None if it cannot be), and
    how many files left nvJPEG's batch path: the JPEGs go to nvJPEG as one batch (one by one if it
    rejects the batch), every other file to the CPU decoder."""
    images: list[torch.Tensor | None] = [None] * len(files)
    jpegs = [i for i, data in enumerate(files) if is_jpeg(data)]
    slow = len(files) - len(jpegs)
    if jpegs:
        try:
            decoded = decode_jpeg([files[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the whole batch: find it
            decoded = [_decode_one(files[i], device) for i in jpegs]
            slow = len(files)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    batched = set(jpegs)
    for i, data in enumerate(files):
        if i not in batched:
            image = _decode_on_cpu(data)
            images[i] = None if image is None else image.to(device, non_blocking=True)
    return images, slow


def decode_batch(
    buffer: torch.Tensor,
    offsets: torch.Tensor,
    targets: torch.Tensor,
    indices: torch.Tensor,
    device: torch.device,
    transform,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Decode a packed batch on ``device``: (uint8 (B, 3, S, S) images on ``device``, CPU targets
    with undecodable files marked ``-(index + 1)``, how many files left nvJPEG's batch path).

    ``transform`` maps one decoded (3, H, W) uint8 image to (3, ``size``, ``size``): the CPU
    path's transform.
    """
    images, slow = decode_files(unpack(buffer, offsets), device)
    targets = targets.clone()
    out = []
    for i, image in enumerate(images):
        if image is None:
            targets[i] = -(int(indices[i]) + 1)
            out.append(None)
        else:
            out.append(transform(image))
    blank = torch.zeros((3, size, size), dtype=torch.uint8, device=device)
    return torch.stack([blank if o is None else o for o in out]), targets, slow


def decode_uploads(
    uploads: list[bytes], device: torch.device, transform, max_pixels: int
) -> list[torch.Tensor | Exception]:
    """The Serve endpoint's decode on a GPU replica: each uploaded image as ``transform``'s uint8
    (3, S, S) tensor on ``device``, or the :class:`~placesnet.images.BadImage` that says why not.

    Every upload's header is read first (PIL, no pixel decoded), so an image over ``max_pixels``
    is refused before any decoding. Complete 8-bit JPEGs in RGB or grayscale go to nvJPEG
    together (:func:`decode_files`); anything else (PNG, WebP, CMYK or truncated JPEGs, ...) and
    any file nvJPEG rejects is decoded by :func:`~placesnet.images.decode_image`, the CPU path of
    ``predict.py``, so its verdicts and messages are the same.
    """
    import io

    from PIL import Image

    from placesnet.images import BadImage, decode_image

    def nvjpeg_can_take(data: bytes) -> bool:
        # no end-of-image marker: truncated, or trailing bytes; PIL's verdict, not nvJPEG's guess
        if not data.startswith(JPEG_MAGIC) or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return False
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                return (
                    img.format == "JPEG"
                    and img.mode in ("RGB", "L")
                    and img.size[0] * img.size[1] <= max_pixels
                )
        except Exception:  # noqa: BLE001 (anything PIL cannot read: decode_image says what)
            return False

    def on_cpu(data: bytes):
        try:
            return transform(decode_image(data, max_pixels)).to(device, non_blocking=True)
        except BadImage as e:
            return e

    out: list = [None] * len(uploads)
    fast = [i for i, data in enumerate(uploads) if nvjpeg_can_take(data)]
    if fast:
        with _DEVICE_DECODE:
            decoded, _ = decode_files(
                [torch.frombuffer(bytearray(uploads[i]), dtype=torch.uint8) for i in fast], device
            )
        for i, image in zip(fast, decoded):
            out[i] = on_cpu(uploads[i]) if image is None else transform(image)
    for i, data in enumerate(uploads):
        if out[i] is None:
            out[i] = on_cpu(data)
    return out


class DeviceDecode:
    """A DataLoader of packed :class:`FileBytes` batches that yields ``(images on device, targets)``
    like the CPU path's loader, decoding each batch on ``device`` (see :func:`decode_batch`)."""

    def __init__(self, loader, device: torch.device, transform, size: int, warn=None) -> None:
        self.loader, self.device, self.transform, self.size, self.warn = loader, device, transform, size, warn
        self.batch_sampler = loader.batch_sampler
        self.slow = 0  # files that left the batched nvJPEG path (CPU fallback or per-file retries)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        warned = False
        for buffer, offsets, targets, indices in self.loader:
            images, targets, slow = decode_batch(
                buffer, offsets, targets, indices, self.device, self.transform, self.size
            )
            self.slow += slow
            if slow and self.warn and not warned:
                warned = True
                self.warn(
                    f"--decode gpu: {slow} file(s) of a batch of {len(targets)} were not plain "
                    "JPEGs nvJPEG could batch (PNG, CMYK or corrupt); they were decoded one by "
                    "one, the CPU decoding the non-JPEGs"
                )
            yield images, targets
