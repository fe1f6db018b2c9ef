"""GGUF (llama.cpp) as an output format: detection, export options and CLI arguments, read-back, llama.cpp runner,
decode bytes and the model card's row. The writer itself is formats/gguf.py."""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from formats.protocol import ArtifactSummary, ExportedArtifact, ExportFormat, count_text

class GGUFFormat(ExportFormat):
    name = "gguf"
    title = "GGUF"
    library = "gguf"
    runtime = "llama.cpp"
    extra = "llamacpp"
    marker = "o"
    suffix = ".gguf"
    magic = b"GGUF"
    validation_checks = "read-back exactness and llama.cpp vs PyTorch logits"

    # ------------------------------------------------------------------ export
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ternary-type", default="TQ2_0", choices=("TQ1_0", "TQ2_0"),
                            help="container for ternary and binary weights: TQ2_0 (default, faster) or TQ1_0 "
                                 "(smaller)")
        parser.add_argument("--ternary-fallback", default="Q4_0", choices=("Q4_0", "Q2_0"),
                            help="container for the ternary and binary rows the 256-block of --ternary-type does "
                                 "not hold (rows not a multiple of 256, e.g. SmolLM2's 576; groups under 256): Q4_0 "
                                 "(default, 4.5 bits/weight, SIMD kernels everywhere) or Q2_0 (2.25 bits/weight, "
                                 "blocks of 64, exact; needs a llama.cpp that has Q2_0, and x86 builds have only its "
                                 "scalar kernel: a size option for Arm)")
        parser.add_argument("--embedding-type", default=None,
                            help="token embedding type: F16 (default), F32, Q8_0, Q4_0 ... (float tables: rounded)")
        parser.add_argument("--output-type", default=None,
                            help="output (lm_head) type for untied models: F16 (default), F32, Q8_0, Q4_0 ...")
        parser.add_argument("--tensor-type", action="append", default=[], metavar="NAME_REGEX=TYPE",
                            help="per-tensor type as llama-quantize takes it (e.g. 'attn_v=Q8_0'); refused unless "
                                 "exact or --allow-lossy; repeatable")
        parser.add_argument("--allow-lossy", action="store_true",
                            help="accept --tensor-type overrides that cannot hold the grid exactly")
        parser.add_argument("--name", default=None, help="general.name (default from the base model)")
        parser.add_argument("--base-model", default=None, help="hub id of the base model for general.base_model.*")
        parser.add_argument("--license", default=None, help="general.license (default: known for the base model)")

    def options_from_args(self, args: argparse.Namespace):
        from formats.gguf import GGUFOptions

        return GGUFOptions(
            ternary_type=args.ternary_type, ternary_fallback=args.ternary_fallback,
            embedding_type=args.embedding_type, output_type=args.output_type,
            tensor_types=args.tensor_type, allow_lossy=args.allow_lossy, overwrite=args.overwrite,
            name=args.name, base_model=args.base_model, license=args.license, progress=None,
        )

    def storage(self, row_length: int, bits: float, group_size: int | None, table: bool = False):
        from formats.gguf_types import gguf_storage

        return gguf_storage(row_length, bits, group_size, table)

    def storage_plan(self, row_length: int, bits: float, table: bool = False):
        from formats.gguf_types import gguf_storage_plan

        return gguf_storage_plan(row_length, bits, table)

    def default_name(self, checkpoint, options: Any) -> str:
        from formats.gguf_metadata import default_filename

        return default_filename(checkpoint, options)

    def export(self, checkpoint, output: str | os.PathLike | None, options: Any) -> ExportedArtifact:
        from formats.gguf import export_gguf

        result = export_gguf(checkpoint, output, options)
        lines = [f"wrote {result.path} ({result.nbytes / 2**20:.1f} MiB, {result.file_type}, {result.seconds:.1f} s)",
                 f"{'type':<8} {'tensors':>7} {'MiB':>8}"]
        for t, n in sorted(result.type_counts().items()):
            mib = sum(r.nbytes for r in result.records if r.ggml_type == t) / 2**20
            lines.append(f"{t:<8} {n:>7} {mib:>8.2f}")
        if result.fallbacks:
            lines.append(f"{len(result.fallbacks)} tensors use an exact fallback container (see paretoq.fallbacks), "
                         f"e.g. {result.fallbacks[0]}")
        if result.lossy:
            lines.append(f"lossy tensors: {', '.join(result.lossy[:5])}{' ...' if len(result.lossy) > 5 else ''}")
        return ExportedArtifact(result.path, lines, result)

    def sweep_options(self, float_model: bool, max_seq_len: int, settings: dict):
        from formats.gguf import GGUFOptions

        # the float model as F16 everywhere (what llama.cpp's own F16 conversion holds)
        extra = (dict(tensor_types=[".*=F16"], allow_lossy=True) if float_model
                 else dict(embedding_type=settings.get("gguf_embedding_type")))
        return GGUFOptions(overwrite=True, progress=False, **extra)

    def sweep_settings(self, config: Any) -> dict:
        return {"gguf_embedding_type": config.gguf_embedding_type}

    # ------------------------------------------------------------------ read back and run
    def readback(self, path: Path, checkpoint) -> dict:
        from formats.gguf_readback import verify_gguf_readback

        rb = verify_gguf_readback(path, checkpoint)
        lossy = sorted(rb["lossy"])
        note = ("every tensor dequantized by gguf-py (Q1_0 / Q2_0, which it cannot dequantize: by ours) equals the "
                "checkpoint bit for bit" if not lossy else
                f"{len(lossy)} tensors were exported lossy on request (--allow-lossy); max |error| "
                f"{max(rb['lossy'].values()):.3g}; all others bit-exact")
        return {"checked": rb["tensors"], "exact": rb["exact"], "mismatches": lossy, "note": note}

    def open_runner(self, path: Path, threads: int, n_ctx: int, for_speed: bool = False):
        from runtime_tests.llamacpp import LlamaCppRunner

        if for_speed:  # F16 KV cache and last-token logits only: what llama-bench measures
            return LlamaCppRunner(path, n_threads=threads, n_ctx=n_ctx, n_batch=max(32, n_ctx), logits_all=False,
                                  kv_f32=False)
        return LlamaCppRunner(path, n_threads=threads, n_ctx=n_ctx)

    def runtime_window(self, runner) -> int | None:
        return int(runner.n_ctx)

    def runtime_info(self, path: Path, runner) -> dict:
        return {"runtime": self.runtime, "n_ctx": runner.n_ctx, "kv_cache": "f32"}

    def tokenize(self, path: Path, text: str) -> list[int] | None:
        from runtime_tests.llamacpp import tokenize_with_vocab

        return tokenize_with_vocab(path, text)

    def decode_bytes(self, path: Path, context: float):
        from runtime_tests.bandwidth import gguf_decode_bytes

        return gguf_decode_bytes(path, context)

    # ------------------------------------------------------------------ model card
    def describe(self, path: Path, root: Path, n_params: int | None) -> ArtifactSummary:
        """Tensor types, sizes and ParetoQ metadata of a GGUF file (header and tensor table only)."""
        from runtime_tests.llamacpp_types import GGUFFileReader

        reader = GGUFFileReader(path)

        def field(key: str) -> Any:
            f = reader.get_field(key)
            return f.contents() if f is not None else None

        tensors = list(reader.tensors)
        counts = Counter(t.tensor_type.name for t in tensors)
        quantized = set(field("paretoq.quantized_tensors") or []) - {""}
        total_bytes = sum(int(t.n_bytes) for t in tensors)
        total_elems = sum(int(t.n_elements) for t in tensors)
        lin = [t for t in tensors if t.name in quantized]
        lin_elems = sum(int(t.n_elements) for t in lin)
        recipe_text = field("paretoq.recipe")
        try:
            recipe = json.loads(recipe_text) if recipe_text else None
        except json.JSONDecodeError:
            recipe = None
        org, name = field("general.base_model.0.organization"), field("general.base_model.0.name")
        base = f"{org}/{name}" if org and name else None
        notes = []
        for type_name in sorted(counts.keys() & {"Q1_0", "Q2_0"}):  # types only recent llama.cpp builds have
            notes.append(f"{type_name} tensors need a llama.cpp recent enough to have ggml type {type_name} "
                         "(llama-cpp-python 0.3.36 has it)" + ("; x86 builds have only its scalar kernel, so it is "
                                                              "slow there (Arm builds: NEON)" if type_name == "Q2_0"
                                                              else ""))
        lossy = [x for x in (field("paretoq.lossy_tensors") or []) if x]
        if lossy:
            notes.append(f"{len(lossy)} tensors were stored in a lossy type on request (--allow-lossy)")
        return ArtifactSummary(
            path=path.relative_to(root), format=self.title, size_bytes=path.stat().st_size,
            containers=count_text(counts),
            linear_bpw=8 * sum(int(t.n_bytes) for t in lin) / lin_elems if lin_elems else None,
            total_bpw=8 * total_bytes / total_elems if total_elems else None,
            bits=sorted({float(b) for b in (field("paretoq.tensor_bits") or []) if b}),
            license=field("general.license"), base_model=base, recipe=recipe, notes=notes,
        )

    def how_to_run(self, relpath: str, prompt: str) -> str:
        f = relpath
        return ("### llama.cpp (GGUF)\n\n"
                f"```bash\nllama-cli -m {f} -p \"{prompt}\" -n 64\nllama-server -m {f}   # OpenAI-compatible "
                "server on port 8080\n```\n\n"
                "llama-cpp-python:\n\n"
                f"```python\nfrom llama_cpp import Llama\n\nllm = Llama(model_path=\"{f}\", n_ctx=2048)\n"
                f"print(llm(\"{prompt}\", max_tokens=64)[\"choices\"][0][\"text\"])\n```"
                "\n\nNever re-quantize these files with llama-quantize: their tensors already hold the trained grid "
                "exactly.")

