#!/usr/bin/env python3
"""pipeline vs the llama-cpp-python peer, side by side on one machine (see scripts/bench).

Every figure comes from this one invocation: the peer script from ../shared/bench on the same
sample, model and threads; pipeline runs on fresh caches; llama.cpp's raw pp512 through both
bindings. Ratios, not absolute times, are what carry over between machines.
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MODELS = {
    "qwen2.5-coder-0.5b": "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
}

# The peer's prompt, word for word (see peer_llamacpp_python.py: SYSTEM, USER).
SYSTEM = "You are a sentiment classifier for movie reviews. Answer with exactly one word: positive or negative."
USER = "Review:\n{{ text }}\n\nIs the sentiment of this review positive or negative? Answer with exactly one word."
FEW_SHOT = (
    "Here are labelled examples of movie reviews.\n"
    "{% for ex in examples %}\nReview:\n{{ ex.text }}\nSentiment: {{ ex.label }}\n{% endfor %}\n"
    "Now classify this review.\n\n" + USER
)


def spec(name, model_path, data, user, methods, sampling, shots=None, n_ctx=4096):
    prompt = {"id": "p", "system": SYSTEM, "user": user}
    if shots:
        prompt["shots"] = shots
    return {
        "name": name,
        "dataset": {
            "path": str(data),
            "id": "id",
            "text": "text",
            "label": "label",
            "labels": {0: "negative", 1: "positive"},
        },
        "models": [{"id": "m", "gguf": str(model_path), "n_ctx": n_ctx}],
        "prompts": [prompt],
        "methods": methods,
        "sampling": sampling,
    }


GREEDY = [{"id": "gen", "kind": "generate", "max_tokens": 4}]


def run_pipeline(args, work, name, spec_dict, extra=()):
    """A full `pipeline run` on a fresh cache; returns run.json, metrics and predictions."""
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    # JSON is YAML: no YAML writer needed.
    (d / "spec.yaml").write_text(json.dumps(spec_dict, indent=1))
    cmd = [
        str(args.pipeline), "run", str(d / "spec.yaml"), "--quiet", "--threads", str(args.threads),
        "--cache-dir", str(d / "cache"), "--reports-dir", str(d / "reports"), *extra,
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    rep = d / "reports" / spec_dict["name"]
    run = json.loads((rep / "run.json").read_text())["run"]
    preds = pq.read_table(rep / "predictions.parquet").to_pylist()
    metrics = pq.read_table(rep / "metrics.parquet").to_pylist()
    # Each prompt once (the first cell's rows) for prompt-processing figures.
    first = [p for p in preds if p["cell"] == metrics[0]["cell"]]
    prefill_s = sum(p["prefill_ms"] for p in first) / 1000
    evaluated = sum(p["evaluated_tokens"] for p in first)
    prompt_tokens = sum(p["prompt_tokens"] for p in first)
    out = {
        "process_wall_s": wall,
        "run_wall_s": run["wall_s"],
        "rows": len(first),
        "cells": len(metrics),
        "reviews_per_s": len(first) / run["wall_s"],
        "prompt_tokens": prompt_tokens,
        "evaluated_tokens": evaluated,
        "prefill_s": prefill_s,
        "evaluated_tok_per_s": evaluated / prefill_s if prefill_s else 0.0,
        "peak_rss_bytes": run.get("peak_rss_bytes"),
        "accuracy": {m["cell"]: m["accuracy"] for m in metrics},
        "invalid": {m["cell"]: m["invalid"] for m in metrics},
    }
    print(f"  {name}: {out['rows']} rows × {out['cells']} cells in {run['wall_s']:.1f} s "
          f"({out['reviews_per_s']:.3f} reviews/s, {out['evaluated_tok_per_s']:.1f} evaluated tok/s)", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default="../shared")
    ap.add_argument("--pipeline", default="target/release/pipeline")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", choices=sorted(MODELS))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench")
    ap.add_argument("--skip-rss", action="store_true", help="skip the 1.5B peak-memory run")
    ap.add_argument("--render-only", action="store_true", help="rewrite RESULTS.md from results.json")
    ap.add_argument("--only-packing", action="store_true",
                    help="measure only packed evaluation (--pack) and add it to an existing results.json")
    ap.add_argument("--packs", default="4,8,16", help="rows per decode call to measure")
    args = ap.parse_args()
    if args.render_only:
        out = Path(args.out)
        (out / "RESULTS.md").write_text(markdown(json.loads((out / "results.json").read_text())))
        return
    args.pipeline = Path(args.pipeline).resolve()
    shared = Path(args.shared).resolve()
    models_dir = Path(os.environ.get("PIPELINE_MODELS_DIR", Path.home() / ".cache/pipeline-models"))
    model = models_dir / MODELS[args.model]
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = shared / "datasets/imdb/test.parquet"

    # The peer's own sampling code, so both sides see exactly the same reviews, in order.
    if args.only_packing and importlib.util.find_spec("llama_cpp") is None:
        # Only its sampling is needed here, not llama-cpp-python itself.
        import types
        stub, chat = types.ModuleType("llama_cpp"), types.ModuleType("llama_cpp.llama_chat_format")
        stub.Llama, chat.Jinja2ChatFormatter = None, None
        sys.modules.update({"llama_cpp": stub, "llama_cpp.llama_chat_format": chat})
    spec_ = importlib.util.spec_from_file_location("peer", shared / "bench/peer_llamacpp_python.py")
    peer_mod = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(peer_mod)
    sample = peer_mod.load_sample(str(data), args.n, args.seed)
    sample_path = (work / "sample.parquet").resolve()
    pq.write_table(
        pa.table({"id": [s[0] for s in sample], "text": [s[1] for s in sample], "label": [s[2] for s in sample]}),
        sample_path,
    )
    train = (Path("experiments/data/imdb/train.parquet")).resolve()
    results = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
        "threads": args.threads,
        "model": model.name,
        "n": args.n,
        "seed": args.seed,
    }
    print(f"bench: {model.name}, {args.n} reviews, {args.threads} threads", flush=True)
    if args.only_packing:
        previous = out / "results.json"
        if previous.exists():
            results = {**json.loads(previous.read_text()), "packing": None}
        results["packing"] = packing(args, work, model, sample_path)
        (out / "results.json").write_text(json.dumps(results, indent=1))
        write_packing_section(out, results)
        print((out / "RESULTS.md").read_text())
        return

    # 1. llama.cpp's raw limits, through both bindings.
    pp_peer = json.loads(subprocess.run(
        [sys.executable, str(shared / "bench/llamacpp_python_ppbench.py"), str(model), str(args.threads)],
        check=True, capture_output=True, text=True).stdout)
    pp_ours = json.loads(subprocess.run(
        [str(args.pipeline), "engine-bench", str(model), "--threads", str(args.threads)],
        check=True, capture_output=True, text=True).stdout)
    results["pp512"] = {"llama_cpp_python": pp_peer, "pipeline_binding": pp_ours}
    print(f"  pp512: {pp_peer['pp512_tok_s']:.1f} tok/s (llama-cpp-python), "
          f"{pp_ours['pp512_tok_s']:.1f} tok/s (pipeline's binding)", flush=True)

    # 2. The peer: one greedy generate pass.
    peer_out = work / "peer_generate.json"
    subprocess.run(
        [sys.executable, str(shared / "bench/peer_llamacpp_python.py"), "--model", str(model), "--data", str(data),
         "--n", str(args.n), "--seed", str(args.seed), "--threads", str(args.threads), "--mode", "generate",
         "--temperature", "0", "--out", str(peer_out)],
        check=True, stdout=subprocess.DEVNULL)
    peer = json.loads(peer_out.read_text())
    pr = peer["runs"][0]
    results["peer_generate_greedy"] = {k: pr[k] for k in ("accuracy", "invalid", "wall_s", "reviews_per_s", "prompt_tokens", "prompt_tok_per_s")}
    results["peer_generate_greedy"]["loop_s"] = peer["loop_s"]
    print(f"  peer greedy: {pr['reviews_per_s']:.3f} reviews/s, accuracy {pr['accuracy']:.3f}", flush=True)

    # 3. pipeline: one greedy cell; the 7-cell seed grid; 4-shot.
    greedy_sampling = {"temperature": 0}
    grid_sampling = {"temperature": [0.2, 0.8], "seed": [1, 2, 3], "top_p": 0.95, "top_k": 40}
    grid_methods = GREEDY + [{"id": "ll", "kind": "loglik"}]
    shots = {"k": 4, "strategy": "balanced", "seed": 11, "from": str(train), "max_chars": 600}
    results["pipeline_greedy"] = run_pipeline(args, work, "greedy", spec("greedy", model, sample_path, USER, GREEDY, greedy_sampling))
    results["pipeline_grid"] = run_pipeline(args, work, "grid", spec("grid", model, sample_path, USER, grid_methods, grid_sampling))
    results["pipeline_four_shot"] = run_pipeline(
        args, work, "fewshot", spec("fewshot", model, sample_path, FEW_SHOT, GREEDY, greedy_sampling, shots=shots))

    # 4. Peak memory with the 1.5B model at n_ctx 4096.
    if not args.skip_rss:
        big = models_dir / MODELS["qwen2.5-coder-1.5b"]
        rss = run_pipeline(args, work, "rss_1p5b", spec("rss_1p5b", big, sample_path, USER, GREEDY, greedy_sampling), ["--limit", "10"])
        results["rss_1p5b"] = {"peak_rss_bytes": rss["peak_rss_bytes"], "gguf_bytes": big.stat().st_size}

    # Ratios.
    g = results["pipeline_greedy"]
    ratios = {
        "t1_greedy_reviews_per_s_vs_peer": g["reviews_per_s"] / pr["reviews_per_s"],
        "t2_seed_grid_wall_vs_one_greedy_cell": results["pipeline_grid"]["run_wall_s"] / g["run_wall_s"],
        "t2_peer_estimate_wall_vs_one_greedy_cell": 7.0,
        "t3_four_shot_per_row_vs_zero_shot": results["pipeline_four_shot"]["run_wall_s"] / g["run_wall_s"],
        "t3_four_shot_prompt_tokens_vs_zero_shot": results["pipeline_four_shot"]["prompt_tokens"] / g["prompt_tokens"],
        "t4_evaluated_tok_per_s_vs_pp512_same_binding": g["evaluated_tok_per_s"] / pp_ours["pp512_tok_s"],
        "t4_evaluated_tok_per_s_vs_pp512_llama_cpp_python": g["evaluated_tok_per_s"] / pp_peer["pp512_tok_s"],
        "peer_prompt_tok_per_s_vs_pp512_llama_cpp_python": pr["prompt_tok_per_s"] / pp_peer["pp512_tok_s"],
        "binding_pp512_vs_llama_cpp_python": pp_ours["pp512_tok_s"] / pp_peer["pp512_tok_s"],
    }
    if "rss_1p5b" in results:
        r = results["rss_1p5b"]
        ratios["t5_peak_rss_minus_gguf_gib"] = (r["peak_rss_bytes"] - r["gguf_bytes"]) / 2**30
    results["ratios"] = ratios
    results["packing"] = packing(args, work, model, sample_path)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "RESULTS.md").write_text(markdown(results))
    print((out / "RESULTS.md").read_text())


def packing(args, work, model, sample_path):
    """One greedy cell evaluated one prompt at a time and packed P prompts to a decode call
    (`--pack P`), each against llama.cpp's raw rate for P rows in separate KV streams."""
    greedy = spec("packing", model, sample_path, USER, GREEDY, {"temperature": 0})
    one = run_pipeline(args, work, "pack1", greedy)
    answers = lambda name: [p["raw_answer"] for p in pq.read_table(
        work / name / "reports/packing/predictions.parquet").sort_by("row_id").to_pylist()]
    base = answers("pack1")
    out = {"one_at_a_time": one, "packed": []}
    for rows in [int(x) for x in args.packs.split(",")]:
        batch = max(512, rows * 64)
        raw = json.loads(subprocess.run(
            [str(args.pipeline), "engine-bench", str(model), "--threads", str(args.threads),
             "--packed", f"{rows}x{batch}"],
            check=True, capture_output=True, text=True).stdout)
        r = run_pipeline(args, work, f"pack{rows}", greedy, ["--pack", str(rows)])
        got = answers(f"pack{rows}")
        out["packed"].append({
            "rows": rows, "batch": batch, "run": r,
            "raw_packed_pp_tok_s": raw["packed"]["pp_tok_s"], "pp512_tok_s": raw["pp512_tok_s"],
            "reviews_per_s_vs_one_at_a_time": r["reviews_per_s"] / one["reviews_per_s"],
            "evaluated_tok_per_s_vs_raw_packed": r["evaluated_tok_per_s"] / raw["packed"]["pp_tok_s"],
            "same_answers": sum(a == b for a, b in zip(base, got)), "rows_compared": len(base),
        })
    return out


