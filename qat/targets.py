"""Bits that follow the container: what a ``--target`` run stores per weight, per module type and in total.

A runtime stores weights in blocks with one scale each. A grid narrower than the block's integers, or one step per
row repeated in every block, spends bytes that carry nothing: SmolLM2's 576-wide rows cannot hold a 256-block type,
so a 2-bit row lands in GGUF's Q4_0 (4.5 bits per weight) anyway, and the same bytes hold a 4-bit grid with its own
step per 32 weights. Which container a weight lands in is each format's knowledge (``ExportFormat.storage`` and
``storage_plan`` in formats/protocol.py); the commands hand the chosen format's plan to ``QATConfig.storage_plan``,
and qat.prepare trains each module at the grid and group size it returns. This module only counts: a placement is
any object with ``bits``, ``group_size``, ``container`` and ``stored_bits`` (bits per weight, codes and scales).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def module_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj(.weight)`` -> ``q_proj``."""
    parts = name.split(".")
    return parts[-2] if parts[-1] == "weight" and len(parts) > 1 else parts[-1]


def is_table(name: str) -> bool:
    """Embedding / output tables (placed as tables: Q8_0 / Q4_0 in GGUF) rather than decoder linears."""
    return module_type(name) in ("embed_tokens", "lm_head", "wte", "output")


def stored_bits(entries: list[tuple[str, int, int, Any]]) -> dict:
    """Bits per weight stored, per module type and in total, from (name, rows, cols, placement) entries, in the
    entries' order. JSON-ready: recorded in the checkpoint's recipe, printed by the CLI, read by the model card."""
    by_type: dict[str, dict] = {}
    for name, rows, cols, placement in entries:
        row = by_type.setdefault(module_type(name), {"weights": 0, "bits": 0.0, "containers": []})
        row["weights"] += rows * cols
        row["bits"] += rows * cols * placement.stored_bits
        if placement.container not in row["containers"]:
            row["containers"].append(placement.container)
    total_bits = sum(r["bits"] for r in by_type.values())
    total_weights = sum(r["weights"] for r in by_type.values())
    return {
        "by_type": {kind: {"weights": r["weights"], "bits_per_weight": r["bits"] / r["weights"],
                           "containers": r["containers"]} for kind, r in by_type.items()},
        "weights": total_weights,
        "bytes": total_bits / 8.0,
        "bits_per_weight": total_bits / max(total_weights, 1),
    }


def checkpoint_stored_bits(checkpoint, storage: Callable[..., Any]) -> dict:
    """``stored_bits`` of a canonical checkpoint's quantized weights, placed by a format's ``storage``."""
    entries = []
    for key, q in checkpoint.quantized.items():
        rows, cols = q.shape
        entries.append((key, rows, cols, storage(cols, q.grid.bits, None if q.per_row else q.group_size,
                                                 is_table(key))))
    return stored_bits(entries)


def format_stored_bits(report: dict, target: str) -> str:
    """The report as the CLI prints it: one line per module type, then the total."""
    lines = [f"bits per weight stored in {target}:"]
    for kind, r in report["by_type"].items():
        lines.append(f"  {kind:<14} {r['bits_per_weight']:6.3f}  ({'/'.join(r['containers'])}, "
                     f"{r['weights']:,} weights)")
    lines.append(f"  {'total':<14} {report['bits_per_weight']:6.3f}  ({report['bytes'] / 2**20:.2f} MiB of "
                 f"{report['weights']:,} quantized weights)")
    return "\n".join(lines)


def recorded_stored_bits(checkpoint_dir) -> str | None:
    """The report a --target run recorded in its checkpoint's recipe, as the CLI prints it (None without one)."""
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    report = config.get("quantization_config", {}).get("recipe", {}).get("stored_bits")
    return None if report is None else format_stored_bits(report, report["target"])
