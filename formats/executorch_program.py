"""torch.export with a KV cache of fixed length in the shape ExecuTorch's LLM runner expects, then XNNPACK lowering.

The exported ``forward(tokens [1, T], input_pos [T]) -> logits [1, T, vocab]`` takes T from 1 (decode) to
max_seq_len - 1 (prefill); input_pos holds the cache positions of the T tokens (the runner passes an arange when
the method's input_pos has more than one element). The KV cache lives in mutable buffers inside the program,
written and read by ExecuTorch's own LLM ops (llama::update_cache, llama::custom_sdpa, as its export_llama does);
the .pte therefore needs those kernels at run time: ``import executorch.extension.llm.custom_ops.custom_ops``
in Python, linked into ExecuTorch's LLM runner. Metadata methods get_max_seq_len,
get_max_context_len, get_vocab_size, get_bos_id, get_eos_ids, use_kv_cache, enable_dynamic_shape are constant
methods of the program, as the runner (extension/llm/runner) reads them.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

# ops that carry a linear layer's work: none may stay outside the XNNPACK delegate
LINEAR_OPS = ("aten_linear_default", "aten_mm_default", "aten_addmm_default")
QUANT_OPS = ("torchao_choose_qparams_affine_default", "torchao_quantize_affine_default",
             "torchao_dequantize_affine_default")


ATTN_IMPL = "paretoq_executorch_kv"  # transformers attention implementation registered below


def _custom_ops() -> None:
    """Register llama::update_cache / llama::custom_sdpa (torch + ExecuTorch kernels) from executorch's wheel."""
    import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401


def _kv_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function over the module's own cache buffers: write this call's keys/values at
    start_pos (llama::update_cache), then causal attention over positions 0 .. start_pos+T-1 (llama::custom_sdpa,
    grouped-query heads included). One custom op each instead of index_put + repeat_kv + masked matmuls over the
    whole cache: attention reads only the filled positions, and each decoder layer splits into ~1 XNNPACK delegate
    instead of ~11 (transformers' StaticCache graph; SmolLM2 did not finish lowering in 10 minutes that way)."""
    start_pos = kwargs["et_start_pos"]
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, T, heads, head_dim] as the ops take them
    torch.ops.llama.update_cache(k, module.et_k_cache, start_pos)
    torch.ops.llama.update_cache(v, module.et_v_cache, start_pos)
    window = kwargs.get("sliding_window")  # transformers passes it to the sliding layers (Gemma 3)
    if window:
        mask = _sliding_window_mask(start_pos, q.shape[1], module.et_k_cache.shape[1], int(window))
        out = torch.ops.llama.custom_sdpa(q, module.et_k_cache, module.et_v_cache, start_pos, mask, 0.0, False,
                                          scaling)
    else:
        out = torch.ops.llama.custom_sdpa(q, module.et_k_cache, module.et_v_cache, start_pos, None, 0.0, True,
                                          scaling)
    return out, None


def _sliding_window_mask(start_pos, seq_len: int, cache_len: int, window: int) -> torch.Tensor:
    """Additive mask [T, cache_len] for custom_sdpa: query start_pos + i sees key j iff j <= start_pos + i and
    j > start_pos + i - window (transformers' sliding_window_overlay). With a mask the kernel reads every cache
    position (masked ones included), so these layers cost a full-cache attention."""
    q_pos = (torch.arange(seq_len) + start_pos)[:, None]
    k_pos = torch.arange(cache_len)[None, :]
    visible = (k_pos <= q_pos) & (k_pos > q_pos - window)
    return torch.where(visible, torch.tensor(0.0), torch.tensor(float("-inf")))


def _no_mask(*args, **kwargs):
    return None  # custom_sdpa masks causally from start_pos


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    _custom_ops()
    AttentionInterface.register(ATTN_IMPL, _kv_attention)
    AttentionMaskInterface.register(ATTN_IMPL, _no_mask)


class LLMForward(nn.Module):
    """``forward(tokens, input_pos)`` over a transformers causal LM with a KV cache of max_seq_len positions held
    in buffers of each attention module (ExecuTorch's custom-op layout [1, max_seq_len, kv_heads, head_dim])."""

    def __init__(self, model: nn.Module, max_seq_len: int):
        super().__init__()
        _register_attention()
        config = model.config
        if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
            raise ValueError("sliding-window attention is not supported by the ExecuTorch exporter: disable "
                             "use_sliding_window in the config")
        if getattr(config, "attn_logit_softcapping", None):  # custom_sdpa has no score softcapping
            raise ValueError("attn_logit_softcapping is not supported by the ExecuTorch exporter")
        model.config._attn_implementation = ATTN_IMPL
        n_kv = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        for layer in model.model.layers:
            attn = layer.self_attn
            for name in ("et_k_cache", "et_v_cache"):
                attn.register_buffer(name, torch.zeros(1, max_seq_len, n_kv, head_dim), persistent=False)
        self.model = model
        self.max_seq_len = max_seq_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        start_pos = input_pos[0].item()
        torch._check(start_pos >= 0)
        torch._check(start_pos + tokens.shape[1] <= self.max_seq_len)
        out = self.model(input_ids=tokens, position_ids=input_pos.unsqueeze(0), use_cache=False,
                         et_start_pos=start_pos)
        return out.logits


