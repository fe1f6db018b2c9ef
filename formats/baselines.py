"""The runtimes' own post-training quantization of the float model: what a user would pick instead of QAT.

    path = make_baseline("gguf", "Q4_0", float_checkpoint_dir, out_dir)   # llama.cpp's quantizer
    path = make_baseline("onnx", "int4", float_checkpoint_dir, out_dir)   # onnxruntime's MatMulNBits quantizer
    path = make_baseline("executorch", "8da4w", float_checkpoint_dir, out_dir, max_seq_len=512)  # torchao's 8da4w
    ppl = runtime_perplexity(path, token_ids)                              # measured in the file's own runtime

Each maker starts from the float model's canonical checkpoint (``QATCheckpoint.from_float_model``), writes the
runtime's float file with our exporter, then runs the runtime's own quantizer on it, as its users do
(``llama-quantize``, ``onnxruntime.quantization``); ExecuTorch's quantizer (torchao's ``quantize_``) runs on the
float model before its export, as ExecuTorch's LLM export does. The files land atomically and are reused when
present.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from formats.protocol import ArtifactError
from formats.registry import detect_artifact, format_named
from paretoq_export.canonical.atomic import atomic_dir, atomic_file
from runtime_tests.metrics import perplexity

# llama.cpp file types by name (llama_ftype suffixes), the quantizations llama.cpp users pick most
GGUF_KINDS = ("Q8_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
ONNX_KINDS = ("int4",)  # MatMulNBitsQuantizer, 4-bit, block 32, symmetric, int8 activations (accuracy_level 4)
EXECUTORCH_KINDS = ("8da4w",)  # torchao: int4 weights per group (largest of 256..32 dividing every row), int8 acts


def gguf_ftype(name: str) -> int:
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}", None)
    if value is None:
        known = sorted(k[len("LLAMA_FTYPE_MOSTLY_"):] for k in dir(llama_cpp) if k.startswith("LLAMA_FTYPE_MOSTLY_"))
        raise ArtifactError(f"llama.cpp has no file type {name!r}: choose from {', '.join(known)}")
    return int(value)


def llama_quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str = "Q4_0", threads: int = 2,
                   overwrite: bool = False) -> Path:
    """llama.cpp's own quantizer (llama_model_quantize, the C API llama-quantize wraps) on a float GGUF: the
    baseline a user would get from llama-quantize. Written to a temporary sibling, then renamed into place.
    Only for float files (an F16 export of the float model): it re-derives scales and would destroy a ParetoQ grid."""
    import llama_cpp

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {src} not found")
    if dst.exists() and not overwrite:
        raise ArtifactError(f"output {dst} exists: pass overwrite=True or choose another name")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = gguf_ftype(ftype)
    params.nthread = threads
    from llama_cpp._utils import suppress_stdout_stderr

    with atomic_file(dst) as tmp:
        with suppress_stdout_stderr(disable=False):  # its per-tensor log goes straight to the C stderr
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise ArtifactError(f"llama_model_quantize({src.name} -> {ftype}) failed with status {rc}")
    return dst


def gguf_f16(float_checkpoint, out_dir: Path) -> Path:
    """The float model as an F16 GGUF (every 2-D tensor F16, as llama.cpp's converter writes it)."""
    from formats.gguf import GGUFOptions, export_gguf

    path = out_dir / "baseline-F16.gguf"
    if not path.is_file():
        export_gguf(float_checkpoint, path, GGUFOptions(tensor_types=[".*=F16"], allow_lossy=True, progress=False))
    return path


# every maker: (kind, float checkpoint, output folder, threads, KV-cache length for formats that fix it)
def _gguf_baseline(kind: str, float_checkpoint, out_dir: Path, threads: int, max_seq_len: int | None) -> Path:
    f16 = gguf_f16(float_checkpoint, out_dir)
    if kind.upper() == "F16":
        return f16
    path = out_dir / f"baseline-{kind.upper()}.gguf"
    if not path.is_file():
        llama_quantize(f16, path, kind, threads=threads)
    return path


def _onnx_baseline(kind: str, float_checkpoint, out_dir: Path, threads: int, max_seq_len: int | None) -> Path:
    """onnxruntime's own 4-bit weight quantizer (MatMulNBitsQuantizer) on our fp32 decoder graph."""
    if kind != "int4":
        raise ArtifactError(f"unknown ONNX baseline {kind!r}: choose from {', '.join(ONNX_KINDS)}")
    from formats.onnx import OnnxOptions, export_onnx

    fp32 = out_dir / "baseline-onnx-fp32"
    if not (fp32 / "model.onnx").is_file():
        export_onnx(float_checkpoint, fp32, OnnxOptions(progress=False))
    path = out_dir / "baseline-onnx-int4"
    if (path / "model.onnx").is_file():
        return path
    import shutil

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = _fold_constant_weight_chains(onnx.load(str(fp32 / "model.onnx")))
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    with atomic_dir(path) as tmp:
        for item in fp32.iterdir():  # tokenizer and genai config beside the graph
            if item.is_file() and item.name != "model.onnx" and not item.name.startswith("model.onnx"):
                shutil.copy2(item, tmp / item.name)
        quantizer.model.save_model_to_file(str(tmp / "model.onnx"), use_external_data_format=False)
    return path


def _fold_constant_weight_chains(model):
    """Our graph multiplies by Transpose(Cast(W)) with W [out, in] stored in the checkpoint's float dtype;
    onnxruntime's quantizer only takes MatMuls whose B is an initializer, so each such chain becomes one fp32
    initializer (exactly the value the chain computes)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    folded, keep = {}, []
    for node in graph.node:
        if node.op_type in ("Cast", "Transpose") and node.input[0] in const and len(node.output) == 1:
            x = const[node.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type == "Cast":
                x = x.astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
            else:
                x = np.ascontiguousarray(x.transpose(attrs.get("perm")))
            const[node.output[0]] = folded[node.output[0]] = x
            continue
        keep.append(node)
    used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items() if k in used)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return model


def _executorch_baseline(kind: str, float_checkpoint, out_dir: Path, threads: int, max_seq_len: int | None) -> Path:
    """torchao's 8da4w post-training quantization of the float model, lowered to XNNPACK as our files are; the
    file name holds the KV-cache length (the .pte's cache and its runtime window depend on it)."""
    if kind not in EXECUTORCH_KINDS:
        raise ArtifactError(f"unknown ExecuTorch baseline {kind!r}: choose from {', '.join(EXECUTORCH_KINDS)}")
    from formats.executorch import ExecuTorchOptions, export_executorch

    options = ExecuTorchOptions(ptq=kind, max_seq_len=max_seq_len, overwrite=True, progress=False)
    path = out_dir / f"baseline-executorch-{kind}{f'-seq{max_seq_len}' if max_seq_len else ''}.pte"
    if not path.is_file():
        export_executorch(float_checkpoint, path, options)
    return path


# format name -> (its runtime's baseline kinds, the maker); formats without a maker have no baselines yet
MAKERS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "gguf": (GGUF_KINDS, _gguf_baseline),
    "onnx": (ONNX_KINDS, _onnx_baseline),
    "executorch": (EXECUTORCH_KINDS, _executorch_baseline),
}


def baseline_kinds(format_name: str) -> tuple[str, ...]:
    format_named(format_name)  # an unknown name: one clear error
    return MAKERS.get(format_name, ((), None))[0]


def make_baseline(format_name: str, kind: str, float_checkpoint, out_dir: str | os.PathLike,
                  threads: int = 2, max_seq_len: int | None = None) -> Path:
    """The runtime's own quantization ``kind`` of the float checkpoint (a QuantizedCheckpoint or its folder);
    ``max_seq_len``: the KV-cache length of formats that fix one (ExecuTorch), None for the format's default."""
    if format_name not in MAKERS:
        raise ArtifactError(f"no runtime baseline for {format_name} yet: baselines exist for {', '.join(MAKERS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return MAKERS[format_name][1](kind, float_checkpoint, out, threads, max_seq_len)


def runtime_perplexity(artifact: str | os.PathLike, token_ids: Sequence[int] | Sequence[Sequence[int]],
                       threads: int = 2) -> float:
    """exp(mean next-token NLL) of ``token_ids`` computed from the artifact's own runtime logits. Given blocks
    (equal-length rows, e.g. held-out blocks), each block is scored from an empty context and the NLL is averaged
    over every prediction of every block, as the PyTorch held-out perplexity is."""
    fmt, path = detect_artifact(artifact)
    blocks = [[int(t) for t in row] for row in token_ids] if _is_blocks(token_ids) else [[int(t) for t in token_ids]]
    if len({len(b) for b in blocks}) != 1:
        raise ValueError("runtime_perplexity: blocks must have equal lengths")
    runner = fmt.open_runner(path, threads, n_ctx=max(len(blocks[0]), 64))
    log_ppl = []
    try:
        window = fmt.runtime_window(runner)
        for ids in blocks:
            if window is not None and len(ids) > window:
                ids = ids[:window]
            logits = np.asarray(runner.logits(ids), dtype=np.float64)
            log_ppl.append(np.log(perplexity(logits[:-1], ids[1:])))
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()
    return float(np.exp(np.mean(log_ppl)))  # equal-length blocks: the mean of means is the pooled mean


def _is_blocks(token_ids) -> bool:
    first = next(iter(token_ids), None)
    return first is not None and hasattr(first, "__len__")
