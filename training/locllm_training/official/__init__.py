"""The public LocLLM checkpoints (kennethwdk/LocLLM) -> our checkpoint format.

By concern: ``shards`` (reading the weight files), ``architecture`` (the model from the
weights and config.json), ``keymap`` (official tensor names -> ours), ``prompt_ids`` (our
prompt ids against the checkpoint's slow tokenizer), ``convert`` (the streaming conversion,
written with ``locllm_training.safetensors_stream``).


A public checkpoint directory is the HF ``save_pretrained`` of the original model:
``config.json`` (``model_type: "locllm"``: a LlamaConfig plus ``lora_*``, ``crop_size``,
``num_patches``, ``im_patch_token``, ``dino_path``), pickled ``pytorch_model*.bin`` weights
(sharded with ``pytorch_model.bin.index.json`` or not) and the slow-tokenizer files. The
vision tower uses the original DINOv2 names (fused ``qkv``, ``ls1/ls2.gamma``) with LoRA on
the q and v row blocks of ``qkv``; the LM is a LlamaForCausalLM with LoRA on q_proj/v_proj.

Conversion (``convert_official``) streams tensor by tensor: one input shard is open at a
time (``torch.load(weights_only=True, mmap=True)``; nothing is unpickled beyond tensors) and
each output safetensors shard is written with its header first and then one tensor at a
time, so the peak memory stays far below the model's size. The position embeddings are
resized once, exactly as the original does at run time, and baked into the checkpoint.

``verify_prompt_ids`` checks, for every keypoint of the description library, that the
prompt ids our runtime produces equal those of the checkpoint's own slow LlamaTokenizer
driven the way transformers 4.31 drives it (see the function).
"""

from __future__ import annotations

from locllm_sdk.loader import OFFICIAL_MODEL_TYPE, read_official_config

from .architecture import VisionLayout, build_config, infer_vision_layout
from .convert import ConversionReport, convert_official
from .errors import SOURCE_FORMAT, OfficialCheckpointError, PromptIdsMismatchError
from .keymap import LAYERSCALE_SOURCES, KeyMapper, load_dino_gammas
from .prompt_ids import _slow_tokenizer, slow_tokenizer_ids, verify_prompt_ids


def is_official_checkpoint(path) -> bool:
    return read_official_config(path) is not None


__all__ = [
    "LAYERSCALE_SOURCES",
    "OFFICIAL_MODEL_TYPE",
    "SOURCE_FORMAT",
    "ConversionReport",
    "KeyMapper",
    "OfficialCheckpointError",
    "PromptIdsMismatchError",
    "VisionLayout",
    "_slow_tokenizer",
    "build_config",
    "convert_official",
    "infer_vision_layout",
    "is_official_checkpoint",
    "load_dino_gammas",
    "read_official_config",
    "slow_tokenizer_ids",
    "verify_prompt_ids",
]
