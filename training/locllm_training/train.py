"""Fine-tune LocLLM with the HF Trainer: stage 1 (projector on captions) and stage 2
(LoRA on ViT q/v + LLM q/v + projector on keypoint conversations), resumable, with
periodic PCK validation through the SDK's own decoding, and our checkpoint format out."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from locllm_sdk.descriptions import DescriptionLibrary
from locllm_sdk.errors import ArgumentError
from locllm_sdk.evaluation import pck
from locllm_sdk.protocol import PROTOCOL_NAMES, PROTOCOL_VERSIONS, PromptTokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import (
    CaptionDataset,
    ConversationConfig,
    ConversationDataset,
    PersonRecord,
    collate,
    load_coco,
    load_companion_records,
)
from .model import LocLLM, load_checkpoint, save_checkpoint, to_moe_lora
from .moe_lora import MoeLoraSettings, moe_parameter_count


@dataclass
class DataSource:
    coco: str  # COCO-keypoints JSON
    images: str | None = None
    companion: str | None = None  # 3D companion JSON (SynthPose / H36M convention)
    weight: float = 1.0


@dataclass
class TrainConfig:
    init: str  # checkpoint directory to start from (our format)
    output: str
    stage: int = 2
    train_llm: str = "lora"  # "lora" (paper) or "full" (an LM trained from scratch)
    train: list[DataSource] = field(default_factory=list)
    val: DataSource | None = None
    captions: str | None = None  # stage 1: LLaVA JSON
    caption_images: str | None = None
    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    bf16: bool = True
    max_rounds: int = 5
    exclude: list[str] = field(default_factory=list)
    midpoint_prob: float = 0.0
    augment: bool = True
    eval_every: int = 200
    eval_persons: int = 64
    save_every: int = 200
    seed: int = 0
    workers: int = 1
    log_every: int = 10
    storage_dtype: str | None = None  # e.g. "float16" for the final checkpoint file
    # answer with 2 or 3 coordinates whatever the init checkpoint did: the weights are the
    # same, only the answer format changes (a 3D model fine-tuned from a 2D one)
    coord_dims: int | None = None
    aux_weight: float = 0.0  # >0: auxiliary "which patch holds joint j" loss on the vision tokens
    # write the final checkpoint as its differences from this one (e.g. the init, when the
    # LM stayed frozen): a few MB instead of the whole model, the parent sha256-checked
    delta_of: str | None = None
    # the LM's adapter: "lora" (peft, the init's) or "moe-lora" (E experts + gate, moe_lora.py;
    # a plain-LoRA init has its LM LoRA folded into the base weights first)
    adapter: str = "lora"
    experts: int = 4
    top_k: int = 2
    zero_expert: bool = False
    expert_rank: int | None = None  # each expert's LoRA rank (default: the init's LM LoRA r)
    balance_weight: float = 0.01
    # the prompt protocol to train (and record in the checkpoint): "per-keypoint", "grouped"
    # (body-part groups, protocol.JOINT_GROUPS) or a version string; default: the init's
    protocol: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["train"] = [DataSource(**s) for s in d.get("train", [])]
        if d.get("val"):
            d["val"] = DataSource(**d["val"])
        return cls(**d)


def set_trainable(model: LocLLM, stage: int, llm: str = "lora") -> int:
    """Stage 1: projector only. Stage 2: LoRA (both towers) + projector, as the paper; with
    ``llm="full"`` the whole LM trains too (for LMs that were never pretrained)."""
    for name, p in model.named_parameters():
        if stage == 1:
            p.requires_grad_(name.startswith("projector."))
        elif llm == "full" and name.startswith("llm."):
            p.requires_grad_(True)
        else:
            p.requires_grad_(name.startswith("projector.") or ".lora_" in name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_adapter(model: LocLLM, cfg: TrainConfig) -> LocLLM:
    """The init model with the LM adapter ``cfg`` asks for (an MoE-LoRA init continues as is
    when its settings are the asked ones)."""
    if cfg.adapter not in ("lora", "moe-lora"):
        raise ArgumentError(f"adapter must be 'lora' or 'moe-lora', got {cfg.adapter!r}")
    have = model.config.llm_adapter
    if cfg.adapter == "lora":
        if have != "lora":
            raise ArgumentError(f"{cfg.init} has a {have} adapter on its LM: train it with --adapter {have}")
        return model
    settings = MoeLoraSettings(cfg.experts, cfg.top_k, cfg.zero_expert, cfg.balance_weight)
    if have == "moe-lora":
        rank = cfg.expert_rank or model.config.lora_llm.r
        if (model.config.moe_llm, model.config.lora_llm.r) != (settings, rank):
            raise ArgumentError(
                f"{cfg.init} has MoE LoRA {model.config.moe_llm} (rank {model.config.lora_llm.r}); "
                f"asked for {settings} (rank {rank})"
            )
        return model
    return to_moe_lora(model, settings, r=cfg.expert_rank)


def protocol_version_of(protocol: str) -> str:
    """The protocol version ``TrainConfig.protocol`` names (a short name or a version)."""
    version = PROTOCOL_NAMES.get(protocol, protocol)
    if version not in PROTOCOL_VERSIONS:
        raise ArgumentError(
            f"protocol must be one of {', '.join([*PROTOCOL_NAMES, *PROTOCOL_VERSIONS])}, got {protocol!r}"
        )
    return version


def records_of(source: DataSource, dims: int) -> list[PersonRecord]:
    if dims == 3 or source.companion:
        if not source.companion:
            raise ValueError(f"a 3D model needs a companion file for {source.coco}")
        return load_companion_records(source.companion, source.coco, source.images)
    return load_coco(source.coco, source.images)


class WeightedMix(torch.utils.data.Dataset):
    """Several sources mixed by weight: an epoch of length sum(len) draws by weight."""

    def __init__(self, parts: list[torch.utils.data.Dataset], weights: list[float], seed: int = 0):
        self.parts, self.weights = parts, np.asarray(weights, float) / np.sum(weights)
        self.n = sum(len(p) for p in parts)
        rng = np.random.default_rng(seed)
        self.choice = rng.choice(len(parts), size=self.n, p=self.weights)
        self.index = [int(rng.integers(len(self.parts[c]))) for c in self.choice]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return self.parts[self.choice[i]][self.index[i]]


class AuxWrapper(torch.nn.Module):
    """Training-time pair (model, patch-classification head); only the model is saved."""

    def __init__(self, model: LocLLM, num_joints: int, weight: float):
        super().__init__()
        self.model = model
        self.head = torch.nn.Linear(model.vision.config.hidden_size, num_joints)
        self.weight = weight

    def forward(self, **inputs):
        return self.model(**inputs, aux_head=self.head, aux_weight=self.weight)


class LocLLMTrainer(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(**inputs)
        return (loss, {"loss": loss}) if return_outputs else loss


@torch.inference_mode()
def evaluate_pck(
    model: LocLLM,
    tokenizer: PromptTokenizer,
    records: list[PersonRecord],
    names: list[str],
    library: DescriptionLibrary,
    alpha: float = 0.1,
) -> dict:
    """PCK@alpha of ``names`` on ``records`` through the SDK's own pipeline (as served)."""
    from locllm_sdk.backends.torch_ref import TorchBackend
    from locllm_sdk.crop import load_image
    from locllm_sdk.loader import ModelSpec
    from locllm_sdk.pipeline import locate_in_image

    was_training = model.training
    model.eval()
    backend = TorchBackend(model=model)
    spec = ModelSpec.from_config(model.config.to_dict(), tokenizer)
    requests = library.resolve(names)
    by_image: dict[Path, list[PersonRecord]] = {}
    for r in records:
        by_image.setdefault(Path(r.image), []).append(r)
    preds, gts, vis, norms = [], [], [], []
    for image, people in by_image.items():
        # COCO boxes are in the stored pixel grid: no EXIF rotation (as the official loader)
        out = locate_in_image(
            backend, spec, load_image(image, exif_orientation=False), [r.box for r in people], requests
        )
        for r, v in zip(people, out.values):
            idx = [r.names.index(n) for n in names]
            preds.append(v[:, :2])
            gts.append(r.joints[idx])
            vis.append(r.visible[idx])
            norms.append(max(r.box[2], r.box[3]))
    res = pck(np.array(preds), np.array(gts), np.array(vis), np.array(norms), alpha)
    model.train(was_training)
    return {"pck": res["mean"], "per_joint": dict(zip(names, np.round(res["per_joint"], 3).tolist()))}