def packing_lines(r):
    k = r.get("packing")
    if not k:
        return []
    one = k["one_at_a_time"]
    lines = [
        "",
        f"## Packed evaluation (`--pack P`), {r['n']} reviews, one greedy cell",
        "",
        "P reviews per decode call, each in its own KV stream (`kv_unified = false`); the limit is llama.cpp's",
        "raw rate for P sequences of batch/P tokens in one call (`pipeline engine-bench --packed PxBATCH`).",
        "",
        "| evaluation | reviews/s | vs one at a time | evaluated tok/s | raw limit, tok/s | vs raw | same answers |",
        "|---|---|---|---|---|---|---|",
        f"| one at a time (default) | {one['reviews_per_s']:.3f} | 1.00× | {one['evaluated_tok_per_s']:.1f} | pp512 {k['packed'][0]['pp512_tok_s']:.1f} | {one['evaluated_tok_per_s'] / k['packed'][0]['pp512_tok_s']:.2f}× | |",
    ]
    for p in k["packed"]:
        run = p["run"]
        lines.append(
            f"| packed {p['rows']} × {p['batch'] // p['rows']} tokens per call | {run['reviews_per_s']:.3f} | "
            f"**{p['reviews_per_s_vs_one_at_a_time']:.2f}×** | {run['evaluated_tok_per_s']:.1f} | "
            f"{p['raw_packed_pp_tok_s']:.1f} | {p['evaluated_tok_per_s_vs_raw_packed']:.2f}× | "
            f"{p['same_answers']} of {p['rows_compared']} |")
    lines += [
        "",
        "Packed prompts are evaluated whole (no shared-prefix reuse), so they evaluate more tokens than one at a time.",
    ]
    return lines


