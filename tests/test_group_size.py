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


def test_fused_kernels_take_the_grouped_view():
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 8, bias=False)
    q = QuantLinear.from_linear(linear, 4, group_size=32)
    x = torch.randn(3, 128)
    ref = q(x)
    (ref.sum()).backward()
    grads = q.weight.grad.clone(), q.alpha.grad.clone()
    q.weight.grad = q.alpha.grad = None
    q.fused = True  # the inductor build on CPU: the same per-row kernels over the [out * in / G, G] view
    out = q(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.weight.grad, grads[0])
    torch.testing.assert_close(q.alpha.grad, grads[1], rtol=1e-5, atol=1e-7)


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
    assert ckpt.nbytes()["steps"] == 2 * sum(q.scale.numel() for q in ckpt.quantized.values())
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


def test_grouped_training_moves_every_group_alpha_and_ends_quantized():
    from qat.data import pack_blocks
    from qat.trainer import TrainConfig, train
    from tiny_models import TINY_TEXT, tiny_tokenizer

    train_blocks, heldout = pack_blocks(tiny_tokenizer(), [TINY_TEXT] * 40, block_size=32, heldout_fraction=0.1)
    model = prepare(tiny_model("llama", hidden=64, intermediate=128),
                    QATConfig(bits=2, group_size=32, alpha_init="mse", embedding_bits=8))
    before = {n: m.alpha.detach().clone() for n, m in quantized_modules(model).items()}
    config = TrainConfig(steps=4, batch_size=2, lr=1e-3, eval_every=0, eval_at_start=False, progress=False,
                         log_every=1, device="cpu", anneal_frac=0.5, alpha_lr_scale=10.0)
    result = train(model, train_blocks, heldout, config)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.loss_history)
    for name, module in quantized_modules(model).items():
        assert module.blend == 1.0 and module.alpha.shape == before[name].shape
        moved = (module.alpha.detach() != before[name]).reshape(module.weight.shape[0], -1)
        assert moved.any(dim=0).all(), name  # each group position's alphas learn (no group left out)
    ckpt = QATCheckpoint.from_qat_model(model)
    assert all(q.group_size == 32 for q in ckpt.quantized.values())


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


# ------------------------------------------------------------------------------------------------ GGUF
gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from formats import gguf as G  # noqa: E402
from formats.gguf_metadata import default_filename  # noqa: E402
from formats.gguf_readback import verify_gguf_readback  # noqa: E402
from formats.validation import validate_artifact  # noqa: E402
from formats.registry import format_named  # noqa: E402
from qat.targets import checkpoint_stored_bits  # noqa: E402
from tiny_models import save_tiny_model_dir, tiny_tokenizer  # noqa: E402

BLOCK_256 = {1: "TQ2_0", 1.58: "TQ2_0", 2: "Q2_K", 3: "Q3_K"}


def _grouped_checkpoint(bits, group, embedding_bits=8, **model_kw):
    model = _moved_alphas(prepare(tiny_model("llama", **model_kw),
                                  QATConfig(bits=bits, group_size=group, embedding_bits=embedding_bits)))
    return QATCheckpoint.from_qat_model(model, tiny_tokenizer(), recipe={"method": "rtn"})


def _ids(n: int = 128) -> list[int]:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("group", GROUPS)
def test_gguf_places_groups_exactly(tmp_path, bits, group):
    ckpt = _grouped_checkpoint(bits, group)
    result = G.export_gguf(ckpt, tmp_path / "m.gguf", G.GGUFOptions(progress=False))
    types = {r.gguf_name: r.ggml_type for r in result.records if r.grid is not None}
    want = BLOCK_256[bits] if group == 256 and bits < 4 else "Q4_0"  # one step per block: 256-blocks hold G=256
    assert types.pop("token_embd.weight") == "Q8_0" and set(types.values()) == {want}
    assert bool(result.fallbacks) == (want == "Q4_0" and bits < 4)  # finer groups: the 32-block container
    assert verify_gguf_readback(result.path, ckpt)["bit_exact"]
    assert default_filename(ckpt).endswith(f"-{want}.gguf")  # the default name says the type actually written
    reader = gguf.GGUFReader(str(result.path))
    assert set(reader.get_field("paretoq.tensor_group_sizes").contents()) == {group}


@pytest.mark.parametrize("bits,group", [(4, 32), (1.58, 256), (2, 256), (3, 64)])
def test_grouped_gguf_runs_in_llama_cpp(tmp_path, bits, group):
    ckpt = _grouped_checkpoint(bits, group)
    result = G.export_gguf(ckpt, tmp_path / "m.gguf", G.GGUFOptions(progress=False))
    report = validate_artifact(result.path, ckpt, _ids())
    m = report["metrics"]
    assert report["readback"]["exact"] == report["readback"]["checked"] and not report["readback"]["mismatches"]
    assert m["kl_mean"] < 1e-4 and m["top1_clear_margin"] == 1.0 and abs(m["ppl_ratio"] - 1) < 0.005, m


def test_gguf_refuses_a_256_block_type_for_finer_groups(tmp_path):
    ckpt = _grouped_checkpoint(2, 64)
    with pytest.raises(G.GGUFExportError, match=r"attn_q.*Q2_K cannot hold the seq2 grid .*group size 64 has no "
                                                r"exact 256-block container.*use group size 256, or Q4_0"):
        G.export_gguf(ckpt, tmp_path / "m.gguf", G.GGUFOptions(tensor_types=["attn_q=Q2_K"]))
    assert not list(tmp_path.iterdir())


