"""Reading a GGUF export back: every tensor dequantized by gguf-py (by formats.gguf_blocks for Q1_0 / Q2_0, which
gguf-py cannot dequantize) must equal the checkpoint bit for bit."""

from __future__ import annotations

import os

import gguf
import numpy as np

from formats.gguf import tensor_items
from formats.gguf_blocks import dequantize_blocks, dequantize_codes
from formats.gguf_metadata import describe_model, row_permutation
from formats.protocol import ReadbackMismatch
from paretoq_export.canonical.checkpoint import open_checkpoint
from runtime_tests.llamacpp_types import GGUFFileReader


def expected_tensors(ckpt) -> dict[str, np.ndarray]:
    """GGUF name -> float32 values the file must hold: the checkpoint's dequantized tensors, Q/K rows permuted,
    Gemma's norms as (1 + w)."""
    model, arch, permute = describe_model(ckpt.config)
    name_map = gguf.get_tensor_name_map(arch, model.n_layers)
    out = {}
    for hf_name in tensor_items(ckpt):
        if hf_name in ckpt.quantized:
            q = ckpt.quantized[hf_name]
            values = dequantize_codes(q.codes.numpy(), q.scale.numpy(), q.grid)
        else:
            values = model.stored_float_values(hf_name, ckpt.tensors[hf_name].float().numpy())
        perm = row_permutation(hf_name, values.shape[0], model, permute)
        out[name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))] = values[perm] if perm is not None else values
    return out


def verify_gguf_readback(gguf_path: str | os.PathLike, checkpoint) -> dict:
    """Dequantize every tensor with gguf-py and compare with the checkpoint (exact float32 equality, -0 == +0).

    Tensors the export recorded as lossy are compared, not required equal. Raises ReadbackMismatch naming the
    first tensor that differs."""
    ckpt, _ = open_checkpoint(checkpoint)
    expected = expected_tensors(ckpt)
    reader = GGUFFileReader(str(gguf_path))
    lossy = set(_string_array(reader, "paretoq.lossy_tensors"))
    seen, exact, lossy_err = set(), 0, {}
    for tensor in reader.tensors:
        if tensor.name not in expected:
            if tensor.name.startswith(("rope_freqs", "rope_factors")):  # generated from the config
                continue
            raise ReadbackMismatch(f"{gguf_path}: unexpected tensor {tensor.name}")
        want = expected[tensor.name]
        got = dequantize_blocks(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32, copy=False)
        got = got.reshape(want.shape)
        seen.add(tensor.name)
        if tensor.name in lossy:
            lossy_err[tensor.name] = float(np.abs(got - want).max())
            continue
        if not np.array_equal(got, want):
            bad = np.argwhere(got != want)[0]
            raise ReadbackMismatch(
                f"{tensor.name} ({tensor.tensor_type.name}) differs from the checkpoint at {tuple(int(i) for i in bad)}: "
                f"{float(got[tuple(bad)])!r} != {float(want[tuple(bad)])!r}")
        exact += 1
    missing = set(expected) - seen
    if missing:
        raise ReadbackMismatch(f"{gguf_path} lacks tensors {sorted(missing)[:3]}")
    return {"tensors": len(seen), "exact": exact, "lossy": lossy_err, "bit_exact": not lossy_err}


def _string_array(reader, key: str) -> list[str]:
    field_ = reader.get_field(key)
    if field_ is None:
        return []
    return [s for s in (bytes(field_.parts[i]).decode() for i in field_.data) if s]
