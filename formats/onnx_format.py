"""ONNX (onnxruntime / onnxruntime-genai) as an output format: detection, export options and CLI arguments,
read-back, onnxruntime runner, cached-generation check, decode bytes and the model card's row. The writer is
formats/onnx.py."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

from formats.protocol import (
    ArtifactError, ArtifactSummary, ExportedArtifact, ExportFormat, StoragePlacement, count_text,
)

MODEL_FILE = "model.onnx"  # formats.onnx.MODEL_FILE (not imported here: onnx is an optional extra)
GENAI_CONFIG = "genai_config.json"

ACCURACY_HELP = (
    "MatMulNBits accuracy_level. 4 (default): onnxruntime quantizes activations to int8 in its integer kernels "
    "(fast; logits off by ~1e-2). 0: float32 activations, logits match the PyTorch reference to ~1e-6 (slower; "
    "an 8-bit embedding/lm_head is very slow there)"
)
SMALLEST_HELP = (
    "fewest bytes instead of fastest: 2-bit SEQ as bits=2 with a float zero point 1.5 (~35%% fewer linear bytes; "
    "onnxruntime runs it on a float kernel, ~10x slower per layer) instead of the exact bits=4 codes 2q+5 with "
    "step s/2; at --accuracy-level 0 ternary/binary likewise"
)


class OnnxFormat(ExportFormat):
    name = "onnx"
    title = "ONNX"
    library = "onnx"
    runtime = "onnxruntime"
    extra = "onnx"
    marker = "s"
    suffix = ""
    validation_checks = "read-back exactness, onnxruntime vs PyTorch logits and cached generation"

    def storage(self, row_length: int, bits: float, group_size: int | None, table: bool = False):
        # MatMulNBits as exported by default (formats.onnx_nbits.choose_encoding): 1 / 1.58-bit codes in bits=2,
        # 2-bit SEQ (its half-integer zero point needs the integer one of bits=4) and 3 / 4-bit in bits=4 (--smallest
        # keeps 2-bit in bits=2 with a float zero point), a float32 scale per block (the largest power of two <= 128
        # dividing the row, or the group); tables as the checkpoint stores them
        if table or bits >= 8:
            return StoragePlacement(bits, group_size, f"int{int(bits)}", bits + 16.0 / (group_size or row_length))
        block = next((b for b in (128, 64, 32, 16) if (group_size or row_length) % b == 0), 16)
        width = 2 if bits < 2 else 4
        return StoragePlacement(bits, group_size, f"MatMulNBits bits={width}", width + 32.0 / block)

    def storage_plan(self, row_length: int, bits: float, table: bool = False):
        # 3-bit is stored in bits=4: train 4-bit; the block's scale is stored anyway: one step per block
        if table or bits >= 8:
            return self.storage(row_length, bits, None, table)
        block = next((b for b in (128, 64, 32) if row_length % b == 0), None)
        return self.storage(row_length, bits if bits <= 2 else 4.0, block, table)

    def detect(self, path: Path) -> Path | None:
        if path.is_dir():
            return path if (path / MODEL_FILE).is_file() else None
        if path.suffix != ".onnx":
            return None
        if path.name != MODEL_FILE or not (path.parent / GENAI_CONFIG).is_file():
            raise ArtifactError(f"{path} is not inside an exported ONNX folder ({MODEL_FILE} + {GENAI_CONFIG}): "
                                "export it with `paretoq-export export onnx`")
        return path.parent

    def artifact_bytes(self, path: Path) -> int:
        """model.onnx plus its external data (not the tokenizer)."""
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file() and p.name.startswith(MODEL_FILE))

    def artifacts_in(self, folder: Path, filenames: list[str]) -> list[Path]:
        return [folder] if MODEL_FILE in filenames else []

    # ------------------------------------------------------------------ export
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--accuracy-level", type=int, default=4, choices=(0, 4), help=ACCURACY_HELP)
        parser.add_argument("--smallest", action="store_true", help=SMALLEST_HELP)
        parser.add_argument("--block-size", type=int, default=128,
                            help="largest MatMulNBits block size (power of two >= 16); per tensor the largest power "
                                 "of two dividing the input width (or the checkpoint's group size) is used "
                                 "(576 -> 64)")
        parser.add_argument("--external-data", action="store_true",
                            help="store tensors in model.onnx.data (automatic above 2 GB)")

    def options_from_args(self, args: argparse.Namespace):
        from formats.onnx import OnnxOptions

        return OnnxOptions(accuracy_level=args.accuracy_level, max_block_size=args.block_size,
                           smallest=args.smallest, overwrite=args.overwrite,
                           external_data=True if args.external_data else None)

    def default_output(self, checkpoint_dir: Path, checkpoint, options: Any) -> Path:
        from formats.onnx import default_dirname

        return Path(checkpoint_dir).resolve().parent / default_dirname(checkpoint, options)

    def default_name(self, checkpoint, options: Any) -> str:
        from formats.onnx import default_dirname

        return default_dirname(checkpoint, options)

    def export(self, checkpoint, output: str | os.PathLike | None, options: Any) -> ExportedArtifact:
        from formats.onnx import export_onnx

        result = export_onnx(checkpoint, output, options)
        lines = [f"wrote {result.path} ({result.nbytes / 2**20:.1f} MiB, accuracy_level {result.accuracy_level}, "
                 f"{result.seconds:.1f} s)", f"{'container':<16} {'tensors':>7} {'MiB':>8}  why"]
        for kind, n in sorted(result.container_counts().items()):
            mib = sum(r.nbytes for r in result.records if r.container == kind) / 2**20
            why = "; ".join(sorted({r.why for r in result.records if r.container == kind and r.why}))
            lines.append(f"{kind:<16} {n:>7} {mib:>8.2f}  {why}".rstrip())
        lines.append(f"{'float tensors':<16} {'':>7} {result.float_bytes / 2**20:>8.2f}")
        gather = [r for r in result.records if r.op == "GatherBlockQuantized"]
        if gather:
            shared = any(r.module == "lm_head" and r.grid and r.nbytes == 0 for r in result.records)
            lines.append(f"embedding: GatherBlockQuantized {gather[0].container} block {gather[0].block_size}"
                         + (", the tied lm_head's MatMulNBits reads the same codes and scales" if shared else ""))
        return ExportedArtifact(result.path, lines, result)

    def sweep_options(self, float_model: bool, max_seq_len: int, settings: dict):
        from formats.onnx import OnnxOptions

        return OnnxOptions(overwrite=True, progress=False)

    # ------------------------------------------------------------------ read back and run
    def readback(self, path: Path, checkpoint) -> dict:
        from formats.onnx_readback import verify_onnx_readback

        rb = verify_onnx_readback(path, checkpoint, progress=None)
        return {"checked": rb["tensors"], "exact": rb["tensors"], "mismatches": [],
                "note": f"{rb['matmulnbits']} MatMulNBits weights"
                        + (" and the GatherBlockQuantized embedding table" if rb["gather_block_quantized"] else "")
                        + f" decoded by onnxruntime and {rb['float']} float initializers equal the checkpoint bit "
                          "for bit",
                "matmulnbits": rb["matmulnbits"]}

    def open_runner(self, path: Path, threads: int, n_ctx: int, for_speed: bool = False):
        from runtime_tests.onnxruntime_runner import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, n_threads=threads)

    def runtime_info(self, path: Path, runner) -> dict:
        import onnx

        meta = {p.key: p.value for p in onnx.load(path / MODEL_FILE, load_external_data=False).metadata_props}
        return {"runtime": self.runtime, "accuracy_level": int(meta.get("paretoq.accuracy_level", -1))}

    def exact_alternative(self, runtime_info: dict) -> str | None:
        level = runtime_info.get("accuracy_level", 0)
        if level > 0:  # int8 activations: not the checkpoint's math
            return (f"re-export with --accuracy-level 0 (float activations, exact; accuracy_level {level} quantizes "
                    "activations to int8)")
        return None

    def extra_checks(self, path: Path, checkpoint, runner, token_ids: list[int], reference, **options) -> dict:
        """Greedy generation with the KV cache equals generation without it, token for token. Where it does not, the
        first differing position and the full-recompute logit gap between the two picks there: int8 activations
        (accuracy_level 4) move logits by up to ~1, so a near-tie can flip while the cache is right."""
        prompt, new_tokens = token_ids[:16], 16
        cached = runner.generate(prompt, new_tokens, use_cache=True)
        uncached = runner.generate(prompt, new_tokens, use_cache=False)
        generation = {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "cached": cached,
                      "uncached": uncached, "cached_equals_uncached": cached == uncached}
        if cached != uncached:
            first = next(i for i, (a, b) in enumerate(zip(cached, uncached)) if a != b)
            row = runner.logits([*prompt, *cached[:first]])[-1]
            generation.update(first_difference=first,
                              logit_gap=float(row[uncached[first]] - row[cached[first]]))
        return {"generation": generation}

    def tokenizer_file(self, path: Path) -> Path | None:
        return next((p for p in (path / "tokenizer.json", path / "tokenizer.model") if p.is_file()), None)

    def decode_bytes(self, path: Path, context: float):
        from runtime_tests.bandwidth import onnx_decode_bytes

        return onnx_decode_bytes(path, context)

    # ------------------------------------------------------------------ model card
    def describe(self, path: Path, root: Path, n_params: int | None) -> ArtifactSummary:
        """MatMulNBits containers and stored bytes of an ONNX decoder folder, from the graph (external data
        unread)."""
        import onnx
        from onnx.helper import tensor_dtype_to_np_dtype

        folder = path
        model = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        inits = {t.name: t for t in model.graph.initializer}

        def nbytes(name: str) -> int:
            t = inits.get(name)
            return math.prod(t.dims) * tensor_dtype_to_np_dtype(t.data_type).itemsize if t is not None else 0

        counts: Counter = Counter()
        packed_names: set[str] = set()
        lin_bytes = lin_elems = 0
        for node in model.graph.node:
            if node.op_type != "MatMulNBits":
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            counts[f"MatMulNBits {attrs.get('bits', 4)}-bit/{attrs.get('block_size')}"] += 1
            names = [n for n in node.input[1:4] if n in inits]
            packed_names.update(names)
            lin_bytes += sum(nbytes(n) for n in names)
            lin_elems += int(attrs["K"]) * int(attrs["N"])
        other = [n for n in inits if n not in packed_names]
        counts.update(f"{onnx.TensorProto.DataType.Name(inits[n].data_type)}" for n in other)
        total_bytes = lin_bytes + sum(nbytes(n) for n in other)
        total_elems = lin_elems + sum(math.prod(inits[n].dims) for n in other)
        try:
            recipe = json.loads(meta["paretoq.recipe"]) if "paretoq.recipe" in meta else None
            linears = json.loads(meta.get("paretoq.quantized_linears", "{}"))
        except json.JSONDecodeError:
            recipe, linears = None, {}
        notes = []
        if "paretoq.accuracy_level" in meta:
            level = meta["paretoq.accuracy_level"]
            notes.append(f"accuracy_level {level}: " + ("float activations (exact)" if level == "0"
                                                         else "onnxruntime quantizes activations to int8 (faster)"))
        return ArtifactSummary(
            path=folder.relative_to(root), format=self.title, size_bytes=self.artifact_bytes(folder),
            containers=count_text(counts), linear_bpw=8 * lin_bytes / lin_elems if lin_elems else None,
            total_bpw=8 * total_bytes / total_elems if total_elems else None,
            bits=sorted({float(v["bits"]) for v in linears.values() if v.get("bits")}), recipe=recipe, notes=notes,
            folder=True,
        )

    def how_to_run(self, relpath: str, prompt: str) -> str:
        d = relpath
        return ("### onnxruntime (ONNX)\n\n"
                "onnxruntime-genai reads the folder as it is (`genai_config.json` is inside):\n\n"
                f"```python\nimport onnxruntime_genai as og\n\nmodel = og.Model(\"{d}\")\n"
                "tokenizer = og.Tokenizer(model)\n"
                "params = og.GeneratorParams(model)\nparams.set_search_options(max_length=64)\n"
                "generator = og.Generator(model, params)\n"
                f"generator.append_tokens(tokenizer.encode(\"{prompt}\"))\n"
                "while not generator.is_done():\n    generator.generate_next_token()\n"
                "print(tokenizer.decode(generator.get_sequence(0)))\n```\n\n"
                "Plain onnxruntime, greedy decoding with the KV cache:\n\n"
                f"```python\n{onnxruntime_snippet(d, prompt)}```")


def onnxruntime_snippet(folder: str, prompt: str) -> str:
    """Greedy generation from an exported ONNX folder with plain onnxruntime (tested in tests/test_model_card.py)."""
    return f'''import json

import numpy as np
import onnxruntime as ort
from transformers import AutoTokenizer

folder = "{folder}"
decoder = json.load(open(f"{{folder}}/genai_config.json"))["model"]["decoder"]
session = ort.InferenceSession(f"{{folder}}/model.onnx", providers=["CPUExecutionProvider"])
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer("{prompt}", return_tensors="np").input_ids
empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
past = {{f"past_key_values.{{i}}.{{kv}}": empty
        for i in range(decoder["num_hidden_layers"]) for kv in ("key", "value")}}
step, generated = ids, []
for _ in range(32):
    n_past = next(iter(past.values())).shape[2]
    logits, *present = session.run(None, {{
        "input_ids": step, "attention_mask": np.ones((1, n_past + step.shape[1]), np.int64),
        "position_ids": np.arange(n_past, n_past + step.shape[1], dtype=np.int64)[None], **past}})
    past = dict(zip(past, present))
    step = logits[:, -1:].argmax(-1)
    generated.append(int(step[0, 0]))
print(tokenizer.decode(generated))
'''
