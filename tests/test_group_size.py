"""Group-wise steps: one alpha per G consecutive columns in QAT, one fp16 step per group in the checkpoint."""

import json

import pytest
import torch

from paretoq_export.canonical.checkpoint import CheckpointError, QuantizedCheckpoint, QuantizedTensor
from paretoq_export.canonical.grids import grid_for_bits
from qat.checkpoint_io import QATCheckpoint
from qat.modules import QuantLinear
from qat.prepare import QATConfig, prepare, quantized_modules
from qat.quantizers import fake_quantize, init_alpha
from tiny_models import tiny_model

ALL_BITS = [1, 1.58, 2, 3, 4]
GROUPS = [32, 64, 128, 256]


def _moved_alphas(model):
    with torch.no_grad():  # move alphas off their init, as training would
        for m in quantized_modules(model).values():
            m.alpha.mul_(torch.empty_like(m.alpha).uniform_(0.6, 1.1))
    return model


@pytest.mark.parametrize("bits", ALL_BITS)
def test_group_quantizer_is_the_row_quantizer_on_the_view(bits):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 8, bias=False)
    q = QuantLinear.from_linear(linear, bits, alpha_init="mse", group_size=32)
    assert q.alpha.shape == (8 * 4, 1)
    view = linear.weight.detach().reshape(-1, 32)
    assert torch.equal(q.alpha.detach(), init_alpha(view, q.grid, "mse"))
    # forward and both gradients equal the per-row quantizer applied to the [out * in / G, G] view
    w = linear.weight.detach().clone().requires_grad_()
    a = q.alpha.detach().clone().requires_grad_()
    ref = fake_quantize(w.reshape(-1, 32), a, q.grid).reshape(8, 128)
    out = q.quantized_weight()
    assert torch.equal(out, ref)
    g = torch.randn(8, 128)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert torch.equal(q.weight.grad, w.grad) and torch.equal(q.alpha.grad, a.grad)
    # groups differ: a per-group alpha is not a per-row alpha in disguise
    assert not torch.equal(q.alpha.reshape(8, 4)[:, :1].expand(8, 4), q.alpha.reshape(8, 4))


def test_group_size_that_does_not_divide_is_refused_before_any_work():
    model = tiny_model("llama", hidden=96, intermediate=192)  # 96 = 3 x 32: 64 does not divide
    with pytest.raises(ValueError, match=r"group size 64 does not divide .*q_proj's rows of 96: use 32 or no group"):
        prepare(model, QATConfig(bits=2, group_size=64))
    assert not quantized_modules(model)  # nothing was replaced
    with pytest.raises(ValueError, match="unsupported group size 48"):
        QATConfig(bits=2, group_size=48)


def test_group_overrides_pick_per_module_group_sizes():
    model = prepare(tiny_model("llama"), QATConfig(bits=2, group_size=32, group_overrides={"down_proj": None},
                                                   embedding_bits=8))
    mods = quantized_modules(model)
    assert mods["model.layers.0.mlp.down_proj"].group_size is None
    assert mods["model.layers.0.self_attn.q_proj"].group_size == 32
    assert mods["model.embed_tokens"].group_size == 32 and mods["model.embed_tokens"].alpha.shape == (320 * 8, 1)
    assert mods["lm_head"].alpha is mods["model.embed_tokens"].alpha  # tied: one table, one set of steps


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_checkpoint_stores_one_step_per_group_and_round_trips(tmp_path, bits, group):
    model = _moved_alphas(prepare(tiny_model("qwen2"), QATConfig(bits=bits, group_size=group, embedding_bits=4,
                                                                 lm_head_bits=8)))
    ckpt = QATCheckpoint.from_qat_model(model, float_dtype="float32")
    ckpt.save(tmp_path / "ck")
    loaded = QuantizedCheckpoint.load(tmp_path / "ck")
    mods = quantized_modules(model)
    for key, q in loaded.quantized.items():
        rows, cols = q.shape
        want_shape = (rows,) if group == cols else (rows, cols // group)  # one group per row is stored per row
        assert q.group_size == group and q.scale.shape == want_shape and q.scale.dtype == torch.float16
        assert torch.equal(q.codes, ckpt.quantized[key].codes) and torch.equal(q.scale, ckpt.quantized[key].scale)
        # the dequantized weight is the module's fake-quantized weight with each group's alpha rounded to fp16
        module = mods[key[: -len(".weight")]]
        s16 = (module.alpha.detach() * module.grid.step_per_alpha).half().float()
        levels = fake_quantize(module.grouped_weight().detach(), module.alpha.detach(), module.grid) / module.alpha
        want = (levels * s16 / module.grid.step_per_alpha).reshape(rows, cols)
        torch.testing.assert_close(q.dequantize(), want, rtol=1e-6, atol=1e-9)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert {m["group_size"] for m in config["modules"].values()} == {group}
    assert config["recipe"]["qat_config"]["group_size"] == group
    ref = loaded.build_reference_model()
    sd = ref.state_dict()
    for key, q in loaded.quantized.items():
        assert torch.equal(sd[key], q.dequantize()), key
    x = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        assert (ref(x).logits - model(x).logits).abs().max() < 5e-2  # only the fp16 rounding of the steps


def test_per_row_checkpoints_keep_their_layout_and_old_ones_load(tmp_path):
    model = _moved_alphas(prepare(tiny_model("llama"), QATConfig(bits=2)))
    QATCheckpoint.from_qat_model(model).save(tmp_path / "ck")
    config_path = tmp_path / "ck" / "config.json"
    config = json.loads(config_path.read_text())
    for info in config["quantization_config"]["modules"].values():
        assert info["group_size"] == info["shape"][1]
        del info["group_size"]  # as written before group sizes existed
    config_path.write_text(json.dumps(config))
    loaded = QuantizedCheckpoint.load(tmp_path / "ck", verify=False)  # the edit changed config.json's hash
    for q in loaded.quantized.values():
        assert q.scale.shape == (q.shape[0],) and q.group_size == q.shape[1] and q.per_row


def test_group_sizes_that_do_not_fit_the_codes_are_refused():
    codes = torch.zeros(4, 96, dtype=torch.uint8)
    with pytest.raises(CheckpointError, match="do not fit codes 4x96"):
        QuantizedTensor(codes, torch.ones(4, 5, dtype=torch.float16), grid_for_bits(2))
    one_group = QuantizedTensor(codes, torch.ones(4, 1, dtype=torch.float16), grid_for_bits(2))
    assert one_group.scale.shape == (4,) and one_group.per_row  # one spelling per layout
