"""What every output format is: one small object per format (formats.registry lists them), so that the commands
(validate, bench, pareto, card, export) never ask which format they hold.

A format knows its files (detect, bytes), how to write one from the canonical checkpoint (its options dataclass,
its CLI arguments, export), how to read one back and run it (read-back, runner, bytes read per decoded token) and
how to describe one on the model card. Adding a format is one module with one subclass of ``ExportFormat`` and one
line in formats/registry.py.
"""

from __future__ import annotations

import argparse
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar


class ArtifactError(ValueError):
    """A path that is no artifact of any format, or a damaged one; one line naming the problem and the fix."""


class ReadbackMismatch(ValueError):
    """A tensor read back from an exported file differs from the checkpoint; the message names the tensor."""


@dataclass
class ArtifactSummary:
    """One exported file (or folder) as the model card describes it."""

    path: Path  # relative to the output folder (an ONNX folder for ONNX)
    format: str  # the format's title: "GGUF" | "ONNX" | "ExecuTorch" | "checkpoint"
    size_bytes: int
    containers: str  # e.g. "Q2_K x84, Q4_0 x14, F32 x9" (count of tensors per container)
    linear_bpw: float | None = None  # stored bits per weight of the quantized linears
    total_bpw: float | None = None  # stored bits per weight over every tensor of the file
    bits: list[float] = field(default_factory=list)  # the ParetoQ bit-widths the file holds
    license: str | None = None
    base_model: str | None = None
    recipe: dict | None = None  # paretoq.recipe embedded in the file
    notes: list[str] = field(default_factory=list)
    folder: bool = False  # a folder (ONNX, the checkpoint) rather than one file


@dataclass(frozen=True)
class StoragePlacement:
    """Where one weight lands in a format's containers: the grid width and group size (None: per row) it is stored
    at, the container, and the bits per weight that container stores (codes and scales together)."""

    bits: float
    group_size: int | None
    container: str
    stored_bits: float


