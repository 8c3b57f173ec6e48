#!/usr/bin/env python3
"""Bounded load test of `pipeline serve` on loopback, against `pipeline run` on the same cell.

    python3 scripts/load_test.py --pipeline target/release/pipeline [--model qwen2.5-coder-0.5b]

1. `pipeline run` computes N fresh IMDB test reviews (none in any study sample) for one cell:
   its rows/s is the yardstick.
2. `pipeline serve` (fresh cache) gets other fresh reviews from 1, 4, 16 and 64 concurrent
   clients, a fixed number of requests per level: latency p50/p95/p99, requests/s, statuses.
3. One review already in the cache, 400 times from 16 clients: the cached path's latency.
4. The server's resident memory, sampled every 0.25 s throughout.

Everything stops by itself. Writes OUT/serve.json and OUT/SERVE.md.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODELS = {
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    "smollm2-135m": "SmolLM2-135M-Instruct-Q4_1.gguf",
}
LEVELS = (1, 4, 16, 64)


def spec(data, model, name):
    return f"""name: {name}
dataset:
  path: {data}
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
  max_text_tokens: 384
models:
  - id: m
    gguf: {model}
    n_ctx: 4096
prompts:
  - id: zero-shot
    system: "You are a sentiment classifier for movie reviews. Answer with exactly one word: negative or positive."
    user: "Review:\\n{{{{ text }}}}\\n\\nIs the sentiment of this review negative or positive? Answer with exactly one word."
methods:
  - id: loglik
    kind: loglik