def write_packing_section(out, results):
    """RESULTS.md with its packed-evaluation section replaced by this run's (the rest of the
    page is the earlier full run's)."""
    page = out / "RESULTS.md"
    text = page.read_text() if page.exists() else ""
    text = text.split("\n## Packed evaluation")[0].rstrip("\n") + "\n"
    page.write_text(text + "\n".join(packing_lines(results)) + "\n")


def markdown(r):
    x = r["ratios"]
    g = r["pipeline_greedy"]
    p = r["peer_generate_greedy"]
    grid = r["pipeline_grid"]
    f = r["pipeline_four_shot"]
    pp = r["pp512"]
    lines = [
        f"# Benchmark: pipeline vs llama-cpp-python ({r['model']}, {r['n']} reviews, {r['threads']} threads)",
        "",
        f"Measured {r['date_utc']} UTC on {r['cpu'] or r['machine']}, all in one `scripts/bench` invocation.",
        "The peer is `../shared/bench/peer_llamacpp_python.py` (llama-cpp-python 0.3.36) on the same",
        "reviews (its own sampler, seed 7) with the same prompt; pipeline runs start from an empty cache.",
        "",
        "| target | pipeline | reference | ratio | goal |",
        "|---|---|---|---|---|",
        f"| 1. one greedy generate cell, reviews/s | {g['reviews_per_s']:.3f} | peer {p['reviews_per_s']:.3f} | **{x['t1_greedy_reviews_per_s_vs_peer']:.2f}×** | ≥ 0.95× |",
    ]
    lines.append(
        f"| 2. seed grid, 7 cells (t 0.2/0.8 × seed 1/2/3 + loglik), wall | {grid['run_wall_s']:.0f} s | one greedy cell {g['run_wall_s']:.0f} s | **{x['t2_seed_grid_wall_vs_one_greedy_cell']:.2f}×** | ≤ 1.5× (peer ≈ 7×) |")
    lines += [
        f"| 3. 4-shot fixed examples, per-row time | {f['run_wall_s'] / f['rows']:.2f} s | zero-shot {g['run_wall_s'] / g['rows']:.2f} s | **{x['t3_four_shot_per_row_vs_zero_shot']:.2f}×** | ≤ 1.25× (prompt is {x['t3_four_shot_prompt_tokens_vs_zero_shot']:.1f}× the tokens) |",
        f"| 4. prompt tokens evaluated per second | {g['evaluated_tok_per_s']:.1f} | pp512 {pp['pipeline_binding']['pp512_tok_s']:.1f} (same binding) | **{x['t4_evaluated_tok_per_s_vs_pp512_same_binding']:.2f}×** | ≥ 0.90× |",
        f"| 4b. same, against llama-cpp-python's pp512 | {g['evaluated_tok_per_s']:.1f} | pp512 {pp['llama_cpp_python']['pp512_tok_s']:.1f} | {x['t4_evaluated_tok_per_s_vs_pp512_llama_cpp_python']:.2f}× | |",
    ]
    if "rss_1p5b" in r:
        rs = r["rss_1p5b"]
        lines.append(
            f"| 5. peak RSS, 1.5B at n_ctx 4096 | {rs['peak_rss_bytes'] / 2**30:.2f} GiB | GGUF {rs['gguf_bytes'] / 2**30:.2f} GiB | GGUF + **{x['t5_peak_rss_minus_gguf_gib']:.2f} GiB** | ≤ GGUF + 1 GiB |")
    lines += [
        "",
        "Generations run one after another from the prompt's state: answers are 1-2 tokens, so they cost little next "
        "to the prompt (decoding them side by side measured 0.97-1.00× here, within run-to-run noise, and was "
        "removed so that a row's numbers never depend on which other cells ran beside it).",
        "",
        "Not measured here: the peer on the 4-shot prompt (its script has no few-shot mode), and GPU speed (no GPU on "
        "this machine; `--features cuda` builds llama.cpp with CUDA). Rows are never packed into one decode call of a "
        "unified KV cache: with llama-cpp-sys-2 0.1.160 a decode mixing sequences with 32+ tokens gives wrong logits "
        "there (ggml-org/llama.cpp#24962, reproduced here). They are packed in separate KV streams (`--pack`, below).",
    ]
    lines += [
        "",
        f"Accuracy on the same rows: pipeline greedy {list(g['accuracy'].values())[0]:.3f}, peer greedy {p['accuracy']:.3f}.",
        f"Prompt tokens: pipeline evaluated {g['evaluated_tokens']} of {g['prompt_tokens']} (each template's fixed prefix is evaluated once per model); the peer evaluated {p['prompt_tokens']}.",
        f"Peer prompt tokens/s vs its pp512: {x['peer_prompt_tok_per_s_vs_pp512_llama_cpp_python']:.2f}×; pipeline's binding pp512 vs llama-cpp-python's: {x['binding_pp512_vs_llama_cpp_python']:.2f}×.",
    ]
    lines += packing_lines(r)
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