def metadata(config: dict, max_seq_len: int, eos_ids: list[int]) -> dict:
    """The constant methods ExecuTorch's LLM runner reads (extension/llm/runner/constants.h)."""
    bos = config.get("bos_token_id")
    return {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": int(config["vocab_size"]),
        "get_bos_id": int(bos) if bos is not None else -1,
        "get_eos_ids": eos_ids,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
    }


def eos_ids(config: dict, generation_eos=None) -> list[int]:
    ids = generation_eos if generation_eos is not None else config.get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    return [int(i) for i in ids]


def export_program(model: nn.Module, max_seq_len: int, shortcuts: bool = True) -> torch.export.ExportedProgram:
    """torch.export (non-strict) of the KV-cache wrapper, dynamic in the number of tokens, in the XNNPACK-friendly
    form of formats.executorch_graph; ``shortcuts``: torchao's quant ops traced by shape (quant_ops_by_shape)."""
    from formats.executorch_graph import views_with_inferred_dim, xnnpack_friendly

    wrapper = LLMForward(model, max_seq_len).eval()
    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    example = (torch.tensor([[1, 2]], dtype=torch.long), torch.arange(2, dtype=torch.long))
    with torch.no_grad(), xnnpack_friendly(model), quant_ops_by_shape(shortcuts):
        program = torch.export.export(wrapper, example, dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    return views_with_inferred_dim(program)


@dataclass
class Delegation:
    """What the XNNPACK partitioner took: per-op counts inside and outside delegates."""

    subgraphs: int
    delegated_nodes: int
    non_delegated_nodes: int
    by_op: dict[str, tuple[int, int]] = field(default_factory=dict)  # op -> (delegated, not delegated)

    def count(self, op: str) -> tuple[int, int]:
        return self.by_op.get(op, (0, 0))

    def to_json(self) -> dict:
        return {"subgraphs": self.subgraphs, "delegated_nodes": self.delegated_nodes,
                "non_delegated_nodes": self.non_delegated_nodes,
                "by_op": {k: {"delegated": d, "not_delegated": n} for k, (d, n) in sorted(self.by_op.items())}}


def delegation_of(edge_program) -> Delegation:
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(edge_program.exported_program().graph_module)
    by_op = {op: (b.delegated, b.non_delegated) for op, b in info.delegation_by_operator.items()}
    return Delegation(info.num_delegated_subgraphs, info.num_delegated_nodes, info.num_non_delegated_nodes, by_op)


# XNNPACK delegate passes that only rewrite one op family, and the edge-op name fragments that family needs: on a
# delegate graph holding none of them the pass cannot match, yet it still re-exports its pattern graphs (bilinear
# upsampling: ~4 s per delegate here, SDPA ~2 s) and re-traces the whole subgraph with fake tensors (~0.15 s each
# per SmolLM2 layer). SmolLM2 has 34 delegates; skipping these where they cannot apply cuts the lowering time
# (docs/BENCHMARKS.md) without changing a byte of the program (tests/test_executorch.py compares the bytes).
# Checked on the graph each pass would see, after the passes before it: ChannelsLastTaggedReshapePass inserts the
# _to_copy nodes RemoveRedundantCopyPass looks for.
_XNNPACK_PASS_OPS = {
    "ConvertToUpsampleBilinear2d": ("upsample", "index"),
    "ConvertToLinearPass": ("mm",),  # mm, addmm, bmm back to linear
    "ConvertToSDPAPass": ("softmax",),
    "FuseBatchNormPass": ("batch_norm",),
    "DecomposeBatchNorm": ("batch_norm",),
    "FuseActivationPass": ("relu", "hardtanh"),
    "DecomposeConcatenate": ("cat",),
    "RemoveGetItemPass": ("max_pool2d_with_indices", "max.dim"),
    "Conv1dUnsqueezePass": ("convolution",),
    "PReLUReshapePass": ("prelu",),
    "RemoveRedundantCopyPass": ("_to_copy",),
}


def xnnpack_pass_applies(pass_name: str, graph: torch.fx.Graph) -> bool:
    """False only when XNNPACK's pass ``pass_name`` cannot change ``graph`` (``_XNNPACK_PASS_OPS``; the custom-meta
    pass copies node.meta["custom"], which only user annotations set)."""
    if pass_name == "PropagateCustomMetaPass":
        return any("custom" in node.meta for node in graph.nodes)
    if pass_name not in _XNNPACK_PASS_OPS:
        return True
    targets = " ".join(str(n.target) for n in graph.nodes if n.op == "call_function")
    return any(op in targets for op in _XNNPACK_PASS_OPS[pass_name])


@contextlib.contextmanager
def applicable_xnnpack_passes(enabled: bool = True) -> Iterator[None]:
    """While lowering: XNNPACK's preprocess runs each pass of its default list only where it can change the
    delegate's graph (``xnnpack_pass_applies``); an explicit pass list runs as upstream has it."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    upstream = xnnpack_preprocess.XNNPACKPassManager

    class ApplicablePasses(upstream):
        def __init__(self, exported_program, passes=None):
            super().__init__(exported_program, passes)
            self.default_list = not passes

        def transform(self):
            if not self.default_list:
                return super().transform()
            # upstream's transform, one pass at a time, on the program the previous passes left
            program, passes = self.exported_program, self.passes
            for pass_ in passes:
                if xnnpack_pass_applies(pass_.__name__, program.graph):
                    self._exported_program, self.passes = program, [pass_]
                    program = super().transform()
            self.passes = passes
            return program

    xnnpack_preprocess.XNNPACKPassManager = ApplicablePasses if enabled else upstream
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = upstream


# torchao's quant ops (the 8-bit dynamic activations: choose_qparams, quantize; the weights' dequantize) are
# CompositeImplicitAutograd: every fake-tensor re-trace of the edge and XNNPACK passes runs their Python bodies,
# ~15 symbolic-shape ops each, and SmolLM2's 211 linears are re-traced ~25 times each (~25% of the export). Their
# outputs' shapes follow from the arguments alone; these rules give exactly the shapes and dtypes the bodies return
# (torchao/quantization/quant_primitives.py), so the program is byte-identical (tests/test_executorch.py).
def _choose_qparams_shapes(fake_mode, func, input, mapping_type, block_size, target_dtype, quant_min=None,
                           quant_max=None, eps=None, scale_dtype=None, zero_point_dtype=None, keepdim=False):
    from torchao.quantization.quant_primitives import _get_reduction_params

    # the bodies' own block arithmetic first: the same comparisons, so the same guards on the token count
    reduced, dims = _get_reduction_params(block_size, input.size())
    if keepdim:
        shape = [input.size(i) // block_size[i] for i in range(len(block_size))]
    else:
        shape = [size for i, size in enumerate(reduced) if i not in dims]
    # symmetric mappings fill the zero point like the (float) scale, asymmetric ones default to int32
    zero_dtype = zero_point_dtype or (torch.int32 if mapping_type == "ASYMMETRIC" else input.dtype)
    with fake_mode:
        return input.new_empty(shape, dtype=scale_dtype or input.dtype), input.new_empty(shape, dtype=zero_dtype)


def _elementwise_shapes(fake_mode, func, *args, **kwargs):
    """quantize_affine / dequantize_affine: the input's shape, contiguous, in output_dtype (uint1..7 as uint8)."""
    from torchao.quantization.quant_primitives import _SUB_BYTE_UINT_BOUNDS, _get_reduction_params

    bound = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
    _get_reduction_params(bound["block_size"], bound["input"].size())  # the bodies' guards, as above
    dtype = bound.get("output_dtype") or torch.float32
    with fake_mode:
        return bound["input"].new_empty(bound["input"].shape,
                                        dtype=torch.uint8 if dtype in _SUB_BYTE_UINT_BOUNDS else dtype)


@contextlib.contextmanager
def quant_ops_by_shape(enabled: bool = True) -> Iterator[None]:
    """While exporting and lowering: fake tensors take torchao's quant ops by the shape rules above instead of
    their bodies.

    Registrations, all undone on exit: an AutogradCPU/AutogradMeta kernel that steps below autograd (where the
    CompositeImplicitAutograd body would otherwise run), an entry in torch's meta table (so FakeTensorMode does
    not decompose the op either) and the fake-tensor rule itself, also put back before every run_decompositions:
    that call gives ops it preserves the body as fake rule unless they have one, and drops their rules when done
    (torch/export/exported_program.py, _override_composite_implicit_decomp). Real tensors still run the bodies."""
    if not enabled:
        yield
        return
    from torch._decomp import meta_table
    from torch._subclasses import fake_impls
    import torchao.quantization.quant_primitives  # noqa: F401  defines torch.ops.torchao

    rules = {torch.ops.torchao.choose_qparams_affine.default: _choose_qparams_shapes,
             torch.ops.torchao.quantize_affine.default: _elementwise_shapes,
             torch.ops.torchao.dequantize_affine.default: _elementwise_shapes}
    if any(op in meta_table for op in rules):  # torch or torchao gave them their own meta rules: use those
        yield
        return

    def below_autograd(op):
        def kernel(*args, **kwargs):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args, **kwargs)
        return kernel

    def rule(mode, func, *args, **kwargs):
        return rules[func](mode, func, *args, **kwargs)

    def in_rules(op) -> bool:
        return op in rules

    library = torch.library.Library("torchao", "IMPL")
    for op in rules:
        for key in ("AutogradCPU", "AutogradMeta"):
            library.impl(op._schema.name.split("::")[1], below_autograd(op), key)
        meta_table[op] = rules[op]
    fake_impls.register_op_impl(in_rules)(rule)
    upstream_decompositions = torch.export.ExportedProgram.run_decompositions

    def run_decompositions(self, *args, **kwargs):
        fake_impls.op_implementations_dict.update(dict.fromkeys(rules, rule))
        return upstream_decompositions(self, *args, **kwargs)

    torch.export.ExportedProgram.run_decompositions = run_decompositions
    try:
        yield
    finally:
        torch.export.ExportedProgram.run_decompositions = upstream_decompositions
        fake_impls.op_implementations_checks[:] = [(check, impl) for check, impl in
                                                   fake_impls.op_implementations_checks if check is not in_rules]
        for op in rules:
            if fake_impls.op_implementations_dict.get(op) is rule:
                del fake_impls.op_implementations_dict[op]
            meta_table.pop(op, None)
            op._dispatch_cache.clear()
        library._destroy()


