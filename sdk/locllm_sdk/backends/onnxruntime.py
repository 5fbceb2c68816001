"""ONNX Runtime backend (CPU; CUDA when onnxruntime-gpu really runs on a GPU)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..manifest import (
    ORT_CPU,
    ORT_CUDA,
    STEP_INPUTS,
    VISION_INPUT,
    VISION_OUTPUT,
    EngineManifest,
    OnnxRuntimeEntry,
    decoder_io_names,
    past_names,
    prefix_names,
    shared_step_io_names,
)
from .base import Backend, BackendUnavailable


class OnnxRuntimeBackend(Backend):
    name = ORT_CPU

    def __init__(
        self,
        engine_dir: Path,
        manifest: EngineManifest,
        providers: list[str] | None = None,
        threads: int | None = None,
        device: int = 0,
        io_binding: bool | None = None,
    ):
        """``providers``: ONNX Runtime execution providers (default CPU); with
        ``CUDAExecutionProvider`` first, ``device`` is the GPU index. ``io_binding`` (default:
        on with CUDA): the KV cache stays in ONNX Runtime's device memory from pass to pass
        (OrtValues bound with IO binding) instead of a host <-> device copy of the whole cache
        on every pass; only embeddings, masks and positions go up and the logits come down."""
        try:
            import onnxruntime as ort
        except ImportError as e:  # pragma: no cover - base install has it
            raise BackendUnavailable(
                "ONNX Runtime is not installed: pip install 'locllm-sdk[cpu]' (or 'locllm-sdk[gpu]' on NVIDIA machines)"
            ) from e
        files: OnnxRuntimeEntry = manifest.backend(ORT_CPU)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is None:
            threads = int(os.environ.get("LOCLLM_THREADS", "0")) or None
        if threads:
            opts.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        wanted = providers[0]
        cuda = wanted == "CUDAExecutionProvider"
        provider_args = [(wanted, {"device_id": str(device)}), *providers[1:]] if cuda else providers

        def session(name: str):
            path = manifest.path(engine_dir, name)
            try:
                sess = ort.InferenceSession(str(path), opts, providers=provider_args)
            except Exception as e:  # ORT raises its own types (InvalidProtobuf, Fail, ...)
                raise EngineError(f"{path}: ONNX Runtime cannot load this graph: {str(e).splitlines()[0]}") from e
            # onnxruntime-gpu falls back to CPU silently, at construction and (Session.run retries
            # on CPU after an execution-provider failure) during a run: check what the session
            # really uses, and make a failing run raise instead of retrying on CPU.
            actual = sess.get_providers()
            if not actual or actual[0] != wanted:
                raise BackendUnavailable(
                    f"ONNX Runtime did not enable {wanted} for {name} (the session runs on {actual}); "
                    "refusing to pretend"
                )
            if cuda:
                sess.disable_fallback()
            return sess

        m = manifest.model
        self.vision = session(files.vision)
        self.decoder = session(files.decoder)
        # engines from format 1 builds before the cascade graph existed lack it: copy path
        self.shared = session(files.decoder_shared) if files.decoder_shared else None
        s = m.image_size
        _check_io(self.vision, files.vision, [VISION_INPUT], [VISION_OUTPUT], {VISION_INPUT: ["*", 3, s, s]})
        _check_io(self.decoder, files.decoder, *decoder_io_names(m.num_layers))
        if self.shared is not None:
            _check_io(self.shared, files.decoder_shared, *shared_step_io_names(m.num_layers))
        self.supports_shared_prefix = self.shared is not None
        self.providers = self.decoder.get_providers()
        self.device = device if cuda else None
        if cuda:
            self.name = ORT_CUDA
        path = manifest.path(engine_dir, files.embeddings)
        try:
            self.embeddings = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise EngineError(f"{path}: not a numpy embedding table ({e})") from e
        if self.embeddings.dtype != np.float32 or self.embeddings.shape != (m.vocab_size, m.hidden_size):
            raise EngineError(
                f"{path}: embedding table of {self.embeddings.dtype} {self.embeddings.shape}, the manifest's model "
                f"needs float32 {(m.vocab_size, m.hidden_size)}"
            )
        self.num_layers, self.kv_heads, self.head_dim = m.num_layers, m.num_kv_heads, m.head_dim
        self.cache_dtype = np.float32
        self._past_names = past_names(self.num_layers)
        self._prefix_names = prefix_names(self.num_layers)
        self._out_names = decoder_io_names(self.num_layers)[1]
        self.io_binding = cuda if io_binding is None else bool(io_binding)
        self._ort = ort
        self._device = ("cuda", device) if cuda else ("cpu", 0)

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.vision.run([VISION_OUTPUT], {VISION_INPUT: np.ascontiguousarray(pixels, np.float32)})[0]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self.embeddings[np.asarray(ids, np.int64)], dtype=np.float32)

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.cache_dtype)
        return [z] * (2 * self.num_layers)

    def forward(self, embeds, attention_mask, position_ids, logits_index, cache):
        feeds = _step_feeds(embeds, attention_mask, position_ids, logits_index)
        feeds.update(zip(self._past_names, cache))
        return self._run(self.decoder, feeds)

    def forward_shared(self, embeds, attention_mask, position_ids, logits_index, prefix, cache):
        feeds = _step_feeds(embeds, attention_mask, position_ids, logits_index)
        feeds.update(zip(self._prefix_names, prefix))
        feeds.update(zip(self._past_names, cache))
        return self._run(self.shared, feeds)

    def _run(self, session, feeds: dict):
        """(logits as numpy, present KV): numpy arrays, or with IO binding OrtValues left on
        the device (a cache value may be either: numpy ones are copied up by ORT)."""
        if not self.io_binding:
            out = session.run(self._out_names, feeds)
            return out[0], out[1:]
        io = session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, np.ndarray):
                io.bind_cpu_input(name, value)
            else:
                io.bind_ortvalue_input(name, value)
        io.bind_output(self._out_names[0], "cpu")  # the logits: read on the host
        kind, index = self._device
        for name in self._out_names[1:]:
            io.bind_output(name, kind, index)
        session.run_with_iobinding(io)
        out = io.get_outputs()
        return out[0].numpy(), list(out[1:])

    def cache_batch(self, cache) -> int:
        c = cache[0]
        return c.shape[0] if isinstance(c, np.ndarray) else c.shape()[0]

    def select_rows(self, cache, rows: np.ndarray):
        # once per decoding chunk (a crop's prefix to its rows), not per pass: through the host
        rows = np.asarray(rows, np.int64)
        arrays = [np.ascontiguousarray((c if isinstance(c, np.ndarray) else c.numpy())[rows]) for c in cache]
        if not self.io_binding:
            return arrays
        kind, index = self._device
        return [self._ort.OrtValue.ortvalue_from_numpy(a, kind, index) for a in arrays]

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "onnxruntime": ort.__version__, "providers": self.providers}


def _check_io(session, name: str, inputs: list[str], outputs: list[str], shapes: dict | None = None) -> None:
    """The graph has the inputs and outputs the engine contract names (and fixed dims where
    given): a swapped or mismatched graph is refused at load, not at the first run."""
    got_in = [i.name for i in session.get_inputs()]
    got_out = [o.name for o in session.get_outputs()]
    if got_in != list(inputs) or not set(outputs) <= set(got_out):
        raise EngineError(
            f"{name}: the graph's inputs {got_in[:6]}... / outputs {got_out[:4]}... are not the engine's "
            f"{list(inputs)[:6]}... / {list(outputs)[:4]}... (a graph of another model or another role?)"
        )
    for i in session.get_inputs():
        want = (shapes or {}).get(i.name)
        if want and any(w != "*" and g != w for g, w in zip(i.shape, want)):
            raise EngineError(f"{name}: input {i.name} has shape {i.shape}, the manifest's model needs {want}")


def _step_feeds(embeds, attention_mask, position_ids, logits_index) -> dict:
    arrays = (
        np.ascontiguousarray(embeds, np.float32),
        np.ascontiguousarray(attention_mask, np.int64),
        np.ascontiguousarray(position_ids, np.int64),
        np.ascontiguousarray(logits_index, np.int64),
    )
    return dict(zip(STEP_INPUTS, arrays))
