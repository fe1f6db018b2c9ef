"""Held-out perplexity of the float model, RTN and ParetoQ QAT at the given bits, on documents never trained on.

    python bench/rtn_vs_qat.py --bits 2 --steps 300 --batch-size 8 --block-size 256 --out bench/results/rtn_vs_qat.json
    python bench/rtn_vs_qat.py --bits 2 --steps 60 --batch-size 4 --block-size 128 --lr 2e-5 1e-4 3e-4 1e-3  # lr sweep

Every quantized figure is measured on the PyTorch model rebuilt from the saved canonical checkpoint (fp16 steps),
i.e. what the exporters ship. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
from paretoq_export.model_source import load_model
from paretoq_export.pipeline import heldout_perplexity
from qat.checkpoint_io import QATCheckpoint
from qat.data import DataConfig, build_data
from qat.prepare import QATConfig, prepare
from qat.trainer import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--bits", nargs="+", default=["2"])
    ap.add_argument("--data", nargs="+", default=["wikipedia"])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--lr", type=float, nargs="+", default=[None],
                    help="peak learning rate(s); several: one QAT run per lr (default: the paper's per bits)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--out", default="bench/results/rtn_vs_qat.json")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = DataConfig(args.data, args.block_size)
    source = load_model(args.model)
    train_blocks, heldout = build_data(source.tokenizer, data)
    heldout = heldout[: args.eval_blocks]
    rows = []
    model = source.model.to(device)
    rows.append({"method": "float", "bits": 16, "heldout_ppl": heldout_perplexity(model, heldout), "steps": 0})
    print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            for method, lr in [("rtn", None)] + [("qat", lr) for lr in args.lr]:
                target = copy.deepcopy(model)
                prepare(target, QATConfig(bits=bits))
                start = time.time()
                steps = 0
                if method == "qat":
                    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                                      lr=lr, warmup_steps=max(1, args.steps // 20), eval_every=0,
                                      output_dir=str(Path(tmp) / f"state{bits}-{lr}"))
                    result = train(target, train_blocks, heldout, cfg)
                    steps, lr = result.steps, result.lr
                seconds = time.time() - start
                ckpt_dir = Path(tmp) / f"{method}{bits}-{lr}"
                QATCheckpoint.from_qat_model(target, source.tokenizer).save(ckpt_dir)
                reference = QuantizedCheckpoint.load(ckpt_dir).build_reference_model().to(device)
                ppl = heldout_perplexity(reference, heldout)
                tokens = steps * args.batch_size * args.grad_accum * args.block_size
                rows.append({"method": method, "bits": float(bits), "heldout_ppl": ppl, "steps": steps, "lr": lr,
                             "train_tokens": tokens, "seconds": round(seconds, 1),
                             "tokens_per_s": round(tokens / seconds, 1) if steps else None})
                print(rows[-1], flush=True)
                del target, reference

    meta = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "model": source.description,
        "data": args.data, "block_size": args.block_size, "eval_blocks": len(heldout),
        "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lrs": args.lr, "note": source.note,
    }
    print(f"\n{'method':<6} {'bits':>5} {'steps':>6} {'lr':>8} {'held-out PPL':>13}")
    for r in rows:
        lr = f"{r['lr']:.0e}" if r.get("lr") else "-"
        print(f"{r['method']:<6} {r['bits']:>5} {r['steps']:>6} {lr:>8} {r['heldout_ppl']:>13.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
