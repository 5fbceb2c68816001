"""MoE LoRA with a zero expert (training/locllm_training/moe_lora.py): the zero expert adds
exactly nothing, routing and load balancing on hand-made gates, top-k renormalisation, and
a tiny MoE checkpoint that trains, saves, loads and is refused by the (merging) exporter."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from locllm_sdk.errors import ArgumentError, CheckpointError
from locllm_training.model import LocLLM, load_checkpoint, merge_lora, save_checkpoint, to_moe_lora
from locllm_training.moe_lora import (
    MoeLoraLinear,
    MoeLoraSettings,
    apply_moe_lora,
    balance_loss,
    moe_layers,
    moe_parameter_count,
    route,
)
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)  # float32 compared bit for bit (-0.0 != 0.0)


def sign_routed_layer(seed: int = 0) -> MoeLoraLinear:
    """2 experts + zero expert, top-1; the gate sends x[0] > 0 to the zero expert, x[0] < 0
    to expert 1; the experts' B are random so that any expert contribution shows."""
    torch.manual_seed(seed)
    layer = MoeLoraLinear(nn.Linear(8, 6), MoeLoraSettings(experts=2, top_k=1, zero_expert=True), r=2, alpha=4)
    with torch.no_grad():
        layer.lora_experts_B.normal_()
        layer.lora_gate.weight.zero_()
        layer.lora_gate.bias.zero_()
        layer.lora_gate.weight[2, 0] = 10.0  # zero expert (index E = 2)
        layer.lora_gate.weight[1, 0] = -10.0
    return layer.eval()


def test_token_routed_to_zero_expert_is_base_bit_for_bit():
    layer = sign_routed_layer()
    x = torch.randn(3, 5, 8)
    x[..., 0] = torch.where(torch.arange(5) % 2 == 0, 1.0, -1.0) * (x[..., 0].abs() + 0.5)
    out = layer(x)
    base = layer.base_layer(x)
    to_zero = x[..., 0] > 0
    chosen = layer.last_routing.chosen.reshape(3, 5)
    assert bool((chosen[to_zero] == 2).all()) and bool((chosen[~to_zero] == 1).all())
    assert torch.equal(bits(out[to_zero]), bits(base[to_zero]))
    # the other tokens get expert 1 with weight 1 (top-1 renormalised)
    a, b = layer.lora_experts_A[1], layer.lora_experts_B[1]
    expected = base[~to_zero] + x[~to_zero] @ a.T @ b.T * layer.scaling
    torch.testing.assert_close(out[~to_zero], expected)
    assert (out[~to_zero] - base[~to_zero]).abs().min() > 0


def test_fresh_experts_add_nothing_whatever_the_routing():
    torch.manual_seed(1)
    layer = MoeLoraLinear(nn.Linear(8, 6), MoeLoraSettings(experts=3, top_k=2), r=2, alpha=4).eval()
    x = torch.randn(10, 8)
    assert torch.equal(layer(x), layer.base_layer(x))  # B starts at zero, as LoRA's


def test_route_top_k_renormalised_on_a_hand_made_gate():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 0.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    r = route(logits, top_k=2)
    assert r.probs.shape == (3, 4) and r.chosen.shape == (3, 2) and r.weights.shape == (3, 2)
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    np.testing.assert_allclose(r.probs.numpy(), p, rtol=1e-6)
    assert r.chosen[0].tolist() == [0, 1] and r.chosen[1].tolist() == [1, 3] and r.chosen[2, 0] == 3
    # renormalised over the chosen two: p_a / (p_a + p_b)
    np.testing.assert_allclose(r.weights[0].numpy(), p[0, :2] / p[0, :2].sum(), rtol=1e-6)
    np.testing.assert_allclose(r.weights[1].numpy(), p[1, [1, 3]] / p[1, [1, 3]].sum(), rtol=1e-6)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(3))
    assert torch.equal(route(logits, top_k=1).weights, torch.ones(3, 1))


