"""Backend-free generation: shared image prefix, batched suffixes, constrained digits.

For a batch of crops and (crop, keypoint) requests:
  1. prefix: ``<s> Image : <im_patch>*P`` prefilled once per crop (image tokens in place),
     with the tokens all suffixes start with (``split_common_head``);
  2. suffixes: every request's round text, right-padded into one batch on top of its crop's
     prefix KV, per-row positions; with cascade attention the prefix KV is never copied
     (one copy per crop, read once per pass by all its rows), else rows get copies;
  3. constrained decoding: the answer skeleton's forced tokens ride along with the previous
     pass (jump-forward), a pass runs only where a digit is free, and the digit is the
     argmax over the ten digit tokens. A 2D answer takes 6 decoder passes.
``decoding="free"`` is plain greedy over the full vocabulary, as the official eval runs it.
A group answer (grouped protocol) is decoded the same way with its longer grammar and parsed
with ``parse_group_answer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend
from .protocol import AnswerGrammar, ParsedAnswer, PromptTokenizer, max_softmax, parse_answer, parse_group_answer


@dataclass(frozen=True)
class DecodeStats:
    decoder_passes: int
    rows: int
    prefix_tokens: int
    max_suffix_tokens: int


def prefill_prefix(backend: Backend, prefix_ids: Sequence[int], im_patch_id: int, image_tokens: np.ndarray):
    """Prefill ``prefix_ids`` for each crop; ``image_tokens`` [N,P,H] go at <im_patch>."""
    ids = np.asarray(prefix_ids, np.int64)
    n = image_tokens.shape[0]
    patch = ids == im_patch_id
    if int(patch.sum()) != image_tokens.shape[1]:
        raise ValueError(
            f"prefix holds {int(patch.sum())} image tokens, the vision tower gives {image_tokens.shape[1]}"
        )
    text = backend.embed(ids[~patch][None, :])[0]
    embeds = np.empty((n, len(ids), image_tokens.shape[2]), np.float32)
    embeds[:, ~patch] = text[None]
    embeds[:, patch] = image_tokens
    mask = np.ones((n, len(ids)), np.int64)
    pos = np.tile(np.arange(len(ids), dtype=np.int64), (n, 1))
    last = np.full((n, 1), len(ids) - 1, np.int64)
    _, cache = backend.forward(embeds, mask, pos, last, backend.empty_cache(n))
    return cache


def split_common_head(suffixes: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """(head, tails): the tokens every suffix starts with ("Keypoint: The" for the standard
    rounds), and the rest of each. The head attends to the prefix and itself only, so it can
    be prefilled once per crop with the prefix instead of once per row: same positions, same
    attention, same answers, fewer FLOPs per keypoint. Each tail keeps at least one token (it
    must give the logits of the first answer token)."""
    if not suffixes:
        return [], []
    limit = min(len(s) for s in suffixes) - 1
    n = 0
    first = suffixes[0]
    while n < limit and all(s[n] == first[n] for s in suffixes):
        n += 1
    return list(first[:n]), [list(s[n:]) for s in suffixes]


def crop_layout(crop_of_row: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(crops, rows per crop) when rows come crop by crop in equal runs, as ``Pose`` lays
    them out; else None."""
    crop_of_row = np.asarray(crop_of_row)
    n = len(crop_of_row)
    starts = np.flatnonzero(np.r_[True, crop_of_row[1:] != crop_of_row[:-1]])
    r = n // len(starts)
    if r * len(starts) != n or not np.array_equal(starts, np.arange(0, n, r)):
        return None
    crops = crop_of_row[starts]
    if len(np.unique(crops)) != len(crops):
        return None
    return crops, r


