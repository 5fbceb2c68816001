"""The public LocLLM checkpoints (kennethwdk/LocLLM) -> our checkpoint format.

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

import ctypes
import json
import math
import mmap
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import TOKENIZER_FILES, LocLLM, LocLLMConfig, LoraSettings

OFFICIAL_MODEL_TYPE = "locllm"
SOURCE_FORMAT = "locllm-official"
DINOV2_HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) uses 64-dim heads
LAYERSCALE_SOURCES = ("checkpoint", "dino-file")
VISION_PREFIX = "vision_model."
IM_PATCH = "<im_patch>"


class OfficialCheckpointError(ValueError):
    """A public LocLLM directory that cannot be converted faithfully."""


class PromptIdsMismatchError(OfficialCheckpointError):
    """Our prompt ids differ from the checkpoint's own slow tokenizer."""


# --------------------------------------------------------------------------------------
# Detection and reading


def read_official_config(path: str | Path) -> dict | None:
    """The official ``config.json`` as a dict, or None when ``path`` is not an official dir."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("model_type") == OFFICIAL_MODEL_TYPE else None


def is_official_checkpoint(path: str | Path) -> bool:
    return read_official_config(path) is not None


def _weight_map(directory: Path) -> dict[str, str]:
    """key -> file name, in the order the files hold them (reads no tensor data)."""
    for index_name in ("pytorch_model.bin.index.json", "model.safetensors.index.json"):
        index = directory / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not weight_map:
                raise OfficialCheckpointError(f"{index}: no weight_map")
            missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
            if missing:
                raise OfficialCheckpointError(f"{directory}: shards named in {index_name} are missing: {missing}")
            return dict(weight_map)
    for single in ("pytorch_model.bin", "model.safetensors"):
        if (directory / single).is_file():
            return {k: single for k in _open_shard(directory / single)[0]}
    raise OfficialCheckpointError(
        f"{directory}: no weights (pytorch_model.bin, pytorch_model.bin.index.json + shards, or model.safetensors)"
    )


def _open_shard(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors of one weight file and whether they are memory-mapped (then no data is read yet)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
        return out, False
    mapped = True
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be mmapped
        state, mapped = torch.load(path, map_location="cpu", weights_only=True), False
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{path}: not a state dict of tensors")
    return state, mapped


class _ShardCache:
    """At most one input shard open at a time."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.name: str | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.mapped = False

    def get(self, file: str) -> dict[str, torch.Tensor]:
        if file != self.name:
            self.close()
            self.tensors, self.mapped = _open_shard(self.directory / file)
            self.name = file
        return self.tensors

    def close(self) -> None:
        self.tensors, self.name, self.mapped = {}, None, False


# --------------------------------------------------------------------------------------
# Architecture from the weights


@dataclass
class VisionLayout:
    width: int
    depth: int
    heads: int
    patch_size: int
    num_channels: int
    ffn: str  # "mlp" or "swiglu"
    mlp_ratio: float
    qkv_bias: bool
    pos_grid: int  # side of the position grid the ViT was trained with (37 for DINOv2)


