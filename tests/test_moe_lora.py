"""MoE LoRA with a zero expert (training/locllm_training/moe_lora.py): the zero expert adds
exactly nothing, routing and load balancing on hand-made gates, top-k renormalisation, the
dense (exported) computation against the per-expert one, a tiny MoE checkpoint that trains,
saves and loads, and its unmerged engine: the manifest's adapter record, the gate in both
decoder graphs, ONNX Runtime answering as the torch backend does."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from locllm_sdk.errors import ArgumentError, CheckpointError
from locllm_training.model import LocLLM, load_checkpoint, merge_lora, save_checkpoint, to_llm_lora, to_moe_lora
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


def per_expert_reference(layer: MoeLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The mixture computed expert by expert: each expert on the tokens that chose it, its
    weighted output added back at their rows (the sparse form of the same sum)."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = route(layer.lora_gate(tokens), layer.settings.top_k)
    out = layer.base_layer(tokens)
    for e in range(layer.settings.experts):
        token_idx, slot = torch.where(routing.chosen == e)
        h = tokens[token_idx] @ layer.lora_experts_A[e].T @ layer.lora_experts_B[e].T
        out = out.index_add(0, token_idx, routing.weights[token_idx, slot].unsqueeze(-1) * layer.scaling * h)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@pytest.mark.parametrize(
    "settings",
    [
        MoeLoraSettings(experts=3, top_k=2, zero_expert=True),
        MoeLoraSettings(experts=4, top_k=1, zero_expert=True),
        MoeLoraSettings(experts=2, top_k=2, zero_expert=False),
    ],
)
def test_dense_mixture_equals_the_per_expert_sum_values_and_gradients(settings):
    torch.manual_seed(5)
    dense = MoeLoraLinear(nn.Linear(16, 12), settings, r=3, alpha=6).eval()
    with torch.no_grad():
        dense.lora_experts_B.normal_()
        dense.lora_gate.weight.normal_()  # a spread gate: every choice gets tokens
    sparse = copy.deepcopy(dense)
    x = torch.randn(4, 10, 16)
    got, want = dense(x), per_expert_reference(sparse, x)
    chosen = dense.last_routing.chosen
    assert len(chosen.unique()) == settings.choices  # the sum saw every expert (and the zero one)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - dense.base_layer(x)).abs().max() > 0.1
    # the same gradients (what training follows), the gate's through the renormalised weights
    got.square().sum().backward()
    want.square().sum().backward()
    for name in ("lora_experts_A", "lora_experts_B", "lora_gate.weight", "lora_gate.bias"):
        g_dense, g_sparse = dense.get_parameter(name).grad, sparse.get_parameter(name).grad
        assert g_sparse.abs().max() > 0, name
        torch.testing.assert_close(g_dense, g_sparse, rtol=1e-4, atol=1e-5)


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


def test_to_llm_lora_gives_a_fresh_lora_of_another_rank_with_the_same_outputs(tiny_config):
    from locllm_training.init import random_model

    base = random_model(tiny_config, seed=2)  # its LM LoRA has random B: folding it matters
    plain = to_llm_lora(base, r=5, alpha=10).eval()
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        before, after = (m.llm.model(input_ids=ids).last_hidden_state for m in (base, plain))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # old LoRA folded in, new B = 0
    lm = {n: p for n, p in plain.llm.named_parameters() if ".lora_" in n}
    assert lm and all(p.shape[0] == 5 for n, p in lm.items() if ".lora_A." in n)
    assert all(not p.any() for n, p in lm.items() if ".lora_B." in n)
    assert plain.config.lora_llm.r == 5 and plain.config.lora_llm.scaling == 2.0
    vision_lora = [n for n in plain.state_dict() if n.startswith("vision.") and ".lora_" in n]
    assert vision_lora and all(torch.equal(plain.state_dict()[n], base.state_dict()[n]) for n in vision_lora)
    with pytest.raises(CheckpointError, match="keep_moe=True"):  # an MoE LM cannot be folded into plain LoRA
        to_llm_lora(to_moe_lora(base, MoeLoraSettings(experts=2, top_k=1)), r=4)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    cmd = [sys.executable, str(ROOT / "training" / "make_synthpose.py"), "--output", str(out)]
    cmd += ["--images", "4", "--seed", "5", "--split", "train", "--persons", "1"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "annotations" / "person_keypoints_train.json"


def test_moe_checkpoint_saves_loads_identically_and_merges_only_the_vision_lora(tiny_checkpoint, tmp_path):
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
        reference = back(ids, pixels)
        assert torch.equal(model(ids, pixels), reference)
    # the gated mixture cannot be folded into plain weights...
    with pytest.raises(CheckpointError, match="keep_moe=True"):
        merge_lora(back)
    with pytest.raises(CheckpointError, match="keep_moe=True"):
        load_checkpoint(ckpt, with_lora=False)
    # ...but the ViT's LoRA can: the exporter's model keeps the LM's experts and gates as they are
    kept = merge_lora(back, keep_moe=True)
    assert not any(".lora_A" in k for k in kept.state_dict()) and len(moe_layers(kept.llm)) == len(moe_layers(back.llm))
    assert not kept.config.lora_vision.enabled and kept.config.moe_llm == back.config.moe_llm
    for a, b in zip(moe_layers(kept.llm), moe_layers(back.llm)):
        for name in ("lora_experts_A", "lora_experts_B"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert torch.equal(a.lora_gate.weight, b.lora_gate.weight)
    with torch.no_grad():
        torch.testing.assert_close(kept(ids, pixels), reference, rtol=1e-4, atol=1e-5)


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


# -- the unmerged engine ---------------------------------------------------------------

ENGINE_MOE = MoeLoraSettings(experts=3, top_k=2, zero_expert=True)


@pytest.fixture(scope="module")
def moe_engine(tmp_path_factory):
    """A tiny MoE-LoRA checkpoint trained a few steps (experts' B non-zero, gates moved) and
    its ONNX engine."""
    from locllm_export.build import build_onnx_engine
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.init import init_checkpoint, teach_format

    root = tmp_path_factory.mktemp("moe-engine")
    base = init_checkpoint("tiny", root / "base", seed=4, image_size=56)
    model = to_moe_lora(load_checkpoint(base), ENGINE_MOE, r=4)
    teach_format(model, PromptTokenizer.from_dir(base), steps=8, seed=4)
    ckpt = save_checkpoint(model, base, root / "moe")
    build_onnx_engine(ckpt, root / "engine")
    return ckpt, root / "engine"


def test_moe_engine_answers_as_the_torch_backend(moe_engine, monkeypatch):
    import onnx
    from locllm_export.build import GRAPH_TOLERANCE
    from locllm_sdk import Pose
    from locllm_sdk.manifest import read_manifest
    from locllm_training.graphs import DecoderStep, empty_past

    ckpt, engine = moe_engine
    manifest = read_manifest(engine)
    model = manifest.model
    assert model.llm_adapter == "moe-lora" and model.moe_lora.experts == 3 and model.moe_lora.top_k == 2
    assert model.moe_lora.zero_expert and model.moe_lora.rank == 4 and model.moe_lora.targets == ("q_proj", "v_proj")
    assert manifest.precision.lora.startswith("vision merged")

    ort_pose = Pose(engine, backend="onnxruntime")
    torch_pose = Pose(ckpt, backend="torch")
    layers = moe_layers(torch_pose.backend.model.llm)
    assert len(layers) == 2 * model.num_layers
    assert all(float(layer.lora_experts_B.detach().abs().min()) > 0 for layer in layers)  # trained: no expert is zero
    # both decoder graphs hold the gate: one TopK per MoE layer (a merged LoRA has none)
    for name in ("decoder.onnx", "decoder_shared.onnx"):
        graph = onnx.load(str(engine / name), load_external_data=False).graph
        assert sum(node.op_type == "TopK" for node in graph.node) == len(layers), name

    # the mixture is alive: the experts move the logits well beyond what verification tolerates
    llm = torch_pose.backend.model.llm
    dead = copy.deepcopy(llm)
    for layer in moe_layers(dead):
        layer.lora_experts_B.data.zero_()
    torch.manual_seed(0)
    feeds = (torch.randn(2, 5, model.hidden_size), torch.ones(2, 5, dtype=torch.int64))
    feeds += (torch.arange(5).repeat(2, 1), torch.tensor([[4], [3]]))
    with torch.no_grad():
        live = DecoderStep(llm)(*feeds, *empty_past(llm.config, 2))[0]
        base = DecoderStep(dead)(*feeds, *empty_past(dead.config, 2))[0]
    assert float((live - base).abs().max() / live.abs().max()) > 10 * GRAPH_TOLERANCE

    # routing of the answer passes (every shared pass after the suffixes' one) on torch
    passes = []
    forward_shared = torch_pose.backend.forward_shared

    def recording(*args):
        out = forward_shared(*args)
        passes.append(torch.cat([layer.last_routing.chosen for layer in layers]))
        return out

    monkeypatch.setattr(torch_pose.backend, "forward_shared", recording)
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (180, 150, 3), dtype=np.uint8)
    boxes = [[5, 10, 90, 150], [60, 20, 85, 155]]
    on_ort = ort_pose.locate(image, "coco17", boxes=boxes)
    on_torch = torch_pose.locate(image, "coco17", boxes=boxes)
    answers = torch.cat(passes[1:])
    with_zero = (answers == ENGINE_MOE.experts).any(dim=1)  # the zero expert is index E
    assert len(passes) > 1 and bool(with_zero.any()) and not bool(with_zero.all()), with_zero.float().mean()

    assert len(on_ort) == len(on_torch) == 2
    for person_ort, person_torch in zip(on_ort, on_torch):
        assert [kp.name for kp in person_ort] == [kp.name for kp in person_torch] and len(list(person_ort)) == 17
        for a, b in zip(person_ort, person_torch):
            assert (a.answer, a.x, a.y) == (b.answer, b.x, b.y), a.name
            assert a.score == pytest.approx(b.score, abs=1e-5)
    # the answers are not one constant: the keypoint and the crop matter
    assert len({kp.answer for person in on_ort for kp in person}) > 1


def test_moe_engine_manifest_reads_back_and_checks_its_adapter_fields(moe_engine):
    from locllm_sdk.errors import EngineError
    from locllm_sdk.manifest import EngineManifest

    data = json.loads((moe_engine[1] / "manifest.json").read_text())
    assert EngineManifest.from_dict(data).to_dict() == data
    broken = copy.deepcopy(data)
    del broken["model"]["moe_lora"]
    with pytest.raises(EngineError, match="'model.moe_lora' is missing"):
        EngineManifest.from_dict(broken)
    broken = copy.deepcopy(data)
    broken["model"]["llm_adapter"] = "mixture"
    with pytest.raises(EngineError, match="'model.llm_adapter' must be one of lora, moe-lora"):
        EngineManifest.from_dict(broken)
    broken = copy.deepcopy(data)
    broken["model"]["moe_lora"]["top_k"] = "2"
    with pytest.raises(EngineError, match="'model.moe_lora.top_k' must be an integer"):
        EngineManifest.from_dict(broken)
    broken = copy.deepcopy(data)
    del broken["model"]["llm_adapter"]  # a moe_lora section on a plain (merged) engine
    with pytest.raises(EngineError, match="'model.moe_lora' is given"):
        EngineManifest.from_dict(broken)


def test_plain_engine_manifest_reads_as_merged_lora_and_is_written_unchanged():
    from locllm_sdk.manifest import EngineManifest

    template = ROOT / "models" / "demo" / "engine_template"
    manifest = EngineManifest.read(template)  # written before the adapter fields existed
    assert manifest.model.llm_adapter == "lora" and manifest.model.moe_lora is None
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == (template / "manifest.json").read_text()


def test_tensorrt_build_refuses_an_moe_engine(moe_engine):
    from locllm_export.tensorrt_build import build_tensorrt_targets
    from locllm_export.tensorrt_plan import BuildOptions
    from locllm_sdk.errors import EngineError

    ckpt, engine = moe_engine
    with pytest.raises(EngineError, match="moe-lora adapters, which the TensorRT-LLM build cannot hold"):
        build_tensorrt_targets(engine, ckpt, BuildOptions())
    assert not (engine / "tensorrt").exists()


@pytest.mark.slow
def test_moe_serving_benchmark_smoke(tmp_path):
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "moe_serving.py"), "--preset", "tiny", "--reps", "1"]
    cmd += ["--warmup", "0", "--backends", "ort", "--threads", "1", "--workdir", str(tmp_path / "work")]
    run = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads((out / "moe_serving_tiny.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"plain-ort", "moe-ort"} and all(r["decoder_passes"] == 6 for r in rows.values())
    assert all(r["p50_ms"] > 0 and r["cpu_p50_ms"] > 0 for r in rows.values())
    # matched capacity: the plain rank is the one nearest the MoE count
    plain, moe = rows["plain-ort"]["lm_adapter_parameters"], rows["moe-ort"]["lm_adapter_parameters"]
    assert abs(plain - moe) / moe < 0.1 and result["plain_rank"] > result["moe"]["rank"]
    layers = 2  # the tiny preset's LM: q and v of each layer carry a gate
    for graph in ("decoder.onnx", "decoder_shared.onnx"):
        assert result["graphs"]["moe"][graph]["TopK"] == 2 * layers and result["graphs"]["plain"][graph]["TopK"] == 0


@pytest.mark.slow
def test_cpp_runtime_answers_the_moe_engine_as_pose(moe_engine, tmp_path):
    """The gate and the experts are ONNX nodes of the decoder graphs: the C++ runtime serves an
    MoE-LoRA engine unchanged, answering as ``Pose.locate`` does."""
    import json
    import shutil
    import subprocess

    import cv2
    from locllm_sdk import Pose

    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    from cpp_latency import ensure_built

    build = ensure_built()
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, stdout=subprocess.DEVNULL)
    _, engine = moe_engine
    image = np.random.default_rng(2).integers(0, 255, (180, 150, 3), dtype=np.uint8)
    path = tmp_path / "scene.png"
    cv2.imwrite(str(path), image)
    boxes = [[5, 10, 90, 150], [60, 20, 85, 155]]
    names = ["nose", "left_wrist", "right_knee", "neck"]
    args = [str(build / "locllm_cpp"), "locate", str(path), "-m", str(engine), "--json"]
    args += [a for n in names for a in ("-k", n)]
    args += [a for b in boxes for a in ("--box", ",".join(repr(float(v)) for v in b))]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)["persons"]
    want = Pose(engine, backend="onnxruntime").locate(str(path), names, boxes=boxes)
    assert [[k["answer"] for k in p["keypoints"]] for p in got] == [[k.answer for k in p] for p in want]
    assert [[k["name"] for k in p["keypoints"]] for p in got] == [[k.name for k in p] for p in want]
