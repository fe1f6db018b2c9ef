"""Reading an ExecuTorch .pte back: XNNPACK files every constant in the program's named data under the sha256 of
its bytes, without tensor names, so each quantized linear's codes and scales are rebuilt from the checkpoint with
the exporter's own container and found by content."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from formats.protocol import ArtifactError


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def xnnpack_weight_bytes(qdata: np.ndarray, bits: int) -> bytes:
    """A weight's bytes as the XNNPACK delegate serializes them (executorch/backends/xnnpack/operators/
    node_visitor.py): int8 as is; int4 ("qc4w") offset by 8 and packed two per byte, even column in the low nibble,
    rows padded to an even length."""
    if bits != 4:
        return np.ascontiguousarray(qdata, dtype=np.int8).tobytes()
    q = ((qdata.astype(np.int16) + 8) & 0xFF).astype(np.uint8)
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
    flat = q.reshape(-1)
    return (flat[1::2] << 4 | flat[0::2]).astype(np.uint8).tobytes()


def embedding_table_bytes(q) -> tuple[bytes, bytes]:
    """The bytes of a per-row quantized embedding table as executorch's quantized embedding op stores them: int8
    codes k = q - z (``quantized_decomposed::embedding_byte``'s weight) and the fp32 per-row steps."""
    import torch

    from formats.executorch_weights import intx_weight

    w = intx_weight(q.codes, q.scale, q.grid, "x86", dynamic_activations=False)
    return (np.ascontiguousarray(w.qdata.numpy(), dtype=np.int8).tobytes(),
            w.scale.reshape(-1).to(torch.float32).contiguous().numpy().tobytes())


def find_embedding_table(data: bytes, q) -> bool | None:
    """The quantized lookup table found in the .pte bytes by content (codes and steps, bit for bit); None for a
    4-bit table, whose nibble packing is the op's own (not checked here)."""
    if q.grid.code_bits != 8:
        return None
    codes, steps = embedding_table_bytes(q)
    return data.find(codes) >= 0 and data.find(steps) >= 0


def verify_executorch_readback(path: Path, ckpt) -> dict:
    """The .pte's XNNPACK constants vs the checkpoint. XNNPACK files every constant in the program's named data
    under the sha256 of its bytes (scales under "scale_" + sha256), without tensor names: each quantized linear's
    expected int4/int8 codes and scales are rebuilt from the checkpoint (formats.executorch_weights.intx_weight,
    the exporter's own container) and looked up by content; every entry's bytes must hash to its key (a flipped
    byte is named through the tensor whose key it carries)."""
    import torch

    from formats.executorch_weights import container_for, intx_weight

    try:
        from executorch.exir._serialize._program import deserialize_pte_binary
    except ImportError as exc:
        raise ImportError("reading .pte files needs executorch: pip install 'paretoq-export[executorch]'") from exc
    raw = path.read_bytes()
    named = deserialize_pte_binary(raw).named_data
    entries = named.pte_data if named is not None else {}

    def data(key: str) -> bytes:
        return bytes(named.buffers[entries[key].buffer_index])

    emb = "model.embed_tokens.weight"
    linears = {("lm_head.weight" if k == emb else k): q for k, q in ckpt.quantized.items()
               if k != emb or ckpt.tied}  # an embedding table is a lookup outside XNNPACK, unless tied to lm_head
    owner: dict[str, str] = {}
    expected = {}
    for name, q in linears.items():
        for target in ("x86", "x86-int8"):  # int4 (default) or int8 container, whichever the file holds
            container = container_for(q.grid, target)
            w = intx_weight(q.codes, q.scale, q.grid, target)
            key = _sha256(xnnpack_weight_bytes(w.qdata.numpy(), container.bits))
            if key in entries:
                break
        scale32 = w.scale.reshape(-1).to(torch.float32).contiguous()
        scale16 = scale32.to(torch.bfloat16)  # XNNPACK's per-channel-group (qb4w) path stores bf16 scales
        keys = {"fp32": "scale_" + _sha256(scale32.numpy().tobytes()),
                "bf16": "scale_" + _sha256(scale16.view(torch.int16).numpy().tobytes())}
        expected[name] = (key, keys, scale32, scale16)
        owner[key] = name
        owner.update({k: f"{name} (scales)" for k in keys.values()})
    for key in entries:
        bare = key.removeprefix("scale_")
        if len(bare) == 64 and _sha256(data(key)) != bare:
            raise ArtifactError(f"read-back of {path} failed: {owner.get(key, f'XNNPACK constant {key[:16]}...')} "
                                "does not match its content hash (the file is corrupt: re-export it)")
    table = find_embedding_table(raw, ckpt.quantized[emb]) if emb in ckpt.quantized else None
    if table is False:
        raise ArtifactError(f"read-back of {path} failed: the quantized embedding table ({emb}: int8 codes and fp32 "
                            "steps) is not in the .pte (it was not exported from this checkpoint: re-export it)")
    exact, lossy, rel_err = 0, [], 0.0
    head = ckpt.tensors.get("lm_head.weight", ckpt.tensors.get(emb) if ckpt.tied and emb not in ckpt.quantized else None)
    head_note = ""
    if head is not None and "lm_head.weight" not in linears:  # a float output layer: XNNPACK keeps it in fp32
        if _sha256(head.to(torch.float32).contiguous().numpy().tobytes()) in entries:
            exact += 1
            linears = {**linears, "lm_head.weight": None}
        else:
            head_note = "; the float lm_head was not found among the XNNPACK constants"
    for name, (key, scale_keys, scale32, scale16) in expected.items():
        if key not in entries:
            raise ArtifactError(f"read-back of {path} failed: the codes of {name} are not in the .pte (it was not "
                                "exported from this checkpoint, or for another --target: re-export it)")
        if scale_keys["fp32"] in entries or (scale_keys["bf16"] in entries and torch.equal(scale16.float(), scale32)):
            exact += 1
        elif scale_keys["bf16"] in entries:
            lossy.append(name)
            rel_err = max(rel_err, float(((scale16.float() - scale32).abs() / scale32.abs()).max()))
        else:
            raise ArtifactError(f"read-back of {path} failed: the scales of {name} are not in the .pte (it was not "
                                "exported from this checkpoint: re-export it)")
    n_quant = sum(q is not None for q in linears.values())
    checked = len(linears) + (table is True)
    exact += table is True
    table_note = ("the quantized embedding table found bit for bit (int8 codes, fp32 steps); norms not read back"
                  if table else "norms and embedding table not read back")
    note = (f"{n_quant} quantized linears{' and the float lm_head' if n_quant < len(linears) else ''} found in the "
            f"XNNPACK constants by content hash, codes bit-exact; {table_note}{head_note}")
    if lossy:
        note += (f"; {len(lossy)} linears have their per-row scales stored as bf16 by XNNPACK's int4 path (max "
                 f"relative error {rel_err:.2g}): not bit-exact")
    return {"checked": checked, "exact": exact, "mismatches": lossy, "note": note}