class _Rows:
    """Per-row sequence bookkeeping for passes on top of a shared prefix.

    With a backend that runs cascade attention, the prefix KV stays one copy per crop and
    the rows' caches start empty; otherwise each row gets a copy of its crop's prefix KV.
    """

    def __init__(
        self, backend: Backend, prefix_cache, prefix_len: int, crop_of_row: np.ndarray, shared: bool | None = None
    ):
        rows = len(crop_of_row)
        self.backend = backend
        self.shared = backend.supports_shared_prefix if shared is None else shared
        if self.shared:
            layout = crop_layout(crop_of_row)
            if layout is None:  # arbitrary mapping: one prefix per row (R = 1)
                self.prefix = backend.select_rows(prefix_cache, crop_of_row)
            else:
                crops, _ = layout
                whole = len(crops) == backend.cache_batch(prefix_cache) and np.array_equal(crops, np.arange(len(crops)))
                self.prefix = prefix_cache if whole else backend.select_rows(prefix_cache, crops)
            self.cache = backend.empty_cache(rows)
            self.mask = np.zeros((rows, 0), np.int64)
        else:
            self.cache = backend.select_rows(prefix_cache, crop_of_row)
            self.mask = np.ones((rows, prefix_len), np.int64)
        self.next_pos = np.full(rows, prefix_len, np.int64)
        self.passes = 0

    def run(self, feeds: list[list[int]], want: list[list[int]]) -> np.ndarray:
        """Feed each row its tokens (right-padded); return logits at ``want[r]`` (indices
        into the row's feed; same count per row) as [R,K,V]."""
        lengths = np.array([len(f) for f in feeds], np.int64)
        t = int(lengths.max())
        ids = np.zeros((len(feeds), t), np.int64)
        step_mask = np.zeros((len(feeds), t), np.int64)
        for r, f in enumerate(feeds):
            ids[r, : len(f)] = f
            step_mask[r, : len(f)] = 1
        pos = self.next_pos[:, None] + np.arange(t, dtype=np.int64)[None, :]
        self.mask = np.concatenate([self.mask, step_mask], axis=1)
        embeds, want = self.backend.embed(ids), np.asarray(want, np.int64)
        if self.shared:
            logits, self.cache = self.backend.forward_shared(embeds, self.mask, pos, want, self.prefix, self.cache)
        else:
            logits, self.cache = self.backend.forward(embeds, self.mask, pos, want, self.cache)
        self.next_pos += lengths
        self.passes += 1
        return logits


def constrained_decode(
    backend: Backend,
    prefix_cache,
    prefix_len: int,
    crop_of_row: np.ndarray,
    suffixes: Sequence[Sequence[int]],
    grammar: AnswerGrammar,
    tokenizer: PromptTokenizer,
    shared: bool | None = None,
) -> tuple[list[ParsedAnswer], DecodeStats]:
    """``shared``: cascade attention (default: whenever the backend has it)."""
    rows = len(suffixes)
    state = _Rows(backend, prefix_cache, prefix_len, crop_of_row, shared)
    n = len(grammar.slots)
    needed = set(grammar.free_positions) | {p for a, b in grammar.number_spans for p in range(a, b)}
    conf = np.full((rows, n), np.nan)
    digits = np.zeros((rows, len(grammar.free_positions)), np.int64)
    digit_ids = np.asarray(grammar.digit_ids)
    # Pending tokens per row, and for each pending answer position that needs logits the
    # feed index whose output predicts it.
    feeds = [list(s) for s in suffixes]
    wanted: list[tuple[int, int]] = []  # (answer position, offset from the end of the feed)
    free_k = 0
    last_needed = max(needed)
    for j, slot in enumerate(grammar.slots):
        if j > last_needed:
            break
        if j in needed:
            wanted.append((j, 0))  # predicted by the last token currently pending
        if slot == AnswerGrammar.FREE or j == last_needed:
            # Run the pass: logits at the wanted positions, counted from each row's end.
            want = [[len(f) - 1 - back for _, back in wanted] for f in feeds]
            logits = state.run(feeds, want)
            for k, (pos, _) in enumerate(wanted):
                conf[:, pos] = max_softmax(logits[:, k])
            if slot == AnswerGrammar.FREE:
                d = np.argmax(logits[:, -1][:, digit_ids], axis=1)
                digits[:, free_k] = d
                free_k += 1
                feeds = [[int(digit_ids[v])] for v in d]
            else:
                feeds = [[slot] for _ in range(rows)]
            wanted = []
        else:
            for f in feeds:
                f.append(slot)
            # earlier wanted positions are now one token further from the end
            wanted = [(p, back + 1) for p, back in wanted]
    answers = []
    for r in range(rows):
        ids = grammar.fill(digits[r].tolist())
        if grammar.joints > 1:
            answers.append(_parse_group(tokenizer, ids, conf[r], grammar.dims, grammar.joints))
            continue
        text = tokenizer.decode(ids)
        # Official scores drop the last generated step; positions beyond the numbers are
        # never read, so the per-position confidences can be passed as they are.
        answers.append(parse_answer(text, conf[r, :-1], grammar.dims))
    stats = DecodeStats(state.passes, rows, prefix_len, max(len(s) for s in suffixes))
    return answers, stats


