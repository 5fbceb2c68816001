"""A stand-in for ``tensorrt_llm.bindings.executor`` that behaves like it where our backend
depends on it, on the CPU: a decoder-only executor with greedy sampling (top_k 1), batched
logits post-processors run on the decoder's logits before sampling, and generation logits
stored the way TensorRT-LLM stores them: the first step copied, later steps views of the
decoder's logits buffer, which guided decoding (xgrammar) then masks in place with -inf for
disallowed tokens (``handleGenerationLogits.cpp``, ``guidedDecoder.cpp``,
``logitsBitmask.cu``: the mask runs after the logits are stored).

The "model" is a deterministic function of the token sequence (seeded random logits), so a
test can recompute every raw logit the executor saw.
"""

from __future__ import annotations

import hashlib
import itertools
from types import SimpleNamespace

import numpy as np
import torch

VOCAB_PADDED_EXTRA = 3  # engines pad the vocabulary; the padding's logits are never scored


def model_logits(tokens: list[int], vocab: int) -> np.ndarray:
    """The fake model's next-token logits after ``tokens`` (float32 [vocab + padding])."""
    seed = int.from_bytes(hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=8).digest(), "little")
    x = np.random.default_rng(seed).standard_normal(vocab + VOCAB_PADDED_EXTRA).astype(np.float32) * 3
    x[vocab:] = -30.0
    return x


class Request:
    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(self, input_token_ids, max_tokens, *, end_id, pad_id, sampling_config, output_config=None,
                 prompt_tuning_config=None, guided_decoding_params=None, client_id=None):  # fmt: skip
        self.input_token_ids, self.max_tokens = list(input_token_ids), int(max_tokens)
        self.end_id, self.pad_id, self.sampling_config = end_id, pad_id, sampling_config
        self.output_config = output_config or OutputConfig()
        self.prompt_tuning_config = prompt_tuning_config
        self.guided_decoding_params = guided_decoding_params
        self.client_id = client_id
        self.logits_post_processor_name = None


class OutputConfig:
    def __init__(self, return_generation_logits=False, exclude_input_from_output=False):
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output


class SamplingConfig:
    def __init__(self, beam_width=1, top_k=None):
        self.beam_width, self.top_k = beam_width, top_k


class KvCacheConfig:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class LogitsPostProcessorConfig:
    def __init__(self):
        self.processor_map, self.processor_batched = None, None


class ExecutorConfig:
    def __init__(self, max_beam_width=1, kv_cache_config=None, gather_generation_logits=False,
                 guided_decoding_config=None):  # fmt: skip
        self.max_beam_width, self.kv_cache_config = max_beam_width, kv_cache_config
        self.gather_generation_logits = gather_generation_logits
        self.guided_decoding_config = guided_decoding_config
        self.logits_post_processor_config = None


class PromptTuningConfig:
    def __init__(self, embedding_table, input_token_extra_ids=None):
        self.embedding_table, self.input_token_extra_ids = embedding_table, input_token_extra_ids


class GuidedDecodingParams:
    class GuideType:
        REGEX = "regex"

    def __init__(self, guide_type, guide):
        self.guide_type, self.guide = guide_type, guide


class GuidedDecodingConfig:
    class GuidedDecodingBackend:
        XGRAMMAR = "xgrammar"

    def __init__(self, backend, encoded_vocab=None, stop_token_ids=None):
        self.backend, self.encoded_vocab, self.stop_token_ids = backend, encoded_vocab, stop_token_ids


ModelType = SimpleNamespace(DECODER_ONLY="decoder_only")


class Executor:
    """In-flight batching over all enqueued requests, one step for all of them at a time.

    ``allowed_by_guide(request, generated) -> token ids`` stands for xgrammar: what guided
    decoding lets through at that step (the test gives the answer grammar's rule)."""

    vocab = 32000
    allowed_by_guide = None
    log: list = []

    def __init__(self, engine_dir, model_type, config: ExecutorConfig):
        self.config = config
        self._ids = itertools.count(1)
        self._done: list = []
        Executor.log = []

    def enqueue_requests(self, requests):
        ids = [next(self._ids) for _ in requests]
        active = [(rid, r, []) for rid, r in zip(ids, requests)]
        stored = {rid: [] for rid in ids}
        lpp = self.config.logits_post_processor_config
        while active:
            buffers = {
                rid: torch.from_numpy(model_logits(r.input_token_ids + gen, self.vocab))[None, None]
                for rid, r, gen in active
            }
            for rid, _, gen in active:  # generation logits are stored before any later mask
                buf = buffers[rid]
                stored[rid].append(buf.clone() if not gen else buf)  # step 0 copied, later steps views
            batched = [
                (rid, r, gen)
                for rid, r, gen in active
                if r.logits_post_processor_name == Request.BATCHED_POST_PROCESSOR_NAME
            ]
            if batched:
                if lpp is None or lpp.processor_batched is None:
                    raise RuntimeError("a request names the batched post-processor, the executor has none")
                lpp.processor_batched(
                    [rid for rid, _, _ in batched],
                    [buffers[rid] for rid, _, _ in batched],
                    [[r.input_token_ids + gen] for _, r, gen in batched],
                    None,  # no CUDA stream on the CPU
                    [r.client_id for _, r, _ in batched],
                )
            for rid, r, gen in active:
                buf = buffers[rid]
                if r.guided_decoding_params is not None:  # xgrammar masks the decoder buffer in place
                    keep = torch.full((buf.shape[-1],), True)
                    keep[list(Executor.allowed_by_guide(r, gen))] = False
                    buf[..., keep] = float("-inf")
                gen.append(int(torch.argmax(buf.reshape(-1))))
            still = []
            for rid, r, gen in active:
                if gen[-1] == r.end_id or len(gen) >= r.max_tokens:
                    logits = torch.cat(stored[rid], dim=1) if r.output_config.return_generation_logits else None
                    self._done.append(SimpleNamespace(
                        request_id=rid, has_error=lambda: False, error_msg="",
                        result=SimpleNamespace(is_final=True, output_token_ids=[list(gen)], generation_logits=logits),
                    ))  # fmt: skip
                    Executor.log.append((r, list(gen)))
                else:
                    still.append((rid, r, gen))
            active = still
        return ids

    def await_responses(self):
        out, self._done = self._done, []
        return out

    def shutdown(self):
        pass


def module() -> SimpleNamespace:
    """The fake as the ``tle`` module our backend uses."""
    names = ("Request", "OutputConfig", "SamplingConfig", "KvCacheConfig", "LogitsPostProcessorConfig",
             "ExecutorConfig", "PromptTuningConfig", "GuidedDecodingParams", "GuidedDecodingConfig",
             "Executor")  # fmt: skip
    return SimpleNamespace(ModelType=ModelType, **{n: globals()[n] for n in names})
