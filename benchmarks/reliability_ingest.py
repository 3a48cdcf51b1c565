"""Hostile ingestion cases of issue #20 for ``benchmarks/reliability.py`` (part d), and the tests that
inject faults, which part (e) cites (each takes minutes: they are not re-run there).

The inputs of tests/test_ingest_limits.py and tests/test_ingest.py (an 80-member tar sample, ICO
bombs, a 9000 x 9000 PNG header, inexact folder labels, symlink and hard-link duplicates, repeated
captions.jsonl lines, 2 MB captions, truncated PNGs, unsafe tar members), each with a few good
images beside it, each ingested by ``condgen.tasks.data.ingest.ingest`` in a subprocess of its own
so that the RSS measured (sampled every 5 ms while ``ingest`` runs) is that case's alone.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INGEST_ONE = """
import json, sys, threading, time
from collections import Counter
from pathlib import Path
import psutil
from condgen.tasks.data.ingest import ingest
me, peak, stop = psutil.Process(), [0], threading.Event()
def sample():  # RSS every 5 ms while ingest runs (ru_maxrss would report the imports' high-water mark)
    while not stop.is_set():
        peak[0] = max(peak[0], me.memory_info().rss)
        time.sleep(0.005)
base = me.memory_info().rss
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
r = ingest(sys.argv[1], sys.argv[2], shard_size=50)
took = time.perf_counter() - t0
stop.set()
rej = Path(sys.argv[2]) / "rejects.json"
reasons = Counter(x["reason"] for x in json.loads(rej.read_text())["rejects"]) if rej.exists() else {}
print(json.dumps({"accepted": sum(r.counts.values()), "rejected": r.n_rejected, "reasons": reasons, "s": took,
                  "base_mb": base / 2**20, "peak_mb": max(peak[0], me.memory_info().rss) / 2**20}))
