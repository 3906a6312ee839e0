"""TensorBoard event files for a training run, next to metrics.csv (``<run>/tensorboard/``).

    tensorboard --logdir ~/ray_results            # every run, each its own colour
    tensorboard --logdir ~/ray_results/<run>/tensorboard

The Train controller rewrites one event file from the run's whole history after every epoch (as
it does metrics.csv), so a restarted or resumed run never shows an epoch twice, and the file can
live on any storage Ray writes to (local, NFS, s3://). Wall times are the run's cumulative epoch
times, so TensorBoard's "relative" axis is training time and the file's bytes depend only on the
history: each rewrite extends the previous one, which a running TensorBoard reads on.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

TB_DIR = "tensorboard"
TB_FILE = "events.out.tfevents.placesnet"  # TensorBoard reads any file with "tfevents" in its name

# metrics.csv column -> TensorBoard tag (train and val of one quantity share a chart section)
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_top1": "top1/train",
    "val_top1": "top1/val",
    "val_top5": "top5/val",
    "lr": "optim/lr",
    "images_per_s": "speed/images_per_s",
    "epoch_time_s": "speed/epoch_time_s",
}
_START = 1_700_000_000.0  # a fixed origin for wall times, so the bytes are reproducible


def event_file_bytes(history: list[dict]) -> bytes:
    """One TensorBoard event file with a scalar per TAGS column per epoch (step = epoch)."""
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory(prefix="placesnet-tb-") as tmp:
        writer = SummaryWriter(tmp, flush_secs=3600)
        clock = _START
        for row in history:
            clock += float(row.get("epoch_time_s", 0.0) or 0.0)
            for column, tag in TAGS.items():
                if column in row and row[column] == row[column]:  # skip missing and NaN
                    writer.add_scalar(tag, float(row[column]), int(row["epoch"]), walltime=clock)
        writer.close()
        (path,) = Path(tmp).glob("events.out.tfevents.*")
        data = bytearray(path.read_bytes())
    # The first record is the file-version header, stamped with the time of writing: give it the
    # fixed origin instead, so rewriting the same history gives the same bytes.
    return _restamp_header(bytes(data))


def _restamp_header(data: bytes) -> bytes:
    import struct

    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    (length,) = struct.unpack("<Q", data[:8])
    event = event_pb2.Event.FromString(data[12 : 12 + length])
    event.wall_time = _START
    body = event.SerializeToString()
    if len(body) != length:  # wall_time is a fixed-size double; never expected
        return data
    header = struct.pack("<Q", length)
    record = header + struct.pack("<I", masked_crc32c(header)) + body + struct.pack("<I", masked_crc32c(body))
    return record + data[12 + length + 4 :]
