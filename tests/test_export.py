"""build_engines.py: LoRA merge, ONNX export, manifest, and verification that can fail."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from locllm_export.build import ExportVerificationError, build_onnx_engine, check_merge, verify_onnx
from locllm_sdk.manifest import read_manifest, sha256_file
from locllm_training.model import LocLLM, load_checkpoint, merge_lora
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent


def test_lora_weights_matter_and_merge_is_exact(tiny_checkpoint):
    model = load_checkpoint(tiny_checkpoint)
    merged = merge_lora(model)
    assert check_merge(model, merged) < 1e-5
    # the same checkpoint without its adapters answers differently: merging matters
    base = LocLLM(model.config, with_lora=False)
    base_sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(base_sd, strict=False)
    with pytest.raises(ExportVerificationError):
        check_merge(model, base.eval())


def test_cli_builds_engine_with_manifest(tiny_checkpoint, tmp_path):
    out = tmp_path / "engine"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export" / "build_engines.py"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "decoder cached step max rel diff" in run.stdout
    assert "cascade step (onnx) max rel diff" in run.stdout
    m = read_manifest(out)
    assert m.model.num_patches == 256 and m.model.coord_dims == 2
    assert m.tokenizer.im_patch_id == 32000
    assert len(m.tokenizer.digit_ids) == 10
    assert set(m.files) >= {
        "vision.onnx",
        "decoder.onnx",
        "decoder_shared.onnx",
        "embeddings.npy",
        "descriptions.yaml",
        "tokenizer/tokenizer.model",
        "tokenizer/tokenizer_config.json",
    }
    for name, meta in m.files.items():
        assert sha256_file(out / name) == meta.sha256
    assert m.built_with["transformers"].startswith("4.57")
    # no partial directory is left behind, and a second build refuses to overwrite
    assert not (tmp_path / "engine.partial").exists()
    again = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export" / "build_engines.py"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 1 and "not empty" in again.stderr


def test_verification_fails_on_a_corrupted_graph(tiny_checkpoint, tmp_path):
    engine = tmp_path / "engine"
    build_onnx_engine(tiny_checkpoint, engine)
    manifest = read_manifest(engine).backend("onnxruntime")
    merged = merge_lora(load_checkpoint(tiny_checkpoint))
    verify_onnx(engine, merged, manifest)  # intact: passes
    graph = onnx.load(str(engine / "decoder.onnx"))
    init = max(graph.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    w = numpy_helper.to_array(init).copy()
    w[:, : w.shape[1] // 8] *= 1.05  # a 5% error in part of one matrix
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(graph, str(engine / "decoder.onnx"))
    with pytest.raises(ExportVerificationError, match="disagree"):
        verify_onnx(engine, merged, manifest)


def test_engine_embeddings_are_the_merged_table(tiny_checkpoint, tmp_path):
    engine = tmp_path / "engine"
    build_onnx_engine(tiny_checkpoint, engine)
    emb = np.load(engine / "embeddings.npy")
    model = load_checkpoint(tiny_checkpoint)
    np.testing.assert_array_equal(emb, model.llm.get_input_embeddings().weight.detach().numpy())
    assert emb.shape == (32000, 64)
    torch.testing.assert_close(torch.from_numpy(emb[5]), model.embed_tokens(torch.tensor([5]))[0])


def test_parity_script_passes_and_can_fail(trained, tiny_checkpoint):
    ckpt, engine = trained[2]
    script = str(ROOT / "benchmarks" / "parity.py")
    ok = subprocess.run(
        [sys.executable, script, "--checkpoint", str(ckpt), "--engine", str(engine), "--images", "2"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "onnxruntime" in ok.stdout and "1.0000" in ok.stdout
    # the engine of one model against another model's checkpoint: must be flagged
    bad = subprocess.run(
        [sys.executable, script, "--checkpoint", str(tiny_checkpoint), "--engine", str(engine), "--images", "2"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "FAIL" in bad.stdout


def test_parity_accuracy_on_ground_truth(trained, tmp_path):
    """--gt: PCK/AP of each backend and of the torch reference, side by side, on SynthPose."""
    ckpt, engine = trained[2]
    data = tmp_path / "synth"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "training" / "make_synthpose.py"),
            "--output",
            str(data),
            "--images",
            "3",
            "--split",
            "val",
            "--seed",
            "5",
        ],
        check=True,
        capture_output=True,
    )
    gt = data / "annotations" / "person_keypoints_val.json"
    out = tmp_path / "parity.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "parity.py"),
            "--checkpoint",
            str(ckpt),
            "--engine",
            str(engine),
            "--images",
            "3",
            "--gt",
            str(gt),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads(out.read_text())
    ort = next(r for r in rows if r["backend"] == "onnxruntime")
    ref = next(r for r in rows if r["backend"] == "torch (reference)")
    assert ort["exact_match"] == 1.0
    assert ort["accuracy"] == ref["accuracy"]  # identical answers -> identical metrics
    assert 0.0 <= ort["accuracy"]["PCK@0.1"] <= 1.0
