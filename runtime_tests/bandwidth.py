"""The machine's memory read bandwidth, and the bytes a decoder reads per generated token: the decode speed bound.

Decoding one token reads every weight once (except the token-embedding table, of which only one row is
gathered) plus the KV cache so far, and does little arithmetic per byte: on a CPU its speed is bounded by
``read bandwidth / bytes per token``. ``measure_read_bandwidth`` times numpy reductions (a bitwise OR over uint64
words: the cheapest reduction, so the loop waits on memory, not on arithmetic -- float sums measured 10-25% lower
here) over a buffer several times the last-level cache, split over the same number of threads the runtime uses
(numpy releases the GIL in reductions, so the threads read memory in parallel), best of several passes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_BUFFER_BYTES = 256 * 2**20


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache in sysfs (Linux); 32 MiB when it cannot be read."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * scale)
    return best or 32 * 2**20


def measure_read_bandwidth(threads: int = 2, buffer_bytes: int | None = None, passes: int = 5) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s): best of ``passes`` reductions over a buffer of ``buffer_bytes`` (default:
    8x the last-level cache, at least 256 MiB), each of ``threads`` threads reducing its own contiguous slice.
    Not cached: other work on the machine changes it, so each bench run measures it next to its own timings."""
    threads = max(1, int(threads))
    nbytes = buffer_bytes or max(MIN_BUFFER_BYTES, 8 * last_level_cache_bytes())
    # ones, not zeros: every page really allocated (no shared zero page)
    buf = np.ones(nbytes // 8, dtype=np.uint64)
    chunks = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(np.bitwise_or.reduce, chunks))  # warm-up: page faults, thread start
        for _ in range(passes):
            t0 = time.perf_counter()
            words = list(pool.map(np.bitwise_or.reduce, chunks))
            elapsed = time.perf_counter() - t0
            if any(int(w) != 1 for w in words):  # pragma: no cover - the reduction must have read the buffer
                raise RuntimeError("bandwidth probe read back a wrong value")
            best = max(best, buf.nbytes / elapsed / 1e9)
    return best


def kv_cache_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, context: float,
                             bytes_per_element: float) -> int:
    """Bytes of keys and values read by one decode step attending over ``context`` positions."""
    return int(round(2 * n_layers * n_kv_heads * head_dim * context * bytes_per_element))


def decode_bound_tps(bandwidth_gbs: float, bytes_per_token: int) -> float:
    """Tokens/s if decoding did nothing but read ``bytes_per_token`` at ``bandwidth_gbs``."""
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be > 0, got {bytes_per_token}")
    return bandwidth_gbs * 1e9 / bytes_per_token


@dataclass
class DecodeBytes:
    """What one decode step reads, and how it was counted (``method``: a sentence for tables and cards)."""
    weights: int  # weight bytes touched per token (embedding table: one row, unless it is also the output layer)
    kv_cache: int  # keys + values read at the bench's mean decode context
    context: float
    method: str

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def mean_decode_context(pp: int, tg: int) -> float:
    """Positions attended on average by the tg decode steps that follow a pp-token prompt."""
    return pp + (tg - 1) / 2