@torch.no_grad()
def image_swap_test(model: LocLLM, dataset: torch.utils.data.Dataset, pad_id: int, n: int = 32, seed: int = 0) -> dict:
    """Loss with the true crops vs with crops permuted within the batch: a model that reads
    its image gets clearly worse with the wrong crops."""
    was_training = model.training
    model.eval()
    rng = random.Random(seed)
    idx = rng.sample(range(len(dataset)), min(n, len(dataset)))
    batch = collate([dataset[i] for i in idx], pad_id)
    true = float(model(**batch))
    perm = torch.roll(torch.arange(len(idx)), 1)
    swapped = float(model(**{**batch, "pixel_values": batch["pixel_values"][perm]}))
    model.train(was_training)
    return {"loss_true_images": true, "loss_swapped_images": swapped, "ratio": swapped / max(true, 1e-9)}


class ValidationCallback(TrainerCallback):
    def __init__(self, fn, every: int, log_path: Path):
        self.fn, self.every, self.log_path = fn, every, log_path

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.is_world_process_zero:
            metrics = self.fn()
            metrics["step"] = state.global_step
            print(json.dumps(metrics), flush=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(metrics) + "\n")


def run(cfg: TrainConfig) -> Path:
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")
    model = with_adapter(load_checkpoint(cfg.init, with_lora=True), cfg)
    if cfg.coord_dims:
        if cfg.coord_dims not in (2, 3):
            raise ValueError(f"coord_dims must be 2 or 3, got {cfg.coord_dims}")
        model.config.coord_dims = cfg.coord_dims
    if cfg.protocol:
        model.config.protocol_version = protocol_version_of(cfg.protocol)
    model.train()
    tok = PromptTokenizer.from_dir(cfg.init)
    library = DescriptionLibrary.load()
    trainable = set_trainable(model, cfg.stage, cfg.train_llm)
    dims = model.config.coord_dims
    # each source's annotations are read once, here
    train_records = [records_of(s, dims) for s in cfg.train] if cfg.stage == 2 else []
    aux_joints: tuple[str, ...] = ()
    if cfg.aux_weight > 0 and train_records:
        aux_joints = tuple(n for n in train_records[0][0].names if n not in cfg.exclude)
    conv = ConversationConfig(
        aux_joints=aux_joints,
        patch_size=model.config.patch_size,
        image_size=model.config.image_size,
        dims=dims,
        max_rounds=cfg.max_rounds,
        augment=cfg.augment,
        exclude=tuple(cfg.exclude),
        midpoint_prob=cfg.midpoint_prob,
        banned_pairs=_banned_pairs(cfg.exclude),
        norm_mean=model.config.norm_mean,
        norm_std=model.config.norm_std,
        protocol=model.config.protocol_version,
    )
    if cfg.stage == 1:
        if not cfg.captions:
            raise ValueError("stage 1 needs --captions (LLaVA JSON)")
        train_set: torch.utils.data.Dataset = CaptionDataset(
            cfg.captions, cfg.caption_images, tok, model.config.num_patches, conv
        )
    else:
        parts = [
            ConversationDataset(records, tok, model.config.num_patches, conv, library, cfg.seed)
            for records in train_records
        ]
        train_set = parts[0] if len(parts) == 1 else WeightedMix(parts, [s.weight for s in cfg.train], cfg.seed)
    print(
        f"training stage {cfg.stage}: {trainable / 1e6:.2f}M trainable parameters, {len(train_set)} samples, "
        f"protocol {model.config.protocol_version}"
    )
    if model.config.moe_llm:
        print(f"MoE LoRA on the LM: {model.config.moe_llm}, {moe_parameter_count(model.llm) / 1e6:.3f}M parameters")

    val_fn = None
    if cfg.val is not None and cfg.stage == 2:
        val_records = records_of(cfg.val, dims)
        val_records = random.Random(1).sample(val_records, min(cfg.eval_persons, len(val_records)))
        names = [n for n in val_records[0].names if n in library and n not in cfg.exclude][:17]
        val_conv = ConversationConfig(**{**asdict(conv), "augment": False, "midpoint_prob": 0.0})
        val_set = ConversationDataset(val_records, tok, model.config.num_patches, val_conv, library)

        def val_fn():
            m = evaluate_pck(model, tok, val_records, names, library)
            m.update(image_swap_test(model, val_set, tok.spec.pad_id, n=min(16, len(val_set))))
            m.pop("per_joint")
            return m

    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=cfg.log_every,
        save_steps=cfg.save_every,
        save_total_limit=2,
        # training state only (resumed with torch.load(weights_only=True)); safetensors refuses
        # the tied embedding/lm_head pair of small LMs. The final checkpoint is safetensors.
        save_safetensors=False,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=cfg.workers,
        remove_unused_columns=False,
        report_to=[],
        seed=cfg.seed,
        disable_tqdm=False,
        # several processes (torchrun / accelerate launch) on CPU talk through gloo
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available() else None,
    )
    callbacks = [ValidationCallback(val_fn, cfg.eval_every, out / "validation.jsonl")] if val_fn else []
    trained_module = AuxWrapper(model, len(aux_joints), cfg.aux_weight) if aux_joints else model
    if aux_joints:
        print(f"auxiliary patch loss (weight {cfg.aux_weight}) on {len(aux_joints)} joints")
    trainer = LocLLMTrainer(
        model=trained_module,
        args=args,
        train_dataset=train_set,
        data_collator=partial(collate, pad_id=tok.spec.pad_id),
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        backend = args.ddp_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        parallel = f"data parallel: {args.world_size} processes ({backend})" if args.world_size > 1 else "1 process"
        print(f"{parallel}, {per_step} samples per optimizer step")
    resume = last_checkpoint(out / "trainer")
    if resume:
        print(f"resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    final = out / "final"
    if trainer.is_world_process_zero():
        save_checkpoint(
            model,
            cfg.init,
            final,
            extra={"trained": {"stage": cfg.stage, "steps": cfg.steps, "exclude": cfg.exclude}},
            storage_dtype=getattr(torch, cfg.storage_dtype) if cfg.storage_dtype else None,
            parent=cfg.delta_of,
        )
        if val_fn:
            metrics = val_fn()
            (final / "validation.json").write_text(json.dumps(metrics, indent=2) + "\n")
            print("final validation:", json.dumps(metrics))
    return final


def _banned_pairs(exclude: list[str]) -> tuple[tuple[str, str], ...]:
    # midpoints that define a held-out keypoint in SynthPose would leak it into training
    pairs = {"neck": ("left shoulder", "right shoulder"), "pelvis": ("left hip", "right hip")}
    return tuple(pairs[n] for n in exclude if n in pairs)


def last_checkpoint(folder: Path) -> str | None:
    if not folder.is_dir():
        return None
    cks = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / "trainer_state.json").is_file()]
    if not cks:
        return None
    return str(max(cks, key=lambda p: int(p.name.split("-")[-1])))
