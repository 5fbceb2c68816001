"""TensorRT backend: the ViT as a TensorRT plan, the decoder in TensorRT-LLM's C++ executor.

Unlike the per-pass backends, TensorRT-LLM's executor schedules and generates on its own
(in-flight batching, paged KV cache, guided decoding), so this backend is a whole-request
engine (``base.RequestBackend``): the pipeline calls ``encode_images`` then ``locate_rows``.

Per call:
  1. the crops go through the TensorRT vision plan (named I/O tensors, ``execute_async_v3``);
  2. each crop's image tokens become a prompt-embedding table; its ``<im_patch>`` positions
     become fake ids ``vocab_size + k`` with ``input_token_extra_ids`` = a hash of the table,
     so equal prefixes share KV blocks and different crops never do (gpu_logic);
  3. one request per crop primes the prefix (KV blocks become reusable only once the
     request that computed them has finished: TensorRT-LLM kv-cache-reuse.md), then every
     keypoint request is enqueued at once;
  4. constrained decoding = xgrammar guided decoding with the answer regex (greedy, top_k 1);
     scores = the official max-softmax of the gathered generation logits, parsed by
     ``protocol.parse_answer``.

Imports tensorrt, tensorrt_llm and torch (device buffers, and the tensors TensorRT-LLM's
bindings take) only here, when the backend is chosen.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from pathlib import Path

import numpy as np

from ..decoding import DecodeStats
from ..errors import EngineError
from ..manifest import TENSORRT, EngineManifest, TensorRTEntry
from ..protocol import MAX_NEW_TOKENS, AnswerGrammar, ParsedAnswer, PromptTokenizer, max_softmax, parse_answer
from . import gpu_logic
from .base import BackendUnavailable, RequestBackend


def _import_gpu_stack():
    try:
        import tensorrt
        import tensorrt_llm
        import torch
        from tensorrt_llm.bindings import executor
    except ImportError as e:
        raise BackendUnavailable(
            f"backend='tensorrt' needs TensorRT and TensorRT-LLM 1.2 on an NVIDIA GPU ({e}); see docs/gpu.md"
        ) from e
    if not torch.cuda.is_available():
        raise BackendUnavailable("backend='tensorrt' needs a CUDA GPU: torch.cuda.is_available() is False")
    return tensorrt, tensorrt_llm, torch, executor


def _torch_dtype(trt, torch, dtype):
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    if dtype not in table:
        raise EngineError(f"unsupported TensorRT I/O dtype {dtype}")
    return table[dtype]


class TrtVisionRunner:
    """A TensorRT plan with one dynamic-batch input and one output, run with named tensors."""

    def __init__(self, plan_path: str | Path, input_name: str, output_name: str, device: int = 0):
        trt, _, torch, _ = _import_gpu_stack()
        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise EngineError(f"{plan_path}: TensorRT could not deserialize the plan (built for another GPU/version?)")
        self.context = self.engine.create_execution_context()
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        for name, mode in ((input_name, trt.TensorIOMode.INPUT), (output_name, trt.TensorIOMode.OUTPUT)):
            if name not in names or self.engine.get_tensor_mode(name) != mode:
                raise EngineError(f"{plan_path}: the plan has no {mode} tensor {name!r} (it has {sorted(names)})")
        self.input_name, self.output_name = input_name, output_name
        # Profile 0: [min, opt, max] shapes of the input.
        self.max_batch = int(self.engine.get_tensor_profile_shape(input_name, 0)[2][0])
        self.in_dtype = _torch_dtype(trt, torch, self.engine.get_tensor_dtype(input_name))
        self.out_dtype = _torch_dtype(trt, torch, self.engine.get_tensor_dtype(output_name))
        self.stream = torch.cuda.Stream(device=self.device)

    def run_device(self, pixels: np.ndarray):
        """[N,3,S,S] float32 -> torch float32 tensor on the GPU, in chunks of the profile's max."""
        torch = self.torch
        outs = []
        for start in range(0, pixels.shape[0], self.max_batch):
            chunk = np.ascontiguousarray(pixels[start : start + self.max_batch], np.float32)
            x = torch.from_numpy(chunk).to(self.device).to(self.in_dtype).contiguous()
            if not self.context.set_input_shape(self.input_name, tuple(x.shape)):
                raise EngineError(f"input shape {tuple(x.shape)} is outside the plan's optimization profile")
            y = torch.empty(
                tuple(self.context.get_tensor_shape(self.output_name)), dtype=self.out_dtype, device=self.device
            )
            self.context.set_tensor_address(self.input_name, x.data_ptr())
            self.context.set_tensor_address(self.output_name, y.data_ptr())
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the H2D copy above
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            self.stream.synchronize()
            outs.append(y.float())
        return torch.cat(outs)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.run_device(pixels).cpu().numpy()


