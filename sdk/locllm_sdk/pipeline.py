"""The pipeline: crop -> vision -> prefix -> suffixes -> digits -> coordinates.

One definition, called by ``Pose``, training's validation, the benchmarks and the tests:

* ``locate_in_image``: an image, person boxes and keypoint requests -> coordinates in image
  pixels, scores and answer texts (``ImageAnswers``); crops are made chunk by chunk;
  ``locate_in_images`` the same for several images in one batch;
* ``locate_crops``: normalised crops and requests -> normalised answers (``CropAnswers``);
* ``flip_merge``: flip test-time augmentation's average of plain and mirrored answers.

A grouped model (protocol ``locllm-grouped-v1``) answers body parts: the requests are asked as
the groups that hold them (``group_rows``: one row per group, each answer listing the group's
joints in order) and the answers are handed back per request, laid out as for any model.

Memory is bounded per call whatever the number of boxes and keypoints: crops go through the
vision tower, the prefix prefill and the decoding in chunks of crops whose working set fits
``memory_budget_mb``, and within a chunk the rows are decoded in chunks whose KV cache fits
what is left. Chunking changes no answer: every crop and every row is computed on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import crop as cropping
from .backends.base import Backend, RequestBackend
from .decoding import DecodeStats, constrained_decode, free_decode, prefill_prefix, split_common_head
from .descriptions import KeypointRequest
from .errors import ArgumentError, KeypointError, ProtocolError
from .loader import ModelSpec
from .protocol import MAX_NEW_TOKENS, AnswerGrammar, JointGroup, ParsedAnswer, plan_groups

DECODING = ("constrained", "free")
DEFAULT_MEMORY_BUDGET_MB = 1024.0
_FLOAT = 4  # bytes: activations, logits and the KV cache are fp32


@dataclass(frozen=True)
class CropAnswers:
    """Answers for rows laid out crop by crop (row ``i * K + j``: crop i, request j)."""

    values: np.ndarray  # [R, dims] normalised crop coordinates (z in the protocol's unit)
    answers: list[ParsedAnswer]
    stats: DecodeStats


@dataclass(frozen=True)
class ImageAnswers:
    """Per box and request: image-pixel x, y (and depth unit z), score, answer texts."""

    values: np.ndarray  # [N, K, dims]: x, y in image pixels; z in the protocol's unit (0.5 = root)
    scores: np.ndarray  # [N, K]
    texts: list[list[str]]
    flip_texts: list[list[str]]  # "" without flip
    stats: DecodeStats


class StageTimes:
    """Wall time per pipeline stage, in ms, added up over one call's chunks (``Results.info``
    reports them): ``crop`` (warp + normalise), ``vision`` (the ViT), ``prefix`` (the image
    prefix's prefill, common head included) and ``decode`` (the answer passes)."""

    STAGES = ("crop", "vision", "prefix", "decode")

    def __init__(self):
        self.ms = dict.fromkeys(self.STAGES, 0.0)

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] += 1000.0 * (time.perf_counter() - start)


def _stage(times: StageTimes | None, name: str):
    return times.stage(name) if times is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Memory


def row_bytes(spec: ModelSpec, backend, row_tokens: int, prefix_len: int, grammar: AnswerGrammar | None = None) -> int:
    """Working memory of one decoded row, dominated by its first pass (all its suffix tokens
    at once): the attention scores over prefix + row (a few copies: scores, exponentials),
    the per-token activations, the KV cache (input and output of a pass alive at once, plus
    a prefix copy without cascade attention) and the logits it reads. An estimate, checked
    by benchmarks/memory.py (measured: the first pass of the demo model, 1.7 MB per row)."""
    kv_tokens = row_tokens + (0 if getattr(backend, "supports_shared_prefix", False) else prefix_len)
    attention = 3 * max(spec.num_heads, 1) * row_tokens * (prefix_len + row_tokens)
    activations = 12 * row_tokens * spec.hidden_size
    logits = logits_per_pass(grammar or spec.grammar) * max(spec.vocab_size, 1)
    return _FLOAT * (attention + activations + logits) + 2 * spec.kv_bytes_per_token * kv_tokens


