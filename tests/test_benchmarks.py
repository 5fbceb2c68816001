"""CI smoke of the benchmark scripts on the tiny preset (few repetitions, no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.slow
def test_throughput_int8_method_smoke(tmp_path):
    """sdk-ort-int8 next to sdk-ort: the int8 engine built from the preset's (forced), its rows
    and the fractions of the measured int8 and fp32 matmul peaks; the ablation's last rung and
    the scaling sweep on the int8 engine."""
    from locllm_sdk.manifest import read_manifest

    out, work = tmp_path / "results", tmp_path / "work"
    args = ["--preset", "tiny", "--teach-format", "40", "--reps", "1", "--warmup", "0", "--calibration-images", "2"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), *args, "--methods", "sdk-ort,sdk-ort-int8"]
        + ["--workdir", str(work), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads((out / "throughput_tiny.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"sdk-ort", "sdk-ort-int8"}
    assert result["ort_matmul_peak_gops"]["int8"] > 0 and result["ort_matmul_peak_gops"]["fp32"] > 0
    int8 = rows["sdk-ort-int8"]
    assert 0 < int8["int8_gflop_per_person"] < result["sdk_person_gflop"]
    assert int8["fraction_of_mixed_peak"] > 0 and int8["speedup_vs_sdk_ort"] > 0
    assert 0 <= result["int8_vs_fp32_identical_answers"] <= 1
    gate = result["int8_engine_gate"]  # the forced build's own gate, on the scenes asked for
    assert gate["calibration images"] == 2 and gate["calibration answers"] > 0
    assert gate["answer agreement"] == gate["identical answers"] / gate["calibration answers"]
    (engine,) = (work / "int8").iterdir()
    precision = read_manifest(engine).precision
    assert (precision.vision, precision.decoder) == ("int8", "int8")
    rungs = [r["rung"] for r in result["ablation"]]
    assert rungs[-2:] == ["sdk", "sdk-int8"] and isinstance(result["ablation"][-1]["answers_equal_previous"], bool)
    assert result["ablation"][-1]["speedup_vs_previous"] > 0
    fp32_sweep, int8_sweep = result["scaling"], result["scaling_int8"]
    assert [r["keypoints"] for r in int8_sweep["keypoints"]] == [r["keypoints"] for r in fp32_sweep["keypoints"]]
    assert [r["persons"] for r in int8_sweep["persons"]] == [1, 2, 4, 8, 16]
    assert all(r["p50_ms"] > 0 for r in int8_sweep["keypoints"] + int8_sweep["persons"])
    assert "extra_keypoint_fraction_of_one" in int8_sweep
    assert (out / "scaling_tiny.png").stat().st_size > 10_000


def test_flop_model_matches_counted_flops(trained):
    """throughput.py's per-person FLOP model (behind "fraction of the matmul peak" and the
    marginal keypoint's FLOP ratio) agrees with torch's own count of the torch backend's
    matmuls for the same request (it once counted one decoder layer instead of all)."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput
    from locllm_sdk import Pose
    from locllm_sdk.manifest import read_manifest

    ckpt, engine = trained[2]
    pose = Pose(ckpt, backend="torch")
    requests = throughput.keypoint_requests(pose.library, 17)
    img = np.random.default_rng(0).integers(0, 255, (120, 90, 3)).astype(np.uint8)
    with FlopCounterMode(display=False) as counter:
        pose.locate(img, {r.name: r.description for r in requests})
    prefix, tails = throughput.served_token_counts(pose, requests)
    model = throughput.person_flops(
        read_manifest(engine), prefix, tails, *throughput.grammar_token_counts(pose.spec.grammar)
    )
    assert 0.95 < model / counter.get_total_flops() < 1.05
    # the linear layers alone (what an int8 engine runs in int8): the ViT's, the LM's and its head
    parts = throughput.person_flop_parts(
        read_manifest(engine), prefix, tails, *throughput.grammar_token_counts(pose.spec.grammar)
    )
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    linear = sum(counted.get(op, 0) for op in ("aten.mm", "aten.addmm", "aten.convolution"))
    assert 0.95 < (parts["vision_linear"] + parts["decoder_linear"] + parts["lm_head"]) / linear < 1.05


def test_reference_flop_model_matches_counted_flops(trained):
    """The official procedure's FLOP model (whose ratio to the SDK's says what fewer FLOPs alone
    give) agrees with torch's count of ``reference_locate`` on the same request."""
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import throughput
    from locllm_sdk import Pose
    from locllm_sdk.manifest import read_manifest
    from locllm_sdk.protocol import MAX_NEW_TOKENS, PromptTokenizer
    from locllm_training.model import load_checkpoint
    from locllm_training.reference import reference_locate

    ckpt, engine = trained[2]
    model = load_checkpoint(ckpt, with_lora=False)  # the merged weights: the adapters' FLOPs are not the model's
    pose = Pose(engine)
    requests = throughput.keypoint_requests(pose.library, 17)
    size = model.config.image_size
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    with FlopCounterMode(display=False) as counter:
        reference_locate(model, PromptTokenizer.from_dir(ckpt), pixels, [(r.name, r.description) for r in requests])
    prefix, tails = throughput.served_token_counts(pose, requests)
    manifest = read_manifest(engine)
    parts = throughput.reference_flop_parts(manifest, [prefix + t for t in tails], MAX_NEW_TOKENS[2])
    assert 0.95 < sum(parts.values()) / counter.get_total_flops() < 1.05
