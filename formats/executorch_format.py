"""ExecuTorch (.pte, XNNPACK) as an output format: detection, export options and CLI arguments, read-back by
content hash, the ExecuTorch runner, the KV-cache check, decode bytes and the model card's row. The writer is
formats/executorch.py."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from formats.protocol import ArtifactSummary, ExportedArtifact, ExportFormat, StoragePlacement, Thresholds

class ExecuTorchFormat(ExportFormat):
    name = "executorch"
    title = "ExecuTorch"
    library = "executorch"
    runtime = "executorch"
    extra = "executorch"
    marker = "^"
    suffix = ".pte"
    # int8 dynamic activations, and --embedding-bits 4 rounds the table (KL up to ~2e-2)
    thresholds = Thresholds(max_kl=5e-2, min_top1=0.90, max_ppl_ratio=1.05)
    magic, magic_offset = b"ET", 4  # the flatbuffer file identifier (program.fbs: "ET12") after the root offset
    validation_checks = "ExecuTorch vs PyTorch logits and KV-cached decode"

    # ------------------------------------------------------------------ storage (--target, x86 default)
    def storage(self, row_length: int, bits: float, group_size: int | None, table: bool = False):
        # XNNPACK on x86 runs linears at 4 or 8 bits: every grid in int4 with a bf16 scale per row or group
        width = 8 if bits > 4 else 4
        return StoragePlacement(bits, group_size, f"int{width}", width + 16.0 / (group_size or row_length))

    def storage_plan(self, row_length: int, bits: float, table: bool = False):
        # int4 per channel holds every grid up to 4 bits at the same bytes: train 4-bit, one step per row
        return self.storage(row_length, 8.0 if bits > 4 else 4.0, None, table)

    # ------------------------------------------------------------------ export
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--target", default="x86", choices=("x86", "x86-int8", "arm64"),
                            help="x86 (default): every grid's codes exactly in int4, XNNPACK 8da4w kernels, runs on "
                                 "any CPU; XNNPACK stores int4 per-row scales as bf16 (<= 2^-9 relative). x86-int8: "
                                 "the same integers in int8 with fp32 scales (8da8w): bit-exact, twice the linear "
                                 "bytes. arm64: true 1-3 bit weights for torchao's lowbit kernels -- the export needs "
                                 "an Arm64 torchao and the .pte runs only on Arm64 ExecuTorch builds with those "
                                 "kernels")
        parser.add_argument("--max-seq-len", type=int, default=None,
                            help="KV cache length, prompt + generated tokens (default 1024, capped at the model's "
                                 "max_position_embeddings)")
        parser.add_argument("--embedding-bits", type=int, default=None, choices=(4, 8),
                            help="store the token embedding table with 4 or 8-bit per-row steps (lossy; default "
                                 "float32)")

    def options_from_args(self, args: argparse.Namespace):
        from formats.executorch import ExecuTorchOptions

        return ExecuTorchOptions(target=args.target, max_seq_len=args.max_seq_len,
                                 embedding_bits=args.embedding_bits, overwrite=args.overwrite, progress=None)

    def default_name(self, checkpoint, options: Any) -> str:
        from formats.executorch import default_filename

        return default_filename(checkpoint, options)

    def export(self, checkpoint, output: str | os.PathLike | None, options: Any) -> ExportedArtifact:
        from formats.executorch import export_executorch

        result = export_executorch(checkpoint, output, options)
        d = result.delegation
        lines = [f"wrote {result.path} ({result.nbytes / 2**20:.1f} MiB, target {result.target}, max_seq_len "
                 f"{result.max_seq_len}, {result.seconds:.0f} s)"]
        if result.tokenizer_path:
            lines.append(f"tokenizer: {result.tokenizer_path}")
        lines.append(f"weights: {result.weights['exact']}/{result.weights['tensors']} quantized tensors equal the "
                     f"checkpoint; XNNPACK: {d.subgraphs} delegates, linears delegated: "
                     f"{'all' if result.linears_delegated() else 'NOT all'}")
        arm64 = "an arm64 .pte runs only on Arm64 ExecuTorch builds" if result.target == "arm64" else None
        return ExportedArtifact(result.path, lines, result, cannot_run_here=arm64)

    def validation_tokens(self, artifact: ExportedArtifact, tokens: int) -> int:
        return min(tokens, artifact.result.max_seq_len - 1)  # the whole text must fit the cache

    def sweep_options(self, float_model: bool, max_seq_len: int, settings: dict):
        from formats.executorch import ExecuTorchOptions

        return ExecuTorchOptions(overwrite=True, progress=False, max_seq_len=max_seq_len)

    # ------------------------------------------------------------------ read back and run
    def readback(self, path: Path, checkpoint) -> dict:
        from formats.executorch_readback import verify_executorch_readback

        return verify_executorch_readback(path, checkpoint)

    def open_runner(self, path: Path, threads: int, n_ctx: int, for_speed: bool = False):
        from runtime_tests.executorch_runner import ExecuTorchRunner

        if for_speed:
            import torch

            torch.set_num_threads(threads)
        return ExecuTorchRunner(path, threads=threads)

    def runtime_window(self, runner) -> int | None:
        return int(runner.max_seq_len) - 1

    def runtime_info(self, path: Path, runner) -> dict:
        return {"runtime": self.runtime, "max_seq_len": runner.max_seq_len, "metadata": runner.metadata}

    def extra_checks(self, path: Path, checkpoint, runner, token_ids: list[int], reference,
                     kv_prefill: int | None = None) -> dict:
        """KV-cached decode vs a full recompute, and both vs the PyTorch reference (formats.executorch);
        ``kv_prefill``: tokens prefilled before decoding one by one (default half)."""
        from formats.executorch import check_kv_decode

        prefill = kv_prefill or max(1, len(token_ids) // 2)
        new_tokens = min(16, runner.max_seq_len - prefill - 1)
        return {"kv_cache": check_kv_decode(runner, token_ids, prefill, new_tokens=new_tokens, reference=reference)}

    def tokenizer_file(self, path: Path) -> Path | None:
        from formats.executorch import TOKENIZER_FILES

        return next((path.parent / n for n in TOKENIZER_FILES if (path.parent / n).is_file()), None)

    def decode_bytes(self, path: Path, context: float):
        from runtime_tests.bandwidth import executorch_decode_bytes

        return executorch_decode_bytes(path, context)

    # ------------------------------------------------------------------ model card
    def describe(self, path: Path, root: Path, n_params: int | None) -> ArtifactSummary:
        """An ExecuTorch program: its size, and the target its writer recorded in the file name."""
        name = path.name
        if name.endswith("-xnnpack.pte"):
            containers = "int4 per-channel codes, XNNPACK (int8 dynamic activations)"
        elif name.endswith("-arm64-lowbit.pte"):
            containers = "torchao low-bit kernels (Arm64 builds only)"
        else:
            containers = "ExecuTorch program"
        notes = []
        emb = re.search(r"-emb(\d+)-", name)
        if emb:
            containers += f"; {emb.group(1)}-bit embedding"
            notes.append(f"the float embedding table was rounded to {emb.group(1)} bits per row at export (lossy)")
        size = path.stat().st_size
        return ArtifactSummary(path=path.relative_to(root), format=self.title, size_bytes=size,
                               containers=containers, total_bpw=8 * size / n_params if n_params else None,
                               notes=notes)

    def how_to_run(self, relpath: str, prompt: str) -> str:
        f = relpath
        tok_dir = Path(f).parent.as_posix()
        return ("### ExecuTorch (.pte)\n\n"
                "ExecuTorch's LLM runner (`examples/models/llama`, built with XNNPACK), with the tokenizer file "
                "beside the program:\n\n"
                f"```bash\nllama_main --model_path={f} --tokenizer_path={tok_dir}/tokenizer.json "
                f"--prompt=\"{prompt}\" --seq_len=128\n```\n\n"
                "Python (`pip install executorch`):\n\n"
                f"```python\n{executorch_snippet(f, tok_dir, prompt)}```")


def executorch_snippet(pte: str, tokenizer_dir: str, prompt: str) -> str:
    """Greedy generation from a .pte with executorch.runtime (tested in tests/test_model_card.py when available)."""
    return f'''import torch
from executorch.runtime import Runtime
from transformers import PreTrainedTokenizerFast

tokenizer = PreTrainedTokenizerFast(tokenizer_file="{tokenizer_dir}/tokenizer.json")
forward = Runtime.get().load_program("{pte}").load_method("forward")
ids = tokenizer("{prompt}").input_ids
logits = forward.execute([torch.tensor([ids]), torch.arange(len(ids))])[0]  # [1, tokens, vocab]
generated = []
for pos in range(len(ids), len(ids) + 32):
    generated.append(int(logits[0, -1].argmax()))
    logits = forward.execute([torch.tensor([[generated[-1]]]), torch.tensor([pos])])[0]
print(tokenizer.decode(generated))
'''