def gguf_decode_bytes(path: str | os.PathLike, context: float, kv_bytes_per_element: float = 2.0) -> DecodeBytes:
    """Every tensor's stored bytes (gguf-py's reader, taught the types only llama.cpp has), token_embd counted as
    one row -- or in full plus a row when there is no output.weight (tied models read the table again as the output
    layer). KV cache F16 (llama.cpp's default, what the bench runs)."""
    from runtime_tests.llamacpp_types import GGUFFileReader

    reader = GGUFFileReader(str(path))
    arch = bytes(reader.get_field("general.architecture").parts[-1]).decode()

    def field(key: str, default=None):
        f = reader.get_field(f"{arch}.{key}")
        return default if f is None else int(f.parts[-1][0])

    tensors = {t.name: t for t in reader.tensors}
    weights = 0
    for name, t in tensors.items():
        if name == "token_embd.weight":
            rows = int(t.shape[-1])  # ggml order: ne0 = columns, ne1 = rows (vocab)
            weights += int(t.n_bytes) // rows
            if "output.weight" not in tensors:
                weights += int(t.n_bytes)
        else:
            weights += int(t.n_bytes)
    n_layers, n_heads = field("block_count"), field("attention.head_count")
    n_kv = field("attention.head_count_kv", n_heads)
    head_dim = field("attention.key_length", field("embedding_length") // n_heads)
    kv = kv_cache_bytes_per_token(n_layers, n_kv, head_dim, context, kv_bytes_per_element)
    return DecodeBytes(weights, kv, context, "GGUF: stored bytes of every tensor, token_embd as one row (in full "
                       "again when tied as the output layer); F16 KV cache at the mean decode context")


_ONNX_PASS_THROUGH = {"Cast", "Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze"}


def _onnx_element_bits(data_type: int) -> float:
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    packed = (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    sub_byte = {getattr(onnx.TensorProto, n): b for n, b in packed if hasattr(onnx.TensorProto, n)}
    return sub_byte.get(data_type) or 8 * tensor_dtype_to_np_dtype(data_type).itemsize


def onnx_decode_bytes(model_dir: str | os.PathLike, context: float, kv_bytes_per_element: float = 4.0) -> DecodeBytes:
    """Every initializer, at the element size its consumers see: onnxruntime constant-folds Cast / Transpose of an
    initializer at load, so an fp16 table cast to float32 is read as float32. An initializer reaching only the data
    input of a Gather (the embedding lookup) counts one row; one that also reaches a MatMul (tied output layer)
    counts in full. KV cache float32 (the exported graph's past tensors)."""
    import json

    import numpy as np
    import onnx

    model_dir = Path(model_dir)
    model_path = model_dir / "model.onnx" if model_dir.is_dir() else model_dir
    config_path = model_path.parent / "genai_config.json"
    model = onnx.load(str(model_path), load_external_data=False)  # shapes and types only: no weight bytes
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))

    weights = 0
    for init in model.graph.initializer:
        n_elements = int(np.prod(init.dims)) if init.dims else 1
        bits = _onnx_element_bits(init.data_type)
        row_only, frontier, seen = True, [init.name], set()
        while frontier:  # follow load-time-folded ops to the real readers
            name = frontier.pop()
            for node, index in consumers.get(name, []):
                if node.op_type in _ONNX_PASS_THROUGH and index == 0:
                    if node.op_type == "Cast":
                        to = next(a.i for a in node.attribute if a.name == "to")
                        bits = _onnx_element_bits(to)
                    if node.output[0] not in seen:
                        seen.add(node.output[0])
                        frontier.append(node.output[0])
                elif not (node.op_type.startswith("Gather") and index == 0):
                    row_only = False
        nbytes = n_elements * bits / 8
        rows = int(init.dims[0]) if init.dims else 1
        weights += int(nbytes / rows) if row_only and rows > 1 else int(nbytes)
    decoder = json.loads(config_path.read_text())["model"]["decoder"]
    kv = kv_cache_bytes_per_token(int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]),
                                  int(decoder["head_size"]), context, kv_bytes_per_element)
    return DecodeBytes(weights, kv, context, "ONNX: every initializer at the element size its consumers read "
                       "(Cast folded at load), Gather-only tables as one row; float32 KV cache at the mean decode "
                       "context")


def executorch_decode_bytes(path: str | os.PathLike, context: float) -> DecodeBytes:
    """The .pte's bytes (the XNNPACK delegate blobs hold the packed linear weights, the output layer included) minus
    every constant tensor whose first dimension is the vocabulary (the embedding table and its scales, gathered one
    row per token) plus one row of each. KV cache: the program's static cache buffers [1, max_seq_len, heads, dim]
    (not stored in the file), their bytes per position times the mean decode context."""
    import numpy as np
    from executorch.exir._serialize._program import deserialize_pte_binary

    path = Path(path)
    data = path.read_bytes()
    program = deserialize_pte_binary(data).program
    scalar_bytes = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 15: 2}  # executorch ScalarType -> bytes

    def constant(method: str) -> int | None:
        plan = next((p for p in program.execution_plan if p.name == method), None)
        return next((int(v.val.int_val) for v in plan.values if hasattr(v.val, "int_val")), None) if plan else None

    vocab, max_seq = constant("get_vocab_size"), constant("get_max_seq_len")
    forward = next(p for p in program.execution_plan if p.name == "forward")
    table_bytes = row_bytes = kv_per_position = 0
    seen_buffers: set[int] = set()
    for value in forward.values:
        tensor = value.val
        sizes = [int(x) for x in getattr(tensor, "sizes", None) or []]
        if not sizes:
            continue
        nbytes = int(np.prod(sizes)) * scalar_bytes.get(int(tensor.scalar_type), 4)
        buffer = int(getattr(tensor, "data_buffer_idx", 0) or 0)
        if buffer and vocab and sizes[0] == vocab and buffer not in seen_buffers:
            seen_buffers.add(buffer)
            table_bytes, row_bytes = table_bytes + nbytes, row_bytes + nbytes // vocab
        elif not buffer and max_seq and len(sizes) == 4 and sizes[1] == max_seq:  # a layer's key or value cache
            kv_per_position += nbytes // max_seq
    weights = max(1, len(data) - table_bytes + row_bytes)
    return DecodeBytes(weights, int(round(kv_per_position * context)), context,
                       "ExecuTorch: file bytes with vocabulary-sized constant tables (embedding) as one row; the "
                       "static KV cache buffers' bytes per position at the mean decode context")


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform reports."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """CPUs this process may run on (the affinity mask, which containers narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


if __name__ == "__main__":  # python -m runtime_tests.bandwidth [threads]
    import sys

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    print(f"{cpu_name()}: read bandwidth {measure_read_bandwidth(n):.1f} GB/s on {n} threads")
