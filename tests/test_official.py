"""Public LocLLM checkpoints (kennethwdk/LocLLM layout) served unchanged.

The official-format fixtures are written here from the documented layout (original DINOv2
names, fused qkv with LoRA on its q and v row blocks, LayerScale gammas, Llama with LoRA on
q_proj/v_proj, mm_projector, pickled .bin shards). The reference forward below is written
from that description with plain torch ops, independently of transformers and peft.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from locllm_sdk import Pose
from locllm_sdk.descriptions import DescriptionLibrary
from locllm_sdk.protocol import PromptTokenizer
from locllm_training.graphs import VisionTower
from locllm_training.model import load_checkpoint
from locllm_training.official import (
    OfficialCheckpointError,
    PromptIdsMismatchError,
    _slow_tokenizer,
    convert_official,
    is_official_checkpoint,
    slow_tokenizer_ids,
    verify_prompt_ids,
)
from locllm_training.tokenizer_files import write_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CROP, PATCH, GRID0 = 224, 14, 37  # DINOv2 position grid trained at 518 px
VOCAB = 32000
ORACLE = Path(__file__).parent / "fixtures" / "hf431_tokenizer_oracle.json"


# --------------------------------------------------------------------------------------
# Official-format fixture


def official_weights(
    seed=0, width=128, depth=2, swiglu=False, hidden=64, layers=2, heads=4, kv_heads=2, inter=96, r=4, vlora=True
):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.05, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    c, w = width, {}
    v = "vision_model."
    w[v + "patch_embed.proj.weight"] = rnd(c, 3, PATCH, PATCH, std=0.03)
    w[v + "patch_embed.proj.bias"] = rnd(c, std=0.02)
    w[v + "cls_token"] = rnd(1, 1, c, std=0.5)
    w[v + "pos_embed"] = rnd(1, 1 + GRID0 * GRID0, c, std=0.5)
    w[v + "mask_token"] = rnd(1, c)
    for n in range(depth):
        b = f"{v}blocks.{n}."
        w[b + "norm1.weight"], w[b + "norm1.bias"] = rnd(c, mean=1.0, std=0.1), rnd(c, std=0.1)
        w[b + "attn.qkv.weight"], w[b + "attn.qkv.bias"] = rnd(3 * c, c, std=0.08), rnd(3 * c, std=0.05)
        if vlora:
            w[b + "attn.lora_A_q"], w[b + "attn.lora_B_q"] = rnd(r, c, std=0.1), rnd(c, r, std=0.1)
            w[b + "attn.lora_A_v"], w[b + "attn.lora_B_v"] = rnd(r, c, std=0.1), rnd(c, r, std=0.1)
        w[b + "attn.proj.weight"], w[b + "attn.proj.bias"] = rnd(c, c, std=0.08), rnd(c, std=0.05)
        w[b + "ls1.gamma"] = rnd(c, mean=0.5, std=0.2)
        w[b + "norm2.weight"], w[b + "norm2.bias"] = rnd(c, mean=1.0, std=0.1), rnd(c, std=0.1)
        if swiglu:  # ViT-g style: hidden = 2/3 * 4c rounded up to 8
            h = (int(4 * c * 2 / 3) + 7) // 8 * 8
            w[b + "mlp.w12.weight"], w[b + "mlp.w12.bias"] = rnd(2 * h, c, std=0.08), rnd(2 * h, std=0.05)
            w[b + "mlp.w3.weight"], w[b + "mlp.w3.bias"] = rnd(c, h, std=0.08), rnd(c, std=0.05)
        else:
            w[b + "mlp.fc1.weight"], w[b + "mlp.fc1.bias"] = rnd(4 * c, c, std=0.08), rnd(4 * c, std=0.05)
            w[b + "mlp.fc2.weight"], w[b + "mlp.fc2.bias"] = rnd(c, 4 * c, std=0.05), rnd(c, std=0.05)
        w[b + "ls2.gamma"] = rnd(c, mean=0.5, std=0.2)
    w[v + "norm.weight"], w[v + "norm.bias"] = rnd(c, mean=1.0, std=0.1), rnd(c, std=0.1)
    w["mm_projector.weight"], w["mm_projector.bias"] = rnd(hidden, c, std=0.1), rnd(hidden, std=0.05)
    hd = hidden // heads
    w["model.embed_tokens.weight"] = rnd(VOCAB, hidden, std=0.05)  # small: answers depend on context
    for n in range(layers):
        b = f"model.layers.{n}."
        w[b + "self_attn.q_proj.weight"] = rnd(heads * hd, hidden, std=0.15)
        w[b + "self_attn.k_proj.weight"] = rnd(kv_heads * hd, hidden, std=0.15)
        w[b + "self_attn.v_proj.weight"] = rnd(kv_heads * hd, hidden, std=0.15)
        w[b + "self_attn.o_proj.weight"] = rnd(hidden, heads * hd, std=0.15)
        w[b + "self_attn.q_proj.lora_A"], w[b + "self_attn.q_proj.lora_B"] = rnd(r, hidden), rnd(heads * hd, r)
        w[b + "self_attn.v_proj.lora_A"], w[b + "self_attn.v_proj.lora_B"] = rnd(r, hidden), rnd(kv_heads * hd, r)
        # A saved (bf16-rounded) inv_freq buffer: garbage here, it must be ignored.
        w[b + "self_attn.rotary_emb.inv_freq"] = torch.ones(hd // 2)
        w[b + "mlp.gate_proj.weight"] = rnd(inter, hidden, std=0.15)
        w[b + "mlp.up_proj.weight"] = rnd(inter, hidden, std=0.15)
        w[b + "mlp.down_proj.weight"] = rnd(hidden, inter, std=0.15)
        w[b + "input_layernorm.weight"] = rnd(hidden, mean=1.0, std=0.1)
        w[b + "post_attention_layernorm.weight"] = rnd(hidden, mean=1.0, std=0.1)
    w["model.norm.weight"] = rnd(hidden, mean=1.0, std=0.1)
    w["lm_head.weight"] = rnd(VOCAB, hidden, std=0.3)
    config = {
        "architectures": ["LocLLMModel"],
        "model_type": "locllm",
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "llama_path": "lmsys/vicuna-7b-v1.5",
        "dino_path": "dinov2_vitl14_pretrain.pth",
        "lora_vision_r": r,
        "lora_vision_alpha": 16,
        "lora_vision_dropout": 0.05,
        "lora_vision_enable": vlora,
        "lora_llm_r": r,
        "lora_llm_alpha": 16,
        "lora_llm_dropout": 0.05,
        "lora_llm_enable": True,
        "crop_size": CROP,
        "num_patches": (CROP // PATCH) ** 2,
        "im_patch_token": VOCAB,
    }
    return w, config


def write_official(root: Path, weights: dict, config: dict, shards: int = 2, legacy: bool = False) -> Path:
    root.mkdir(parents=True)
    write_tokenizer(root, legacy=legacy)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(weights)
    if shards == 1:
        torch.save(weights, root / "pytorch_model.bin")
        return root
    # Split mid-model (a vision block's qkv and its LoRA may sit in different shards).
    cut = [round(i * len(keys) / shards) for i in range(shards + 1)]
    weight_map = {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: weights[k] for k in keys[cut[i] : cut[i + 1]]}
        torch.save(part, root / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return root


# --------------------------------------------------------------------------------------
# Independent reference forward (plain torch, from the layout description)


def ref_vision(w, cfg, pixels, gammas=None):
    v = "vision_model."
    c = w[v + "patch_embed.proj.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in w if k.startswith(v + "blocks."))
    heads = c // 64
    scale_lora = cfg["lora_vision_alpha"] / cfg["lora_vision_r"]
    x = F.conv2d(pixels, w[v + "patch_embed.proj.weight"], w[v + "patch_embed.proj.bias"], stride=PATCH)
    bsz, _, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w[v + "cls_token"].expand(bsz, -1, -1), x], dim=1)
    pe = w[v + "pos_embed"].float()
    grid = pe[:, 1:].reshape(1, GRID0, GRID0, c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((gh + 0.1) / GRID0, (gw + 0.1) / GRID0), mode="bicubic")
    x = x + torch.cat([pe[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, c)], dim=1)

    def ln(t, name):
        return F.layer_norm(t, (c,), w[name + ".weight"], w[name + ".bias"], eps=1e-6)

    for n in range(depth):
        b = f"{v}blocks.{n}."
        h = ln(x, b + "norm1")
        qkv = h @ w[b + "attn.qkv.weight"].T + w[b + "attn.qkv.bias"]
        q, k, val = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
        if cfg["lora_vision_enable"]:
            q = q + (h @ w[b + "attn.lora_A_q"].T) @ w[b + "attn.lora_B_q"].T * scale_lora
            val = val + (h @ w[b + "attn.lora_A_v"].T) @ w[b + "attn.lora_B_v"].T * scale_lora

        def split(t):
            return t.reshape(bsz, -1, heads, c // heads).transpose(1, 2)

        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        o = (att @ split(val)).transpose(1, 2).reshape(bsz, -1, c)
        o = o @ w[b + "attn.proj.weight"].T + w[b + "attn.proj.bias"]
        g1 = gammas[f"blocks.{n}.ls1.gamma"] if gammas else w[b + "ls1.gamma"]
        g2 = gammas[f"blocks.{n}.ls2.gamma"] if gammas else w[b + "ls2.gamma"]
        x = x + o * g1
        h = ln(x, b + "norm2")
        if b + "mlp.fc1.weight" in w:
            h = F.gelu(h @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"])
            h = h @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"]
        else:
            x1, x2 = (h @ w[b + "mlp.w12.weight"].T + w[b + "mlp.w12.bias"]).chunk(2, dim=-1)
            h = (F.silu(x1) * x2) @ w[b + "mlp.w3.weight"].T + w[b + "mlp.w3.bias"]
        x = x + h * g2
    x = ln(x, v + "norm")[:, 1:]
    return x @ w["mm_projector.weight"].T + w["mm_projector.bias"]


def ref_llm(w, cfg, embeds, positions):
    """Logits at ``positions`` of a plain Llama forward (RMSNorm, RoPE base 10000, GQA, SiLU MLP,
    LoRA on q/v scaled alpha/r)."""
    hidden, heads, kvh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps = hidden // heads, cfg["rms_norm_eps"]
    scale_lora = cfg["lora_llm_alpha"] / cfg["lora_llm_r"]
    bsz, t, _ = embeds.shape
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1).float(), torch.cat([ang.sin(), ang.sin()], -1).float()

    def rope(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    causal = torch.full((t, t), float("-inf")).triu(1)
    x = embeds
    for n in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{n}."
        h = rms(x, w[b + "input_layernorm.weight"])

        def proj(name, h=h, b=b):
            y = h @ w[f"{b}self_attn.{name}.weight"].T
            if f"{b}self_attn.{name}.lora_A" in w:
                y = y + (h @ w[f"{b}self_attn.{name}.lora_A"].T) @ w[f"{b}self_attn.{name}.lora_B"].T * scale_lora
            return y

        q = proj("q_proj").reshape(bsz, t, heads, hd).transpose(1, 2)
        k = proj("k_proj").reshape(bsz, t, kvh, hd).transpose(1, 2)
        v = proj("v_proj").reshape(bsz, t, kvh, hd).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kvh, dim=1), v.repeat_interleave(heads // kvh, dim=1)
        att = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(hd) + causal, dim=-1)
        o = (att @ v).transpose(1, 2).reshape(bsz, t, hidden)
        x = x + o @ w[b + "self_attn.o_proj.weight"].T
        h = rms(x, w[b + "post_attention_layernorm.weight"])
        g = F.silu(h @ w[b + "mlp.gate_proj.weight"].T) * (h @ w[b + "mlp.up_proj.weight"].T)
        x = x + g @ w[b + "mlp.down_proj.weight"].T
    return rms(x, w["model.norm.weight"])[:, positions] @ w["lm_head.weight"].T


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    weights, config = official_weights(seed=0)
    root = write_official(tmp_path_factory.mktemp("official") / "locllm-coco", weights, config, shards=2)
    return root, weights, config


@pytest.fixture(scope="module")
def converted(official, tmp_path_factory):
    root, _, _ = official
    return convert_official(root, tmp_path_factory.mktemp("conv") / "ckpt", log=lambda s: None)


def check_against_reference(ckpt: Path, weights: dict, config: dict, gammas=None):
    model = load_checkpoint(ckpt)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, CROP, CROP, generator=g)
    with torch.inference_mode():
        ours_img = VisionTower(model)(pixels)
        ref_img = ref_vision(weights, config, pixels, gammas)
        assert ours_img.shape == ref_img.shape == (2, 256, config["hidden_size"])
        assert rel(ours_img, ref_img) < 1e-4

        tok = PromptTokenizer.from_dir(ckpt)
        lib = DescriptionLibrary.load()
        rows = [tok.prompt_ids(n, lib.descriptions[n], 256) for n in ("nose", "left wrist")]
        ids = torch.tensor([r[: min(map(len, rows))] for r in rows])
        positions = torch.cat([torch.arange(0, ids.shape[1], 9), torch.tensor([ids.shape[1] - 1])])

        def logits_of(m):
            hidden = m.llm.model(inputs_embeds=m.build_inputs_embeds(ids, ours_img)).last_hidden_state
            return m.llm.lm_head(hidden[:, positions])

        ref_embeds = weights["model.embed_tokens.weight"][ids.clamp(max=VOCAB - 1)]
        ref_embeds[ids == config["im_patch_token"]] = ref_img.reshape(-1, ref_img.shape[-1])
        ref_logits = ref_llm(weights, config, ref_embeds, positions)
        assert rel(logits_of(model), ref_logits) < 1e-4
        # and so does the LoRA merge the exporter does
        assert rel(logits_of(load_checkpoint(ckpt, with_lora=False)), ref_logits) < 1e-4
    return model


def test_detection_and_converted_layout(official, converted):
    root, _, config = official
    assert is_official_checkpoint(root) and not is_official_checkpoint(converted.output)
    out = converted.output
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source_format"] == "locllm-official" and cfg["image_size"] == CROP and cfg["num_patches"] == 256
    assert cfg["vision"]["hidden_size"] == 128 and cfg["vision"]["num_hidden_layers"] == 2
    assert cfg["vision"]["num_attention_heads"] == 2  # 64-dim heads, from the weights
    assert cfg["llm"]["rope_theta"] == 10000.0 and cfg["lora_llm"]["alpha"] / cfg["lora_llm"]["r"] == 4.0
    # sharded in, sharded out (streamed shard by shard)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    from safetensors.torch import load_file

    pos = load_file(str(out / index["weight_map"]["vision.embeddings.position_embeddings"]))
    assert pos["vision.embeddings.position_embeddings"].shape == (1, 257, 128)
    assert converted.prompts_checked == len(DescriptionLibrary.load().descriptions)


def test_converted_matches_reference_forward(official, converted):
    _, weights, config = official
    check_against_reference(converted.output, weights, config)


def test_swiglu_single_file_and_dino_file_gammas(tmp_path):
    """ViT-g style SwiGLU FFN, vision LoRA off, one .bin file with a bf16 LM (its LoRA fp32),
    gammas from a DINOv2 file."""
    weights, config = official_weights(seed=1, width=64, depth=2, swiglu=True, vlora=False, r=2)
    stored = {k: v.bfloat16() if k.startswith("model.") and "lora_" not in k else v for k, v in weights.items()}
    weights = {k: v.float() for k, v in stored.items()}  # the reference sees the stored values
    root = write_official(tmp_path / "official", stored, config, shards=1)
    g = torch.Generator().manual_seed(9)
    dino = {k.replace("vision_model.", ""): torch.rand(64, generator=g) + 0.5 for k in weights if "gamma" in k}
    torch.save(dino, tmp_path / "dinov2.pth")
    with pytest.raises(OfficialCheckpointError, match="dino-weights"):
        convert_official(root, tmp_path / "x", layerscale="dino-file", log=lambda s: None)
    rep = convert_official(
        root, tmp_path / "ckpt", layerscale="dino-file", dino_weights=tmp_path / "dinov2.pth", log=lambda s: None
    )
    assert (rep.output / "model.safetensors").is_file() and rep.vision.ffn == "swiglu"
    from safetensors import safe_open

    with safe_open(str(rep.output / "model.safetensors"), framework="pt") as f:  # dtypes kept as stored
        assert f.get_slice("llm.model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("vision.embeddings.position_embeddings").get_dtype() == "F32"
    check_against_reference(rep.output, weights, config, gammas=dino)


def test_pose_and_engine_from_official_dir(official, tmp_path):
    from locllm_export.build import build_onnx_engine

    root, _, _ = official
    build_onnx_engine(root, tmp_path / "engine")
    manifest = json.loads((tmp_path / "engine" / "manifest.json").read_text())
    assert manifest["model"]["source_format"] == "locllm-official"
    assert manifest["model"]["source_checkpoint"] == str(root.resolve())
    torch_pose = Pose(root, backend="torch")
    ort_pose = Pose(tmp_path / "engine")
    img = np.asarray(__import__("cv2").imread(str(Path(__file__).parent / "data" / "astronaut.jpg")))[..., ::-1]
    boxes = [[40, 20, 300, 480], [150, 60, 200, 300]]
    kps = ["nose", "left wrist", "right knee", "neck"]
    a, b = ort_pose.locate(img, kps, boxes), torch_pose.locate(img, kps, boxes)
    assert a.info["backend"] == "onnxruntime" and b.info["backend"] == "torch"
    answers = set()
    for pa, pb in zip(a, b):
        for ka, kb in zip(pa, pb):
            assert ka.answer == kb.answer and (ka.x, ka.y) == (kb.x, kb.y)
            assert abs(ka.score - kb.score) <= 1e-4
            answers.add(ka.answer)
    assert len(answers) >= 3, "the fixture answers everything alike: parity would be vacuous"


def test_cli_converts_and_refuses(official, tmp_path, capsys):
    import convert_official as cli  # training/ is on sys.path (conftest)

    root, _, _ = official
    assert cli.main([str(root), str(tmp_path / "out")]) == 0
    assert "LayerScale" in capsys.readouterr().out  # the printed gamma note
    assert cli.main([str(tmp_path / "out"), str(tmp_path / "again")]) == 1  # ours, not official


# -- prompt ids against the checkpoint's own slow tokenizer ---------------------------


def test_slow_tokenizer_emulation_reproduces_transformers_431(tmp_path):
    oracle = json.loads(ORACLE.read_text())
    checked = 0
    for legacy in (False, True):
        d = write_tokenizer(tmp_path / f"tok{legacy}", legacy=legacy)
        slow, im_id = _slow_tokenizer(d)
        for case in oracle["cases"]:
            if case["legacy"] == legacy and case["kind"] in ("prompt", "prompt4"):
                assert slow_tokenizer_ids(slow, im_id, case["text"]) == case["ids"]
                checked += 1
    assert checked >= 100


def test_verify_prompt_ids_fails_loudly(official, tmp_path, monkeypatch):
    root, _, _ = official
    assert verify_prompt_ids(root, 256) == len(DescriptionLibrary.load().descriptions)
    # a runtime tokenizer whose tokenizer_config has legacy flipped
    flipped = tmp_path / "flipped"
    shutil.copytree(root, flipped, ignore=shutil.ignore_patterns("*.bin"))
    cfg = json.loads((flipped / "tokenizer_config.json").read_text())
    cfg["legacy"] = not cfg["legacy"]
    (flipped / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PromptIdsMismatchError, match=r"position 259[\s\S]*ours: .*'▁Ke'[\s\S]*slow: .*'Ke'"):
        verify_prompt_ids(root, 256, tokenizer=PromptTokenizer.from_dir(flipped))
    # an altered tokenizer: newer-transformers behaviour (every chunk encoded as opening text)
    original = PromptTokenizer._encode_chunk
    monkeypatch.setattr(PromptTokenizer, "_encode_chunk", lambda self, chunk, opens_text: original(self, chunk, True))
    with pytest.raises(PromptIdsMismatchError, match="differ from the checkpoint's slow LlamaTokenizer"):
        convert_official(root, tmp_path / "never", log=lambda s: None)
    assert not (tmp_path / "never").exists()


class _Hostile:
    """What a malicious checkpoint carries: unpickling it would call a function."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_hostile_pickle_is_refused_in_one_line(official, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    import cv2

    root, _, _ = official
    bad = tmp_path / "hostile"
    shutil.copytree(root, bad)
    shard = sorted(bad.glob("pytorch_model*.bin"))[0]
    torch.save({"model.norm.weight": _Hostile()}, shard)
    img = tmp_path / "img.png"
    cv2.imwrite(str(img), np.zeros((64, 48, 3), np.uint8))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / s) for s in ("sdk", "training", "export"))}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "locllm_sdk.cli",
            "locate",
            str(img),
            "-m",
            str(bad),
            "--backend",
            "torch",
            "-k",
            "nose",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2 and "this must never run" not in run.stdout + run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused: not a plain tensor file" in lines[0] and shard.name in lines[0], run.stderr
