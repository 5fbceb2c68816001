"""``backend="auto"``: the fastest backend this machine can really run for an engine.

TensorRT engines + a CUDA GPU + TensorRT/TensorRT-LLM installed + the engine built for this
GPU and these versions -> ``tensorrt``; a CUDA GPU + onnxruntime-gpu -> ``onnxruntime-cuda``;
else ``onnxruntime`` (CPU). The probes live in gpu_logic (tests fake them).
"""

from __future__ import annotations

from . import gpu_logic


def choose_backend(manifest: dict) -> str:
    backends = manifest["backends"]
    gpu = gpu_logic.has_cuda_gpu()
    if gpu and gpu_logic.TENSORRT in backends and gpu_logic.has_tensorrt_runtime():
        built = manifest.get("build_machine", {})
        if not gpu_logic.compatibility_problems(built, gpu_logic.this_machine()):
            return gpu_logic.TENSORRT
    if "onnxruntime" in backends:
        if gpu and gpu_logic.ort_cuda_provider_listed():
            return gpu_logic.ORT_CUDA
        return gpu_logic.ORT_CPU
    from ..engine import EngineError

    raise EngineError(f"no backend of this engine can run here (engine has: {', '.join(backends)})")