def logits_per_pass(grammar) -> int:
    """The most vocabulary rows one constrained pass reads per row (free decoding reads 1):
    the scored answer positions since the previous pass, up to a free digit."""
    needed = set(grammar.free_positions) | {p for a, b in grammar.number_spans for p in range(a, b)}
    most = count = 0
    for j, slot in enumerate(grammar.slots):
        count += j in needed
        if slot == grammar.FREE or j == max(needed):
            most, count = max(most, count), 0
    return max(most, 1)


def crop_bytes(spec: ModelSpec, prefix_len: int) -> int:
    """Working memory of one crop: pixels, vision activations (an estimate: a few hidden-state
    copies and the attention scores of one layer), image tokens, the prefix's prefill
    activations and its KV cache."""
    s, p = spec.image_size, spec.num_patches
    hv = spec.vision_hidden_size or spec.hidden_size
    vision = (p + 1) * hv * 8 + max(hv // 64, 1) * (p + 1) ** 2
    prefill = prefix_len * spec.hidden_size * 12 + max(spec.hidden_size // 64, 1) * prefix_len**2
    return _FLOAT * (3 * s * s + vision + p * spec.hidden_size + prefill) + 2 * spec.kv_bytes_per_token * prefix_len


def crops_per_chunk(spec: ModelSpec, backend, k: int, max_suffix: int, budget_mb: float) -> int:
    """How many crops (with all their k rows) one chunk holds within ``budget_mb``."""
    prefix_len = len(spec.prefix_ids) + max_suffix  # an upper bound of prefix + common head
    per_crop = crop_bytes(spec, prefix_len) + k * row_bytes(
        spec, backend, max_suffix + spec.max_answer_tokens, prefix_len, _widest(spec)
    )
    return max(1, int(budget_mb * 2**20 // max(per_crop, 1)))


def _widest(spec: ModelSpec) -> AnswerGrammar:
    """The model's grammar with the longest answer (its one grammar, unless grouped)."""
    return max((spec.grammar, *spec.group_grammars), key=lambda g: len(g.slots))


def row_chunks(
    spec: ModelSpec,
    backend,
    n_crops: int,
    k: int,
    max_suffix: int,
    prefix_len: int,
    decoding: str,
    budget_mb: float,
    grammar: AnswerGrammar | None = None,
) -> list[np.ndarray]:
    """Row index chunks whose decoding memory fits what ``budget_mb`` leaves after the crops'
    own working set; whole persons per chunk where they fit (cascade attention wants equal
    runs per crop; free decoding's stop rule needs whole persons). ``grammar``: the rows'
    answer grammar (default the model's)."""
    grammar = grammar or spec.grammar
    left = budget_mb * 2**20 - n_crops * crop_bytes(spec, prefix_len)
    per_row = max(1, row_bytes(spec, backend, max_suffix + len(grammar.slots), prefix_len, grammar))
    max_rows = max(1, int(max(left, 0) // per_row))
    n = n_crops * k
    if max_rows >= n:
        return [np.arange(n)]
    if decoding == "free" or max_rows >= k:  # whole persons per chunk (at least one)
        per_chunk = max(1, max_rows // k) * k
    else:
        per_chunk = max_rows
    return [np.arange(i, min(i + per_chunk, n)) for i in range(0, n, per_chunk)]


# --------------------------------------------------------------------------------------
# Crops -> answers


def _merge_stats(a: DecodeStats | None, b: DecodeStats) -> DecodeStats:
    """Chunks run one after the other: passes and rows add up; the widest row and prefix are kept."""
    if a is None:
        return b
    return DecodeStats(
        a.decoder_passes + b.decoder_passes,
        a.rows + b.rows,
        max(a.prefix_tokens, b.prefix_tokens),
        max(a.max_suffix_tokens, b.max_suffix_tokens),
    )


def _decode_chunk(
    backend: Backend | RequestBackend,
    spec: ModelSpec,
    pixels: np.ndarray,
    suffix: list[list[int]],
    decoding: str,
    budget_mb: float,
    times: StageTimes | None = None,
    grammars: Sequence[AnswerGrammar] | None = None,
) -> tuple[list[ParsedAnswer], DecodeStats]:
    """One chunk of crops: vision once per crop, then every (crop, request) row.

    ``grammars``: each request's answer grammar (default: the model's for all). Requests with
    the same grammar are decoded together; each grammar's rows run their own passes on the
    crops' one prefix (a grouped model's groups of another size)."""
    with _stage(times, "vision"):
        image_tokens = backend.encode_images(pixels)
    n_crops, k = pixels.shape[0], len(suffix)
    grammars = list(grammars) if grammars is not None else [spec.grammar] * k
    if isinstance(backend, RequestBackend):  # whole-request engines (tensorrt) schedule themselves
        if any(g != spec.grammar for g in grammars):
            raise ProtocolError(f"backend {type(backend).__name__} decodes one-keypoint answers only")
        with _stage(times, "decode"):
            return backend.locate_rows(image_tokens, np.repeat(np.arange(n_crops), k), suffix * n_crops, decoding)
    # The rounds' common first tokens join the prefix: computed once per crop, not per row.
    head, tails = split_common_head(suffix)
    prefix_ids = list(spec.prefix_ids) + head
    with _stage(times, "prefix"):
        prefix_cache = prefill_prefix(backend, prefix_ids, spec.tokenizer.spec.im_patch_id, image_tokens)
    del image_tokens
    answers: list[ParsedAnswer | None] = [None] * (n_crops * k)
    stats = None
    for grammar in dict.fromkeys(grammars):  # in order of first use
        cols = [j for j in range(k) if grammars[j] == grammar]
        kc, class_tails = len(cols), [tails[j] for j in cols]
        rows_tails, crop_of_row = class_tails * n_crops, np.repeat(np.arange(n_crops), kc)
        chunks = row_chunks(
            spec, backend, n_crops, kc, max(map(len, class_tails)), len(prefix_ids), decoding, budget_mb, grammar
        )
        for rows in chunks:
            sub = [rows_tails[i] for i in rows]
            with _stage(times, "decode"):
                part, st = _decode_rows(
                    backend, spec, prefix_cache, prefix_ids, crop_of_row[rows], sub, decoding, grammar
                )
            for row, answer in zip(rows, part):
                crop, c = divmod(int(row), kc)
                answers[crop * k + cols[c]] = answer
            stats = _merge_stats(stats, st)
    return answers, stats


def _decode_rows(backend, spec: ModelSpec, prefix_cache, prefix_ids, crops, sub, decoding: str, grammar=None):
    """Constrained or free decoding of one chunk of rows (``crops``: each row's crop), all
    answering with ``grammar`` (default the model's one-keypoint grammar)."""
    grammar = grammar or spec.grammar
    if decoding == "constrained":
        return constrained_decode(backend, prefix_cache, len(prefix_ids), crops, sub, grammar, spec.tokenizer)
    # the official budget for one keypoint; a group answer's own length (+ EOS) for a group
    budget = MAX_NEW_TOKENS[spec.coord_dims] if grammar.joints == 1 else len(grammar.slots) + 1
    return free_decode(
        backend,
        prefix_cache,
        len(prefix_ids),
        crops,
        sub,
        crops,
        budget,
        spec.coord_dims,
        spec.tokenizer,
        joints=grammar.joints,
    )


def _suffixes(spec: ModelSpec, requests: Sequence[KeypointRequest]) -> list[list[int]]:
    """Each request's round ids, refused before any model work when prompt + answer would run
    past the model's context (positions beyond ``max_position_embeddings`` were never trained)."""
    answer = max(len(spec.grammar.slots) + 1, MAX_NEW_TOKENS[spec.coord_dims])
    return [
        _fits(spec, f"keypoint {r.name!r}", spec.tokenizer.round_ids(r.name, r.description), answer) for r in requests
    ]


def _fits(spec: ModelSpec, what: str, ids: list[int], answer: int) -> list[int]:
    """``ids`` (a round's) when prefix + round + ``answer`` tokens fit the model's context."""
    total = len(spec.prefix_ids) + len(ids) + answer
    if spec.max_positions and total > spec.max_positions:
        raise ProtocolError(
            f"{what}: its prompt is {len(spec.prefix_ids) + len(ids)} tokens ({len(spec.prefix_ids)} "
            f"image prefix + {len(ids)} description and question) + {answer} answer tokens = {total}, past the "
            f"model's context of {spec.max_positions} positions: shorten the description"
        )
    return ids


@dataclass(frozen=True)
class GroupRows:
    """How a grouped model asks a list of requests: one row per group holding any of them."""

    groups: list[JointGroup]
    suffixes: list[list[int]]  # each group's round ids
    grammars: list[AnswerGrammar]  # each group's answer grammar
    members: list[tuple[int, int]]  # per request: (group row, the joint's position in its answer)


def group_rows(spec: ModelSpec, requests: Sequence[KeypointRequest]) -> GroupRows:
    """The rows a grouped model (``spec.groups``) asks for ``requests``: the groups holding the
    requested joints, in the protocol's group order, each asked whole with the descriptions the
    model was built with. Refused before any model work (KeypointError naming the keypoint) for
    a joint no group holds and for a description other than the model's own."""
    if not spec.groups:
        raise ProtocolError(f"protocol {spec.protocol_version!r} has no body-part groups")
    described = dict(spec.group_descriptions)
    for r in requests:
        if r.name in described and r.description != described[r.name]:
            raise KeypointError(
                f"keypoint {r.name!r}: a grouped model asks its body parts with its own descriptions, and the "
                f"description given differs from its {described[r.name]!r}"
            )
    plan = plan_groups([r.name for r in requests], spec.groups)
    members: list[tuple[int, int]] = [(0, 0)] * len(requests)
    suffixes, grammars = [], []
    for row, (group, asked) in enumerate(plan):
        grammar = spec.grammar_for(len(group.joints))
        ids = spec.tokenizer.group_round_ids(group, [described[j] for j in group.joints])
        suffixes.append(_fits(spec, f"group {group.name!r}", ids, len(grammar.slots) + 1))
        grammars.append(grammar)
        for request, position in asked:
            members[request] = (row, position)
    return GroupRows([g for g, _ in plan], suffixes, grammars, members)


def _per_request(spec: ModelSpec, plan: GroupRows, answers: list[ParsedAnswer]) -> list[ParsedAnswer]:
    """Group answers laid out crop by crop -> one answer per (crop, request), crop by crop."""
    g = len(plan.groups)
    return [
        answers[crop * g + row].part(position, spec.coord_dims)
        for crop in range(len(answers) // g)
        for row, position in plan.members
    ]


def _run_chunks(
    backend,
    spec: ModelSpec,
    n_crops: int,
    make_pixels: Callable[[np.ndarray], np.ndarray],
    requests,
    decoding,
    budget_mb,
    times: StageTimes | None = None,
) -> CropAnswers:
    """Crops ``make_pixels(indices)`` chunk by chunk (the caller decides how a chunk is made)."""
    if decoding not in DECODING:
        raise ArgumentError(f"decoding must be one of {DECODING}, got {decoding!r}")
    plan = group_rows(spec, requests) if spec.groups else None
    suffix = plan.suffixes if plan else _suffixes(spec, requests)
    size = crops_per_chunk(spec, backend, len(suffix), max(map(len, suffix)), budget_mb)
    answers: list[ParsedAnswer] = []
    stats = None
    for start in range(0, n_crops, size):
        with _stage(times, "crop"):
            pixels = make_pixels(np.arange(start, min(start + size, n_crops)))
        part, st = _decode_chunk(
            backend, spec, pixels, suffix, decoding, budget_mb, times, plan.grammars if plan else None
        )
        answers += _per_request(spec, plan, part) if plan else part
        stats = _merge_stats(stats, st)
    values = np.array([a.values for a in answers], dtype=np.float64).reshape(len(answers), spec.coord_dims)
    return CropAnswers(values, answers, stats)


def locate_crops(
    backend: Backend | RequestBackend,
    spec: ModelSpec,
    pixels: np.ndarray,
    requests: Sequence[KeypointRequest],
    decoding: str = "constrained",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    times: StageTimes | None = None,
) -> CropAnswers:
    """Normalised crops [N,3,S,S] and keypoint requests -> every (crop, request) answer."""
    return _run_chunks(
        backend, spec, pixels.shape[0], lambda idx: pixels[idx], requests, decoding, memory_budget_mb, times
    )


# --------------------------------------------------------------------------------------
# Flip test-time augmentation


def flip_merge(
    plain: CropAnswers, mirrored: CropAnswers, crop_size: int
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Average each plain answer with its mirrored crop's answer (x mirrored back).

    ``plain`` and ``mirrored`` hold the same rows (crop i, request j at i * k + j); a
    flipped crop's pixel column u is the plain crop's column ``size - 1 - u``. An incomplete
    answer (free decoding only) has no value to average: the other one stands.
    Returns (values [R, dims], scores [R], plain texts, mirrored texts)."""
    size = float(crop_size)
    v_plain, v_other = plain.values, mirrored.values.copy()
    v_other[:, 0] = (size - 1.0) / size - v_other[:, 0]
    ok_plain = np.array([a.complete for a in plain.answers])
    ok_other = np.array([a.complete for a in mirrored.answers])
    w = np.where(ok_plain & ok_other, 0.5, np.where(ok_other, 0.0, 1.0))
    values = w[:, None] * v_plain + (1.0 - w[:, None]) * v_other
    scores = np.array([wp * a.score + (1.0 - wp) * b.score for a, b, wp in zip(plain.answers, mirrored.answers, w)])
    return values, scores, [a.text for a in plain.answers], [b.text for b in mirrored.answers]


def _select_rows(result: CropAnswers, rows: Sequence[int]) -> CropAnswers:
    return CropAnswers(result.values[list(rows)], [result.answers[r] for r in rows], result.stats)


def locate_crops_flipped(
    backend, spec: ModelSpec, pixels: np.ndarray, requests, mirrored, decoding, memory_budget_mb, times=None
) -> tuple[CropAnswers, CropAnswers]:
    """(plain, mirrored) answers from one run over the plain and the mirrored crops, with the
    union of the requests and their mirrors (a left/right-symmetric set like coco17 is its
    own mirror: no extra rows)."""
    n = pixels.shape[0]
    union = list(dict.fromkeys(list(requests) + list(mirrored)))
    row_of = {r: j for j, r in enumerate(union)}
    both = np.concatenate([pixels, pixels[..., ::-1]])  # a copy: contiguous
    run = locate_crops(backend, spec, both, union, decoding, memory_budget_mb, times)
    u = len(union)
    plain = _select_rows(run, [i * u + row_of[r] for i in range(n) for r in requests])
    other = _select_rows(run, [(n + i) * u + row_of[m] for i in range(n) for m in mirrored])
    return plain, other


# --------------------------------------------------------------------------------------
# Image -> coordinates


def crop_batch(image: np.ndarray, geometries: Sequence[cropping.CropGeometry], spec: ModelSpec) -> np.ndarray:
    """Normalised crops [N,3,S,S] of ``image`` (RGB uint8) with the model's statistics."""
    return crops_of([(image, g) for g in geometries], spec)


def crops_of(pairs: Sequence[tuple[np.ndarray, cropping.CropGeometry]], spec: ModelSpec) -> np.ndarray:
    """Normalised crops [N,3,S,S], one per (RGB uint8 image, geometry)."""
    crops = np.stack([cropping.warp(image, g) for image, g in pairs])
    return cropping.normalize(crops, spec.norm_mean, spec.norm_std)


def locate_in_image(
    backend: Backend | RequestBackend,
    spec: ModelSpec,
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    requests: Sequence[KeypointRequest],
    decoding: str = "constrained",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    mirrored: Sequence[KeypointRequest] | None = None,
    times: StageTimes | None = None,
) -> ImageAnswers:
    """Boxes ``[x, y, w, h]`` of an RGB uint8 image -> keypoints in image pixels.

    ``mirrored``: flip test-time augmentation, with the mirrored request of each request
    (``DescriptionLibrary.mirror``); the answers are averaged by ``flip_merge``."""
    return locate_in_images(backend, spec, [(image, boxes)], requests, decoding, memory_budget_mb, mirrored, times)[0]


def locate_in_images(
    backend: Backend | RequestBackend,
    spec: ModelSpec,
    items: Sequence[tuple[np.ndarray, Sequence[Sequence[float]]]],
    requests: Sequence[KeypointRequest],
    decoding: str = "constrained",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    mirrored: Sequence[KeypointRequest] | None = None,
    times: StageTimes | None = None,
) -> list[ImageAnswers]:
    """``locate_in_image`` for several (image, boxes) at once: the crops of all images go
    through the pipeline as one batch (one vision pass, one decoding per chunk), so a server
    batches several requests' persons x keypoints together. The same answers as one call per
    image (every crop and row is computed on its own); ``stats`` are the whole run's."""
    geoms = [
        (i, cropping.crop_geometry(b, image.shape[:2], spec.image_size))
        for i, (image, boxes) in enumerate(items)
        for b in boxes
    ]
    n, k, size = len(geoms), len(requests), spec.image_size

    def pixels(sel: Sequence[tuple[int, cropping.CropGeometry]]) -> np.ndarray:
        return crops_of([(items[i][0], g) for i, g in sel], spec)

    if n == 0:  # nobody in any image
        empty = np.zeros((0, k, spec.coord_dims)), np.zeros((0, k))
        return [ImageAnswers(*empty, [], [], DecodeStats(0, 0, 0, 0)) for _ in items]
    if mirrored is None:
        run = _run_chunks(
            backend, spec, n, lambda idx: pixels([geoms[i] for i in idx]), requests, decoding, memory_budget_mb, times
        )
        values, scores = run.values, np.array([a.score for a in run.answers])
        texts, flip_texts, stats = [a.text for a in run.answers], [""] * len(run.answers), run.stats
    else:
        # chunk the boxes here: each chunk runs its plain and mirrored crops together
        union = list(dict.fromkeys(list(requests) + list(mirrored)))
        suffix = group_rows(spec, union).suffixes if spec.groups else _suffixes(spec, union)
        step = max(1, crops_per_chunk(spec, backend, len(suffix), max(map(len, suffix)), memory_budget_mb) // 2)
        parts, stats = [], None
        for start in range(0, n, step):
            with _stage(times, "crop"):
                px = pixels(geoms[start : start + step])
            plain, other = locate_crops_flipped(
                backend, spec, px, requests, mirrored, decoding, memory_budget_mb, times
            )
            parts.append(flip_merge(plain, other, size))
            stats = _merge_stats(stats, plain.stats)
        values = np.concatenate([p[0] for p in parts])
        scores = np.concatenate([p[1] for p in parts])
        texts = [t for p in parts for t in p[2]]
        flip_texts = [t for p in parts for t in p[3]]
    values = values.reshape(n, k, spec.coord_dims).copy()
    scores = scores.reshape(n, k)
    for c, (_, g) in enumerate(geoms):
        values[c, :, :2] = cropping.to_image_coords(values[c, :, :2] * size, g.inverse)
    out, first = [], 0
    for _, boxes in items:
        crops = range(first, first + len(boxes))
        out.append(
            ImageAnswers(
                values=values[first : first + len(boxes)],
                scores=scores[first : first + len(boxes)],
                texts=[texts[c * k : (c + 1) * k] for c in crops],
                flip_texts=[flip_texts[c * k : (c + 1) * k] for c in crops],
                stats=stats,
            )
        )
        first += len(boxes)
    return out
