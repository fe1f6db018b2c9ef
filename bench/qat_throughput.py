"""Training throughput of ParetoQ QAT against plain bf16 fine-tuning, through the real trainer (qat.trainer.train).

    python bench/qat_throughput.py                      # SmolLM2-135M and TinyLlama-1.1B shapes, 2 and 4 bits
    python bench/qat_throughput.py --models smollm2-135m --bits 2 --steps 4 --batch 2 --seq 256   # quick
    python bench/qat_throughput.py --replot bench/results/qat_throughput.json                       # PNG only

Per model shape (random weights from a LlamaConfig: throughput does not depend on the values) and in one
process, so every ratio compares runs on the same GPU in the same state:
  bf16      no quantization: fp32 master weights, bf16 autocast, AdamW (the trainer's float path)
  qatN      ParetoQ N-bit fake-quant, reference (unfused) autograd function
  qatN-fused  the same with the compiled one-pass kernels of qat/fused.py
Each variant runs ``--warmup`` trainer steps (compilation, allocator warm-up), then ``--steps`` timed steps in a
second train() call; tokens/s is the trainer's own figure for that call (loss.item() synchronises every step).
Peak memory is torch.cuda.max_memory_allocated over the timed call. Writes JSON, prints a table, and draws a PNG
next to the JSON when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from qat.prepare import QATConfig, prepare
from qat.trainer import TrainConfig, train

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192),
    # TinyLlama/TinyLlama-1.1B (the Llama-2 architecture at 1.1B)
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
                       max_position_embeddings=4096),
    # for a CPU check of this script
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, tie_word_embeddings=True, max_position_embeddings=512),
}
DEFAULT_BATCH = {"smollm2-135m": 8, "llama-1.1b": 4, "tiny": 2}
GIB = 2**30


def _build(shape: str, device: torch.device, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **SHAPES[shape])
    with device:  # initialise on the GPU directly: a 1.1B random init on the CPU takes longer than the bench
        return LlamaForCausalLM(config).float()


def _run_variant(shape: str, name: str, bits: float | None, fused: bool, batch: int, seq: int, warmup: int,
                 steps: int, device: torch.device) -> dict:
    model = _build(shape, device, seed=0)
    if bits is not None:
        prepare(model, QATConfig(bits=bits))
    n_params = sum(p.numel() for p in model.parameters())
    blocks = torch.randint(3, SHAPES[shape]["vocab_size"], (2 * batch, seq),
                           generator=torch.Generator().manual_seed(1))
    common = dict(batch_size=batch, lr=1e-5, eval_every=0, eval_at_start=False, progress=False,
                  device=str(device), fused=fused if bits is not None else None, log_every=max(1, steps))
    row = {"model": shape, "variant": name, "bits": bits, "fused": fused, "batch": batch, "seq": seq,
           "tokens_per_step": batch * seq, "params": n_params}
    cuda = device.type == "cuda"
    try:
        start = time.perf_counter()
        train(model, blocks, None, TrainConfig(steps=warmup, **common))
        row["warmup_s"] = round(time.perf_counter() - start, 2)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = train(model, blocks, None, TrainConfig(steps=steps, **common))
        if cuda:
            torch.cuda.synchronize()
        row["timed_wall_s"] = round(time.perf_counter() - start, 3)  # a cross-check of the trainer's tokens/s
        row["tokens_per_s"] = result.tokens_per_s
        row["step_ms"] = 1000 * batch * seq / result.tokens_per_s
        row["final_loss"] = result.final_loss
        if cuda:
            row["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    finally:
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return row


def check_fused(device: torch.device, bits_list=(1, 1.58, 2, 3, 4), shape=(256, 1536)) -> dict:
    """Max differences of the fused kernels (the backend the bench uses on this device) from the reference autograd
    function, bf16 output as under autocast: recorded next to the timings so they are known to time the same maths."""
    from qat.fused import fused_fake_quantize, resolve_backend
    from paretoq_export.canonical.grids import grid_for_bits
    from qat.quantizers import fake_quantize, init_alpha

    out = {"backend": resolve_backend("auto", device)}
    gen = torch.Generator(device="cpu").manual_seed(0)
    for bits in bits_list:
        grid = grid_for_bits(bits)
        w = (torch.randn(shape, generator=gen) * 0.05).to(device)
        a = (init_alpha(w, grid) * 0.8).to(device)
        g = torch.randn(shape, generator=gen).to(device, torch.bfloat16)
        w1, a1 = w.clone().requires_grad_(), a.clone().requires_grad_()
        w2, a2 = w.clone().requires_grad_(), a.clone().requires_grad_()
        y1 = fused_fake_quantize(w1, a1, grid, torch.bfloat16)
        y1.backward(g)
        y2 = fake_quantize(w2, a2, grid).to(torch.bfloat16)
        y2.backward(g)
        out[f"{bits:g}"] = {
            "output_max_abs": (y1.float() - y2.float()).abs().max().item(),
            "grad_weight_max_abs": (w1.grad - w2.grad).abs().max().item(),
            "grad_alpha_max_rel": ((a1.grad - a2.grad).abs().max() / a2.grad.abs().max()).item(),
        }
    return out


def _add_ratios(rows: list[dict]) -> None:
    for row in rows:
        base = next((r for r in rows if r["model"] == row["model"] and r["variant"] == "bf16" and "step_ms" in r),
                    None)
        if base is not None and "step_ms" in row:
            row["step_ratio_to_bf16"] = row["step_ms"] / base["step_ms"]


def table(rows: list[dict]) -> str:
    head = (f"{'model':<13} {'variant':<11} {'batch x seq':>11} {'tokens/s':>10} {'step ms':>8} "
            f"{'x bf16':>7} {'peak GiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<13} {r['variant']:<11} {r['batch']:>5} x {r['seq']:<5} {r['error']}")
            continue
        ratio = f"{r['step_ratio_to_bf16']:.3f}" if "step_ratio_to_bf16" in r else "-"
        peak = f"{r['peak_alloc_gib']:.1f}" if "peak_alloc_gib" in r else "-"
        lines.append(f"{r['model']:<13} {r['variant']:<11} {r['batch']:>5} x {r['seq']:<5} "
                     f"{r['tokens_per_s']:>10,.0f} {r['step_ms']:>8.1f} {ratio:>7} {peak:>9}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in result["rows"] if "step_ratio_to_bf16" in r]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = [r for r in rows if r["model"] == model]
        colors = ["tab:gray" if r["bits"] is None else ("tab:green" if r["fused"] else "tab:red") for r in sub]
        ax.bar([r["variant"] for r in sub], [r["step_ratio_to_bf16"] for r in sub], color=colors)
        ax.axhline(1.10, color="k", ls="--", lw=1, label="1.10x target")
        ax.set_title(f"{model}: batch {sub[0]['batch']} x seq {sub[0]['seq']}")
        ax.set_ylabel("train step time / bf16 step time")
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.suptitle(f"ParetoQ QAT step cost ({result['meta'].get('device', '')})")
    fig.tight_layout()
    png = path.with_suffix(".png")
    tmp = png.with_name(png.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def _write_json(path: Path, result: dict) -> None:
    from paretoq_export.canonical.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1.1b"], choices=sorted(SHAPES))
    ap.add_argument("--bits", nargs="+", type=float, default=[2.0, 4.0])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=None, help="blocks per step (default: per model, see DEFAULT_BATCH)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-unfused", action="store_true", help="skip the reference (unfused) QAT variants")
    ap.add_argument("--out", default="bench/results/qat_throughput.json")
    ap.add_argument("--replot", metavar="JSON", help="only draw the PNG of an existing result file")
    args = ap.parse_args()

    if args.replot:
        path = Path(args.replot)
        print(plot(json.loads(path.read_text()), path))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (AdamW, norms) as any fine-tuning script runs them
    meta = {
        "command": "python bench/qat_throughput.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "precision": "fp32 master weights + bf16 autocast (CUDA), AdamW, grad clip 1.0",
        "timing": f"{args.warmup} warm-up steps, then {args.steps} timed steps (trainer tokens/s)",
    }
    meta["fused_check"] = check_fused(device)
    print("fused vs reference:", json.dumps(meta["fused_check"]), flush=True)
    variants = [("bf16", None, False)]
    for bits in args.bits:
        label = f"qat{bits:g}"
        if not args.no_unfused:
            variants.append((label, bits, False))
        variants.append((f"{label}-fused", bits, True))
    rows: list[dict] = []
    out = Path(args.out)
    todo = [(m, v) for m in args.models for v in variants]
    for model, (name, bits, fused) in tqdm(todo, desc="variants", unit="run"):
        batch = args.batch or DEFAULT_BATCH[model]
        row = _run_variant(model, name, bits, fused, batch, args.seq, args.warmup, args.steps, device)
        rows.append(row)
        _add_ratios(rows)
        tqdm.write(json.dumps(row), nolock=True)
        _write_json(out, {"meta": meta, "rows": rows})  # after every variant: a cut-off run keeps what it measured
    print(table(rows))
    png = plot({"meta": meta, "rows": rows}, out)
    print(f"wrote {out}" + (f" and {png}" if png else ""))


if __name__ == "__main__":
    main()