"""


def post(port, text, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = json.dumps({"review_text": text})
    t0 = time.perf_counter()
    c.request("POST", "/v1/sentiment?k=0", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    dt = time.perf_counter() - t0
    c.close()
    return r.status, dt, data


def load(port, texts, clients):
    """Send `texts` from `clients` threads; returns (latencies, statuses, wall seconds)."""
    todo = list(texts)
    lock = threading.Lock()
    lat, statuses = [], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                t = todo.pop()
            s, dt, _ = post(port, t)
            with lock:
                statuses.append(s)
                if s == 200:
                    lat.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, statuses, time.perf_counter() - t0


def pct(v, q):
    if not v:
        return None
    v = sorted(v)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="target/release/pipeline")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--per-level", type=int, default=16)
    ap.add_argument("--baseline", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench")
    args = ap.parse_args()
    import pyarrow.parquet as pq

    repo = Path(__file__).resolve().parent.parent
    models_dir = Path(os.environ.get("PIPELINE_MODELS_DIR", Path.home() / ".cache/pipeline-models"))
    model = models_dir / MODELS[args.model]
    rows = pq.read_table(repo / "experiments/data/imdb/test.parquet").to_pylist()
    rng = random.Random(20261125)
    rng.shuffle(rows)
    # Fresh reviews: far down a shuffled order no study sample uses, of moderate length.
    rows = [r for r in rows[5000:] if 400 < len(r["text"]) < 1500]
    needed = args.baseline + args.per_level * len(LEVELS) + 1
    rows = rows[:needed]
    work = Path(tempfile.mkdtemp(prefix="pipeline-load-"))
    env = dict(os.environ, PIPELINE_MODELS_DIR=str(models_dir))

    # 1. The yardstick: `pipeline run` on the same cell.
    base = rows[: args.baseline]
    with open(work / "base.jsonl", "w") as f:
        for r in base:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) + "\n")
    (work / "base.yaml").write_text(spec(work / "base.jsonl", model, "base"))
    subprocess.run([args.pipeline, "run", str(work / "base.yaml"), "--quiet", "--threads", str(args.threads),
                    "--cache-dir", str(work / "cache-run"), "--reports-dir", str(work / "reports")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    run = json.loads((work / "reports/base/run.json").read_text())["run"]
    run_rows_per_s = run["computed_rows"] / run["wall_s"]
    print(f"run: {run['computed_rows']} rows in {run['wall_s']:.1f} s = {run_rows_per_s:.3f} rows/s", flush=True)

    # 2. The server, with a fresh cache.
    (work / "serve.yaml").write_text(spec(work / "base.jsonl", model, "serve"))
    server = subprocess.Popen(
        [args.pipeline, "serve", str(work / "serve.yaml"), "--cell", "m/zero-shot/loglik", "--addr", "127.0.0.1:0",
         "--threads", str(args.threads), "--queue", "64", "--cache-dir", str(work / "cache-serve"),
         "--reports-dir", str(work / "reports")],
        env=env, stderr=subprocess.PIPE, text=True)
    port = None
    for line in server.stderr:
        if "http://" in line:
            port = int(line.rsplit(":", 1)[1])
            break
    while True:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        c.request("GET", "/health")
        if c.getresponse().status == 200:
            break
        time.sleep(0.2)
    rss, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                for l in open(f"/proc/{server.pid}/status"):
                    if l.startswith("VmRSS:"):
                        rss.append(int(l.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.25)

    threading.Thread(target=sample, daemon=True).start()
    fresh = rows[args.baseline:]
    levels = {}
    for i, c in enumerate(LEVELS):
        texts = [r["text"] for r in fresh[i * args.per_level:(i + 1) * args.per_level]]
        lat, statuses, wall = load(port, texts, c)
        ok = statuses.count(200)
        levels[str(c)] = {
            "clients": c, "requests": len(texts), "ok": ok,
            "errors": {str(s): statuses.count(s) for s in set(statuses) if s != 200},
            "wall_s": wall, "requests_per_s": ok / wall,
            "p50_ms": 1000 * pct(lat, 0.5), "p95_ms": 1000 * pct(lat, 0.95), "p99_ms": 1000 * pct(lat, 0.99),
            "rss_bytes": rss[-1] if rss else None,
        }
        print(f"clients {c}: {ok}/{len(texts)} ok, {ok / wall:.3f} req/s, p50 {1000 * pct(lat, 0.5):.0f} ms, "
              f"p99 {1000 * pct(lat, 0.99):.0f} ms, errors {levels[str(c)]['errors']}", flush=True)

    # 3. A cached review.
    cached_text = fresh[0]["text"]
    lat, statuses, wall = load(port, [cached_text] * 400, 16)
    cached = {"requests": 400, "ok": statuses.count(200), "requests_per_s": statuses.count(200) / wall,
              "p50_ms": 1000 * pct(lat, 0.5), "p95_ms": 1000 * pct(lat, 0.95), "p99_ms": 1000 * pct(lat, 0.99)}
    print(f"cached: p50 {cached['p50_ms']:.2f} ms, p99 {cached['p99_ms']:.2f} ms, {cached['requests_per_s']:.0f} req/s",
          flush=True)
    stop.set()
    server.terminate()
    code = server.wait(timeout=60)
    served = max(l["requests_per_s"] for l in levels.values())
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "model": MODELS[args.model], "threads": args.threads, "cell": "zero-shot loglik",
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
        "run_rows_per_s": run_rows_per_s, "levels": levels, "cached": cached,
        "served_best_vs_run": served / run_rows_per_s,
        "rss_min_bytes": min(rss) if rss else None, "rss_max_bytes": max(rss) if rss else None,
        "sigterm_exit_code": code,
    }
    out = repo / args.out
    out.mkdir(exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1))
    (out / "SERVE.md").write_text(markdown(result))
    print((out / "SERVE.md").read_text())
    shutil.rmtree(work, ignore_errors=True)


def markdown(r):
    lines = [
        f"# `pipeline serve` under load ({r['model']}, {r['threads']} threads, loopback)",
        "",
        f"Measured {r['date_utc']} UTC on {r['cpu']}, in one `scripts/load_test.py` invocation: fresh IMDB test",
        "reviews (not in any study sample), the zero-shot loglik cell, a fresh cache, `--queue 64`.",
        "",
        "| clients | requests | ok | errors | requests/s | p50 ms | p95 ms | p99 ms | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for l in r["levels"].values():
        lines.append(
            f"| {l['clients']} | {l['requests']} | {l['ok']} | {l['errors'] or 'none'} | {l['requests_per_s']:.3f} | "
            f"{l['p50_ms']:.0f} | {l['p95_ms']:.0f} | {l['p99_ms']:.0f} | {l['rss_bytes'] / 2**20:.0f} |")
    c = r["cached"]
    lines += [
        "",
        f"- `pipeline run` on the same cell: {r['run_rows_per_s']:.3f} rows/s; the server's best: "
        f"**{r['served_best_vs_run']:.2f}×** (goal ≥ 0.9×).",
        f"- A cached review, 400 requests from 16 clients: p50 {c['p50_ms']:.2f} ms, p95 {c['p95_ms']:.2f} ms, "
        f"**p99 {c['p99_ms']:.2f} ms** (goal < 5 ms), {c['requests_per_s']:.0f} requests/s.",
        f"- Resident memory over the whole test: {r['rss_min_bytes'] / 2**20:.0f} to {r['rss_max_bytes'] / 2**20:.0f} MiB.",
        f"- SIGTERM at the end: exit code {r['sigterm_exit_code']}.",
        "",
        "Requests wait in one queue for the one model worker and are evaluated one after another (on 2",
        "cores a prompt already uses both), so latency grows with the number of clients while throughput",
        "stays at the model's rate; 429s appear only when more requests wait than `--queue` allows.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
