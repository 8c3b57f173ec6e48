#!/usr/bin/env python3
"""The embed stage against llama.cpp's raw embedding rate, on the same binding and threads.

    python3 scripts/bench_embed.py [--pipeline target/release/pipeline] [--pool 2000]

1. `pipeline run` on a spec whose only cell is a kNN vote over a pool of `--pool` IMDB train
   reviews (fresh cache): the embed stage embeds every pool text, one text per decode call.
   Its tokens/s (model load excluded) is the measured rate.
2. `pipeline engine-bench --embed-tokens T` with T the mean tokens per text of step 1: one
   decode of T tokens, median of 5: llama.cpp's raw rate at the same decode size.

Writes OUT/embed.json and OUT/EMBED.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

MINILM = "all-MiniLM-L6-v2-F16.gguf"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="target/release/pipeline")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parent.parent
    models = Path(os.environ.get("PIPELINE_MODELS_DIR", Path.home() / ".cache/pipeline-models"))
    model = models / MINILM
    work = Path(tempfile.mkdtemp(prefix="pipeline-embed-bench-"))
    data = repo / "experiments/data/imdb"
    (work / "spec.yaml").write_text(f"""name: embed-bench
dataset:
  path: {data / 'test.parquet'}
  id: id
  text: text
  label: label
  labels: {{0: negative, 1: positive}}
  sample: {{n: 20, seed: 1}}
  clean: {{replace: {{"<br />": " "}}, collapse_whitespace: true}}
# A model and a prompt, as every spec names; the only method is a vote, so neither runs.
models:
  - id: smollm2
    gguf: {models / 'SmolLM2-135M-Instruct-Q4_1.gguf'}
prompts:
  - id: p
    user: "{{{{ text }}}}"
embedders:
  - id: minilm
    gguf: {model}
    max_tokens: 256
methods:
  - id: vote
    kind: knn_vote
    embedder: minilm
    from: {data / 'train.parquet'}
    pool: {{n: {args.pool}, seed: 5}}
""")
    subprocess.run([args.pipeline, "run", str(work / "spec.yaml"), "--quiet", "--threads", str(args.threads),
                    "--cache-dir", str(work / "cache"), "--reports-dir", str(work / "reports")],
                   check=True, stdout=subprocess.DEVNULL)
    embed = json.loads((work / "reports/embed-bench/run.json").read_text())["run"]["embed"]
    busy_s = embed["embedded"] / embed["texts_per_s"]
    stage_tok_s = embed["tokens"] / busy_s
    mean_tokens = round(embed["tokens"] / embed["embedded"])
    raw = json.loads(subprocess.run(
        [args.pipeline, "engine-bench", str(model), "--threads", str(args.threads), "--reps", "5",
         "--embed-tokens", str(mean_tokens)], check=True, capture_output=True, text=True).stdout)
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "model": MINILM, "threads": args.threads,
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), ""),
        "texts": embed["embedded"], "tokens": embed["tokens"], "mean_tokens_per_text": mean_tokens,
        "stage_texts_per_s": embed["texts_per_s"], "stage_tokens_per_s": stage_tok_s,
        "raw_tokens_per_s": raw["embed_tok_s"], "ratio": stage_tok_s / raw["embed_tok_s"],
    }
    out = repo / args.out
    out.mkdir(exist_ok=True)
    (out / "embed.json").write_text(json.dumps(result, indent=1))
    (out / "EMBED.md").write_text("\n".join([
        f"# The embed stage vs llama.cpp's raw embedding rate ({MINILM}, {args.threads} threads)",
        "",
        f"Measured {result['date_utc']} UTC on {result['cpu']}, in one `scripts/bench_embed.py` invocation.",
        "",
        "| what | texts/s | tokens/s |",
        "|---|---|---|",
        f"| embed stage: {result['texts']} IMDB train reviews (mean {mean_tokens} tokens, cut at 256), "
        f"one text per decode | {result['stage_texts_per_s']:.1f} | {stage_tok_s:.0f} |",
        f"| llama.cpp raw: one decode of {mean_tokens} tokens, embeddings on, same binding (median of 5) | "
        f"| {raw['embed_tok_s']:.0f} |",
        "",
        f"Ratio: **{result['ratio']:.2f}×** the raw rate (goal ≥ 0.8×). The stage includes tokenizing,",
        "pooling, L2-normalising and committing the vectors to the artifact store.",
        "",
    ]))
    print((out / "EMBED.md").read_text())
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
