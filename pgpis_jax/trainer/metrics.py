"""What a run reports: metric writers (TensorBoard event files, written without TensorFlow: trainer/event_files.py),
a console progress line with ETA, sample grids, NaN guard.

Process 0 writes TensorBoard events to <workdir>/tensorboard and every logged scalar to
<workdir>/metrics.jsonl (one JSON object per log step, floats at full precision; a resumed run appends),
and prints a progress line. Scalars: train/loss, train/grad_norm, train/learning_rate, train/<aux> (means
over the steps since the previous log), perf/step_time_s, perf/images_per_sec_per_device,
perf/device_memory_gb and perf/device_peak_memory_gb (where the backend reports memory).
"""

from __future__ import annotations

import io
import json
import logging as pylogging
import math
import time
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np
from absl import logging
from etils import epath

from pgpis_jax.errors import UserError
from pgpis_jax.trainer.event_files import EventFileWriter


class _NoOpWriter:
    """Base for writers that only handle some kinds of values (the calls a run makes of its writers)."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        pass

    def write_images(self, step: int, images: Mapping[str, Any]):
        pass

    def flush(self):
        pass

    def close(self):
        pass


class Writers(_NoOpWriter):
    """Every call passed on to each of `writers` in order."""

    def __init__(self, writers):
        self._writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for writer in self._writers:
            writer.write_scalars(step, scalars)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for writer in self._writers:
            writer.write_images(step, images)

    def flush(self):
        for writer in self._writers:
            writer.flush()

    def close(self):
        for writer in self._writers:
            writer.close()


class JsonlWriter(_NoOpWriter):
    """Appends {"step": s, name: value, ...} lines to a local file (floats round-trip exactly)."""

    def __init__(self, path: epath.Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+b")
        self._file.seek(0, 2)
        if self._file.tell():  # a run killed mid-line must not glue its fragment to our first line
            self._file.seek(-1, 2)
            if self._file.read(1) != b"\n":
                self._file.write(b"\n")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write((json.dumps(record) + "\n").encode())
        self._file.flush()

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


class ConsoleWriter(_NoOpWriter):
    """Scalars as one progress line on stdout (process 0): step, loss, lr, grad norm, throughput, ETA."""

    def __init__(self, progress: "Progress"):
        self._progress = progress

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        console(self._progress.line(step, {k: float(v) for k, v in scalars.items()}))


def read_jsonl(path) -> Dict[int, Dict[str, float]]:
    """{step: record} from a metrics.jsonl; a later line for a step (a resumed run) replaces an earlier one;
    broken lines (a killed writer) are skipped."""
    records = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[int(record["step"])] = record
    return records


def make_writer(workdir: str, config) -> Writers:
    """TensorBoard + metrics.jsonl on process 0 (nothing on the others; the console line is separate)."""
    writers = []
    if jax.process_index() == 0:
        root = epath.Path(workdir)
        if config.logging.tensorboard:
            writers.append(EventFileWriter(root / "tensorboard"))
        if not str(workdir).startswith("gs://"):
            writers.append(JsonlWriter(root / "metrics.jsonl"))
    return Writers(writers)


def device_memory() -> Dict[str, float]:
    """Bytes in use / peak on this process's first device, in GB, where the backend reports them (GPU,
    TPU; not CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001
        stats = {}
    out = {}
    if "bytes_in_use" in stats:
        out["perf/device_memory_gb"] = stats["bytes_in_use"] / 1e9
    if "peak_bytes_in_use" in stats:
        out["perf/device_peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9
    return out


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    """Step timing and the console line: step, loss, lr, throughput, ETA."""

    def __init__(self, first_step: int, total_steps: int, global_batch: int, num_devices: int):
        self.total = total_steps
        self.global_batch = global_batch
        self.num_devices = num_devices
        self._window_start = (first_step, time.perf_counter())
        self._run_start: Optional[tuple] = None   # after the first step (which includes any warm-up)

    def step_done(self, step: int) -> None:
        if self._run_start is None:
            self._run_start = (step, time.perf_counter())

    def restart_window(self, step: int) -> None:
        """Excludes what happened since the last window (a checkpoint save, a sample grid) from the next."""
        self._window_start = (step, time.perf_counter())

    def window(self, step: int) -> Dict[str, float]:
        """perf/* scalars for the steps since the previous call; starts the next window."""
        now = time.perf_counter()
        first, start = self._window_start
        steps = max(step - first, 1)
        seconds = max(now - start, 1e-9)
        self._window_start = (step, now)
        return {"perf/step_time_s": seconds / steps,
                "perf/images_per_sec_per_device": self.global_batch * steps / seconds / self.num_devices}

    def eta_seconds(self, step: int) -> float:
        if self._run_start is None or step <= self._run_start[0]:
            return float("nan")
        done, start = self._run_start
        return (self.total - step) * (time.perf_counter() - start) / (step - done)

    def line(self, step: int, scalars: Mapping[str, float]) -> str:
        parts = [f"step {step}/{self.total} ({100.0 * step / self.total:.1f}%)"]
        if "train/loss" in scalars:
            parts.append(f"loss {scalars['train/loss']:.6g}")
        if "train/learning_rate" in scalars:
            parts.append(f"lr {scalars['train/learning_rate']:.3g}")
        if "train/grad_norm" in scalars:
            parts.append(f"grad norm {scalars['train/grad_norm']:.3g}")
        if "perf/images_per_sec_per_device" in scalars:
            parts.append(f"{scalars['perf/images_per_sec_per_device']:.1f} img/s/device")
        if "perf/step_time_s" in scalars:
            parts.append(f"{1000 * scalars['perf/step_time_s']:.1f} ms/step")
        if "perf/device_memory_gb" in scalars:
            parts.append(f"mem {scalars['perf/device_memory_gb']:.2f} GB")
        parts.append(f"ETA {format_seconds(self.eta_seconds(step))}")
        return " | ".join(parts)


def console(message: str) -> None:
    """One line on stdout, from process 0."""
    if jax.process_index() == 0:
        print(message, flush=True)


class _LibraryInfoFilter(pylogging.Filter):
    """Drops INFO/DEBUG records of orbax (a dozen lines per checkpoint); warnings and errors pass."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/")


_FILTER = _LibraryInfoFilter()


def quiet_library_logs() -> None:
    for target in (logging.get_absl_handler(), pylogging.getLogger("absl")):
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


# ---------------------------------------------------------------------------------------------------------
# NaN / Inf guard

class NonFiniteLoss(UserError):
    """The loss or gradient norm stopped being finite; the run stops without saving."""


def check_finite(step: int, metrics: Mapping[str, Any], last_checkpoint: Optional[int], checkpoint_dir) -> None:
    """Raises NonFiniteLoss naming the step and values if loss or gradient norm is NaN / Inf."""
    loss = float(metrics["loss"])
    grad_norm = float(metrics["grad_norm"])
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    where = (f"The last checkpoint (step {last_checkpoint}) in {checkpoint_dir} is intact and was not overwritten; "
             "rerunning the same command resumes from it" if last_checkpoint is not None
             else "No checkpoint had been written yet")
    raise NonFiniteLoss(f"train/loss is {loss} and the gradient norm is {grad_norm} at step {step}; stopped "
                        f"without saving. {where} (if it recurs: lower config.optimizer.learning_rate, set "
                        "config.grad.clip_norm, or use float32)")


# ---------------------------------------------------------------------------------------------------------
# Sample grids

def image_grid(images: np.ndarray, columns: Optional[int] = None, pad: int = 1) -> np.ndarray:
    """[N, H, W, C] in [0, 1] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] grid."""
    images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, c = images.shape
    columns = columns or int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / columns))
    grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return (grid * 255.0 + 0.5).astype(np.uint8)


def save_png(path: epath.Path, grid: np.ndarray, min_size: int = 256) -> None:
    from PIL import Image

    image = Image.fromarray(grid)
    scale = max(1, min_size // max(grid.shape[:2]))
    if scale > 1:
        image = image.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f"{path.name}.tmp"   # written under a temporary name, then renamed
    temporary.write_bytes(buffer.getvalue())
    temporary.replace(path)
