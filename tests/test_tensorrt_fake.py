"""The tensorrt backend against a fake TensorRT-LLM executor that masks its stored logits in
place exactly as TensorRT-LLM does with guided decoding (tests/fake_trtllm.py): the scores must
come from the raw logits, and the answers must be the SDK's constrained decoding."""

from __future__ import annotations

import fake_trtllm
import numpy as np
import pytest
import torch
from locllm_sdk.backends import gpu_logic
from locllm_sdk.backends.tensorrt import TensorRTBackend
from locllm_sdk.descriptions import DescriptionLibrary
from locllm_sdk.loader import ModelSpec
from locllm_sdk.protocol import AnswerGrammar, max_softmax, parse_answer

NAMES = ["nose", "left wrist", "pelvis"]
VOCAB = 32000


@pytest.fixture(scope="module")
def spec(tiny_checkpoint):
    return ModelSpec.from_checkpoint(tiny_checkpoint)


def backend(spec) -> TensorRTBackend:
    be = TensorRTBackend.__new__(TensorRTBackend)  # no GPU probes: the executor is the fake
    be._setup(
        fake_trtllm.module(), torch, "engine", spec.tokenizer, spec.grammar, spec.prefix_ids, vocab_size=VOCAB,
        device=torch.device("cpu"), table_dtype=torch.float32, max_table_rows=spec.num_patches, max_input_len=4096,
    )  # fmt: skip
    return be


def rows(spec, n_crops: int, seed: int = 0):
    lib = DescriptionLibrary.load()
    tokens = np.random.default_rng(seed).standard_normal((n_crops, spec.num_patches, spec.hidden_size))
    suffixes = [spec.tokenizer.round_ids(n, lib.descriptions[n]) for n in NAMES] * n_crops
    return tokens.astype(np.float32), np.repeat(np.arange(n_crops), len(NAMES)), suffixes


def prompt_ids(spec, image_tokens, crop, suffix) -> list[int]:
    key = gpu_logic.image_key(image_tokens[crop])
    return gpu_logic.request_layout(spec.prefix_ids, spec.tokenizer.spec.im_patch_id, VOCAB, suffix, key).input_ids


def reference_constrained(spec, ids: list[int]):
    """decoding.constrained_decode's rule on the fake model's raw logits: forced tokens, the
    argmax over the ten digits at free slots, official scores from the full vocabulary."""
    g, seq, digits, conf = spec.grammar, list(ids), [], []
    for slot in g.slots:
        x = fake_trtllm.model_logits(seq, VOCAB)[:VOCAB]
        conf.append(float(max_softmax(x)))
        if slot == AnswerGrammar.FREE:
            digits.append(int(np.argmax(x[list(g.digit_ids)])))
            seq.append(g.digit_ids[digits[-1]])
        else:
            seq.append(slot)
    return parse_answer(spec.tokenizer.decode(g.fill(digits)), np.array(conf[:-1]), g.dims)


def test_constrained_scores_are_read_from_raw_logits(spec):
    be = backend(spec)
    fake_trtllm.Executor.allowed_by_guide = None
    image_tokens, crop_of_row, suffixes = rows(spec, 2)
    answers, stats = be.locate_rows(image_tokens, crop_of_row, suffixes, "constrained")
    assert len(answers) == len(suffixes) and stats.rows == len(suffixes)
    distinct = set()
    for r, (a, suffix) in enumerate(zip(answers, suffixes)):
        ref = reference_constrained(spec, prompt_ids(spec, image_tokens, int(crop_of_row[r]), suffix))
        assert a.text == ref.text and a.complete
        np.testing.assert_allclose(a.scores, ref.scores, rtol=1e-6)
        distinct.add(a.text)
    assert len(distinct) > 1  # the fake model answers differently per row: the check can fail
    # every constrained request went through the post-processor, none through guided decoding
    assert all(r.logits_post_processor_name == "batched" and r.guided_decoding_params is None
               for r, _ in fake_trtllm.Executor.log[len(image_tokens):])  # fmt: skip
    assert be.processor._rows == {}  # scores popped: nothing kept per request


def test_free_decoding_reads_unmasked_generation_logits(spec):
    be = backend(spec)
    image_tokens, crop_of_row, suffixes = rows(spec, 1, seed=3)
    answers, _ = be.locate_rows(image_tokens, crop_of_row, suffixes, "free")
    g, tok = spec.grammar, spec.tokenizer
    for r, a in enumerate(answers):
        seq, gen, conf = prompt_ids(spec, image_tokens, 0, suffixes[r]), [], []
        for _ in range(13):
            x = fake_trtllm.model_logits(seq + gen, VOCAB)
            conf.append(float(max_softmax(x[:VOCAB])))
            gen.append(int(np.argmax(x)))
            if gen[-1] == g.eos_id:
                break
        ref = parse_answer(tok.decode(gen), np.array(conf[: len(gen) - 1]), g.dims)
        assert a.text == ref.text
        np.testing.assert_allclose(a.scores, ref.scores, rtol=1e-6)


def test_what_guided_decoding_would_store(spec):
    """The fake reproduces the defect the design avoids: with xgrammar guided decoding the
    stored generation logits of every step after the first are masked (-inf)."""
    tle = fake_trtllm.module()
    ex = tle.Executor("engine", tle.ModelType.DECODER_ONLY, tle.ExecutorConfig(gather_generation_logits=True))
    g = spec.grammar

    def allowed(request, generated):
        j = len(generated)
        return list(g.digit_ids) if g.slots[j] == AnswerGrammar.FREE else [g.slots[j]]

    fake_trtllm.Executor.allowed_by_guide = allowed
    try:
        image_tokens, _, suffixes = rows(spec, 1)
        ids = prompt_ids(spec, image_tokens, 0, suffixes[0])
        req = tle.Request(ids, len(g.slots), end_id=g.eos_id, pad_id=0, sampling_config=tle.SamplingConfig(1, 1),
                          output_config=tle.OutputConfig(return_generation_logits=True),
                          guided_decoding_params=tle.GuidedDecodingParams("regex", "..."))  # fmt: skip
        ex.enqueue_requests([req])
        logits = ex.await_responses()[0].result.generation_logits[0]
    finally:
        fake_trtllm.Executor.allowed_by_guide = None
    assert torch.isfinite(logits[0]).all() and not torch.isfinite(logits[1:]).all()