def count_text(counts: Counter) -> str:
    """"Q2_K x84, Q4_0 x14": tensors per container, most first (the card's containers column)."""
    return ", ".join(f"{name} x{n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail bounds of a validation (flags --max-kl, --min-top1, --max-ppl-ratio)."""

    max_kl: float = 1e-2  # mean KL(reference || artifact), nats
    min_top1: float = 0.95  # top-1 agreement where the reference's top-1 leads clearly
    max_ppl_ratio: float = 1.02  # artifact PPL / reference PPL, and its inverse, at most this


@dataclass
class ExportedArtifact:
    """What an export wrote: the path its runtime opens, and the lines the CLI prints about it."""

    path: Path
    summary: list[str]
    result: Any  # the format's own result object (tensor records, timings, ...)
    cannot_run_here: str | None = None  # why this machine cannot run it (an Arm64-only program): no validation


class ExportFormat(ABC):
    name: ClassVar[str]  # CLI and JSON name: "gguf"
    title: ClassVar[str]  # tables and the card: "GGUF"
    library: ClassVar[str]  # Hub library_name
    runtime: ClassVar[str]  # the runtime that validates and benchmarks it: "llama.cpp"
    extra: ClassVar[str]  # the pip extra of paretoq-export that installs its exporter and runtime
    marker: ClassVar[str]  # matplotlib marker of its points in the pareto plots
    suffix: ClassVar[str]  # the file name ending of a default output ("" for a folder)
    magic: ClassVar[bytes] = b""  # the bytes at magic_offset that identify one of its files (b"" for folders)
    magic_offset: ClassVar[int] = 0
    validation_checks: ClassVar[str]  # what --validate checks, for the help text
    # exact weights: what remains is the runtime's float summation order (KL ~1e-6 against PyTorch)
    thresholds: ClassVar[Thresholds] = Thresholds()

    # ------------------------------------------------------------------ files
    def detect(self, path: Path) -> Path | None:
        """The path this format's runtime opens when ``path`` (an existing file or folder) is one of its artifacts,
        else None; ArtifactError where it looks like one but is damaged. By default by content: a file whose bytes
        at magic_offset are ``magic``; a file with the format's name ending but other bytes is damaged."""
        if not self.magic or not path.is_file():
            return None
        with open(path, "rb") as fh:
            head = fh.read(self.magic_offset + len(self.magic))
        if head[self.magic_offset:] == self.magic:
            return path
        if path.suffix == self.suffix:
            raise ArtifactError(f"{path} has a {self.suffix} name but not its magic bytes ({head!r}): the file is "
                                "truncated or not an export; re-export it")
        return None

    def artifact_bytes(self, path: Path) -> int:
        """Bytes of what the runtime loads (tokenizer and config files excluded)."""
        return Path(path).stat().st_size

    def artifacts_in(self, folder: Path, filenames: list[str]) -> list[Path]:
        """This format's artifacts among one folder's files (the model card's walk)."""
        return [folder / n for n in filenames if self.suffix and n.endswith(self.suffix)]

    # ------------------------------------------------------------------ export
    @abstractmethod
    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """This format's own export options (the checkpoint, -o, --overwrite and validation are common)."""

    @abstractmethod
    def options_from_args(self, args: argparse.Namespace) -> Any:
        """The format's options dataclass from parsed arguments."""

    @abstractmethod
    def export(self, checkpoint, output: str | os.PathLike | None, options: Any) -> ExportedArtifact:
        """Write the artifact from a QuantizedCheckpoint (or its directory), atomically."""

    @abstractmethod
    def sweep_options(self, float_model: bool, max_seq_len: int, settings: dict) -> Any:
        """Options of one cell of a pareto sweep (``settings``: the sweep's format settings, e.g.
        gguf_embedding_type); ``float_model``: the unquantized baseline."""

    @abstractmethod
    def default_name(self, checkpoint, options: Any) -> str:
        """The file (or folder) name an export gets when -o names no file: from the model, bits and options."""

    def storage(self, row_length: int, bits: float, group_size: int | None, table: bool = False) -> StoragePlacement:
        """Where a weight of this grid width and group size lands and what it stores per weight (``table``: an
        embedding / output table)."""
        raise NotImplementedError(f"{self.name} has no storage plan")

    def storage_plan(self, row_length: int, bits: float, table: bool = False) -> StoragePlacement:
        """``--target``: for a weight asked for at ``bits``, the widest grid and the group size that the container
        it lands in stores at no extra cost (so no module pays for bits it does not use)."""
        raise NotImplementedError(f"{self.name} has no storage plan")

    def default_output(self, checkpoint_dir: Path, checkpoint, options: Any) -> Path:
        """Where `export` writes without -o: next to the checkpoint, under the format's default name."""
        return Path(checkpoint_dir).resolve().parent

    def sweep_settings(self, config: Any) -> dict:
        """The sweep settings this format reads (recorded in each cell, so a resumed sweep sees a change)."""
        return {}

    def validation_tokens(self, artifact: ExportedArtifact, tokens: int) -> int:
        """How many of ``tokens`` validation tokens this export can take in one call (ExecuTorch: its cache)."""
        return tokens

    # ------------------------------------------------------------------ read back and run
    @abstractmethod
    def readback(self, path: Path, checkpoint) -> dict:
        """Compare the file's tensors with the checkpoint: {"checked", "exact", "mismatches", "note"}; a
        difference raises ReadbackMismatch (a ValueError) naming the tensor."""

    @abstractmethod
    def open_runner(self, path: Path, threads: int, n_ctx: int, for_speed: bool = False):
        """A runtime_tests runner (``logits(ids)``, ``bench(pp, tg)``). ``for_speed``: as the bench measures
        (runtime-default KV types, last-token logits only)."""

    def runtime_window(self, runner) -> int | None:
        """Most tokens one ``runner.logits`` call takes (None: unbounded)."""
        return None

    def runtime_info(self, path: Path, runner) -> dict:
        return {"runtime": self.runtime}

    def exact_alternative(self, runtime_info: dict) -> str | None:
        """When a validation fails: the export option that runs the checkpoint's exact math where this file took a
        faster, approximate path (``runtime_info`` as runtime_info gave it), or None."""
        return None

    def extra_checks(self, path: Path, checkpoint, runner, token_ids: list[int], reference, **options) -> dict:
        """Format-specific runtime checks beyond the logits (KV cache vs recompute ...), into the report's
        "checks" (``reference``: the PyTorch logits [T, V] of ``token_ids``); a failed check is reported, not
        raised."""
        return {}

    def tokenizer_file(self, path: Path) -> Path | None:
        """The tokenizer file shipped with the artifact that its runtime reads (tokenizer.json, or a SentencePiece
        tokenizer.model), or None where the artifact embeds its vocabulary or carries none."""
        return None

    def tokenize(self, path: Path, text: str) -> list[int] | None:
        """The ids the artifact's own tokenizer gives ``text`` (no BOS/EOS), None where it carries none; the
        validation compares them with transformers'. By default from ``tokenizer_file``: tokenizer.json through
        the tokenizers library (what onnxruntime-genai and ExecuTorch's runner read), tokenizer.model through
        sentencepiece."""
        file = self.tokenizer_file(path)
        if file is None or not file.is_file():
            return None
        if file.suffix == ".model":
            import sentencepiece

            return list(sentencepiece.SentencePieceProcessor(model_file=str(file)).encode(text))
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(file)).encode(text, add_special_tokens=False).ids

    @abstractmethod
    def decode_bytes(self, path: Path, context: float):
        """Bytes one decoded token reads (runtime_tests.bandwidth.DecodeBytes)."""

    # ------------------------------------------------------------------ model card
    @abstractmethod
    def describe(self, path: Path, root: Path, n_params: int | None) -> ArtifactSummary:
        """The card's row of this artifact, read from the file."""

    @abstractmethod
    def how_to_run(self, relpath: str, prompt: str) -> str:
        """The card's markdown section on running the artifact at ``relpath`` (inside the uploaded folder)."""
