"""QAT recipe ablation: which lever moves held-out perplexity at a fixed token budget, against torchao's PARQ.

    python bench/qat_recipe_ablation.py --model SmolLM2-135M-Instruct.Q4_1.gguf --data wiki.txt --steps 141 \\
        --variant paper:recipe=paper --variant mse:recipe=paper,alpha_init=mse \\
        --variant default:recipe=default --variant parq:method=parq --out ablation.json

Each ``--variant NAME:key=value,...`` is one run from the same float model on the same blocks in the same order
(qat.trainer's BlockOrder from --seed). Keys: method (qat | parq), recipe (qat.recipe names), alpha_init, anneal_frac,
alpha_lr_scale, distill_weight, lr, bits, steps, seed, group, emb, target. Every figure is the held-out perplexity of the PyTorch model
rebuilt from the saved canonical checkpoint (what the exporters ship), on documents never trained on. Results are
written after every run, so a run cut short keeps its rows; ``--plot-only`` draws the bar chart. Each row records
the SHA-256 of its saved checkpoint files, so ``--deterministic`` runs can be compared byte for byte across processes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from paretoq_export.canonical.atomic import write_text_atomic
from qat.checkpoint_io import QATCheckpoint as QuantizedCheckpoint
from paretoq_export.model_source import load_model
from paretoq_export.pipeline import heldout_perplexity
from qat.data import DataConfig, build_data
from qat.grids import format_bits, parse_bits
from qat.parq import PARQConfig, parq_checkpoint, train_parq
from qat.prepare import QATConfig, prepare
from qat.recipe import recipe
from qat.trainer import TrainConfig, request_deterministic_cublas, train

_FLOATS = ("anneal_frac", "alpha_lr_scale", "distill_weight", "lr")
_INTS = ("steps", "seed", "group", "emb")


def parse_variant(text: str) -> dict:
    """'NAME:key=value,key=value' -> {'name': NAME, key: value, ...} with numbers parsed."""
    name, _, body = text.partition(":")
    spec: dict = {"name": name}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key in _FLOATS:
            spec[key] = float(value)
        elif key in _INTS:
            spec[key] = int(value)
        elif key == "bits":
            spec[key] = parse_bits(value)
        elif key in ("method", "recipe", "alpha_init", "target"):
            spec[key] = value
        else:
            raise SystemExit(f"error: variant {text!r}: unknown key {key!r}")
    return spec


def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # a reader never sees half a file


def qat_config(spec: dict, bits: float, alpha_init: str) -> QATConfig:
    """The variant's QATConfig: group size (``group``), embedding bits (``emb``, same group size) and ``target``
    (gguf, onnx, executorch): per module the grid and group size that format stores at no extra cost, from the
    format's own storage plan, as ``--target`` does (for GGUF, rows no 256-block type holds train 4-bit per 32,
    exactly the Q4_0 they are stored in)."""
    target = spec.get("target")
    storage_plan = None
    if target is not None:
        from formats.registry import format_named

        storage_plan = format_named(target).storage_plan
    return QATConfig(bits=bits, alpha_init=alpha_init, group_size=spec.get("group"), embedding_bits=spec.get("emb"),
                     target=target, storage_plan=storage_plan)


def run_variant(spec: dict, model: torch.nn.Module, tokenizer, train_blocks: torch.Tensor, heldout: torch.Tensor,
                args: argparse.Namespace, tmp: Path, device: str) -> dict:
    bits = spec.get("bits", parse_bits(args.bits))
    steps = spec.get("steps", args.steps)
    lr = spec.get("lr", args.lr)
    seed = spec.get("seed", args.seed)
    method = spec.get("method", "qat")
    cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=lr, warmup_steps=max(1, steps // 20),
                      eval_at_start=False, seed=seed, fused=args.fused, **args.train_extra)
    row = {"name": spec["name"], "method": method, "bits": bits, "steps": steps, "lr": lr, "seed": seed,
           "train_tokens": steps * args.batch_size * train_blocks.shape[1]}
    start = time.time()
    target = copy.deepcopy(model)
    if method == "parq":
        result = train_parq(target, train_blocks, None, PARQConfig(bits=bits), cfg)
        ckpt = parq_checkpoint(target, bits, tokenizer)
    else:
        chosen = recipe(spec.get("recipe", "paper"), **{k: spec[k] for k in
                                                        ("alpha_init", "anneal_frac", "alpha_lr_scale",
                                                         "distill_weight") if k in spec})
        row["recipe"] = chosen.to_json()
        recipe_lr = chosen.lr_for(bits, grouped="group" in spec)
        if "lr" not in spec and recipe_lr is not None:  # the recipe's lr unless the variant names one
            row["lr"] = recipe_lr
        prepare(target, qat_config(spec, bits, chosen.alpha_init))
        row.update({k: spec[k] for k in ("group", "emb", "target") if k in spec})
        cfg = dataclasses.replace(cfg, lr=row["lr"], anneal_frac=chosen.anneal_frac,
                                  alpha_lr_scale=chosen.alpha_lr_scale, distill_weight=chosen.distill_weight)
        teacher = None
        if chosen.distill_weight > 0:
            teacher = copy.deepcopy(model).to(torch.bfloat16 if device == "cuda" else torch.float32)
        if steps > 0:
            result = train(target, train_blocks, heldout if args.eval_every else None, cfg, teacher=teacher)
        else:
            result = None
        del teacher
        ckpt = QuantizedCheckpoint.from_qat_model(target, tokenizer, recipe={"method": "qat"})
    if result is not None:
        row.update(final_train_loss=round(result.final_loss, 4), tokens_per_s=round(result.tokens_per_s),
                   heldout_history=result.heldout_ppl,
                   **{k: getattr(result, k) for k in ("kept_step", "best_step", "passes", "warnings")
                      if hasattr(result, k)})
    row["train_seconds"] = round(time.time() - start, 1)
    del target
    where = Path(args.save_dir) if args.save_dir else tmp
    ckpt.save(where / spec["name"])
    row["checkpoint_sha256"] = checkpoint_digest(where / spec["name"])
    reference = QuantizedCheckpoint.load(where / spec["name"]).build_reference_model().to(device)
    row["heldout_ppl"] = heldout_perplexity(reference, heldout)
    del reference, ckpt
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def checkpoint_digest(directory: Path) -> str:
    """SHA-256 over the checkpoint's files (names and bytes, in name order): equal iff the saved files are equal."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def plot(results: dict, png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["method"] != "float"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    colors = ["tab:orange" if r["method"] == "parq" else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r["heldout_ppl"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), [f"{r['name']}\n{format_bits(r['bits'])}-bit" for r in rows], rotation=45,
                  ha="right", fontsize=8)
    floats = [r["heldout_ppl"] for r in results["rows"] if r["method"] == "float"]
    if floats:
        ax.axhline(floats[0], color="black", linestyle=":", label=f"float {floats[0]:.2f}")
        ax.legend()
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title(f"{results['meta']['model']}: QAT recipe levers (blue) vs torchao PARQ (orange)", fontsize=9)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF / transformers dir (default: the packaged SmolLM2-135M)")
    ap.add_argument("--data", nargs="+", default=["wikipedia"])
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...")
    ap.add_argument("--bits", default="2", help="bits of variants that do not say")
    ap.add_argument("--steps", type=int, default=141)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False,
                    help="fused fake-quant kernels (default off: every earlier benchmark ran the reference path)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--no-float", action="store_true", help="skip the float model's row")
    ap.add_argument("--save-dir", default=None, help="keep each variant's canonical checkpoint here (NAME/)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="held-out PPL during training every N steps; the best evaluation's weights are kept where "
                         "the trainer supports it (keep_best)")
    ap.add_argument("--out", default="bench/results/qat_recipe_ablation.json")
    ap.add_argument("--deterministic", action="store_true",
                    help="deterministic kernels (qat.trainer TrainConfig.deterministic): identical runs, identical files")
    ap.add_argument("--plot-only", default=None, metavar="JSON")
    args = ap.parse_args()
    args.train_extra = {"eval_every": 0}
    if args.eval_every:
        args.train_extra = {"eval_every": args.eval_every}
        if "keep_best" in TrainConfig.__dataclass_fields__:
            args.train_extra["keep_best"] = True
    if args.deterministic:  # before any tensor reaches the GPU
        request_deterministic_cublas()
        args.train_extra["deterministic"] = True
    if args.plot_only:
        results = json.loads(Path(args.plot_only).read_text())
        print(f"wrote {plot(results, Path(args.plot_only).with_suffix('.png'))}")
        return
    specs = [parse_variant(v) for v in args.variant]
    if not specs:
        raise SystemExit("error: no --variant given: e.g. --variant paper:recipe=paper")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")
    source = load_model(args.model)
    started = time.time()
    train_blocks, heldout = build_data(source.tokenizer, DataConfig(args.data, args.block_size),
                                       model=source.model.to(device))  # teacher[:N] sources sample the float model
    data_seconds = time.time() - started
    heldout = heldout[: args.eval_blocks]
    model = source.model.to(device)
    out = Path(args.out)
    results = {"meta": {"date": time.strftime("%Y-%m-%d"), "model": source.description, "data": args.data,
                        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                        "torch": torch.__version__, "train_blocks": len(train_blocks),
                        "train_tokens_available": train_blocks.numel(), "heldout_tokens": heldout.numel(),
                        "data_seconds": round(data_seconds, 1), "deterministic": args.deterministic,
                        "command": " ".join(sys.argv)}, "rows": []}
    if not args.no_float:
        results["rows"].append({"name": "float", "method": "float", "bits": 16.0,
                                "heldout_ppl": heldout_perplexity(model, heldout)})
        print(json.dumps(results["rows"][-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp_dir:
        for spec in specs:
            row = run_variant(spec, model, source.tokenizer, train_blocks, heldout, args, Path(tmp_dir), device)
            results["rows"].append(row)
            _write_json(out, results)
            print(json.dumps(row), flush=True)
    print(f"\n{'name':<24} {'method':<6} {'bits':>5} {'steps':>6} {'held-out PPL':>13}")
    for r in results["rows"]:
        print(f"{r['name']:<24} {r['method']:<6} {format_bits(r['bits']):>5} {r.get('steps', 0):>6} "
              f"{r['heldout_ppl']:>13.2f}")
    _write_json(out, results)


if __name__ == "__main__":
    main()