def test_q4_0_recipe_from_the_cli(tmp_path, capsys):
    from paretoq_export.cli import main

    model_dir = save_tiny_model_dir(tmp_path / "tiny")
    assert main(["quantize", "--model", str(model_dir), "--bits", "4", "--group-size", "32", "--embedding-bits",
                 "8", "-o", str(tmp_path / "ck")]) == 0
    assert main(["--format", "gguf", str(tmp_path / "ck"), "-o", str(tmp_path / "m.gguf"), "--text", __file__,
                 "--validate-tokens", "96"]) == 0
    assert "bit-exact" in capsys.readouterr().out
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q4_0)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # tied: one table
    assert {v for k, v in types.items() if k.startswith("blk.") and k.endswith("weight") and "norm" not in k} == {
        "Q4_0"}
    validation = json.loads((tmp_path / "m.gguf.validation.json").read_text())
    assert validation["readback"]["exact"] == validation["readback"]["checked"]


def test_target_gguf_trains_each_module_for_its_container(tmp_path, capsys):
    from paretoq_export.cli import main

    # 320-wide rows cannot hold a 256-block: q/k/v/o/gate/up land in Q4_0, so they train 4-bit with a step per 32;
    # down_proj's 512-wide rows fit Q2_K: 2-bit with Q2_K's one step per 256
    model_dir = save_tiny_model_dir(tmp_path / "tiny", hidden=320, num_attention_heads=5, num_key_value_heads=1)
    assert main(["quantize", "--model", str(model_dir), "--bits", "2", "--target", "gguf", "--embedding-bits", "8",
                 "-o", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "bits per weight stored in gguf" in out and "down_proj" in out and "2.625" in out and "4.500" in out
    ckpt = QuantizedCheckpoint.load(tmp_path / "ck")
    for key, q in ckpt.quantized.items():
        if key.endswith("down_proj.weight"):
            assert (q.grid.bits, q.group_size) == (2, 256)
        elif "embed" in key:
            assert (q.grid.bits, q.group_size) == (8, 32)
        else:
            assert (q.grid.bits, q.group_size) == (4, 32), key
    result = G.export_gguf(ckpt, tmp_path / "m.gguf", G.GGUFOptions(progress=False))
    assert not result.fallbacks  # every module was trained for the container it lands in
    assert {r.ggml_type for r in result.records if r.hf_name.endswith("down_proj.weight")} == {"Q2_K"}
    # the report counts every byte the GGUF's quantized tensors hold, per module type and in total
    report = ckpt.recipe["stored_bits"]
    held = sum(r.nbytes for r in result.records if r.grid is not None)
    assert report["bytes"] == held == checkpoint_stored_bits(ckpt, format_named("gguf").storage)["bytes"]
    for kind, row in report["by_type"].items():
        nbytes = sum(r.nbytes for r in result.records if r.grid is not None and kind in r.hf_name)
        assert row["bits_per_weight"] * row["weights"] == 8 * nbytes, kind
    assert verify_gguf_readback(result.path, ckpt)["bit_exact"]


def test_cli_qat_with_target_prints_and_records_the_stored_bits(tmp_path, capsys):
    from paretoq_export.cli import main
    from tiny_models import TINY_TEXT

    model_dir = save_tiny_model_dir(tmp_path / "tiny", hidden=64, intermediate=256)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i}. {TINY_TEXT}" for i in range(40)))
    assert main(["qat", "--model", str(model_dir), "--bits", "1.58", "--target", "gguf", "--data", str(text),
                 "--steps", "2", "--batch-size", "2", "--block-size", "32", "--recipe", "paper", "-o",
                 str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "bits per weight stored in gguf" in out and "TQ2_0" in out and "Q4_0" in out
    ckpt = QuantizedCheckpoint.load(tmp_path / "ck")
    assert ckpt.recipe["qat_config"]["target"] == "gguf" and ckpt.recipe["stored_bits"]["target"] == "gguf"
    down = ckpt.quantized["model.layers.0.mlp.down_proj.weight"]  # 256-wide rows: ternary in TQ2_0, a step per 256
    q_proj = ckpt.quantized["model.layers.0.self_attn.q_proj.weight"]  # 64-wide rows: 4-bit in Q4_0, a step per 32
    assert (down.grid.bits, down.group_size) == (1.58, 256) and (q_proj.grid.bits, q_proj.group_size) == (4, 32)


def test_target_plans_for_onnx_and_executorch():
    def plan(target, *args):
        p = format_named(target).storage_plan(*args)
        return p.bits, p.group_size

    assert plan("onnx", 576, 2) == (2, 64)  # MatMulNBits bits=2, with the 64-block's scale it stores anyway
    assert plan("onnx", 576, 3) == (4, 64)  # 3-bit is stored in bits=4: train 4-bit
    assert plan("executorch", 576, 1.58) == (4, None)  # int4 per channel
    assert plan("gguf", 1536, 1.58) == (1.58, 256) and format_named("gguf").storage_plan(1536, 1.58).container == "TQ2_0"
    gguf_plan = format_named("gguf").storage_plan
    with pytest.raises(ValueError, match="drop --group-size"):
        QATConfig(bits=2, group_size=32, target="gguf", storage_plan=gguf_plan)
    with pytest.raises(ValueError, match="a target needs its format's storage plan"):
        QATConfig(bits=2, target="gguf")
