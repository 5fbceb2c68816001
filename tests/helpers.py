"""Test models: tiny checkpoints trained for a few seconds to speak the answer format.

A random model never produces a well-formed free answer and answers every request alike.
A tiny model fitted briefly on random crops, with answers scattered around a per-keypoint
position, speaks the format and answers each keypoint differently, while its last digits
(close to uniform) swing with the image: a meaningful subject for parity, batching and
free-vs-constrained tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from locllm_sdk.descriptions import DescriptionLibrary
from locllm_sdk.protocol import PromptTokenizer, format_answer
from locllm_training.init import preset_config, random_model
from locllm_training.model import save_checkpoint
from locllm_training.tokenizer_files import write_tokenizer


def format_trained_checkpoint(out: Path, dims: int = 2, steps: int = 150, seed: int = 0, image_size: int = 56) -> Path:
    tok_dir = write_tokenizer(out.parent / f"{out.name}-tokenizer")
    tok = PromptTokenizer.from_dir(tok_dir)
    cfg = preset_config("tiny", dims=dims, image_size=image_size)
    model = random_model(cfg, seed=seed).train()
    lib = DescriptionLibrary.load()
    names = list(lib.descriptions)
    rng = np.random.default_rng(seed)
    for p in model.parameters():  # peft froze the base weights; fit everything here
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prefix = tok.prefix_ids(cfg.num_patches)
    # Each keypoint gets its own typical position (+ noise): answers then differ per request.
    centre = {name: rng.uniform(0.1, 0.9, dims) for name in names}
    for _ in range(steps):
        ids_batch, label_batch = [], []
        for _ in range(4):
            ids, labels = list(prefix), [-100] * len(prefix)
            for name in rng.choice(names, size=2, replace=False):
                head = tok.round_ids(name, lib.descriptions[name])
                full = tok.round_ids(
                    name,
                    lib.descriptions[name],
                    answer=format_answer(np.clip(centre[name] + rng.normal(0, 0.03, dims), 0, 0.999)),
                )
                ids += full
                labels += [-100] * len(head) + full[len(head) :]
            ids_batch.append(ids)
            label_batch.append(labels)
        t = max(map(len, ids_batch))
        ids_t = torch.tensor([i + [0] * (t - len(i)) for i in ids_batch])
        lab_t = torch.tensor([lab + [-100] * (t - len(lab)) for lab in label_batch])
        mask = torch.tensor([[1] * len(i) + [0] * (t - len(i)) for i in ids_batch])
        pixels = torch.randn(4, 3, cfg.image_size, cfg.image_size)
        loss = model(ids_t, pixels, attention_mask=mask, labels=lab_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return save_checkpoint(model, tok_dir, out, extra={"preset": "tiny-format", "seed": seed})