"""


def ingestion_cases(root: Path) -> dict[str, tuple[str, str]]:
    """name -> (source path, what is hostile in it); every case also holds a few good images."""
    import tarfile

    from PIL import Image

    from tests.test_ingest import _digits, _png
    from tests.test_ingest_limits import _ico_holding, _png_1bit, _tar_gz

    x, y = _digits(20)
    cases: dict[str, tuple[str, str]] = {}

    def folder(name: str, what: str, files: dict[str, bytes]) -> Path:
        src = root / name
        for i in range(4):
            files.setdefault(f"{y[i]}/good{i}.png", _png(x[i]))
        for rel, data in files.items():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes(data)
        cases[name] = (str(src), what)
        return src

    digits = {f"{y[2 * i]}/d{i}.png": _png(x[2 * i]) for i in range(10)}  # one folder per digit 0-9
    folder("clean", "good digits only (baseline)", dict(digits))
    bomb = _ico_holding(_png_1bit(9000))
    folder("ico_bomb", "ICO saying 16x16 holding a 9000x9000 PNG, named .png; a .ico; a TIFF",
           {"3/bomb.png": bomb, "3/icon.ico": _ico_holding(_png(x[5]), 28), "3/scan.tif": _tiff(Image.fromarray(x[6]))})
    folder("huge_png", "9000x9000 PNG (10 KB) in a class folder", {"1/huge.png": _png_1bit(9000)})
    folder("bad_labels", "folders 0-9, and ٧ +7 -0 ' 7' '7 ' 07 seven 12", {
        **digits, **{f"{lab}/x.png": _png(x[7]) for lab in ["٧", "+7", "-0", " 7", "7 ", "07", "seven", "12"]}})
    good = _png(x[8])
    folder("truncated", "PNG cut in half, garbage after a PNG signature, empty file, text named .png",
           {"2/half.png": good[: len(good) // 2], "2/garbage.png": b"\x89PNG\r\n\x1a\n" + b"junk" * 30,
            "2/empty.png": b"", "2/text.png": b"hello"})
    dup = folder("duplicates", "a symlink and a hard link to one image, a symlink out of the source", {})
    os.symlink(dup / f"{y[0]}/good0.png", dup / f"{y[1]}/alias.png")
    os.link(dup / f"{y[0]}/good0.png", dup / f"{y[2]}/hard.png")
    (root / "outside.png").write_bytes(good)
    os.symlink(root / "outside.png", dup / f"{y[3]}/escape.png")
    for name, what, rows in (
            ("repeated_captions", "captions.jsonl naming one image 3 times (./ prefix too)",
             [{"file": "img/0.png", "label": 1}, {"file": "img/1.png", "label": 2}, {"file": "img/0.png", "label": 1},
              {"file": "./img/0.png", "label": 3}]),
            ("caption_2mb", "a 2 MB caption, a 60,000-character caption, one of 2,001",
             [{"file": "img/0.png", "label": 1, "caption": "c" * 2_000_000},
              {"file": "img/1.png", "caption": "b" * 60_000}, {"file": "img/2.png", "label": 1, "caption": "a" * 2001},
              {"file": "img/3.png", "label": 2, "caption": "ok"}])):
        src = root / name
        (src / "img").mkdir(parents=True)
        for i in range(4):
            (src / "img" / f"{i}.png").write_bytes(_png(x[10 + i]))
        (src / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        cases[name] = (str(src), what)
    members = [("good.png", _png(x[0])), ("good.cls", str(y[0]).encode()), ("bomb.png", _png(x[1])),
               ("bomb.cls", str(y[1]).encode())] + [(f"bomb.extra{i:02d}.bin", bytes(1 << 20)) for i in range(78)]
    _tar_gz(root / "tar80.tar", members + [("after.png", _png(x[2])), ("after.cls", str(y[2]).encode())])
    cases["tar_80_members"] = (str(root / "tar80.tar"), "gzipped tar (<1 MB): one key with 80 members of 1 MiB")
    with tarfile.open(root / "evil.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        reg, sym = tarfile.REGTYPE, tarfile.SYMTYPE
        for nm, data, kind, link in [("good0.png", _png(x[0]), reg, ""), ("good0.cls", b"0", reg, ""),
                                     ("../evil.png", _png(x[4]), reg, ""), ("../evil.cls", b"1", reg, ""),
                                     ("/etc/passwd", b"root:x:0:0", reg, ""), ("link.png", b"", sym, "/etc/passwd"),
                                     ("bomb.png", bomb, reg, ""), ("bomb.cls", b"3", reg, ""),
                                     ("s.png", _png(x[5]), reg, ""), ("s.cls", b"+3", reg, "")]:
            info = tarfile.TarInfo(nm)
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    cases["tar_hostile_members"] = (str(root / "evil.tar"), ("tar: ../ path, absolute path, symlink member, "
                                    "ICO bomb, label '+3'"))
    return cases


def _tiff(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="TIFF")
    return buf.getvalue()


def hostile_ingestion(root: Path) -> dict[str, dict]:
    out = {}
    for name, (src, what) in ingestion_cases(root).items():
        p = subprocess.run([sys.executable, "-c", INGEST_ONE, src, str(root / f"out-{name}")], cwd=ROOT,
                           capture_output=True, text=True, timeout=600, check=False)
        row = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {"error": p.stderr[-300:]}
        out[name] = {"what": what, **row}
        print(f"  ingest {name}: {row}", flush=True)
    return out


# -- (e) faults: cited, not re-run -----------------------------------------------------------------------------
T = "tests/test_faults.py::test_"
FAULTS = [  # (fault, outcome, the test that injects it)
    ("training worker killed (os._exit) in epoch 1 of 3", ("restarts from the epoch-0 checkpoint; 3 epochs, each "
     "logged once"), "tests/test_train_ray.py::test_killed_worker_resumes_from_checkpoint"),
    ("last worker killed after step 10 of epoch 0 (1 and 2 workers)", ("resumes from the step-8 checkpoint to the "
     "weights of an uninterrupted run (bit-identical on 1 worker)"),
     "tests/test_resume.py::test_a_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run"),
    ("ingestion flow's process group SIGKILLed after its first shard", ("re-run keeps the finished shards; output "
     "byte-identical to an uninterrupted run"), T + "flow_killed_mid_ingestion_resumes_byte_identical"),
    ("S3 endpoint down 10 s during ingestion", "retried inside the budget; every object and shard intact",
     T + "s3_outage_during_ingestion_loses_nothing"),
    ("S3 down past the retry budget (CONDGEN_S3_RETRY_SECONDS=2)", ("exit 1, one line (nothing lost, re-run); "
     "the re-run keeps both shards and completes"),
     T + "s3_outage_longer_than_the_budget_is_one_line_and_the_rerun_completes"),
    ("MLflow server SIGKILLed after epoch 0, back ~10 s later", "every epoch's metrics logged",
     T + "mlflow_restart_during_training_keeps_every_epoch"),
    ("S3-source ingestion SIGKILLed mid-download", "re-run reuses the mirror, then removes it",
     "tests/test_ingest_limits.py::test_a_killed_s3_ingestion_leaves_a_mirror_the_rerun_reuses_and_removes"),
]
