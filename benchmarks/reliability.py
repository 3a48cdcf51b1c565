"""Reliability figures of issue #20 ("How it is checked"): the project's own hostile tests, measured.

Starts the real service (Ray Serve's proxy on a free 127.0.0.1 port, a private CONDGEN_HOME, MLflow on
SQLite, a tiny diffusion model registered as ``models:/rel-diffusion@champion``), then
(a) fuzzes ``--fuzz`` requests generated from its own ``/openapi.json`` (valid bodies, type-mutated
fields, out-of-range numbers, missing/extra fields, malformed, non-object and deeply nested JSON, huge
strings, wrong content types): a 500/502, a dropped connection or a hang (60 s) is a failure, 503
(overload) and 504 (the request's own ``timeout_s``) are documented answers; (b) runs ``--clients`` x
``--seconds`` of valid ``/v1/generate`` (requests, errors, p50/p95, the replica's RSS before and after);
(c) probes ``/health`` every 50 ms with six hostile requests in flight (chunked 64 MiB bodies, the ICO
bomb of issue #20 item 2, 0.7 MB JSON bodies; target p99 < 100 ms); (d) ingests the hostile cases of
``benchmarks/reliability_ingest.py``; (e) cites the tests that inject faults (minutes each: not re-run).
One markdown table per part. The replica is this process's descendant whose command line names
``ServeReplica`` (Ray's process title): other Ray clusters on the machine are not measured.

    python -m benchmarks.reliability --quick        # smoke run: 300 fuzzed, 8 clients x 5 s (~3 min)
    python -m benchmarks.reliability                # issue #20: 2,000 fuzzed, 32 clients x 60 s
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import sys
import tempfile
import time
import urllib.request
from asyncio.subprocess import PIPE
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reliability_ingest import FAULTS, hostile_ingestion
from benchmarks.serve import body, free_port, pct

MODEL = "rel-diffusion"
DOCUMENTED_5XX = {503, 504}
_REPLICAS: list = []  # the Serve replica processes, found once


def replica_rss_mb() -> float:
    """RSS of this process tree's Serve replica(s), MB (nan when none is found)."""
    import psutil

    if not _REPLICAS:
        for proc in psutil.Process().children(recursive=True):
            try:
                if "ServeReplica" in " ".join(proc.cmdline()):
                    _REPLICAS.append(proc)
            except psutil.Error:
                continue
    try:
        return sum(p.memory_info().rss for p in _REPLICAS) / 2**20 if _REPLICAS else float("nan")
    except psutil.Error:
        return float("nan")