def free_decode(
    backend: Backend,
    prefix_cache,
    prefix_len: int,
    crop_of_row: np.ndarray,
    suffixes: Sequence[Sequence[int]],
    group_of_row: np.ndarray,
    max_new_tokens: int,
    dims: int,
    tokenizer: PromptTokenizer,
    shared: bool | None = None,
    joints: int = 1,
) -> tuple[list[ParsedAnswer], DecodeStats]:
    """Greedy decoding over the full vocabulary with the official parse.

    As in the official eval, rows are decoded in groups (one person's keypoints): a group
    stops when all its rows produced EOS or after ``max_new_tokens``; finished rows are fed
    the pad token; the last step's confidences are dropped. ``joints`` > 1: every row is a
    group answer of that many joints (``parse_group_answer``).
    """
    rows = len(suffixes)
    eos, pad = tokenizer.spec.eos_id, tokenizer.spec.pad_id
    state = _Rows(backend, prefix_cache, prefix_len, crop_of_row, shared)
    feeds = [list(s) for s in suffixes]
    tokens = np.full((rows, max_new_tokens), pad, np.int64)
    conf = np.zeros((rows, max_new_tokens))
    finished = np.zeros(rows, bool)
    groups = np.unique(group_of_row)
    group_steps = {g: max_new_tokens for g in groups}
    step = 0
    for step in range(max_new_tokens):
        logits = state.run(feeds, [[len(f) - 1] for f in feeds])[:, 0]
        conf[:, step] = max_softmax(logits)
        nxt = np.argmax(logits, axis=1)
        nxt = np.where(finished, pad, nxt)
        tokens[:, step] = nxt
        finished |= nxt == eos
        for g in groups:
            if group_steps[g] == max_new_tokens and finished[group_of_row == g].all():
                group_steps[g] = min(group_steps[g], step + 1)
        if finished.all():
            break
        feeds = [[int(t)] for t in nxt]
    answers = []
    for r in range(rows):
        n_steps = group_steps[group_of_row[r]]
        if joints > 1:
            answers.append(_parse_group(tokenizer, tokens[r, :n_steps].tolist(), conf[r, : n_steps - 1], dims, joints))
            continue
        text = tokenizer.decode(tokens[r, :n_steps].tolist())
        answers.append(parse_answer(text, conf[r, : n_steps - 1], dims))
    return answers, DecodeStats(state.passes, rows, prefix_len, max(len(s) for s in suffixes))


def _parse_group(tokenizer: PromptTokenizer, ids: list[int], step_conf: np.ndarray, dims: int, joints: int):
    """A group answer's tokens -> its numbers, each scored at its own tokens."""
    return parse_group_answer(tokenizer.decode(ids), tokenizer.char_confidence(ids, step_conf), dims, joints)
