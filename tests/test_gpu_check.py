"""benchmarks/gpu_check.py's CPU part (CI runs it; the GPU part needs a CUDA GPU)."""

from __future__ import annotations

import json

import pytest


def test_dry_part_shapes_and_floor(tmp_path):
    import gpu_check
    import torch
    from locllm_training.model import LocLLM

    assert gpu_check.main(["--out", str(tmp_path), "--dry-run", "--persons", "1,8"]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["gpu_ran"] is False and report["gpu_not_run_because"] == "--dry-run"
    # the analytic parameter counts are the real model's (built on the meta device: no memory)
    config = gpu_check.model_config()
    with torch.device("meta"):
        model = LocLLM(config, with_lora=False)
    counts = report["dry"]["parameters"]
    assert counts["vision"] == sum(p.numel() for p in model.vision.parameters()) + sum(
        p.numel() for p in model.projector.parameters()
    )
    assert counts["decoder_layers"] == sum(p.numel() for p in model.llm.model.layers.parameters())
    assert counts["embeddings"] + counts["lm_head"] == model.llm.model.embed_tokens.weight.numel() * 2
    one, eight = report["dry"]["floor"]
    # the arithmetic for an H200: ~17 TFLOP at ~790 TFLOP/s + 5 passes over ~13.5 GB at ~4.3 TB/s
    assert 15 < one["tflop"] < 20 and 12 < one["weight_gb"] < 14 and one["memory_bound_passes"] == 5
    assert 30 < one["floor_ms_per_person"] < 45
    assert eight["floor_ms_per_person"] < one["floor_ms_per_person"]  # weights read once for all persons


@pytest.mark.parametrize("bad", [["--persons", "0"], ["--persons", "a,b"], ["--reps", "0"]])
def test_arguments_are_checked(tmp_path, bad):
    import gpu_check

    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path), "--dry-run", *bad])
    assert e.value.code == 2