def replica_body_bytes(url: str) -> dict[str, float]:
    """Request body bytes that reached the replica, per endpoint (``condgen_request_body_bytes`` in /metrics)."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    found = re.finditer(r'^condgen_request_body_bytes_total\{endpoint="([^"]+)"\} (\S+)$', text, re.MULTILINE)
    return {m[1]: float(m[2]) for m in found}


# -- (a) a request generator from the OpenAPI schema --------------------------------------------------------
class Fuzzer:
    """Bodies from an OpenAPI 3 spec: ``valid`` follows the schema (small integers, so that valid
    requests stay cheap); each mutation breaks it in one way a client could."""

    MUTATIONS = ("valid", "type_mutated", "out_of_range", "missing_required", "extra_field", "malformed_json",
                 "huge_string", "wrong_content_type", "non_object", "deep_nesting")

    def __init__(self, spec: dict, rng: random.Random, model: str, png_b64: str):
        self.spec, self.rng, self.model, self.png = spec, rng, model, png_b64
        self.posts = {p: self.resolve(op["post"]["requestBody"]["content"]["application/json"]["schema"])
                      for p, op in spec["paths"].items() if "post" in op}

    def resolve(self, s: dict) -> dict:
        while "$ref" in s:
            s = self.spec["components"]["schemas"][s["$ref"].rsplit("/", 1)[1]]
        return s

    def valid(self, s: dict, name: str = ""):
        s, r = self.resolve(s), self.rng
        if "anyOf" in s:
            opts = [self.resolve(o) for o in s["anyOf"]]
            real = [o for o in opts if o.get("type") != "null"]
            return None if (len(real) < len(opts) and r.random() < 0.2) else self.valid(r.choice(real), name)
        if "enum" in s:
            return r.choice(s["enum"])
        t = s.get("type")
        if t == "string":
            if "image" in name:
                return self.png
            if name == "model":
                return self.model
            lo, hi = s.get("minLength", 1), s.get("maxLength", 40)
            return "".join(r.choice("abcdefgh0123456789") for _ in range(r.randint(lo, min(hi, lo + 12))))
        if t == "integer":
            lo, hi = int(s.get("minimum", 0)), int(s.get("maximum", 100))
            return r.choice([s.get("default", lo), lo, lo + r.randint(0, min(8, hi - lo))])
        if t == "number":
            lo, hi = float(s.get("minimum", s.get("exclusiveMinimum", 0.0))), float(s.get("maximum", 10.0))
            return s["default"] if "default" in s and r.random() < 0.3 else r.uniform(lo + 1e-3, hi)
        if t == "boolean":
            return r.random() < 0.5
        if t == "array":
            n = r.randint(lo := s.get("minItems", 0), min(s.get("maxItems", 4), lo + 3))
            return [self.valid(s.get("items", {}), name) for _ in range(n)]
        if t == "object" or "properties" in s:
            req = set(s.get("required", []))
            return {k: self.valid(v, k) for k, v in s.get("properties", {}).items() if k in req or r.random() < 0.5}
        return None

    def mutate(self, kind: str, schema: dict, body: dict) -> tuple[bytes, dict[str, str]]:
        r, js = self.rng, {"content-type": "application/json"}
        props = schema.get("properties", {})
        field = r.choice(sorted(props)) if props else "x"
        if kind == "type_mutated":
            body[field] = r.choice(["text", 1.5, True, False, None, [], {}, 10**30, -1, [1, "a"], {"a": 1}])
        elif kind == "out_of_range":
            fs = self.resolve(props.get(field, {}))
            fs = next((self.resolve(o) for o in fs.get("anyOf", []) if o.get("type") != "null"), fs)
            bad = [fs["minimum"] - 1] if "minimum" in fs else []
            bad += [fs["maximum"] + 1] if "maximum" in fs else []
            bad += ["x" * (fs["maxLength"] + 1)] if "maxLength" in fs else []
            bad += [""] if fs.get("type") == "string" else []
            bad += [[0] * (fs["maxItems"] + 1)] if "maxItems" in fs else []
            raw = r.choice(bad + [1e308, -1e308, 2**63, -(2**63), "NaN", "Infinity"])
            if raw in ("NaN", "Infinity"):  # not JSON, but Python's json module reads them
                return json.dumps({**body, field: 0}).replace(f'"{field}": 0', f'"{field}": {raw}').encode(), js
            body[field] = raw
        elif kind == "missing_required":
            req = schema.get("required", [])
            body = {k: v for k, v in body.items() if k not in req} if req else {}
        elif kind == "extra_field":
            body[r.choice(["junk", "__proto__", "x" * 200, "label "])] = r.choice([1, "x", None, [1]])
        elif kind == "malformed_json":
            text = json.dumps(body).encode()
            return r.choice([text[:max(1, len(text) // 2)], text + b"}", b"{not json", b"\xff\xfe{}",
                             text.replace(b":", b"=", 1), b""]), js
        elif kind == "huge_string":
            size = r.choice([600_000, 900_000, 3 << 20])  # under and over the 1 MiB body limit
            body[field] = "A" * size
        elif kind == "wrong_content_type":
            ct = r.choice(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                           "application/xml", ""])
            return json.dumps(body).encode(), ({"content-type": ct} if ct else {})
        elif kind == "non_object":
            return json.dumps(r.choice([[body], 1, "body", None, True, []])).encode(), js
        elif kind == "deep_nesting":
            depth = r.choice([1_000, 100_000])
            return (b"[" * depth + b"]" * depth) if r.random() < .5 else (b'{"a":' * depth + b"1" + b"}" * depth), js
        return json.dumps(body).encode(), js

    def request(self) -> tuple[str, str, bytes, dict[str, str]]:
        path = self.rng.choice(sorted(self.posts))
        schema = self.posts[path]
        kind = "valid" if self.rng.random() < 0.2 else self.rng.choice(self.MUTATIONS[1:])
        content, headers = self.mutate(kind, schema, self.valid(schema))
        return kind, path, content, headers


async def fuzz(url: str, n: int, seed: int, workers: int = 8) -> dict:
    import httpx

    from tests.test_ingest import _digits, _png

    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
        spec = (await http.get("/openapi.json")).json()
    fz = Fuzzer(spec, random.Random(seed), MODEL, base64.b64encode(_png(_digits(1)[0][0])).decode())
    plan = [fz.request() for _ in range(n)]
    by_kind: dict[str, Counter] = {k: Counter() for k in Fuzzer.MUTATIONS}
    by_path: dict[str, Counter] = {}
    slowest, queue = [0.0], iter(plan)

    async def worker(http) -> None:
        for kind, path, content, headers in queue:
            t0 = time.perf_counter()
            try:
                key = str((await http.post(path, content=content, headers=headers)).status_code)
            except httpx.TimeoutException:
                key = "hang"
            except httpx.HTTPError as exc:
                key = type(exc).__name__
            slowest[0] = max(slowest[0], time.perf_counter() - t0)
            by_kind[kind][key] += 1
            by_path.setdefault(path, Counter())[key] += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
        await asyncio.gather(*[worker(http) for _ in range(workers)])
    return {"by_kind": by_kind, "by_path": by_path, "seconds": time.perf_counter() - t0, "slowest_s": slowest[0]}


async def load(url: str, clients: int, seconds: float, steps: int) -> dict:
    """``clients`` back-to-back /v1/generate loops (benchmarks/serve.py's bodies), with p95."""
    import httpx

    lat: list[float] = []
    errors: Counter = Counter()
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, trust_env=False) as http:
        t_end = time.perf_counter() + seconds

        async def one() -> None:
            while time.perf_counter() < t_end:
                s = time.perf_counter()
                try:
                    r = await http.post("/v1/generate", json=body(next(counter), steps, 1.5))
                    key = None if r.status_code == 200 else str(r.status_code)
                except httpx.HTTPError as exc:
                    key = type(exc).__name__
                lat.append(time.perf_counter() - s) if key is None else errors.update([key])

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(clients)])
        wall = time.perf_counter() - t0
    return {"requests": len(lat) + sum(errors.values()), "ok": len(lat), "errors": sum(errors.values()),
            "error_kinds": dict(errors), "samples_s": len(lat) / wall, "p50_ms": 1000 * pct(lat, .5),
            "p95_ms": 1000 * pct(lat, .95), "p99_ms": 1000 * pct(lat, .99)}


