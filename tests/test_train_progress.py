"""The driver's training progress: one line per epoch the rank-0 worker logged, read from MLflow."""
from __future__ import annotations

import io
import time

import pytest
from mlflow.tracking import MlflowClient

from condgen.tasks.training import watch


def test_a_line_shows_epoch_losses_throughput_and_eta():
    text = watch.line(3, 10, {"loss": 180.21, "kl": 4.4, "step": 93, "samples_per_s": 1034.2,
                              "epoch_seconds": 4.0, "peak_rss_mb": 1000.0}, eta=62)
    assert text == "condgen train: epoch 3/10 | kl 4.4 loss 180.2 | 1,034 samples/s | ETA 00:01:02"


def test_each_logged_epoch_is_printed_once_while_training_runs(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("progress", artifact_location=str(tmp_path / "art")))
    out = io.StringIO()
    with watch.progress_lines(run.info.run_id, 3, every=0.2, out=out, tracking_uri=uri):
        for epoch in range(3):
            for key, value in {"loss": 10.0 - epoch, "step": 5.0 * (epoch + 1)}.items():
                client.log_metric(run.info.run_id, key, value, step=epoch)
            time.sleep(0.5)  # the poller sees each epoch on its own, some twice: each is printed once
    lines = out.getvalue().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == [f"condgen train: epoch {e}/3" for e in (1, 2, 3)]
    assert "loss 8" in lines[-1] and lines[-1].endswith("ETA 00:00:00")


@pytest.mark.parametrize("bad", ["no-such-run"])
def test_a_poll_that_fails_never_fails_the_run(tmp_path, bad):
    out = io.StringIO()
    with watch.progress_lines(bad, 2, every=0.1, out=out, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"):
        time.sleep(0.3)
    assert out.getvalue() == ""
