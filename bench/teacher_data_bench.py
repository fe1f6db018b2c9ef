"""Speed and diversity of teacher-data sampling (qat/teacher_data.py) on the available device.

    python bench/teacher_data_bench.py --model SmolLM2-135M-Instruct.Q4_1.gguf --tokens 2M --length 512 \\
        --batch-size 1024 --out bench/results/teacher_data_bench.json
    python bench/teacher_data_bench.py --model my-hf-dir --tokens 200k --batch-size 256 --no-compile

One warm-up batch first (CUDA-graph capture and compilation), then the timed run of --tokens; the JSON holds the
steady-state tokens/s, the warm-up seconds, the settings, the device and the diversity of the sample (distinct
tokens and 4-grams over all tokens, the fraction of sequences that are mostly not letters) plus a few decoded
samples. Nothing is cached: every run samples.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paretoq_export.canonical.atomic import write_text_atomic  # noqa: E402
from paretoq_export.model_source import load_model  # noqa: E402
from qat.teacher_data import SamplingConfig, TeacherSampler, diversity_stats, parse_token_count  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a .gguf file, a transformers directory (default: SmolLM2-135M)")
    p.add_argument("--tokens", default="1M", help="tokens to sample in the timed run (500000, 250k, 5M)")
    p.add_argument("--length", type=int, default=512, help="tokens per sequence (one training block)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences at once (default 1024 on CUDA, 16 CPU)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--greedy-tokens", type=int, default=3)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="eager decode step (default: compiled with CUDA graphs on CUDA, eager on CPU)")
    p.add_argument("--samples", type=int, default=5, help="decoded sequences to keep in the JSON")
    p.add_argument("--out", default=None, help="write the JSON here too")
    args = p.parse_args(argv)

    source = load_model(args.model)
    sampler = TeacherSampler(source.model, source.tokenizer, batch_size=args.batch_size, device=args.device,
                             compile=args.compile)
    del source.model
    tokens = parse_token_count(args.tokens)
    count = max(1, math.ceil(tokens / args.length))
    settings = dict(length=args.length, seed=args.seed, temperature=args.temperature,
                    greedy_tokens=args.greedy_tokens, top_k=args.top_k, top_p=args.top_p)

    start = time.perf_counter()  # warm-up: compilation and graph capture happen in the first batch
    sampler.sample(SamplingConfig(count=min(count, sampler.batch_size), **{**settings, "seed": args.seed + 1}),
                   progress=False)
    _sync(sampler.device)
    warmup_s = time.perf_counter() - start

    start = time.perf_counter()
    blocks = sampler.sample(SamplingConfig(count=count, **settings))
    _sync(sampler.device)
    seconds = time.perf_counter() - start

    result = {
        "model": args.model or "smollm2-135m", "device": str(sampler.device),
        "device_name": torch.cuda.get_device_name(sampler.device) if sampler.device.type == "cuda" else platform.processor(),
        "dtype": str(sampler.dtype), "compiled": sampler.compile, "batch_size": min(sampler.batch_size, count),
        "sequences": count, "tokens": blocks.numel(), "seconds": round(seconds, 3),
        "tokens_per_s": round(blocks.numel() / seconds, 1), "warmup_s": round(warmup_s, 2), **settings,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        **diversity_stats(blocks, source.tokenizer),
        "samples": source.tokenizer.batch_decode(blocks[:args.samples].tolist()),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    for text in result["samples"][:3]:
        print("---", text[:300].replace("\n", " "))
    if args.out:
        write_text_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
