"""CI smoke of the benchmark scripts on the tiny preset (few repetitions, no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_throughput_smoke(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "throughput.py"),
            "--preset",
            "tiny",
            "--teach-format",
            "40",
            "--reps",
            "1",
            "--warmup",
            "0",
            "--workdir",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads((out / "throughput_tiny.json").read_text())
    methods = {r["method"]: r for r in result["rows"]}
    assert set(methods) == {"reference", "sdk-torch", "sdk-ort"}
    assert methods["sdk-ort"]["decoder_passes_per_keypoint"] == 6
    assert methods["reference"]["decoder_passes_per_keypoint"] == 13
    assert [r["rung"] for r in result["ablation"]][-1] == "sdk"
    # every rung reports whether it changed the answers (greedy equivalence itself is proven in
    # tests/test_reference.py; a 40-step model has near-tied digits, so no equality here)
    assert all(isinstance(r["answers_equal_previous"], bool) for r in result["ablation"][1:])
    assert all(r["p50_ms"] > 0 for r in result["ablation"])
    assert [r["keypoints"] for r in result["scaling"]["keypoints"]] == [1, 2, 4, 8, 17, 32, 64]
    assert (out / "scaling_tiny.png").stat().st_size > 10_000
