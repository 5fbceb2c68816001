"""``backend="auto"``: the fastest backend this machine can really run for an engine.

TensorRT engines + a CUDA GPU + TensorRT/TensorRT-LLM installed + the engine built for this
GPU and these versions -> ``tensorrt``; a CUDA GPU + onnxruntime-gpu -> ``onnxruntime-cuda``;
else ``onnxruntime`` (CPU). The probes live in gpu_logic (tests fake them).
"""

from __future__ import annotations

from ..errors import EngineError
from ..manifest import ORT_CPU, ORT_CUDA, TENSORRT, EngineManifest
from . import gpu_logic


def backend_candidates(manifest: EngineManifest) -> list[str]:
    """The backends ``auto`` tries, fastest first; the CPU one last (it always runs)."""
    backends = manifest.backends
    gpu = gpu_logic.has_cuda_gpu()
    out = []
    if gpu and TENSORRT in backends and gpu_logic.has_tensorrt_runtime():
        if not gpu_logic.compatibility_problems(manifest.build_machine or {}, gpu_logic.this_machine()):
            out.append(TENSORRT)
    if ORT_CPU in backends:
        if gpu and gpu_logic.ort_cuda_provider_listed():
            out.append(ORT_CUDA)
        out.append(ORT_CPU)
    if not out:
        raise EngineError(f"no backend of this engine can run here (engine has: {', '.join(backends)})")
    return out


def choose_backend(manifest: EngineManifest) -> str:
    return backend_candidates(manifest)[0]
