#!/usr/bin/env python3
"""Bounded load test of `pipeline serve` on loopback, against `pipeline run` on the same cell.

    python3 scripts/load_test.py --pipeline target/release/pipeline [--model qwen2.5-coder-0.5b]

1. `pipeline run` computes N fresh IMDB test reviews (none in any study sample) for one cell:
   its rows/s is the yardstick.
2. For 1, 4, 16 and 64 concurrent clients, a `pipeline serve` with a fresh cache gets the same
   N reviews (one request each): latency p50/p95/p99, requests/s, statuses. Then twice the
   queue size of other reviews at once: the only level where 429s may appear.
3. One review already in the cache, from 16 keep-alive clients for 10 s (`wrk`): the cached
   path's latency, and the server's own `latency_ms` for it.
4. Each server's resident memory, sampled every 0.25 s.

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


def start_server(pipeline, spec, cache, work, threads, queue, env):
    """A `pipeline serve` on a free loopback port, its cache fresh; returns (process, port)."""
    server = subprocess.Popen(
        [pipeline, "serve", str(spec), "--cell", "m/zero-shot/loglik", "--addr", "127.0.0.1:0",
         "--threads", str(threads), "--queue", str(queue), "--cache-dir", str(cache),
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
    return server, port


class Rss:
    """The resident memory of a process, sampled every 0.25 s."""

    def __init__(self, pid):
        self.values, self.stop = [], threading.Event()
        threading.Thread(target=self.sample, args=(pid,), daemon=True).start()

    def sample(self, pid):
        while not self.stop.is_set():
            try:
                for l in open(f"/proc/{pid}/status"):
                    if l.startswith("VmRSS:"):
                        self.values.append(int(l.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.25)


def wrk_cached(port, text, clients, seconds, work):
    """`wrk` on one cached review over keep-alive connections: its latency percentiles."""
    body = json.dumps({"review_text": text})
    (work / "post.lua").write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(body)}\n")
    out = subprocess.run(["wrk", "-t", "2", "-c", str(clients), "-d", f"{seconds}s", "--latency",
                          "-s", str(work / "post.lua"), f"http://127.0.0.1:{port}/v1/sentiment?k=0"],
                         check=True, capture_output=True, text=True).stdout
    ms = {"us": 1e-3, "ms": 1.0, "s": 1000.0}

    def value(v):
        for unit in ("us", "ms", "s"):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * ms[unit]
        return float(v)

    pcts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].endswith("%"):
            pcts[parts[0]] = value(parts[1])
    requests = next(int(l.split()[0]) for l in out.splitlines() if "requests in" in l)
    rps = next(float(l.split(":")[1]) for l in out.splitlines() if l.startswith("Requests/sec"))
    non2xx = sum(int(l.split(":")[1]) for l in out.splitlines() if "Non-2xx" in l)
    return {"tool": "wrk", "clients": clients, "seconds": seconds, "requests": requests,
            "non_2xx": non2xx, "requests_per_s": rps,
            "p50_ms": pcts.get("50%"), "p90_ms": pcts.get("90%"), "p99_ms": pcts.get("99%")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="target/release/pipeline")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--reviews", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queue", type=int, default=64)
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
    texts = [r["text"] for r in rows[: args.reviews]]
    overload_texts = [r["text"] for r in rows[args.reviews: args.reviews + 2 * args.queue]]
    work = Path(tempfile.mkdtemp(prefix="pipeline-load-"))
    env = dict(os.environ, PIPELINE_MODELS_DIR=str(models_dir))

    # 1. The yardstick: `pipeline run` on the same cell and the very reviews every level sends.
    with open(work / "reviews.jsonl", "w") as f:
        for r in rows[: args.reviews]:
            f.write(json.dumps({"id": r["id"], "text": r["text"], "label": r["label"]}) + "\n")
    (work / "run.yaml").write_text(spec(work / "reviews.jsonl", model, "run"))
    subprocess.run([args.pipeline, "run", str(work / "run.yaml"), "--quiet", "--threads", str(args.threads),
                    "--cache-dir", str(work / "cache-run"), "--reports-dir", str(work / "reports")],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    run = json.loads((work / "reports/run/run.json").read_text())["run"]
    run_rows_per_s = run["computed_rows"] / run["wall_s"]
    print(f"run: {run['computed_rows']} rows in {run['wall_s']:.1f} s = {run_rows_per_s:.3f} rows/s", flush=True)

    # 2. Each level: a server with a fresh cache gets the same reviews from C clients; one
    # level sends more clients than the queue holds. 3. On the last regular level's server, a
    # review it has cached, from 16 keep-alive clients (wrk), and the server's own latency for
    # it (the `latency_ms` it reports).
    (work / "serve.yaml").write_text(spec(work / "reviews.jsonl", model, "serve"))
    levels, rss_all, cached, exit_codes = {}, [], None, []
    for c in LEVELS + (2 * args.queue,):
        overload = c > args.queue
        server, port = start_server(args.pipeline, work / "serve.yaml", work / f"cache-{c}", work,
                                    args.threads, args.queue, env)
        rss = Rss(server.pid)
        batch = overload_texts if overload else texts
        lat, statuses, wall = load(port, batch, c)
        ok = statuses.count(200)
        levels[str(c)] = {
            "clients": c, "requests": len(batch), "ok": ok, "over_queue": overload,
            "errors": {str(s): statuses.count(s) for s in set(statuses) if s != 200},
            "wall_s": wall, "requests_per_s": ok / wall,
            "p50_ms": 1000 * pct(lat, 0.5), "p95_ms": 1000 * pct(lat, 0.95), "p99_ms": 1000 * pct(lat, 0.99),
            "rss_first_bytes": rss.values[0] if rss.values else None,
            "rss_max_bytes": max(rss.values) if rss.values else None,
        }
        print(f"clients {c}: {ok}/{len(batch)} ok, {ok / wall:.3f} req/s, p50 {1000 * pct(lat, 0.5):.0f} ms, "
              f"p99 {1000 * pct(lat, 0.99):.0f} ms, errors {levels[str(c)]['errors']}", flush=True)
        if c == LEVELS[-1]:
            cached = wrk_cached(port, texts[0], 16, 10, work)
            own = [json.loads(post(port, texts[0])[2])["latency_ms"] for _ in range(200)]
            cached["server_p50_ms"], cached["server_p99_ms"] = pct(own, 0.5), pct(own, 0.99)
            print(f"cached: p50 {cached['p50_ms']:.2f} ms, p99 {cached['p99_ms']:.2f} ms, "
                  f"{cached['requests_per_s']:.0f} req/s; server-side p99 {cached['server_p99_ms']:.3f} ms",
                  flush=True)
        rss.stop.set()
        rss_all += rss.values
        server.terminate()
        exit_codes.append(server.wait(timeout=60))
    served = [l["requests_per_s"] for l in levels.values() if not l["over_queue"]]
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "model": MODELS[args.model], "threads": args.threads, "cell": "zero-shot loglik", "queue": args.queue,
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
        "run_rows_per_s": run_rows_per_s, "run_wall_s": run["wall_s"], "levels": levels, "cached": cached,
        "served_min_vs_run": min(served) / run_rows_per_s,
        "served_max_vs_run": max(served) / run_rows_per_s,
        "rss_min_bytes": min(rss_all) if rss_all else None, "rss_max_bytes": max(rss_all) if rss_all else None,
        "sigterm_exit_codes": exit_codes,
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
        f"Measured {r['date_utc']} UTC on {r['cpu']}, in one `scripts/load_test.py` invocation: the",
        f"zero-shot loglik cell, `--queue {r['queue']}`, IMDB test reviews that no study samples. Every",
        "regular level is a fresh server (fresh cache) sent the same reviews as the `pipeline run` yardstick;",
        "the clients run on the same 2 cores as the server.",
        "",
        "| clients | requests | ok | errors | requests/s | vs run | p50 ms | p95 ms | p99 ms | RSS MiB first → max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for l in r["levels"].values():
        note = " (over the queue)" if l["over_queue"] else ""
        ratio = "" if l["over_queue"] else f"{l['requests_per_s'] / r['run_rows_per_s']:.2f}×"
        lines.append(
            f"| {l['clients']}{note} | {l['requests']} | {l['ok']} | {l['errors'] or 'none'} | "
            f"{l['requests_per_s']:.3f} | {ratio} | {l['p50_ms']:.0f} | {l['p95_ms']:.0f} | {l['p99_ms']:.0f} | "
            f"{l['rss_first_bytes'] / 2**20:.0f} → {l['rss_max_bytes'] / 2**20:.0f} |")
    c = r["cached"]
    lines += [
        "",
        f"- `pipeline run` on the same cell and reviews: {r['run_rows_per_s']:.3f} rows/s (model load included);",
        f"  served under load: **{r['served_min_vs_run']:.2f}× to {r['served_max_vs_run']:.2f}×** (goal ≥ 0.9×).",
        f"- A cached review, `wrk` with 16 keep-alive clients for {c['seconds']} s: {c['requests']} requests,",
        f"  {c['non_2xx']} not 200, p50 {c['p50_ms']:.2f} ms, p90 {c['p90_ms']:.2f} ms, **p99 {c['p99_ms']:.2f} ms**",
        f"  (goal < 5 ms), {c['requests_per_s']:.0f} requests/s; the server's own time for it: p50",
        f"  {c['server_p50_ms']:.3f} ms, p99 {c['server_p99_ms']:.3f} ms.",
        f"- Resident memory: {r['rss_min_bytes'] / 2**20:.0f} to {r['rss_max_bytes'] / 2**20:.0f} MiB over every server.",
        f"- SIGTERM after each level: exit codes {r['sigterm_exit_codes']}.",
        "",
        "Requests wait in one queue for the one model worker and are evaluated one after another (on 2",
        "cores a prompt already uses both), so latency grows with the number of clients while throughput",
        "stays at the model's rate; 429s appear only when more requests wait than `--queue` allows.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