def test_balance_loss_values():
    # Switch loss C * sum_i f_i P_i: 1 for uniform probabilities whatever the tie-break
    uniform = route(torch.zeros(6, 3), top_k=1)
    assert float(balance_loss(uniform)) == pytest.approx(1.0)
    # hand-made: 4 tokens over C = 3, top-1
    logits = torch.tensor([[4.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 0.0, 4.0]])
    r = route(logits, top_k=1)
    p = r.probs.numpy()
    f = np.array([2, 1, 1]) / 4
    assert float(balance_loss(r)) == pytest.approx(3 * float((f * p.mean(0)).sum()), rel=1e-6)
    # all tokens on one choice with near-certainty: close to the maximum C
    collapsed = route(torch.tensor([[20.0, 0.0, 0.0]] * 5), top_k=1)
    assert float(balance_loss(collapsed)) == pytest.approx(3.0, rel=1e-6)
    # top-2: each token's two slots count half
    r2 = route(logits, top_k=2)
    f2 = nn.functional.one_hot(r2.chosen, 3).float().sum(1).mean(0).numpy() / 2
    assert f2.sum() == pytest.approx(1.0)
    assert float(balance_loss(r2)) == pytest.approx(3 * float((f2 * r2.probs.numpy().mean(0)).sum()), rel=1e-6)


def test_balance_loss_reaches_the_gate():
    layer = sign_routed_layer().train()
    layer(torch.randn(7, 8))
    loss = layer.last_balance_loss
    assert loss is not None and loss.requires_grad
    loss.backward()
    assert layer.lora_gate.weight.grad.abs().sum() > 0


def test_settings_are_checked():
    with pytest.raises(ArgumentError, match="top_k"):
        MoeLoraSettings(experts=2, top_k=4, zero_expert=True)
    with pytest.raises(ArgumentError, match="at least one expert"):
        MoeLoraSettings(experts=0, top_k=1)
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_moe_lora(nn.Sequential(nn.ReLU()), ["q_proj"], MoeLoraSettings(), r=2, alpha=4)


@pytest.fixture(scope="module")
def tiny_config():
    from locllm_training.init import preset_config

    return preset_config("tiny", image_size=28)


