"""The runtimes' own post-training quantization of the float model (formats.baselines), measured in the runtime."""

import onnx
import pytest
from tiny_models import TINY_TEXT, tiny_model, tiny_tokenizer

from formats.baselines import baseline_kinds, make_baseline, runtime_perplexity
from formats.protocol import ArtifactError
from qat.checkpoint_io import QATCheckpoint


@pytest.fixture(scope="module")
def float_ckpt():
    return QATCheckpoint.from_float_model(tiny_model("llama"), tiny_tokenizer())


@pytest.fixture(scope="module")
def ids():
    return [int(t) for t in tiny_tokenizer()(TINY_TEXT * 3)["input_ids"][:96]]


def test_onnxruntime_int4_baseline_is_quantized_and_close_to_fp32(float_ckpt, ids, tmp_path):
    path = make_baseline("onnx", "int4", float_ckpt, tmp_path)
    graph = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 7 * 2 + 1  # every decoder linear of both layers and the head, as its users get
    assert (path / "tokenizer.json").is_file()
    fp32 = runtime_perplexity(tmp_path / "baseline-onnx-fp32", ids)
    int4 = runtime_perplexity(path, ids)
    assert int4 == pytest.approx(fp32, rel=0.05) and int4 != fp32
    assert make_baseline("onnx", "int4", float_ckpt, tmp_path) == path  # reused, not rebuilt


def test_executorch_8da4w_baseline_runs_in_executorch_close_to_float(float_ckpt, ids, tmp_path):
    """torchao's own 8da4w of the float model, lowered to XNNPACK: int4 linears (a fifth of the float bytes), its
    perplexity measured in the ExecuTorch runtime near the float model's."""
    pytest.importorskip("executorch")
    import numpy as np
    import torch

    from runtime_tests.metrics import perplexity

    path = make_baseline("executorch", "8da4w", float_ckpt, tmp_path, max_seq_len=128)
    assert path.name == "baseline-executorch-8da4w-seq128.pte" and (tmp_path / "tokenizer.json").is_file()
    model = float_ckpt.build_reference_model()
    linear_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    table_bytes = model.get_input_embeddings().weight.numel() * 4
    assert path.stat().st_size < table_bytes + linear_bytes / 4  # int4 + scales, not fp32
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double().numpy()
    float_ppl = perplexity(logits[:-1], ids[1:])
    ppl = runtime_perplexity(path, ids)
    assert np.isfinite(ppl) and ppl == pytest.approx(float_ppl, rel=0.05) and ppl != float_ppl
    assert make_baseline("executorch", "8da4w", float_ckpt, tmp_path, max_seq_len=128) == path  # reused


def test_unknown_baselines_are_refused(float_ckpt, tmp_path):
    assert "Q4_0" in baseline_kinds("gguf") and baseline_kinds("executorch") == ("8da4w",)
    with pytest.raises(ArtifactError, match="no runtime baseline for tflite"):
        make_baseline("tflite", "int8", float_ckpt, tmp_path)
    with pytest.raises(ArtifactError, match="unknown ONNX baseline"):
        make_baseline("onnx", "int3", float_ckpt, tmp_path)
    with pytest.raises(ArtifactError, match="unknown ExecuTorch baseline 'int8'"):
        make_baseline("executorch", "int8", float_ckpt, tmp_path)


def test_runtime_perplexity_pools_blocks_each_scored_from_an_empty_context(float_ckpt, ids, tmp_path):
    import math

    path = make_baseline("onnx", "int4", float_ckpt, tmp_path)
    first, second = ids[:48], ids[48:96]
    alone = [runtime_perplexity(path, first), runtime_perplexity(path, second)]
    pooled = runtime_perplexity(path, [first, second])
    assert pooled == pytest.approx(math.exp((math.log(alone[0]) + math.log(alone[1])) / 2), rel=1e-9)
    assert pooled != pytest.approx(runtime_perplexity(path, ids[:96]), rel=1e-6)  # not one 96-token context
    with pytest.raises(ValueError, match="equal lengths"):
        runtime_perplexity(path, [first, second[:10]])