def _block_index(key: str) -> int | None:
    m = re.match(rf"{re.escape(VISION_PREFIX)}blocks\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _swiglu_hidden(width: int, mlp_ratio: float) -> int:
    # HF Dinov2SwiGLUFFN (and the original SwiGLUFFNFused): 2/3 of the MLP width, rounded up to 8
    return (int(int(width * mlp_ratio) * 2 / 3) + 7) // 8 * 8


def infer_vision_layout(keys: Iterable[str], shape_of: Callable[[str], tuple], heads: int | None = None):
    keys = set(keys)
    p = VISION_PREFIX
    needed = [f"{p}patch_embed.proj.weight", f"{p}pos_embed", f"{p}cls_token", f"{p}norm.weight"]
    missing = [k for k in needed if k not in keys]
    if missing:
        raise OfficialCheckpointError(f"vision weights missing: {missing}")
    width, channels, ph, pw = shape_of(f"{p}patch_embed.proj.weight")
    if ph != pw:
        raise OfficialCheckpointError(f"non-square patches {ph}x{pw} are not supported")
    blocks = {b for b in (_block_index(k) for k in keys) if b is not None}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise OfficialCheckpointError(f"vision blocks are not numbered 0..N-1: {sorted(blocks)[:5]}...")
    depth = max(blocks) + 1
    if heads is None:
        if width % DINOV2_HEAD_DIM:
            raise OfficialCheckpointError(
                f"vision width {width} is not a multiple of DINOv2's {DINOV2_HEAD_DIM}-dim heads: give the head count"
            )
        heads = width // DINOV2_HEAD_DIM
    if width % heads:
        raise OfficialCheckpointError(f"vision width {width} is not divisible by {heads} heads")
    if f"{p}blocks.0.mlp.fc1.weight" in keys:
        ffn, hidden = "mlp", shape_of(f"{p}blocks.0.mlp.fc1.weight")[0]
        mlp_ratio = hidden / width
    elif f"{p}blocks.0.mlp.w12.weight" in keys:
        ffn, hidden = "swiglu", shape_of(f"{p}blocks.0.mlp.w12.weight")[0] // 2
        ratios = [r / 4 for r in range(1, 65)]
        fits = [r for r in ratios if _swiglu_hidden(width, r) == hidden]
        if not fits:
            raise OfficialCheckpointError(
                f"SwiGLU hidden size {hidden} does not fit HF Dinov2's rule for width {width}"
            )
        mlp_ratio = 4.0 if 4.0 in fits else fits[0]
    else:
        raise OfficialCheckpointError("vision blocks have neither mlp.fc1/fc2 nor mlp.w12/w3 (SwiGLU) weights")
    n_pos = shape_of(f"{p}pos_embed")[1] - 1
    side = math.isqrt(n_pos)
    if side * side != n_pos:
        raise OfficialCheckpointError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    return VisionLayout(
        width=int(width),
        depth=depth,
        heads=int(heads),
        patch_size=int(ph),
        num_channels=int(channels),
        ffn=ffn,
        mlp_ratio=float(mlp_ratio),
        qkv_bias=f"{p}blocks.0.attn.qkv.bias" in keys,
        pos_grid=side,
    )


def _enabled(cfg: dict, which: str) -> bool:
    return bool(cfg.get(f"lora_{which}_enable", False)) and int(cfg.get(f"lora_{which}_r", 0)) > 0


LLM_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
)


