"""The official inference procedure, reproduced in PyTorch + transformers.

What a user of the original LocLLM code runs today (utils/valid2d.py): for each person, K
prompts (one per keypoint) stacked in one batch, the SAME crop fed K times through the ViT,
left padding, HF ``generate`` greedy with ``max_new_tokens`` 13 (2D) / 22 (3D) and scores,
then the regex parse and score of the protocol module. Used as the speed baseline and as an
accuracy oracle for ``decoding="free"``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from locllm_sdk.protocol import MAX_NEW_TOKENS, ParsedAnswer, PromptTokenizer, max_softmax, parse_answer

from .model import LocLLM


@torch.inference_mode()
def reference_locate(
    model: LocLLM,
    tokenizer: PromptTokenizer,
    pixels: np.ndarray,
    requests: Sequence[tuple[str, str]],
) -> list[list[ParsedAnswer]]:
    """``pixels`` [N,3,S,S] normalised crops; ``requests`` (name, description) pairs.
    Returns per crop, per request, the parsed answer (official definition)."""
    cfg = model.config
    dims = cfg.coord_dims
    prompts = [tokenizer.prompt_ids(name, desc, cfg.num_patches) for name, desc in requests]
    width = max(map(len, prompts))
    pad = tokenizer.spec.pad_id
    # left padding, as the official eval's tokenizer(padding_side="left")
    device = next(model.parameters()).device  # the model's (a GPU in benchmarks/gpu_check.py)
    vision_dtype = next(model.vision.parameters()).dtype
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = []
    for crop in pixels:
        batch = torch.from_numpy(np.repeat(crop[None], len(requests), axis=0)).to(device, vision_dtype)
        features = model.encode_images(batch)  # the same crop K times through the ViT
        embeds = model.build_inputs_embeds(ids, features)
        gen = model.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=MAX_NEW_TOKENS[dims],
            do_sample=False,
            num_beams=1,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad,
            eos_token_id=tokenizer.spec.eos_id,
        )
        # with inputs_embeds, sequences hold only the new tokens
        if len(gen.scores) > 1:
            scores = torch.stack(gen.scores[:-1], dim=0).float().cpu().numpy()  # [steps-1, K, V], last dropped
            conf = max_softmax(scores)  # [steps-1, K]
        else:  # every row ended at once (EOS first): no step is scored (the official stack would fail)
            conf = np.zeros((0, len(requests)))
        answers = []
        for k in range(len(requests)):
            text = tokenizer.decode(gen.sequences[k].tolist())
            answers.append(parse_answer(text, conf[:, k], dims))
        out.append(answers)
    return out