def _xnnpack_partitioner(one_decomposition: bool):
    """XNNPACK's partitioner; ``one_decomposition``: without its per-node check in ``ops_to_not_decompose``.

    With the check, executorch decomposes the whole program three times (EDGE_DO_NOT_DECOMP: keep only the
    linears etc. the check accepts); without it, once, keeping every op XNNPACK asks for (~15% of the export). The
    two agree whenever XNNPACK takes every such op, as it does every linear here; where it would not, the lowering
    fails with executorch's "was not decomposed or delegated" and lower_to_executorch redoes it with the check."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if not one_decomposition:
        return XnnpackPartitioner()

    class OneDecompositionPartitioner(XnnpackPartitioner):
        def ops_to_not_decompose(self, ep):
            ops, _ = super().ops_to_not_decompose(ep)
            return ops, None

    return OneDecompositionPartitioner()


def lower_to_executorch(program: torch.export.ExportedProgram, constant_methods: dict,
                        quantized_embedding: bool = False, shortcuts: bool = True):
    """XNNPACK-partitioned edge program -> (ExecutorchProgramManager, Delegation).

    ``shortcuts``: skip XNNPACK passes that cannot match (applicable_xnnpack_passes), give torchao's quant ops
    shape rules (quant_ops_by_shape) and decompose once (_xnnpack_partitioner): the same program bytes in about
    half the time; False runs executorch's own path (tests compare the two).
    A quantized embedding table becomes quantized_decomposed::embedding_{4bit,byte} (executorch's quant fusion
    pass), which runs from executorch's quantized kernels library, not XNNPACK."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    def lower(one_decomposition: bool):
        with applicable_xnnpack_passes(shortcuts), quant_ops_by_shape(shortcuts):
            return to_edge_transform_and_lower(
                program, partitioner=[_xnnpack_partitioner(one_decomposition)], constant_methods=constant_methods,
                compile_config=EdgeCompileConfig(_check_ir_validity=False),  # torchao quant ops are not core ATen
            )

    try:
        edge = lower(one_decomposition=shortcuts)
    except RuntimeError as exc:
        if not shortcuts or "was not decomposed or delegated" not in str(exc):
            raise
        log.info("XNNPACK left an op it asked to keep undelegated (%s): lowering again with its per-node check",
                 str(exc).splitlines()[0])
        edge = lower(one_decomposition=False)
    if quantized_embedding:
        import executorch.kernels.quantized  # noqa: F401  registers quantized_decomposed embedding ops
        from executorch.exir.passes.quant_fusion_pass import quant_fusion_and_const_prop_pass

        edge._edge_programs["forward"] = quant_fusion_and_const_prop_pass(edge.exported_program())
    delegation = delegation_of(edge)  # after the fusion: the table's dequantize is part of the embedding op now
    config = ExecutorchBackendConfig(extract_delegate_segments=True)
    with quant_ops_by_shape(shortcuts):
        return edge.to_executorch(config), delegation