def build_config(official: dict, vision: VisionLayout, coord_dims: int = 2, log=print) -> LocLLMConfig:
    """Our LocLLMConfig for an official config.json and the ViT layout read from its weights."""
    crop = int(official.get("crop_size", 224))
    if crop % vision.patch_size:
        raise OfficialCheckpointError(f"crop_size {crop} is not a multiple of the patch size {vision.patch_size}")
    num_patches = (crop // vision.patch_size) ** 2
    if "num_patches" in official and int(official["num_patches"]) != num_patches:
        raise OfficialCheckpointError(
            f"config num_patches {official['num_patches']} != (crop_size {crop} // patch {vision.patch_size})^2"
        )
    if "im_patch_token" not in official:
        raise OfficialCheckpointError("config.json has no im_patch_token")
    llm = {k: official[k] for k in LLM_FIELDS if official.get(k) is not None}
    llm.setdefault("num_key_value_heads", llm.get("num_attention_heads"))
    llm.setdefault("tie_word_embeddings", False)
    # The original builds RoPE with transformers 4.31's formula, base 10000, whatever the
    # config says (4.31 has no rope_theta; its LoRA attention ignores rope_scaling).
    if official.get("rope_theta", 10000.0) != 10000.0:
        log(f"note: config rope_theta {official['rope_theta']} ignored: the original uses base 10000")
    llm["rope_theta"] = 10000.0
    if official.get("rope_scaling"):
        if _enabled(official, "llm"):
            log("note: config rope_scaling ignored, as the original's LoRA attention does")
        else:
            llm["rope_scaling"] = official["rope_scaling"]
    if int(official.get("pretraining_tp", 1)) > 1 and _enabled(official, "llm"):
        raise OfficialCheckpointError("pretraining_tp > 1 bypasses the LoRA q/v weights in transformers 4.31")
    vision_cfg = dict(
        hidden_size=vision.width,
        num_hidden_layers=vision.depth,
        num_attention_heads=vision.heads,
        mlp_ratio=vision.mlp_ratio,
        use_swiglu_ffn=vision.ffn == "swiglu",
        qkv_bias=vision.qkv_bias,
        num_channels=vision.num_channels,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )

    def lora(which: str) -> LoraSettings:
        # Original: scaling = alpha / r on both towers (models/lora.py), as peft's default.
        return LoraSettings(
            r=int(official.get(f"lora_{which}_r", 8)),
            alpha=official.get(f"lora_{which}_alpha", 16),
            dropout=float(official.get(f"lora_{which}_dropout", 0.05)),
            enabled=_enabled(official, which),
        )

    return LocLLMConfig(
        vision=vision_cfg,
        llm=llm,
        image_size=crop,
        patch_size=vision.patch_size,
        coord_dims=coord_dims,
        im_patch_token_id=int(official["im_patch_token"]),
        lora_vision=lora("vision"),
        lora_llm=lora("llm"),
        projector_bias=True,
    )


# --------------------------------------------------------------------------------------
# Key mapping


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The original's run-time resize (models/dino.py ``interpolate_pos_encoding``), once:
    fp32, bicubic, ``scale_factor = (grid + 0.1) / sqrt(N)``, no antialias, CLS entry kept."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    pe = pos_embed.float()
    if side == grid:
        return pe.clone()
    dim = pe.shape[-1]
    patches = pe[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (grid + 0.1) / math.sqrt(n)
    out = torch.nn.functional.interpolate(patches, scale_factor=(scale, scale), mode="bicubic")
    if tuple(out.shape[-2:]) != (grid, grid):
        raise OfficialCheckpointError(f"position resize gave {tuple(out.shape[-2:])}, expected {grid}x{grid}")
    out = out.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pe[:, :1], out], dim=1).contiguous()


# One input tensor -> [(our key, tensor)]
Converted = list[tuple[str, torch.Tensor]]


