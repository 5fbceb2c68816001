"""The optimisation ladder, each rung on the same ONNX Runtime graphs and weights.

  naive-per-keypoint   each keypoint alone: crop through the ViT, full prompt prefill with
                       logits at every position, 13 greedy steps over the full vocabulary
  batched-keypoints    the official procedure: all keypoints of a person in one batch (the
                       crop still through the ViT once per keypoint)
  vit-once             + the ViT runs once per crop, its tokens reused by every keypoint
  shared-prefix        + the image prefix prefilled once, its KV copied to every suffix row
  logits-where-needed  + the vocabulary projection only at the positions that are read
  cascade-attention    + the prefix KV never copied: one per crop, read by all its rows in
                       one matmul; row caches hold only suffix and answer tokens
  common-head          + the tokens every round starts with ("Keypoint: The") prefilled once
                       per crop with the prefix instead of once per row
  sdk                  + jump-forward constrained decoding (6 passes instead of 13)
Every rung returns the answers it decoded, so the ladder also shows which rungs change them
(only the last may: greedy vs constrained digits).
"""

from __future__ import annotations

import numpy as np
from locllm_sdk.decoding import free_decode, prefill_prefix, split_common_head
from locllm_sdk.pipeline import locate_crops
from locllm_sdk.protocol import max_softmax, parse_answer

RUNGS = (
    "naive-per-keypoint",
    "batched-keypoints",
    "vit-once",
    "shared-prefix",
    "logits-where-needed",
    "cascade-attention",
    "common-head",
    "sdk",
)


def _greedy_full_prompts(backend, spec, pixels_rows, prompts, all_logits: bool, max_new: int):
    """Full prompts (image tokens in place) right-padded into one batch, then greedy steps."""
    tok = spec.tokenizer
    rows = len(prompts)
    image_tokens = backend.encode_images(pixels_rows)  # one crop per row
    width = max(map(len, prompts))
    h = image_tokens.shape[2]
    embeds = np.zeros((rows, width, h), np.float32)
    mask = np.zeros((rows, width), np.int64)
    for r, ids in enumerate(prompts):
        ids = np.asarray(ids)
        patch = ids == tok.spec.im_patch_id
        text = backend.embed(np.where(patch, 0, ids)[None])[0]
        text[patch] = image_tokens[r]
        embeds[r, : len(ids)] = text
        mask[r, : len(ids)] = 1
    pos = np.tile(np.arange(width), (rows, 1))
    lengths = mask.sum(1)
    if all_logits:
        index = np.tile(np.arange(width), (rows, 1))
    else:
        index = (lengths - 1)[:, None]
    logits, cache = backend.forward(embeds, mask, pos, index, backend.empty_cache(rows))
    last = logits[np.arange(rows), (lengths - 1) if all_logits else 0]
    return _greedy(backend, spec, last, mask, lengths.copy(), cache, max_new)


def _greedy(backend, spec, last, mask, next_pos, cache, max_new):
    """Greedy steps over the full vocabulary from the logits ``last`` (one row each)."""
    rows = last.shape[0]
    tokens, conf = [], []
    for step in range(max_new):
        conf.append(max_softmax(last))
        nxt = np.argmax(last, axis=1)
        tokens.append(nxt)
        if step == max_new - 1:
            break
        mask = np.concatenate([mask, np.ones((rows, 1), np.int64)], axis=1)
        zero = np.zeros((rows, 1), np.int64)
        logits, cache = backend.forward(backend.embed(nxt[:, None]), mask, next_pos[:, None], zero, cache)
        next_pos = next_pos + 1
        last = logits[:, 0]
    tokens, conf = np.stack(tokens, 1), np.stack(conf, 1)
    dims, tok = spec.grammar.dims, spec.tokenizer
    return [parse_answer(tok.decode(tokens[r].tolist()), conf[r, :-1], dims).text for r in range(rows)]


def run_rung(rung: str, pose, pixels: np.ndarray, requests) -> list[str]:
    """Answers for one crop (``pixels`` [1,3,S,S]) and ``requests``, the way ``rung`` runs."""
    backend, spec = pose.backend, pose.spec
    tok = spec.tokenizer
    max_new = len(spec.grammar.slots)
    prompts = [tok.prompt_ids(r.name, r.description, spec.num_patches) for r in requests]
    k = len(requests)
    if rung == "naive-per-keypoint":
        out = []
        for p in prompts:
            out += _greedy_full_prompts(backend, spec, pixels, [p], all_logits=True, max_new=max_new)
        return out
    if rung == "batched-keypoints":
        return _greedy_full_prompts(backend, spec, np.repeat(pixels, k, 0), prompts, all_logits=True, max_new=max_new)
    if rung == "vit-once":
        tokens = backend.encode_images(pixels)
        original = backend.encode_images
        backend.encode_images = lambda px: np.repeat(tokens, px.shape[0], 0)  # reuse the crop's tokens
        try:
            return _greedy_full_prompts(
                backend, spec, np.repeat(pixels, k, 0), prompts, all_logits=True, max_new=max_new
            )
        finally:
            backend.encode_images = original
    suffixes = [tok.round_ids(r.name, r.description) for r in requests]
    rows = np.zeros(k, np.int64)
    if rung == "sdk":  # what Pose.locate runs: the pipeline itself
        return [a.text for a in locate_crops(backend, spec, pixels, requests).answers]
    if rung == "common-head":  # the rounds' common first tokens go with the prefix
        head, tails = split_common_head(suffixes)
        prefix_ids = list(spec.prefix_ids) + head
        cache = prefill_prefix(backend, prefix_ids, tok.spec.im_patch_id, backend.encode_images(pixels))
        answers, _ = free_decode(backend, cache, len(prefix_ids), rows, tails, rows, max_new, spec.grammar.dims, tok)
        return [a.text for a in answers]
    cache = prefill_prefix(backend, spec.prefix_ids, tok.spec.im_patch_id, backend.encode_images(pixels))
    if rung == "shared-prefix":
        # suffix prefill with logits at every suffix position (as a plain forward computes them)
        return _shared_prefix_free(backend, spec, cache, suffixes, max_new)
    if rung in ("logits-where-needed", "cascade-attention"):
        if rung == "cascade-attention" and not backend.supports_shared_prefix:
            raise ValueError(f"backend {backend.name} has no cascade-attention step (engine built before it?)")
        answers, _ = free_decode(
            backend,
            cache,
            len(spec.prefix_ids),
            rows,
            suffixes,
            rows,
            max_new,
            spec.grammar.dims,
            tok,
            shared=rung == "cascade-attention",
        )
        return [a.text for a in answers]
    raise ValueError(f"unknown rung {rung!r}")


def _shared_prefix_free(backend, spec, prefix_cache, suffixes, max_new):
    rows = len(suffixes)
    p = len(spec.prefix_ids)
    cache = backend.select_rows(prefix_cache, np.zeros(rows, np.int64))
    width = max(map(len, suffixes))
    ids = np.zeros((rows, width), np.int64)
    step_mask = np.zeros((rows, width), np.int64)
    for r, s in enumerate(suffixes):
        ids[r, : len(s)] = s
        step_mask[r, : len(s)] = 1
    mask = np.concatenate([np.ones((rows, p), np.int64), step_mask], 1)
    pos = p + np.tile(np.arange(width), (rows, 1))
    logits, cache = backend.forward(backend.embed(ids), mask, pos, np.tile(np.arange(width), (rows, 1)), cache)
    lengths = step_mask.sum(1)
    last = logits[np.arange(rows), lengths - 1]
    return _greedy(backend, spec, last, mask, p + lengths, cache, max_new)