class AnswerLogitsProcessor:
    """TensorRT-LLM batched logits post-processor for the answer grammar.

    Called by the executor once per generation step with every constrained request in the
    batch: ``(request ids, logits [beams, 1, vocab(_padded)] per request, token ids per beam
    (prompt + generated so far), CUDA stream, client ids)``. For each request registered here
    (by client id) it records the official score of the step, the max-softmax of the *raw*
    logits over the full vocabulary, then masks the logits in place so that greedy sampling
    takes exactly what ``decoding.constrained_decode`` takes: the skeleton's forced token, or
    the argmax over the ten digits at a free slot (EOS after the answer). The scores stay on
    the device until ``pop`` reads them once per request."""

    def __init__(self, grammar: AnswerGrammar, vocab_size: int):
        self.grammar, self.vocab_size = grammar, vocab_size  # logits beyond it: the engine's padding
        self._rows: dict[int, tuple[int, list]] = {}  # client id -> (prompt length, step scores)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._allowed: dict = {}  # (slot index, device) -> allowed token ids tensor

    def register(self, prompt_len: int) -> int:
        with self._lock:
            client = next(self._ids)
            self._rows[client] = (int(prompt_len), [])
        return client

    def pop(self, client: int) -> np.ndarray:
        with self._lock:
            _, scores = self._rows.pop(client, (0, []))
        if not scores:
            return np.zeros(0)
        import torch

        return torch.stack(scores).double().cpu().numpy()

    def _allowed_ids(self, step: int, device):
        slots = self.grammar.slots
        key = (min(step, len(slots)), str(device))
        if key not in self._allowed:
            import torch

            if step >= len(slots):
                ids = [self.grammar.eos_id]
            elif slots[step] == AnswerGrammar.FREE:
                ids = list(self.grammar.digit_ids)
            else:
                ids = [slots[step]]
            self._allowed[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return self._allowed[key]

    def __call__(self, req_ids, logits_batch, ids_batch, stream_ptr, client_ids) -> None:
        import torch

        stream = torch.cuda.stream(torch.cuda.ExternalStream(stream_ptr)) if stream_ptr else contextlib.nullcontext()
        with stream:
            for logits, ids, client in zip(logits_batch, ids_batch, client_ids):
                row = self._rows.get(client)
                if row is None:
                    continue  # not a constrained request of ours
                prompt_len, scores = row
                step = len(ids[0]) - prompt_len
                x = logits.float()
                # official score: max-softmax over the full (unpadded) vocabulary, before any mask
                real = x[..., : self.vocab_size]
                peak = real.amax(dim=-1, keepdim=True)
                scores.append((1.0 / torch.exp(real - peak).sum(dim=-1)).reshape(-1)[0])
                allowed = self._allowed_ids(step, logits.device)
                keep = logits[..., allowed].clone()
                logits.fill_(float("-inf"))
                logits[..., allowed] = keep


class TensorRTBackend(RequestBackend):
    name = TENSORRT

    def __init__(
        self,
        engine_dir: str | Path,
        manifest: EngineManifest,
        tokenizer: PromptTokenizer,
        grammar: AnswerGrammar,
        prefix_ids: tuple[int, ...],
        device: int = 0,
        kv_cache_free_gpu_memory_fraction: float | None = None,
    ):
        trt, trtllm, torch, tle = _import_gpu_stack()
        self.torch, self.tle = torch, tle
        engine_dir = Path(engine_dir)
        entry: TensorRTEntry = manifest.backend(TENSORRT)
        here = dict(gpu_logic.this_machine(device))
        here.update(tensorrt=trt.__version__, tensorrt_llm=trtllm.__version__)
        gpu_logic.check_compatibility(manifest.build_machine or {}, here)
        self.machine = here
        self.entry = entry
        plan = manifest.path(engine_dir, entry.vision_plan)
        self.vision = TrtVisionRunner(plan, entry.vision_input, entry.vision_output, device)
        self._setup(
            tle,
            torch,
            engine_dir / entry.trtllm_dir,
            tokenizer,
            grammar,
            prefix_ids,
            vocab_size=manifest.model.vocab_size,
            device=torch.device("cuda", device),
            table_dtype={"float16": torch.float16, "bfloat16": torch.bfloat16}[entry.decoder_dtype],
            max_table_rows=entry.prompt_table_rows,
            max_input_len=entry.max_input_len,
            kv_cache_free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
        )

    def _setup(
        self,
        tle,
        torch,
        trtllm_dir,
        tokenizer: PromptTokenizer,
        grammar: AnswerGrammar,
        prefix_ids,
        vocab_size: int,
        device,
        table_dtype,
        max_table_rows: int,
        max_input_len: int,
        kv_cache_free_gpu_memory_fraction: float | None = None,
    ) -> None:
        """Everything after the GPU probes: the executor and its answer constraint (a CPU test
        runs this with a fake executor that behaves like TensorRT-LLM's)."""
        self.tle, self.torch = tle, torch
        self.device = device
        self.tokenizer, self.grammar = tokenizer, grammar
        self.prefix_ids = tuple(prefix_ids)
        self.vocab_size = vocab_size
        self.dims = grammar.dims
        self.table_dtype = table_dtype
        self.max_table_rows = max_table_rows
        self.max_input_len = max_input_len
        # Constrained decoding by our own batched logits post-processor, not xgrammar guided
        # decoding: TensorRT-LLM stores later steps' generation logits as views of the decoder
        # buffer that the guided decoder then masks in place (handleGenerationLogits.cpp,
        # guidedDecoder.cpp, logitsBitmask.cu), so the official score (max-softmax of the raw
        # logits) cannot be read back. Post-processors run before that mask and before
        # sampling: ours records the score from the raw logits, then masks itself.
        self.processor = AnswerLogitsProcessor(grammar, vocab_size)
        kv = {"enable_block_reuse": True}
        if kv_cache_free_gpu_memory_fraction is not None:
            kv["free_gpu_memory_fraction"] = kv_cache_free_gpu_memory_fraction
        # free decoding (greedy over the full vocabulary, unmasked) reads the generation logits
        config = tle.ExecutorConfig(
            max_beam_width=1, kv_cache_config=tle.KvCacheConfig(**kv), gather_generation_logits=True
        )
        processors = tle.LogitsPostProcessorConfig()
        processors.processor_batched = self.processor
        config.logits_post_processor_config = processors
        self.executor = tle.Executor(trtllm_dir, tle.ModelType.DECODER_ONLY, config)
        self.greedy = tle.SamplingConfig(beam_width=1, top_k=1)

    # ----------------------------------------------------------------------------------
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision(pixels)

    def _prompt_config(self, table, layout: gpu_logic.RequestLayout):
        return self.tle.PromptTuningConfig(embedding_table=table, input_token_extra_ids=layout.extra_ids)

    def _run(self, requests: list) -> list:
        """Enqueue ``requests`` and wait until every one is final; results in request order."""
        ids = self.executor.enqueue_requests(requests)
        pending, results = set(ids), {}
        while pending:
            for response in self.executor.await_responses():
                if response.has_error():
                    raise RuntimeError(f"TensorRT-LLM request {response.request_id} failed: {response.error_msg}")
                if response.result.is_final:
                    results[response.request_id] = response.result
                    pending.discard(response.request_id)
        return [results[i] for i in ids]

    def locate_rows(
        self, image_tokens: np.ndarray, crop_of_row: np.ndarray, suffixes: list[list[int]], decoding: str
    ) -> tuple[list[ParsedAnswer], DecodeStats]:
        tle, torch, grammar, tok = self.tle, self.torch, self.grammar, self.tokenizer
        im_patch = tok.spec.im_patch_id
        if image_tokens.shape[1] > self.max_table_rows:
            raise EngineError(f"{image_tokens.shape[1]} image tokens exceed the engine's prompt table rows")
        keys = [gpu_logic.image_key(t) for t in image_tokens]
        # Keep the tables referenced until every request finished.
        tables = [
            torch.from_numpy(np.ascontiguousarray(t, np.float32)).to(self.device).to(self.table_dtype)
            for t in image_tokens
        ]
        common = {"end_id": grammar.eos_id, "pad_id": tok.spec.pad_id, "sampling_config": self.greedy}
        prime = []
        for c, key in enumerate(keys):
            lay = gpu_logic.request_layout(self.prefix_ids, im_patch, self.vocab_size, [], key)
            prime.append(
                tle.Request(lay.input_ids, 1, prompt_tuning_config=self._prompt_config(tables[c], lay), **common)
            )
        self._run(prime)

        constrained = decoding == "constrained"
        max_tokens = len(grammar.slots) if constrained else MAX_NEW_TOKENS[self.dims]
        output = tle.OutputConfig(return_generation_logits=not constrained, exclude_input_from_output=True)
        requests, clients = [], []
        for r, suffix in enumerate(suffixes):
            c = int(crop_of_row[r])
            lay = gpu_logic.request_layout(self.prefix_ids, im_patch, self.vocab_size, suffix, keys[c])
            if len(lay.input_ids) > self.max_input_len:
                raise EngineError(
                    f"a keypoint prompt of {len(lay.input_ids)} tokens exceeds this engine's max_input_len "
                    f"{self.max_input_len}: shorten the description or rebuild with a larger --max-description-tokens"
                )
            request = tle.Request(
                lay.input_ids, max_tokens, output_config=output,
                prompt_tuning_config=self._prompt_config(tables[c], lay), **common,
            )  # fmt: skip
            if constrained:  # our post-processor constrains and scores this request
                request.logits_post_processor_name = tle.Request.BATCHED_POST_PROCESSOR_NAME
                request.client_id = self.processor.register(len(lay.input_ids))
                clients.append(request.client_id)
            requests.append(request)
        try:
            results = self._run(requests)
        finally:
            confs = [self.processor.pop(cid) for cid in clients]
        answers, steps = [], 0
        for r, res in enumerate(results):
            tokens = [int(t) for t in res.output_token_ids[0]]
            steps = max(steps, len(tokens))
            if constrained:
                answers.append(self._constrained_answer(tokens, confs[r]))
                continue
            if res.generation_logits is None:
                raise EngineError(
                    "the TensorRT-LLM engine returned no generation logits (built without "
                    "--gather_generation_logits?): scores cannot be computed"
                )
            # [beams, steps, vocab(_padded)] when not streaming; rows beyond the vocabulary are padding
            logits = res.generation_logits[0, :, : self.vocab_size].float().cpu().numpy()
            n_steps = min(logits.shape[0], max_tokens)
            conf = max_softmax(logits[:n_steps])
            answers.append(parse_answer(self.tokenizer.decode(tokens), conf[: n_steps - 1], grammar.dims))
        stats = DecodeStats(steps, len(suffixes), len(self.prefix_ids), max(len(s) for s in suffixes))
        return answers, stats

    def _constrained_answer(self, tokens: list[int], conf: np.ndarray) -> ParsedAnswer:
        grammar = self.grammar
        n = len(grammar.slots)
        digits = gpu_logic.answer_from_tokens(grammar, tokens[:n])
        if digits is None or len(conf) < n or not np.isfinite(conf[:n]).all():
            raise RuntimeError(
                f"the constrained request returned {tokens} with {len(conf)} recorded scores, not an answer of "
                "the grammar (was the logits post-processor applied?): refusing to pretend"
            )
        text = self.tokenizer.decode(grammar.fill(digits))
        return parse_answer(text, conf[: n - 1], grammar.dims)  # official: the last step's score dropped

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "machine": self.machine,
            "vision_precision": self.entry.vision_precision,
            "decoder_precision": self.entry.decoder_precision,
            "constrained_decoding": "batched logits post-processor (scores from the raw logits)",
        }

    def close(self) -> None:
        if getattr(self, "executor", None) is not None:
            self.executor.shutdown()
            self.executor = None