def test_moe_on_the_lm_q_v_and_its_parameter_count(tiny_config):
    base = LocLLM(tiny_config, with_lora=False)
    settings = MoeLoraSettings(experts=3, top_k=2, zero_expert=True)
    moe = to_moe_lora(base, settings, r=4)
    llm = moe.llm.config
    wrapped = [n for n, m in moe.llm.named_modules() if isinstance(m, MoeLoraLinear)]
    assert len(wrapped) == 2 * llm.num_hidden_layers
    assert all(n.endswith(("self_attn.q_proj", "self_attn.v_proj")) for n in wrapped)
    h, kv = llm.hidden_size, llm.num_key_value_heads * (llm.hidden_size // llm.num_attention_heads)
    e, c, r = 3, 4, 4
    per_layer = sum(e * r * h + e * out * r + c * h + c for out in (h, kv))
    assert moe_parameter_count(moe.llm) == llm.num_hidden_layers * per_layer
    # only the LM's adapter changed: the vision tower keeps its peft LoRA (none here)
    assert moe.config.llm_adapter == "moe-lora" and moe.config.lora_llm.r == 4


def test_lm_routed_only_to_zero_expert_gives_base_hidden_states_bit_for_bit(tiny_config):
    torch.manual_seed(0)
    base = LocLLM(tiny_config, with_lora=False).eval()
    moe = to_moe_lora(base, MoeLoraSettings(experts=2, top_k=1, zero_expert=True)).eval()
    ids = torch.randint(0, 100, (2, 9))

    def hidden(model):
        with torch.no_grad():
            return model.llm.model(input_ids=ids).last_hidden_state

    reference = hidden(base)
    with torch.no_grad():
        for layer in moe_layers(moe.llm):
            layer.lora_experts_B.normal_()
            layer.lora_gate.weight.zero_()
            layer.lora_gate.bias.zero_()
            layer.lora_gate.bias[-1] = 30.0  # every token to the zero expert
    assert torch.equal(bits(hidden(moe)), bits(reference))
    with torch.no_grad():
        for layer in moe_layers(moe.llm):
            layer.lora_gate.bias[0] = 60.0  # now to expert 0: the output moves
    assert (hidden(moe) - reference).abs().max() > 1e-3


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cmd = [sys.executable, str(ROOT / "training" / "make_synthpose.py"), "--output", str(out)]
    cmd += ["--images", "4", "--seed", "5", "--split", "train", "--persons", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "annotations" / "person_keypoints_train.json"


def test_moe_checkpoint_saves_loads_identically_and_export_refuses(tiny_checkpoint, tmp_path):
    from locllm_export.build import build_onnx_engine

    torch.manual_seed(3)
    model = to_moe_lora(load_checkpoint(tiny_checkpoint), MoeLoraSettings(experts=3, top_k=2, zero_expert=True))
    with torch.no_grad():
        for layer in moe_layers(model.llm):
            layer.lora_experts_B.normal_(std=0.1)
    ckpt = save_checkpoint(model.eval(), tiny_checkpoint, tmp_path / "moe")
    config = json.loads((ckpt / "config.json").read_text())
    assert config["llm_adapter"] == "moe-lora" and config["moe_llm"]["experts"] == 3
    back = load_checkpoint(ckpt)
    assert isinstance(back.llm.model.layers[1].self_attn.v_proj, MoeLoraLinear)
    s = model.config.image_size
    ids = torch.randint(0, 100, (2, 6))
    ids = torch.cat([ids[:, :1], torch.full((2, model.config.num_patches), model.config.im_patch_token_id), ids], 1)
    pixels = torch.randn(2, 3, s, s)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), back(ids, pixels))
    # the exporter merges LoRA: it refuses the gated mixture and writes no engine
    with pytest.raises(CheckpointError, match="not implemented yet"):
        merge_lora(back)
    with pytest.raises(CheckpointError, match="not implemented yet"):
        build_onnx_engine(ckpt, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()


def test_moe_checkpoint_trains_only_its_adapters(synth, tiny_checkpoint, tmp_path):
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.data import ConversationConfig, ConversationDataset, collate, load_coco
    from locllm_training.train import DataSource, TrainConfig, run

    cfg = TrainConfig(
        init=str(tiny_checkpoint),
        output=str(tmp_path / "run"),
        train=[DataSource(coco=str(synth))],
        steps=3,
        batch_size=2,
        lr=3e-3,
        warmup_steps=1,
        bf16=False,
        save_every=1000,
        eval_every=0,
        workers=0,
        log_every=1,
        adapter="moe-lora",
        experts=2,
        top_k=2,
        zero_expert=True,
        expert_rank=2,
    )
    final = run(cfg)
    config = json.loads((final / "config.json").read_text())
    assert config["llm_adapter"] == "moe-lora"
    assert config["moe_llm"] == {"experts": 2, "top_k": 2, "zero_expert": True, "balance_weight": 0.01}
    assert config["lora_llm"]["r"] == 2

    init, trained = load_checkpoint(tiny_checkpoint), load_checkpoint(final)
    assert isinstance(trained.llm.model.layers[0].self_attn.q_proj, MoeLoraLinear)
    # the init as training started: its LM LoRA folded into the LM's base weights
    before = to_moe_lora(init, trained.config.moe_llm, r=2).state_dict()
    changed = set()
    for key, value in trained.state_dict().items():
        old = before.get(key)
        if ".lora_experts_" in key or ".lora_gate." in key:
            continue  # new parameters: checked below
        assert old is not None, key
        if not torch.equal(old, value):
            changed.add(key)
    # only adapters (the ViT's LoRA) and the projector moved; the LM's base weights did not
    assert changed and all(".lora_" in k or k.startswith("projector.") for k in changed), sorted(changed)
    assert all(float(m.lora_experts_B.detach().abs().max()) > 0 for m in moe_layers(trained.llm))  # B started at zero

    # a training forward on real samples: finite, the balance loss included
    tok = PromptTokenizer.from_dir(final)
    conv = ConversationConfig(image_size=trained.config.image_size, patch_size=trained.config.patch_size)
    ds = ConversationDataset(load_coco(synth), tok, trained.config.num_patches, conv, seed=0)
    batch = collate([ds[0], ds[1]], tok.spec.pad_id)
    trained.train()
    loss = trained(**batch)
    assert torch.isfinite(loss)
    trained.eval()

    # saved and loaded again: identical outputs
    again_dir = save_checkpoint(trained, final, tmp_path / "again")
    again = load_checkpoint(again_dir)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # logits, not the loss
        assert torch.equal(trained(**inputs), again(**inputs))

    # plain LoRA training refuses the MoE checkpoint instead of ignoring its adapter
    with pytest.raises(ArgumentError, match="moe-lora"):
        run(TrainConfig(init=str(final), output=str(tmp_path / "plain"), train=cfg.train, steps=1))
