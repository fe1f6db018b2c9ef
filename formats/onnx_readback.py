"""Reading an exported ONNX folder back: every MatMulNBits weight decoded by onnxruntime itself, and every float
initializer, equals the checkpoint's dequantized tensor bit for bit (``verify_onnx_readback``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from formats.onnx import EMBED, MODEL_FILE, quantized_weight
from formats.onnx_graph import IR_VERSION, MS_DOMAIN, OPSET, describe_model
from formats.protocol import ReadbackMismatch
from paretoq_export.canonical.checkpoint import open_checkpoint

_DECODE_ROWS = 1024  # identity rows per decoding run: bounds memory for wide K


def decode_matmulnbits(node: ir.Node) -> np.ndarray:
    """The float32 weight [N, K] a MatMulNBits node multiplies by, as onnxruntime computes it: the node's own
    initializers and attributes in a one-node model at accuracy_level 0, fed the identity (I @ W^T = W^T exactly,
    every product being 1*w or 0*w)."""
    import onnxruntime as ort

    attrs = {a.name: a.value for a in node.attributes.values()}
    k, n = int(attrs["K"]), int(attrs["N"])
    consts = [ir.tensor(v.const_value.numpy(), name=f"in{i}") for i, v in enumerate(node.inputs[1:], 1)]
    a = ir.Value(name="A", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", k]))
    inits = [ir.Value(name=t.name, const_value=t, type=ir.TensorType(t.dtype), shape=t.shape) for t in consts]
    y = ir.Value(name="Y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["M", n]))
    decoded = ir.Node(MS_DOMAIN, "MatMulNBits", [a, *inits], outputs=[y],
                      attributes=[ir.AttrInt64(key, int(val)) for key, val in {**attrs, "accuracy_level": 0}.items()])
    graph = ir.Graph([a], [y], nodes=[decoded], initializers=inits, opset_imports={"": OPSET, MS_DOMAIN: 1})
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=IR_VERSION))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out = np.empty((n, k), dtype=np.float32)
    for start in range(0, k, _DECODE_ROWS):
        stop = min(k, start + _DECODE_ROWS)
        eye = np.zeros((stop - start, k), dtype=np.float32)
        eye[np.arange(stop - start), np.arange(start, stop)] = 1.0
        out[:, start:stop] = session.run(None, {"A": eye})[0].T
    return out


def decode_gather_block_quantized(node: ir.Node, graph: ir.Graph) -> np.ndarray:
    """The float32 table [vocab, K] a GatherBlockQuantized node looks rows up in, as onnxruntime computes it: the
    node's data (an initializer, or the Reshape of one the exporter writes), scales and zero points in a one-node
    model gathering every row in order (then the Slice that cuts a padded last block, if the graph has one)."""
    import onnxruntime as ort

    def const(value: ir.Value) -> np.ndarray:
        if value.const_value is None and value.producer() is not None and value.producer().op_type == "Reshape":
            shape = const(value.producer().inputs[1])
            return const(value.producer().inputs[0]).reshape(shape)
        if value.const_value is None:
            raise ReadbackMismatch(f"{node.name}: input {value.name} is not a constant")
        return value.const_value.numpy()

    arrays = [const(v) for v in node.inputs[:1]] + [const(v) for v in node.inputs[2:] if v is not None]
    attrs = [ir.AttrInt64(key, int(a.value)) for key, a in node.attributes.items()]
    inits = [ir.Value(name=f"in{i}", const_value=ir.tensor(a, name=f"in{i}"), type=ir.TensorType(ir.tensor(a).dtype),
                      shape=ir.Shape(a.shape)) for i, a in enumerate(arrays)]
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["T"]))
    y = ir.Value(name="Y", type=ir.TensorType(ir.DataType.FLOAT))
    gather = ir.Node(MS_DOMAIN, "GatherBlockQuantized", [inits[0], ids, *inits[1:]], outputs=[y], attributes=attrs)
    graph1 = ir.Graph([ids], [y], nodes=[gather], initializers=inits, opset_imports={"": OPSET, MS_DOMAIN: 1})
    proto = ir.serde.serialize_model(ir.Model(graph1, ir_version=IR_VERSION))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    table = session.run(None, {"ids": np.arange(arrays[0].shape[0], dtype=np.int64)})[0]
    consumer = next(iter(node.outputs[0].consumers()), None)
    if consumer is not None and consumer.op_type == "Slice":
        table = table[:, : int(const(consumer.inputs[2])[0])]
    return table


def _initializer_values(model: ir.Model) -> dict[str, np.ndarray]:
    """Float initializers as float32 (the fp16-stored ones widened: the graph casts them the same way)."""
    out = {}
    for name, value in model.graph.initializers.items():
        array = value.const_value.numpy()
        if array.dtype in (np.float16, np.float32):
            out[name] = array.astype(np.float32)
    return out


def _expected_floats(ckpt) -> dict[str, np.ndarray]:
    spec = describe_model(ckpt.config)
    return {k: spec.stored_float_values(k, v.float().numpy()) for k, v in ckpt.tensors.items() if v.is_floating_point()}


def _first_difference(name: str, got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"{name}: shape {got.shape} != checkpoint {want.shape}"
    bad = tuple(int(i) for i in np.argwhere(got != want)[0])
    return f"{name} differs from the checkpoint at {bad}: {float(got[bad])!r} != {float(want[bad])!r}"


def verify_onnx_readback(folder: str | os.PathLike, checkpoint, progress: bool | None = False) -> dict:
    """Decode every MatMulNBits weight with onnxruntime and compare every float initializer with the checkpoint
    (exact float32 equality). Raises ReadbackMismatch naming the first tensor that differs or is missing."""
    from tqdm.auto import tqdm

    ckpt, _ = open_checkpoint(checkpoint)
    model = ir.load(Path(folder) / MODEL_FILE)
    floats = _initializer_values(model)
    expected = _expected_floats(ckpt)
    checked: dict[str, str] = {}  # checkpoint tensor -> what held it
    nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
    for node in tqdm(nodes, desc="onnx read-back", unit="weight", disable=None if progress is None else not progress):
        q = quantized_weight(ckpt, node.name)
        if q is None:
            raise ReadbackMismatch(f"MatMulNBits {node.name} has no quantized weight in the checkpoint")
        got, want = decode_matmulnbits(node), q.dequantize().numpy()
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ReadbackMismatch(_first_difference(node.name, got, want))
        checked[EMBED if node.name == "lm_head" and "lm_head.weight" not in ckpt.quantized else
                f"{node.name}.weight"] = "MatMulNBits"
    gathers = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    for node in gathers:
        q = ckpt.quantized.get(EMBED)
        if q is None:
            raise ReadbackMismatch(f"GatherBlockQuantized {node.name} has no quantized table in the checkpoint")
        got, want = decode_gather_block_quantized(node, model.graph), q.dequantize().numpy()
        if got.shape != want.shape or not np.array_equal(got, want):
            raise ReadbackMismatch(_first_difference(node.name, got, want))
        checked.setdefault(EMBED, "GatherBlockQuantized")
    for name, want in expected.items():
        if name not in floats:
            continue
        if floats[name].shape != want.shape or not np.array_equal(floats[name], want):
            raise ReadbackMismatch(_first_difference(name, floats[name], want))
        checked.setdefault(name, "float")
    missing = (set(ckpt.quantized) | set(expected)) - set(checked) - ({"lm_head.weight"} if ckpt.tied else set())
    if missing:
        raise ReadbackMismatch(f"{folder} lacks tensors {sorted(missing)[:3]}")
    n_float = sum(1 for v in checked.values() if v == "float")
    return {"tensors": len(checked), "matmulnbits": len(nodes), "gather_block_quantized": len(gathers),
            "float": n_float, "bit_exact": True}
