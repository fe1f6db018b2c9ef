"""Bits that follow the container: per module, the grid and group size a runtime stores compactly, and the bits
per weight it actually stores.

A runtime stores weights in blocks with one scale each. A grid narrower than the block's integers, or one step per
row repeated in every block, spends bytes that carry nothing: SmolLM2's 576-wide rows cannot hold a 256-block type,
so a 2-bit row lands in Q4_0 (4.5 bits per weight) anyway, and the same bytes hold a 4-bit grid with its own step
per 32 weights. ``plan_module`` picks, for one module of a target, the widest grid and the group size that the
container it will land in stores at no extra cost; ``stored_bits`` counts what that container stores.

The targets as data (bytes per block from gguf-py's GGML_QUANT_SIZES, never retyped):

    gguf        rows of a multiple of 256: 1 / 1.58-bit -> TQ2_0, 2 -> Q2_K, 3 -> Q3_K, all with one step per 256
                (G = 256, the block's d); else, and for 4 bits, Q4_0: 4-bit with one step per 32 (G = 32).
                Embeddings: 8-bit -> Q8_0, 4-bit -> Q4_0, G = 32.
    onnx        MatMulNBits: 1 / 1.58 / 2-bit in bits=2, 3 / 4-bit in bits=4 (so 3 trains as 4), one scale per
                block of the largest power of two (<= 256) dividing the row: G = that block.
    executorch  XNNPACK int4 per channel on x86: every width is stored as int4 with one scale per row, so train
                4-bit per row.

These mirror the writers' choices (formats/gguf_types.py, formats/onnx_nbits.py, formats/executorch_weights.py);
tests/test_group_size.py checks the GGUF plan against the written file byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

TARGETS = ("gguf", "onnx", "executorch")


@dataclass(frozen=True)
class Placement:
    """Where one module's weight goes: the grid width it trains at, its group size (None: per row), the container
    and the bits per weight that container stores (codes and scales together)."""

    bits: float
    group_size: int | None
    container: str
    stored_bits: float


def _ggml(t: T, bits: float, group_size: int | None) -> Placement:
    block, size = GGML_QUANT_SIZES[t]
    return Placement(bits, group_size, t.name, 8.0 * size / block)


def _largest_block(row_length: int, sizes: tuple[int, ...] = (256, 128, 64, 32, 16)) -> int | None:
    return next((b for b in sizes if row_length % b == 0), None)


def plan_module(target: str, row_length: int, bits: float, embedding: bool = False) -> Placement:
    """The placement of one module's weight (rows of ``row_length``) asked for at ``bits`` on ``target``: the
    widest grid and the group size its container stores at no extra cost."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")
    if target == "gguf":
        if embedding or bits >= 8:
            return placement(target, row_length, bits, 32, embedding)
        if row_length % 256 == 0 and bits < 4:
            return placement(target, row_length, bits, 256)
        return placement(target, row_length, 4.0, 32)
    if target == "onnx":
        if embedding or bits >= 8:
            return placement(target, row_length, bits, None, embedding)
        block = _largest_block(row_length)
        return placement(target, row_length, bits if bits <= 2 else 4.0, block if block and block >= 32 else None)
    return placement(target, row_length, 8.0 if bits >= 8 else 4.0, None, embedding)


def placement(target: str, row_length: int, bits: float, group_size: int | None, embedding: bool = False) -> Placement:
    """Where a weight of this grid width and group size (None: per row) lands on ``target``, and what it costs."""
    group = group_size or row_length
    if target == "gguf":
        if bits >= 8:
            return _ggml(T.Q8_0, bits, group_size)
        if not embedding and bits < 4 and group % 256 == 0 and row_length % 256 == 0:
            return _ggml(T.TQ2_0 if bits < 2 else T.Q2_K if bits == 2 else T.Q3_K, bits, group_size)
        return _ggml(T.Q4_0, bits, group_size)  # 32-blocks: any group of a multiple of 32, the row's step repeated
    if target == "onnx":
        if embedding or bits >= 8:
            return Placement(bits, group_size, f"int{int(bits)} per row", bits + 16.0 / group)
        block = min(group, _largest_block(row_length) or group)
        width = 2 if bits <= 2 else 4
        return Placement(bits, group_size, f"MatMulNBits bits={width}", width + 16.0 / block)
    if target == "executorch":
        width = 8 if bits > 4 else 4
        return Placement(bits, group_size, f"int{width}", width + 32.0 / group)
    raise ValueError(f"unknown target {target!r}: choose from {', '.join(TARGETS)}")


def stored_bits(entries: list[tuple[str, int, int, Placement]]) -> dict:
    """Bits per weight stored, per module type and in total, from (name, rows, cols, placement) entries.
    ``by_type`` maps a module type (``q_proj``, ``embed_tokens``, ...) to its weights and bits per weight."""
    by_type: dict[str, dict] = {}
    total_bits = total_weights = 0.0
    for name, rows, cols, placement in entries:
        kind = name.split(".")[-1]
        if kind == "weight":
            kind = name.split(".")[-2]
        row = by_type.setdefault(kind, {"weights": 0, "bits": 0.0, "containers": set()})
        row["weights"] += rows * cols
        row["bits"] += rows * cols * placement.stored_bits
        row["containers"].add(placement.container)
        total_bits += rows * cols * placement.stored_bits
        total_weights += rows * cols
    report = {
        kind: {"weights": int(r["weights"]), "bits_per_weight": r["bits"] / r["weights"],
               "containers": sorted(r["containers"])}
        for kind, r in by_type.items()
    }
    return {"by_type": report, "weights": int(total_weights), "bytes": total_bits / 8.0,
            "bits_per_weight": total_bits / max(total_weights, 1)}


def format_stored_bits(report: dict, target: str) -> str:
    """The report as the CLI prints it: one line per module type, then the total."""
    lines = [f"bits per weight stored in {target}:"]
    for kind, r in report["by_type"].items():
        lines.append(f"  {kind:<14} {r['bits_per_weight']:6.3f}  ({'/'.join(r['containers'])}, "
                     f"{r['weights']:,} weights)")
    lines.append(f"  {'total':<14} {report['bits_per_weight']:6.3f}  ({report['bytes'] / 2**20:.2f} MiB of "
                 f"{report['weights']:,} quantized weights)")
    return "\n".join(lines)


def _is_table(name: str) -> bool:
    return "embed" in name or name.split(".")[-2 if name.endswith(".weight") else -1] in ("lm_head", "output")


def checkpoint_stored_bits(checkpoint, target: str) -> dict:
    """``stored_bits`` of a canonical checkpoint's quantized weights on ``target`` (what the model card shows)."""
    entries = []
    for key, q in checkpoint.quantized.items():
        rows, cols = q.shape
        group = None if q.per_row else q.group_size
        entries.append((key, rows, cols, placement(target, cols, q.grid.bits, group, _is_table(key))))
    return stored_bits(entries)


def recorded_stored_bits(checkpoint_dir) -> str | None:
    """The report a --target run recorded in its checkpoint's recipe, as the CLI prints it (None without one)."""
    import json
    from pathlib import Path

    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    report = config.get("quantization_config", {}).get("recipe", {}).get("stored_bits")
    return None if report is None else format_stored_bits(report, report["target"])