def failures(codes: Counter) -> int:
    return sum(v for k, v in codes.items() if not (k.isdigit() and (int(k) < 500 or int(k) in DOCUMENTED_5XX)))


# -- (c) hostile requests in flight ----------------------------------------------------------------------------
PROBE = """
import json, sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=60, trust_env=False) as c:
    c.get("/health")  # connect once, as a monitor's keep-alive connection would
    lat, until = [], time.perf_counter() + float(sys.argv[2])
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        ok = c.get("/health").status_code == 200
        lat.append(time.perf_counter() - t0 if ok else float("inf"))
        time.sleep(max(0.0, 0.05 - (time.perf_counter() - t0)))
print(json.dumps(lat))
"""


async def hostile(url: str, seconds: float) -> dict:
    """/health every 50 ms: idle; six hostile requests in flight, two of each kind, for ``seconds``;
    then six of one kind, ``seconds / 3`` per kind (which kind is it that slows /health?)."""
    import httpx

    from tests.test_serving_hardening import ico_bomb

    bomb = {"image": ico_bomb(), "source_label": 1, "target_label": 2, "steps": 2}
    big_json = json.dumps({"label": 1, "seeds": list(range(100_000))}).encode()  # 0.7 MB: parsed, then 422
    js = {"content-type": "application/json"}

    async def chunked():
        for _ in range(1024):
            yield b"[" * 65536  # 64 MiB in all, no Content-Length

    kinds = {"chunked 64 MiB body": lambda c: c.post("/v1/generate", content=chunked(), headers=js),
             "ICO bomb to /v1/edit": lambda c: c.post("/v1/edit", json=bomb),
             "0.7 MB JSON body": lambda c: c.post("/v1/generate", content=big_json, headers=js)}
    outcomes: dict[str, Counter] = {k: Counter() for k in kinds}

    async def attacker(kind: str, done: asyncio.Event) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as c:
            while not done.is_set():
                try:
                    outcomes[kind][str((await kinds[kind](c)).status_code)] += 1
                except httpx.HTTPError as exc:
                    outcomes[kind][type(exc).__name__] += 1

    async def probe(span: float) -> dict:  # in a process of its own: the attackers' event loop is not timed
        p = await asyncio.create_subprocess_exec(sys.executable, "-c", PROBE, url, str(span), stdout=PIPE)
        task, rss = asyncio.create_task(p.communicate()), []
        while not task.done():
            rss.append(replica_rss_mb())
            await asyncio.sleep(0.05)
        return {"lat": json.loads((await task)[0]), "rss_peak": max(rss, default=float("nan"))}

    phases: dict[str, dict] = {"idle": {**await probe(min(5.0, seconds)), "rss_before": replica_rss_mb()}}
    for name, crowd, span in [("six in flight, two of each kind", list(kinds) * 2, seconds)] + [
            (f"six x {k}", [k] * 6, seconds / 3) for k in kinds]:
        before, done = replica_rss_mb(), asyncio.Event()
        attackers = [asyncio.create_task(attacker(k, done)) for k in crowd]
        await asyncio.sleep(0.2)
        phases[name] = {**await probe(span), "rss_before": before}
        done.set()
        await asyncio.gather(*attackers)
        await asyncio.sleep(1.0)
        phases[name]["rss_after"] = replica_rss_mb()
    return {"phases": phases, "outcomes": outcomes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 300 fuzzed, 8 clients x 5 s, 5 s hostile")
    p.add_argument("--fuzz", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60.0, help="load test length")
    p.add_argument("--hostile-seconds", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per load-test request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="fuzz,load,hostile,ingest", help="which of the measured parts to run")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    if args.quick:
        args.fuzz, args.clients, args.seconds, args.hostile_seconds = 300, 8, 5.0, 5.0
    parts = set(args.parts.split(","))
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {os.cpu_count()} CPUs; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; args {vars(args)}", flush=True)

    home = Path(tempfile.mkdtemp(prefix="condgen-reliability-"))
    os.environ["CONDGEN_HOME"] = str(home)
    for name in ("MLFLOW_TRACKING_URI", "CONDGEN_API_KEY"):
        os.environ.pop(name, None)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    res: dict = {"args": vars(args)}
    if parts & {"fuzz", "load", "hostile"}:
        import ray
        import torch
        from ray import serve

        from condgen.serving.app import make_config, proxy_policy, run
        from condgen.serving.proxy_guard import proxy_env
        from tests.registry_helpers import register_tiny

        torch.set_num_threads(1)
        register_tiny(MODEL, "diffusion", {"channels": (8, 16), "timesteps": 100}, seed=0)
        config = make_config([f"models:/{MODEL}@champion"], poll_s=0, torch_threads=1, request_timeout_s=60, deny_list=[])
        with proxy_env(proxy_policy(config)):  # Serve's proxy enforces the limits, as when ``run`` starts Ray
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        url = f"http://127.0.0.1:{(port := free_port())}"
        run(port=port, blocking=False, name="reliability", config=config)
        asyncio.run(load(url, 2, 2.0, args.steps))  # warm-up
        res["rss_start"] = replica_rss_mb()
        if "fuzz" in parts:
            res["fuzz"] = asyncio.run(fuzz(url, args.fuzz, args.seed))
        if "load" in parts:
            before = replica_rss_mb()
            lt = asyncio.run(load(url, args.clients, args.seconds, args.steps))
            res["load"] = {**lt, "rss_before": before, "rss_after": replica_rss_mb()}
            print(f"  load: {res['load']}", flush=True)
        if "hostile" in parts:
            before, res["hostile"] = replica_body_bytes(url), asyncio.run(hostile(url, args.hostile_seconds))
            res["hostile"]["body_bytes"] = {k: v - before.get(k, 0.0) for k, v in replica_body_bytes(url).items()}
        res["errors_after"] = asyncio.run(load(url, 1, 1.0, args.steps))["errors"]
        serve.shutdown()
        ray.shutdown()
    if "ingest" in parts:
        res["ingest"] = hostile_ingestion(home / "ingest")
    report(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def _codes(c: Counter) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(c.items()))


def report(res: dict, args) -> None:
    print(f"\nload average at the end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if "fuzz" in res:
        f = res["fuzz"]
        print(f"\n### (a) {args.fuzz} requests fuzzed from /openapi.json ({f['seconds']:.0f} s, 8 at a time, "
              f"slowest answer {f['slowest_s']:.1f} s)\n\n| case | requests | status codes | failures (500/502, "
              "dropped, hang) |\n|---|---:|---|---:|")
        for kind, codes in list(f["by_kind"].items()) + [("**all**", sum(f["by_kind"].values(), Counter()))]:
            print(f"| {kind} | {sum(codes.values())} | {_codes(codes)} | {failures(codes)} |")
        print("\n| endpoint | requests | status codes |\n|---|---:|---|")
        for path, codes in sorted(f["by_path"].items()):
            print(f"| {path} | {sum(codes.values())} | {_codes(codes)} |")
    if "load" in res:
        lt = res["load"]
        print(f"\n### (b) {args.clients} clients x {args.seconds:g} s of /v1/generate ({args.steps} DDIM steps, CFG)"
              "\n\n| requests | errors | samples/s | p50 ms | p95 ms | p99 ms | replica RSS before -> after MB |\n"
              f"|---:|---:|---:|---:|---:|---:|---|\n| {lt['requests']} | {lt['errors']} {lt['error_kinds'] or ''} | "
              f"{lt['samples_s']:.1f} | {lt['p50_ms']:.0f} | {lt['p95_ms']:.0f} | {lt['p99_ms']:.0f} | "
              f"{lt['rss_before']:.0f} -> {lt['rss_after']:.0f} |")
    if "hostile" in res:
        h = res["hostile"]
        print("\n### (c) /health every 50 ms while hostile requests are in flight (target: p99 < 100 ms)\n\n"
              "| in flight | probes | /health p50 ms | p99 ms | max ms | replica RSS before / peak / after MB |\n"
              "|---|---:|---:|---:|---:|---|")
        for name, ph in h["phases"].items():
            xs = [1000 * t for t in ph["lat"]]
            print(f"| {name} | {len(xs)} | {pct(xs, .5):.1f} | {pct(xs, .99):.1f} | {max(xs, default=0):.1f} | "
                  f"{ph['rss_before']:.0f} / {ph['rss_peak']:.0f} / {ph.get('rss_after', ph['rss_before']):.0f} |")
        print("\n| hostile request | answers (all phases) |\n|---|---|")
        for kind, codes in h["outcomes"].items():
            print(f"| {kind} | {_codes(codes)} |")
        got = ", ".join(f"{k}: {v / 2**20:.2f} MiB" for k, v in sorted(h.get("body_bytes", {}).items()) if v)
        print(f"\nbody bytes that reached the replica in (c): {got or 'none'} (refused in the proxy: proxy_guard.py)")
    if "ingest" in res:
        print("\n### (d) hostile ingestion (one subprocess per case; RSS sampled every 5 ms during ingest)\n\n"
              "| case | hostile input | accepted | rejected (reasons) | RSS before -> peak MB | s |\n"
              "|---|---|---:|---|---|---:|")
        for name, r in res["ingest"].items():
            if "error" in r:
                print(f"| {name} | {r['what']} | ERROR | {r['error'][-120:]!r} | | |")
                continue
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items()))
            print(f"| {name} | {r['what']} | {r['accepted']} | {r['rejected']} ({reasons}) | "
                  f"{r['base_mb']:.0f} -> {r['peak_mb']:.0f} | {r['s']:.1f} |")
    print("\n### (e) faults survived (injected by these tests; not re-run here)\n\n| fault | outcome | test |\n"
          "|---|---|---|")
    for fault, outcome, test in FAULTS:
        print(f"| {fault} | {outcome} | `{test}` |")
    print("\ndata lost: none (each test above asserts it: shards byte-identical, every epoch logged once, "
          "weights equal to an uninterrupted run)")


if __name__ == "__main__":
    sys.exit(main())
