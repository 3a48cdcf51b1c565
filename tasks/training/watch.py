"""Training progress on the driver's terminal: one line per finished epoch (epoch, losses, samples/s, ETA).

The workers' own output stays in Ray's logs (``tasks.io.cluster``: copied to the driver it comes with Ray
Train's bookkeeping lines, once per rank). The rank-0 worker already logs every epoch's metrics to the
run's MLflow store, so the driver reads them from there while ``TorchTrainer.fit`` blocks: a daemon
thread polls the run every ``every`` seconds and prints each new epoch once, on stderr, so it shows
in a terminal, in ``make demo`` and in a Prefect worker's log alike.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from mlflow.tracking import MlflowClient

# Per-epoch metrics that are not losses: shown separately or not at all.
NOT_LOSSES = ("step", "epoch_seconds", "samples_per_s", "first_batch_seconds", "data_open_seconds")


def line(epoch: int, epochs: int, metrics: dict[str, float], eta: float) -> str:
    """``condgen train: epoch 3/10 | loss 180.2 rec 175.8 | 1,034 samples/s | ETA 00:01:02``."""
    losses = [(k, v) for k, v in sorted(metrics.items())
              if not k.startswith(("peak_rss", "eval/", "lr")) and k not in NOT_LOSSES][:4]
    parts = [f"condgen train: epoch {epoch}/{epochs}", " ".join(f"{k} {v:.4g}" for k, v in losses)]
    if "samples_per_s" in metrics:
        parts.append(f"{metrics['samples_per_s']:,.0f} samples/s")
    parts.append(f"ETA {int(eta) // 3600:02d}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}")
    return " | ".join(p for p in parts if p)


def epochs_logged(client: MlflowClient, run_id: str) -> dict[int, dict[str, float]]:
    """The per-epoch metrics the rank-0 worker has logged so far, by epoch (MLflow step)."""
    out: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        if key.startswith("eval/"):
            continue
        for m in client.get_metric_history(run_id, key):
            out.setdefault(int(m.step), {})[key] = float(m.value)
    return out


@contextlib.contextmanager
def progress_lines(run_id: str, epochs: int, *, every: float = 3.0, out: TextIO | None = None,
                   first_epoch: int = 0, tracking_uri: str | None = None) -> Iterator[None]:
    """Print each epoch the run logs while the block runs (and the ones logged just before it ends)."""
    stream = out or sys.stderr
    stop = threading.Event()
    shown: set[int] = set()
    t0 = time.monotonic()

    def poll() -> None:
        with contextlib.suppress(Exception):  # progress must never fail a run
            client = MlflowClient(tracking_uri=tracking_uri)
            for epoch, metrics in sorted(epochs_logged(client, run_id).items()):
                if epoch not in shown and "step" in metrics:
                    shown.add(epoch)
                    done = max(epoch + 1 - first_epoch, 1)  # epochs this attempt has trained
                    eta = (time.monotonic() - t0) / done * (epochs - epoch - 1)
                    print(line(epoch + 1, epochs, metrics, eta), file=stream, flush=True)

    def loop() -> None:
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name="condgen-train-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=every + 5)
        poll()
