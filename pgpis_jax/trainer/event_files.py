"""TensorBoard event files written without TensorFlow, which takes about 3 s to import and which a run that reads no
data through tf.data (the toy) does not otherwise need.

An event file is a sequence of TFRecord-framed `Event` protos (tensorboard's own protos and record framing); its name
contains "tfevents", which is how TensorBoard finds it. Scalars are written as float32 `simple_value`s, images as
PNG-encoded `Summary.Image`s; TensorBoard shows both on its Scalars and Images dashboards.
"""

from __future__ import annotations

import io
import os
import socket
import time
from typing import Any, Mapping

import numpy as np
from etils import epath
from PIL import Image
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

FILE_VERSION = "brain.Event:2"


def _png(image: np.ndarray, tag: str) -> bytes:
    """PNG bytes of a uint8 [H, W, C] image (C = 1, 3 or 4)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image {tag!r}: expected uint8 [H, W, C] with C = 1, 3 or 4, got {image.dtype} "
                         f"{list(image.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


class EventFileWriter:
    """Writes scalars and images for TensorBoard into a new event file in `logdir` (a local path or any path
    etils.epath opens, such as gs://); an existing file is never appended to or replaced. Events reach the file at
    `flush`, `close`, and after a write once `flush_every_seconds` have passed since the last flush (as TensorFlow's
    writer, which waits 120 s: a flush uploads the whole file again on gs://)."""

    def __init__(self, logdir: epath.Path, flush_every_seconds: float = 30.0):
        logdir = epath.Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        stem = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = logdir / stem
        suffix = 0
        while self.path.exists():
            suffix += 1
            self.path = logdir / f"{stem}.{suffix}"
        self._records = RecordWriter(self.path.open("wb"))
        self._flush_every_seconds, self._last_flush = flush_every_seconds, time.monotonic()
        self._write(Event(wall_time=time.time(), file_version=FILE_VERSION))
        self.flush()

    def _write(self, event) -> None:
        self._records.write(event.SerializeToString())
        if time.monotonic() - self._last_flush >= self._flush_every_seconds:
            self.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One event at `step` holding every scalar (stored as float32)."""
        values = [Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()]
        self._write(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """One event at `step`: for each name, uint8 images [N, H, W, C] (C = 1, 3 or 4), tagged `name` when N = 1,
        else `name/0` ... `name/{N-1}`."""
        values = []
        for name, batch in images.items():
            batch = np.asarray(batch)
            for index, image in enumerate(batch):
                tag = name if len(batch) == 1 else f"{name}/{index}"
                png = _png(image, tag)
                encoded = Summary.Image(height=image.shape[0], width=image.shape[1], colorspace=image.shape[2],
                                        encoded_image_string=png)
                values.append(Summary.Value(tag=tag, image=encoded))
        self._write(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))

    def flush(self) -> None:
        self._records.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._records.close()
