"""Canonical checkpoint: round trip, packing, size, importers, corrupt input, reference model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from paretoq_export.canonical.checkpoint import CheckpointError, QuantizedCheckpoint
from paretoq_export.canonical.grids import GRIDS, grid_for_bits
from paretoq_export.canonical.packing import pack_codes, unpack_codes
from qat.checkpoint_io import QATCheckpoint, recover_grid_codes
from qat.prepare import QATConfig, prepare, quantized_modules
from qat.quantizers import fake_quantize
from tiny_models import tiny_model

ALL_BITS = [1, 1.58, 2, 3, 4]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_roundtrip_odd_widths(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(7, 37), dtype=np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (7, (37 * bits + 7) // 8)
    np.testing.assert_array_equal(unpack_codes(packed, bits, 37), codes)


def _trained_like(arch="llama", bits=2, **cfg):
    model = tiny_model(arch)
    prepare(model, QATConfig(bits=bits, **cfg))
    with torch.no_grad():  # move alphas off their init, as training would
        for m in quantized_modules(model).values():
            m.alpha.mul_(torch.empty_like(m.alpha).uniform_(0.6, 1.1))
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("bits", ALL_BITS)
def test_roundtrip_is_bit_identical(tmp_path, arch, bits):
    model = _trained_like(arch, bits)
    ckpt = QATCheckpoint.from_qat_model(model)
    ckpt.save(tmp_path / "ck")
    loaded = QuantizedCheckpoint.load(tmp_path / "ck")
    a, b = ckpt.dequantized_state_dict(), loaded.dequantized_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # levels chosen with the trained alpha (as the forward did), times the step rounded once to fp16
    for name, module in quantized_modules(model).items():
        key = f"{name}.weight"
        if key not in loaded.quantized:
            continue
        grid, alpha = module.grid, module.alpha.detach()
        s16 = (alpha * grid.step_per_alpha).half().float()
        levels = fake_quantize(module.weight.detach(), alpha, grid) / alpha
        torch.testing.assert_close(b[key], levels * s16 / grid.step_per_alpha, rtol=1e-6, atol=1e-9)


def test_reference_model_matches_dequantized_weights_and_keeps_bias(tmp_path):
    model = _trained_like("qwen2", 2)
    ckpt = QATCheckpoint.from_qat_model(model, float_dtype="float32")
    ckpt.save(tmp_path / "ck")
    ref = QuantizedCheckpoint.load(tmp_path / "ck").build_reference_model()
    sd = ref.state_dict()
    for key, q in ckpt.quantized.items():
        assert torch.equal(sd[key], q.dequantize())
    bias = sd["model.layers.0.self_attn.q_proj.bias"]
    assert bias.abs().sum() > 0 and torch.equal(bias, model.model.layers[0].self_attn.q_proj.bias.detach())
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        diff = (ref(x).logits - model(x).logits).abs().max()
    assert diff < 5e-2  # only the fp16 rounding of the step separates them


def test_packed_size_is_close_to_bits(tmp_path):
    model = _trained_like("llama", 2)
    ckpt = QATCheckpoint.from_qat_model(model)
    ckpt.save(tmp_path / "ck")
    n_quant = sum(q.codes.numel() for q in ckpt.quantized.values())
    float_bytes = sum(t.numel() * t.element_size() for t in ckpt.tensors.values())
    size = (tmp_path / "ck" / "model.safetensors").stat().st_size
    code_bytes = size - float_bytes
    bits_per_weight = code_bytes * 8 / n_quant
    assert 2.0 <= bits_per_weight < 2.3, bits_per_weight  # 2-bit codes + fp16 steps + header
    raw = load_file(tmp_path / "ck" / "model.safetensors")
    assert raw["model.layers.0.mlp.up_proj.qweight"].dtype == torch.uint8


def test_tied_embeddings_stored_once_and_retied(tmp_path):
    model = _trained_like("llama", 2, embedding_bits=8, lm_head_bits=8)
    ckpt = QATCheckpoint.from_qat_model(model)
    assert "model.embed_tokens.weight" in ckpt.quantized and "lm_head.weight" not in ckpt.quantized
    assert "lm_head.weight" not in ckpt.tensors
    ckpt.save(tmp_path / "ck")
    ref = QuantizedCheckpoint.load(tmp_path / "ck").build_reference_model()
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    x = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        assert (ref(x).logits - model(x).logits).abs().max() < 5e-2


def test_config_records_grid_and_bits(tmp_path):
    model = _trained_like("llama", 2, overrides={"down_proj": 4})
    QATCheckpoint.from_qat_model(model, recipe={"steps": 7}).save(tmp_path / "ck")
    qc = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "paretoq"
    assert qc["modules"]["model.layers.0.mlp.down_proj"]["grid"] == "lsq4"
    assert qc["modules"]["model.layers.0.mlp.up_proj"]["grid"] == "seq2"
    assert qc["grids"]["seq2"]["zero"] == 1.5
    assert qc["recipe"]["steps"] == 7


def test_refuses_non_empty_output_and_leaves_no_partial(tmp_path):
    model = _trained_like("llama", 2)
    ckpt = QATCheckpoint.from_qat_model(model)
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="--overwrite"):
        ckpt.save(out)
    ckpt.save(out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp dirs left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = _trained_like("llama", 2)
    ckpt = QATCheckpoint.from_qat_model(model)
    import paretoq_export.canonical.checkpoint as mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(mod, "save_file", boom)
    with pytest.raises(OSError):
        ckpt.save(tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_checkpoint_errors(tmp_path):
    model = _trained_like("llama", 2)
    QATCheckpoint.from_qat_model(model).save(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        QuantizedCheckpoint.load(tmp_path / "ck")
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(CheckpointError):
        QuantizedCheckpoint.load(tmp_path / "ck", verify=False)
    weights.unlink()
    with pytest.raises(CheckpointError, match="half-written"):
        QuantizedCheckpoint.load(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a paretoq checkpoint"):
        QuantizedCheckpoint.load(tmp_path / "nothing")


@pytest.mark.parametrize("bits", [0, 1, 2, 3, 4])
def test_import_reference_training_checkpoint(bits):
    """A ParetoQ reference run saves latent weights + weight_clip_val; w_bits 0 is ternary there."""
    model = tiny_model("llama", tie_word_embeddings=False)
    grid = grid_for_bits(bits)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clip = {}
    for key in list(state):
        if any(key.endswith(f"{t}.weight") for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            from qat.quantizers import init_alpha

            clip[key + "_clip_val"] = init_alpha(state[key], grid) * 0.9
    state.update(clip)
    ckpt = QATCheckpoint.from_paretoq_reference(state, model.config.to_dict(), bits, float_dtype="float32")
    assert len(ckpt.quantized) == 14 and all(q.grid is grid for q in ckpt.quantized.values())
    key = "model.layers.1.mlp.down_proj.weight"
    alpha = clip[key + "_clip_val"]
    s16 = (alpha * grid.step_per_alpha).half().float()
    expected = fake_quantize(state[key], alpha, grid) / alpha * s16 / grid.step_per_alpha
    torch.testing.assert_close(ckpt.quantized[key].dequantize(), expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(CheckpointError, match="weight_clip_val"):
        QATCheckpoint.from_paretoq_reference(model.state_dict(), model.config.to_dict(), bits)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_import_on_grid_bf16_weights(bits):
    """Released MobileLLM-ParetoQ models store grid values in bf16: recover codes and steps per row."""
    qmodel = _trained_like("llama", bits)
    plain = tiny_model("llama")
    with torch.no_grad():
        for name, m in quantized_modules(qmodel).items():
            plain.get_submodule(name).weight.copy_(m.quantized_weight().to(torch.bfloat16).float())
    ckpt = QATCheckpoint.from_on_grid_model(plain, bits)
    for key, q in ckpt.quantized.items():
        w = plain.state_dict()[key]
        rel = (q.dequantize() - w).abs().amax() / w.abs().amax()
        assert rel < 2**-7, (key, float(rel))
        assert len(torch.unique(q.codes)) <= q.grid.n_codes


def test_import_on_grid_rejects_float_weights():
    model = tiny_model("llama")
    with pytest.raises(CheckpointError, match="distinct values"):
        QATCheckpoint.from_on_grid_model(model, 2)


def test_recover_grid_codes_exact_when_values_are_exact():
    grid = GRIDS["lsq4"]
    codes = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    codes[:, 0] = 15  # rows whose extreme is the positive max (7s), not -8s
    codes[:, 1:] = codes[:, 1:].clamp(1, 15)
    step = torch.rand(8).half() + 0.01
    w = step.float()[:, None] * (codes.float() - grid.zero)
    rec = recover_grid_codes(w, grid)
    assert torch.equal(rec.dequantize(), w)


def test_from_float_model_keeps_the_unquantized_model():
    model = tiny_model("llama")  # tied embeddings
    ckpt = QATCheckpoint.from_float_model(model, float_dtype="float32")
    state = model.state_dict()
    assert not ckpt.quantized and "lm_head.weight" not in ckpt.tensors
    assert set(ckpt.tensors) == set(state) - {"lm_head.weight"}
    assert all(torch.equal(ckpt.tensors[k], state[k]) for k in ckpt.tensors)
    assert ckpt.recipe["method"] == "float"
    with pytest.raises(CheckpointError, match="from_qat_model"):
        QATCheckpoint.from_float_model(prepare(tiny_model("llama"), QATConfig(bits=2)))


def test_gemma3_qat_model_with_quantized_table_equals_its_reference(tmp_path):
    """Gemma 3's embedding multiplies its lookup by sqrt(hidden): the QAT model's quantized table keeps that factor,
    and the reference rebuilt from the checkpoint (embed_scale and both rotary tables restored) computes the same."""
    from qat.prepare import QATConfig, prepare
    from tiny_models import tiny_model

    model = prepare(tiny_model("gemma3"), QATConfig(bits=4, embedding_bits=8))
    ckpt = QATCheckpoint.from_qat_model(model, float_dtype="float32")
    ckpt.save(tmp_path / "ck")
    ref = QuantizedCheckpoint.load(tmp_path / "ck").build_reference_model()
    x = torch.randint(0, 320, (1, 40))  # longer than the sliding window (16)
    with torch.no_grad():
        assert (ref(x).logits - model(x).logits).abs().max() < 5e-2  # only the fp16 rounding of the steps
