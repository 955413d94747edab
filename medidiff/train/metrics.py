"""Training metrics: the JSONL log, the final autoencoder evaluation, and the progress bar.

``metrics.jsonl`` holds one JSON object per ``log_every`` steps: ``step``, ``stage``, ``loss`` (mean of
the window's finite steps, ``null`` if none), ``lr``, ``grad_norm`` (last step), ``skipped`` (total
so far), ``seconds`` (since this call of ``train`` started) and the stage's loss parts (``l1``,
``kl``, ``psnr``, ``g_adv``, ``d_loss`` / ``mse``), averaged over the window.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medidiff.io.atomic import atomic_write_text
from medidiff.train import ddp
from medidiff.train.losses import psnr
from medidiff.train.precision import Precision, autocast_context, resolve_precision
from medidiff.train.steps import StageModules

__all__ = [
    "METRICS_FILE",
    "append_jsonl",
    "evaluate_autoencoder",
    "metrics_row",
    "progress_bar",
    "read_metrics",
    "truncate_metrics",
]

METRICS_FILE = "metrics.jsonl"


@torch.no_grad()
def evaluate_autoencoder(
    autoencoder: nn.Module,
    data: Iterable[Any],
    *,
    n_batches: int,
    device: str | torch.device = "cpu",
    precision: Precision | None = None,
    dist: ddp.DistInfo | None = None,
) -> dict[str, float]:
    """Reconstruction PSNR (dB, per-sample range) and L1 of an autoencoder, decoding the posterior mean.

    Args:
        autoencoder: MONAI ``AutoencoderKL`` (e.g. ``load_models(ckpt).autoencoder`` or EMA weights).
        data: batch dicts with ``"image"``; the first ``n_batches`` are used.
        n_batches: how many batches.
        device: where to run.
        precision: autocast policy (default fp32).
        dist: pool the averages over DDP ranks (every rank must call).

    Returns:
        ``{"psnr": ..., "l1": ..., "n": samples}`` averaged over samples; ``{}`` if there were none.
    """
    ae: Any = autoencoder
    dev = torch.device(device)
    prec = precision if precision is not None else resolve_precision("fp32", dev)
    sums = torch.zeros(3, dtype=torch.float64)
    for i, raw in enumerate(data):
        if i >= n_batches:
            break
        if not isinstance(raw, Mapping) or not isinstance(raw.get("image"), torch.Tensor):
            raise TypeError("evaluation batches must be dicts with an 'image' tensor")
        x = raw["image"].to(device=dev, dtype=torch.float32)
        with autocast_context(prec, dev):
            z_mu, _ = ae.encode(x)
            recon = ae.decode(z_mu)
        recon = recon.float()
        per_sample = psnr(recon, x, reduction="none")
        l1 = (recon - x).abs().flatten(1).mean(1)
        sums += torch.tensor(
            [float(x.shape[0]), float(per_sample.sum()), float(l1.sum())], dtype=torch.float64
        )
    if dist is not None:
        sums = ddp.all_reduce_sum(sums, dist)
    n = float(sums[0])
    if n == 0:
        return {}
    return {"psnr": float(sums[1]) / n, "l1": float(sums[2]) / n, "n": n}


def finite_or_none(v: float) -> float | None:
    """``v``, or ``None`` if it is NaN or infinite (strict JSON has neither)."""
    return v if math.isfinite(v) else None


def metrics_row(
    step: int, lr: float, window: list[dict[str, float]], m: StageModules, seconds: float
) -> dict[str, Any]:
    """The metrics row after ``step`` steps from the per-step values of the ``window`` since the last row."""
    row: dict[str, Any] = {"step": step, "stage": m.stage}
    keys = sorted({k for w in window for k in w})
    means = {k: float(np.mean([w[k] for w in window if k in w])) for k in keys}
    row["loss"] = finite_or_none(means.pop("loss", math.nan))
    row["lr"] = lr
    row["grad_norm"] = finite_or_none(window[-1]["grad_norm"]) if window else None
    means.pop("grad_norm", None)
    row["skipped"] = m.total_skips
    row["seconds"] = round(seconds, 3)  # since this call of train() started
    row.update({k: finite_or_none(v) for k, v in means.items()})
    return row


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one row to a JSONL file with a single write.

    The metrics log is the one file appended rather than replaced: a crash can only tear the
    last line, and resuming rewrites the file (atomically) up to the checkpoint's step.
    """
    line = (json.dumps(row, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a torn last line is ignored)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows up to ``step`` (those the checkpoint saw); drop what a crashed run added after."""
    if not path.exists():
        return
    rows = [r for r in read_metrics(path) if int(r.get("step", 0)) <= step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


@contextlib.contextmanager
def progress_bar(show: bool, stage: str, start: int, end: int) -> Iterator[tuple[Any, Any]]:
    """A rich progress bar from ``start`` to ``end`` steps: yields ``(progress, task)``, or ``(None, None)``
    when ``show`` is false. Update with ``progress.update(task, advance=1, loss="...")``."""
    if not show:
        yield None, None
        return
    if not sys.stdout.isatty():  # batch logs (a scheduler, a worker, nohup): a line every so often
        lines = LineProgress(stage, start, end)
        try:
            yield lines, stage
        finally:
            lines.close()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(f"[bold]train {stage}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        yield progress, progress.add_task(stage, total=end, completed=start, loss="-")


class LineProgress:
    """The progress bar's stand-in where stdout is not a terminal: one plain line per ``every_s`` seconds
    (and at the end) with the step, the recent loss, the speed and the time left, flushed at once."""

    def __init__(self, stage: str, start: int, end: int, *, every_s: float = 30.0, clock: Any = None) -> None:
        self.stage, self.step, self.end, self.every_s = stage, start, end, every_s
        self.clock = clock or time.monotonic
        self.t0 = self.last = self.clock()
        self.start = start
        self.loss = "-"

    def update(self, task: Any = None, *, advance: int = 1, loss: str | None = None, **_: Any) -> None:
        self.step += advance
        self.loss = loss if loss is not None else self.loss
        if self.clock() - self.last >= self.every_s:
            self.emit()

    def emit(self) -> None:
        now = self.clock()
        done = self.step - self.start
        rate = (now - self.t0) / done if done else float("nan")
        left = (self.end - self.step) * rate if done else float("nan")
        print(
            f"train {self.stage}: step {self.step}/{self.end}, loss {self.loss}, {rate:.2f} s/step, "
            f"{left / 60:.1f} min left",
            flush=True,
        )
        self.last = now

    def close(self) -> None:
        if self.step > self.start:
            self.emit()