class KeyMapper:
    """Maps official tensors (one at a time) to our checkpoint's state-dict entries."""

    def __init__(self, config: LocLLMConfig, vision: VisionLayout, gammas: dict[str, torch.Tensor] | None = None):
        self.config, self.vision = config, vision
        self.grid = config.image_size // config.patch_size
        self.vlora = config.lora_vision.enabled
        self.llora = config.lora_llm.enabled
        self.gammas = gammas  # "N.ls1" -> tensor, from a DINOv2 file (--layerscale dino-file)

    def __call__(self, key: str, t: torch.Tensor) -> Converted:
        if key.startswith(VISION_PREFIX):
            return self._vision(key[len(VISION_PREFIX) :], t)
        if key.startswith("mm_projector."):
            return [("projector." + key[len("mm_projector.") :], t)]
        if key.startswith("model.") or key.startswith("lm_head."):
            return self._llm(key, t)
        raise OfficialCheckpointError(f"unexpected tensor {key!r}")

    def _llm(self, key: str, t: torch.Tensor) -> Converted:
        if key.endswith("rotary_emb.inv_freq"):
            return []  # bf16-rounded and unused by the original: RoPE is rebuilt from the config
        m = re.fullmatch(r"(model\.layers\.\d+\.self_attn\.[qv]_proj)\.(weight|lora_A|lora_B)", key)
        if m and m.group(2) != "weight" and not self.llora:
            raise OfficialCheckpointError(f"{key}: LoRA weights present but lora_llm_enable is false in config.json")
        if m and self.llora:
            leaf = {"weight": "base_layer.weight", "lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
            return [(f"llm.{m.group(1)}.{leaf[m.group(2)]}", t)]
        return [("llm." + key, t)]

    def _vision(self, key: str, t: torch.Tensor) -> Converted:
        e = "vision.embeddings."
        simple = {
            "cls_token": e + "cls_token",
            "mask_token": e + "mask_token",
            "patch_embed.proj.weight": e + "patch_embeddings.projection.weight",
            "patch_embed.proj.bias": e + "patch_embeddings.projection.bias",
            "norm.weight": "vision.layernorm.weight",
            "norm.bias": "vision.layernorm.bias",
        }
        if key in simple:
            if key == "mask_token":
                t = t.reshape(1, -1)
            return [(simple[key], t)]
        if key == "pos_embed":
            return [(e + "position_embeddings", resize_pos_embed(t, self.grid))]
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        if not m:
            raise OfficialCheckpointError(f"unexpected vision tensor {VISION_PREFIX}{key!r}")
        n, rest = m.group(1), m.group(2)
        layer = f"vision.encoder.layer.{n}."
        att = layer + "attention.attention."
        c = self.vision.width
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            leaf = rest.rsplit(".", 1)[1]
            if t.shape[0] != 3 * c:
                raise OfficialCheckpointError(f"{key}: fused qkv has {t.shape[0]} rows, expected 3 x {c}")
            q, k, v = t[:c], t[c : 2 * c], t[2 * c :]
            base = "base_layer." if self.vlora else ""
            return [(f"{att}query.{base}{leaf}", q), (f"{att}key.{leaf}", k), (f"{att}value.{base}{leaf}", v)]
        m2 = re.fullmatch(r"attn\.lora_([AB])_([qv])", rest)
        if m2:
            if not self.vlora:
                raise OfficialCheckpointError(f"{key}: LoRA weights present but lora_vision_enable is false")
            target = {"q": "query", "v": "value"}[m2.group(2)]
            return [(f"{att}{target}.lora_{m2.group(1)}.default.weight", t)]
        m3 = re.fullmatch(r"ls([12])\.gamma", rest)
        if m3:
            if self.gammas is not None:
                g = self.gammas.get(f"{n}.ls{m3.group(1)}")
                if g is None or g.shape != t.shape:
                    raise OfficialCheckpointError(
                        f"DINOv2 weights file has no blocks.{n}.ls{m3.group(1)}.gamma {t.shape}"
                    )
                t = g
            return [(f"{layer}layer_scale{m3.group(1)}.lambda1", t)]
        table = {
            "norm1.weight": "norm1.weight",
            "norm1.bias": "norm1.bias",
            "norm2.weight": "norm2.weight",
            "norm2.bias": "norm2.bias",
            "attn.proj.weight": "attention.output.dense.weight",
            "attn.proj.bias": "attention.output.dense.bias",
            "mlp.fc1.weight": "mlp.fc1.weight",
            "mlp.fc1.bias": "mlp.fc1.bias",
            "mlp.fc2.weight": "mlp.fc2.weight",
            "mlp.fc2.bias": "mlp.fc2.bias",
            "mlp.w12.weight": "mlp.weights_in.weight",
            "mlp.w12.bias": "mlp.weights_in.bias",
            "mlp.w3.weight": "mlp.weights_out.weight",
            "mlp.w3.bias": "mlp.weights_out.bias",
        }
        if rest in table:
            return [(layer + table[rest], t)]
        raise OfficialCheckpointError(f"unexpected vision tensor {VISION_PREFIX}{key!r}")


def load_dino_gammas(path: str | Path, depth: int) -> dict[str, torch.Tensor]:
    """LayerScale gammas of a DINOv2 weights file (``blocks.N.ls1.gamma``), torch.load weights_only."""
    state, _ = _open_shard(Path(path))
    out = {}
    for key, t in state.items():
        m = re.search(r"blocks\.(?:\d+\.)?(\d+)\.(ls[12])\.gamma$", key)
        if m:
            out[f"{m.group(1)}.{m.group(2)}"] = t.detach().clone()
    want = {f"{n}.ls{i}" for n in range(depth) for i in (1, 2)}
    if not want <= set(out):
        raise OfficialCheckpointError(
            f"{path}: LayerScale gammas missing for {sorted(want - set(out))[:4]}... (is it a DINOv2 file?)"
        )
    return out


# --------------------------------------------------------------------------------------
# Streaming safetensors writer

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_PAGE = mmap.PAGESIZE
try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - non-POSIX
    _libc = None
_MADV_DONTNEED = 4


def _release_pages(t: torch.Tensor) -> None:
    """Drop the (clean, file-backed) pages a memory-mapped input tensor touched from our RSS."""
    if _libc is None or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a = (start + _PAGE - 1) // _PAGE * _PAGE  # only whole pages inside the tensor
    b = end // _PAGE * _PAGE
    if b > a:
        _libc.madvise(a, b - a, _MADV_DONTNEED)


def write_safetensors_streaming(path: Path, entries: list[tuple[str, torch.Tensor, bool]]) -> int:
    """Write ``entries`` (key, tensor, tensor is a view of a memory-mapped input) in order as
    one safetensors file: header first, then tensor by tensor. Mapped inputs give their pages
    back once written, so the resident set does not grow with the shard."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t, _ in entries:
        if t.dtype not in _ST_DTYPES:
            raise OfficialCheckpointError(f"{key}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t, mapped in entries:
            data = t.contiguous()
            if data.numel():
                f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
            if mapped and data.data_ptr() == t.data_ptr():
                _release_pages(t)
            del data
    return offset


# --------------------------------------------------------------------------------------
# Prompt ids against the checkpoint's own slow tokenizer


def _token_content(value, default: str) -> str:
    if isinstance(value, dict):
        return str(value.get("content", default))
    return str(value) if value else default


def _slow_tokenizer(tokenizer_dir: Path):
    """transformers' slow LlamaTokenizer on the checkpoint's files, settings from its config."""
    import logging

    from transformers import LlamaTokenizer

    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    added_path = tokenizer_dir / "added_tokens.json"
    if not added_path.is_file():
        raise OfficialCheckpointError(f"{tokenizer_dir}: added_tokens.json is missing (it defines {IM_PATCH})")
    added = json.loads(added_path.read_text())
    if IM_PATCH not in added:
        raise OfficialCheckpointError(f"{added_path}: no {IM_PATCH} entry")
    tf_logger = logging.getLogger("transformers.models.llama.tokenization_llama")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the "legacy behaviour" notice when legacy is unset
    try:
        slow = LlamaTokenizer(
            vocab_file=str(tokenizer_dir / "tokenizer.model"),
            legacy=cfg.get("legacy"),  # None -> legacy, as in 4.31
            add_bos_token=cfg.get("add_bos_token", True),
            add_eos_token=cfg.get("add_eos_token", False),
            unk_token=_token_content(cfg.get("unk_token"), "<unk>"),
            bos_token=_token_content(cfg.get("bos_token"), "<s>"),
            eos_token=_token_content(cfg.get("eos_token"), "</s>"),
            pad_token=None,
        )
    finally:
        tf_logger.setLevel(level)
    return slow, int(added[IM_PATCH])


def slow_tokenizer_ids(slow, im_patch_id: int, text: str) -> list[int]:
    """Ids of ``text`` as transformers 4.31's slow LlamaTokenizer gives them.

    4.31 splits the text on the added ``<im_patch>`` token and strips the whitespace on both
    sides of it (a token added as a plain string); the chunk opening the text goes through
    ``tokenize`` (which adds the ``▁`` prefix in non-legacy mode), later chunks through
    ``_tokenize`` (non-legacy: no dummy prefix; legacy: SentencePiece's own prefix).
    """
    for special in ("<s>", "</s>", "<unk>"):
        if special in text:
            raise OfficialCheckpointError(f"prompt text contains {special!r}; not emulated")
    pieces = text.split(IM_PATCH)
    chunks: list[str | None] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            chunks.append(None)  # the added token
            piece = piece.lstrip()
        if i < len(pieces) - 1:
            piece = piece.rstrip()
        chunks.append(piece)
    ids = [slow.bos_token_id] if slow.add_bos_token else []
    for i, chunk in enumerate(chunks):
        if chunk is None:
            ids.append(im_patch_id)
        elif chunk:
            tokens = slow.tokenize(chunk) if i == 0 else slow._tokenize(chunk)
            ids.extend(slow.convert_tokens_to_ids(tokens))
    return ids


def _official_prompt_text(name: str, description: str, num_patches: int) -> str:
    # utils/valid2d.py with conv_keypoint (roles Keypoint/Question/Answer, sep "\n")
    q = f"Where is the {name} of this person in this image? Please provide its coordinates."
    return "Image: " + IM_PATCH * num_patches + "\n" + f"Keypoint: {description}\nQuestion: {q}\nAnswer:"


def _mismatch(what: str, ours: list[int], ref: list[int], piece: Callable[[int], str]) -> str:
    pos = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    lo, hi = max(0, pos - 3), pos + 4

    def show(ids):
        return " ".join(f"{t}:{piece(t)!r}" for t in ids[lo:hi])

    return (
        f"{what}: prompt ids differ from the checkpoint's slow LlamaTokenizer at position {pos} "
        f"(lengths {len(ours)} vs {len(ref)})\n  ours: ... {show(ours)}\n  slow: ... {show(ref)}"
    )


def verify_prompt_ids(tokenizer_dir: str | Path, num_patches: int, tokenizer=None, descriptions=None) -> int:
    """Check our prompt ids for every keypoint of the description library against the ids of
    the checkpoint's own slow tokenizer (``slow_tokenizer_ids``). ``tokenizer`` is the
    runtime's PromptTokenizer (default: built from ``tokenizer_dir``). Both the full prompt
    and the runtime's split (shared prefix + per-keypoint round) are checked. Returns the
    number of prompts checked; raises PromptIdsMismatchError on the first difference."""
    from locllm_sdk.descriptions import DescriptionLibrary
    from locllm_sdk.protocol import PromptTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    ours = tokenizer or PromptTokenizer.from_dir(tokenizer_dir)
    slow, im_patch_id = _slow_tokenizer(tokenizer_dir)
    if ours.spec.im_patch_id != im_patch_id:
        raise PromptIdsMismatchError(
            f"{tokenizer_dir}: <im_patch> id {ours.spec.im_patch_id} (ours) != {im_patch_id} (added_tokens.json)"
        )

    def piece(t: int) -> str:
        return IM_PATCH if t == im_patch_id else slow.convert_ids_to_tokens(int(t))

    library = descriptions if descriptions is not None else DescriptionLibrary.load().descriptions
    prefix = ours.prefix_ids(num_patches)
    checked = 0
    for name, description in library.items():
        ref = slow_tokenizer_ids(slow, im_patch_id, _official_prompt_text(name, description, num_patches))
        full = ours.prompt_ids(name, description, num_patches)
        if full != ref:
            raise PromptIdsMismatchError(_mismatch(f"keypoint {name!r}", full, ref, piece))
        split = prefix + ours.round_ids(name, description)
        if split != ref:
            raise PromptIdsMismatchError(_mismatch(f"keypoint {name!r} (prefix + round)", split, ref, piece))
        checked += 1
    return checked


# --------------------------------------------------------------------------------------
# Conversion


@dataclass
class ConversionReport:
    output: Path
    config: LocLLMConfig
    vision: VisionLayout
    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    prompts_checked: int = 0
    notes: list[str] = field(default_factory=list)


def _expected_state(config: LocLLMConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = LocLLM(config, with_lora=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}


def convert_official(
    official_dir: str | Path,
    output: str | Path,
    layerscale: str = "checkpoint",
    dino_weights: str | Path | None = None,
    coord_dims: int = 2,
    vision_heads: int | None = None,
    overwrite: bool = False,
    verify_prompts: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert a public LocLLM directory into our checkpoint format (see the module doc)."""
    src, output = Path(official_dir).resolve(), Path(output)
    official = read_official_config(src)
    if official is None:
        raise OfficialCheckpointError(f"{src}: not a public LocLLM checkpoint (config.json model_type != 'locllm')")
    if layerscale not in LAYERSCALE_SOURCES:
        raise OfficialCheckpointError(f"layerscale must be one of {LAYERSCALE_SOURCES}, got {layerscale!r}")
    if layerscale == "dino-file" and not dino_weights:
        raise OfficialCheckpointError(
            "--layerscale dino-file needs --dino-weights FILE (e.g. dinov2_vitl14_pretrain.pth)"
        )
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty (pass overwrite to replace it)")
        shutil.rmtree(output)

    weight_map = _weight_map(src)
    files = list(dict.fromkeys(weight_map.values()))
    cache = _ShardCache(src)

    def shape_of(key: str) -> tuple:
        return tuple(cache.get(weight_map[key])[key].shape)

    vision = infer_vision_layout(weight_map, shape_of, heads=vision_heads)
    config = build_config(official, vision, coord_dims=coord_dims, log=log)
    report = ConversionReport(output, config, vision)

    # Tokenizer first: fail before the heavy part.
    if verify_prompts:
        report.prompts_checked = verify_prompt_ids(src, config.num_patches)
    from locllm_sdk.protocol import read_tokenizer_spec

    spec = read_tokenizer_spec(src)
    if spec.im_patch_id != config.im_patch_token_id:
        raise OfficialCheckpointError(
            f"config.json im_patch_token {config.im_patch_token_id} != tokenizer's <im_patch> id {spec.im_patch_id}"
        )

    gammas = None
    has_gamma = any(k.endswith(".ls1.gamma") for k in weight_map)
    if layerscale == "dino-file":
        gammas = load_dino_gammas(dino_weights, vision.depth)
        note = f"LayerScale gammas from {dino_weights} (as the original, which never loads the checkpoint's)"
    else:
        if not has_gamma:
            raise OfficialCheckpointError(
                "the checkpoint has no ls1/ls2.gamma: pass --layerscale dino-file --dino-weights <DINOv2 file>"
            )
        note = (
            "LayerScale gammas taken from the checkpoint. The original code (transformers 4.31) never loads "
            f"them and keeps those of dino_path={official.get('dino_path')!r}; they are identical when the "
            "ViT base was frozen (public models). Use --layerscale dino-file --dino-weights FILE to take them "
            "from that file."
        )
    report.notes.append(note)
    log(f"note: {note}")

    expected = _expected_state(config)
    mapper = KeyMapper(config, vision, gammas)
    tmp = output.with_name(output.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    seen: dict[str, str] = {}
    out_names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    try:
        for file, out_name in zip(files, out_names):
            tensors = cache.get(file)
            entries: list[tuple[str, torch.Tensor, bool]] = []
            for key in [k for k, f in weight_map.items() if f == file]:
                if key not in tensors:
                    raise OfficialCheckpointError(f"{file}: index names {key!r} but the shard lacks it")
                source = tensors[key]
                for new_key, t in mapper(key, source):
                    if new_key not in expected:
                        raise OfficialCheckpointError(f"{key} -> {new_key}: not a tensor of the converted model")
                    if tuple(t.shape) != expected[new_key]:
                        raise OfficialCheckpointError(
                            f"{key} -> {new_key}: shape {tuple(t.shape)}, the config needs {expected[new_key]}"
                        )
                    if new_key in seen:
                        raise OfficialCheckpointError(f"{new_key} produced twice ({seen[new_key]}, {key})")
                    seen[new_key] = out_name
                    view = cache.mapped and t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
                    entries.append((new_key, t, view))
            report.bytes += write_safetensors_streaming(tmp / out_name, entries)
            report.tensors += len(entries)
            report.shards.append(out_name)
            del entries, tensors
            cache.close()
        missing = sorted(set(expected) - set(seen))
        if missing:
            raise OfficialCheckpointError(f"the checkpoint lacks tensors of the model: {missing[:6]}...")
        if len(out_names) > 1:
            index = {"metadata": {"total_size": report.bytes}, "weight_map": seen}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        extra = {
            "source_format": SOURCE_FORMAT,
            "source_checkpoint": str(src),
            "layerscale_source": layerscale if layerscale == "checkpoint" else f"dino-file:{dino_weights}",
            "official": {
                k: official.get(k) for k in ("crop_size", "num_patches", "im_patch_token", "dino_path", "llama_path")
            },
        }
        (tmp / "config.json").write_text(json.dumps({**config.to_dict(), **extra}, indent=2) + "\n")
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        cache.close()
    report.output = output
    return report
