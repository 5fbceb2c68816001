"""locllm annotate on Ray Data: the same results as `locllm predict`, resumable after a kill,
corrupt images in the errors file. Ray runs embedded (2 logical CPUs) and is shut down after."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def start_ray(attempts: int = 3):
    """An embedded Ray with 2 logical CPUs. On a loaded machine the raylet can miss Ray's fixed
    30 s registration deadline; a failed start is shut down and tried again."""
    ray = pytest.importorskip("ray")
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            return ray
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise


@pytest.fixture(scope="module")
def engine() -> Path:
    from locllm_sdk.demo import engine_for, resolve_model

    return engine_for(resolve_model("demo"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """10 rendered SynthPose images; the COCO file's path."""
    sys.path.insert(0, str(ROOT / "training"))
    from make_synthpose import main

    out = tmp_path_factory.mktemp("synthpose")
    assert main(["--output", str(out), "--images", "10", "--split", "val", "--seed", "7", "--size", "160"]) == 0
    return out / "annotations" / "person_keypoints_val.json"


@pytest.fixture(scope="module")
def ray_local():
    ray = start_ray()
    yield ray
    ray.shutdown()


def _reference(engine: Path, gt: Path) -> list[dict]:
    from locllm_sdk import Pose
    from locllm_sdk.predict import predict_coco

    return predict_coco(Pose(engine), gt, progress=False)


def _copy_dataset(gt: Path, dest: Path) -> Path:
    shutil.copytree(gt.parent.parent, dest)
    return dest / "annotations" / gt.name


@pytest.mark.slow
def test_two_workers_equal_single_process_predict(ray_local, engine, dataset, tmp_path):
    from locllm_sdk.annotate import annotate

    out = tmp_path / "results.json"
    summary = annotate(dataset, engine, out, workers=2, batch_size=2, progress=False)
    assert (summary.total, summary.done, summary.failed, summary.skipped) == (10, 10, 0, 0)
    assert json.loads(out.read_text()) == _reference(engine, dataset)  # exactly, in the file's order
    assert json.loads(summary.errors.read_text()) == []


@pytest.mark.slow
def test_rerun_after_a_kill_skips_finished_images_and_records_a_corrupt_one(ray_local, engine, dataset, tmp_path):
    from locllm_sdk.annotate import annotate, read_shards, shards_dir

    gt = _copy_dataset(dataset, tmp_path / "data")
    doc = json.loads(gt.read_text())
    broken = gt.parent.parent / "images" / "val" / doc["images"][6]["file_name"]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a cut download
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "locllm_sdk.cli", "annotate", str(gt), "--out", str(out), "-m", str(engine)]
    cmd += ["--workers", "1", "--batch-size", "1", "--threads", "1"]
    # its own embedded Ray, in its own process group: killed with everything it started
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            done = [r for r in read_shards(shards_dir(out)).values() if r["status"] == "done"]
            if len(done) >= 2:
                break
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = read_shards(shards_dir(out))
    done_before = {i for i, r in before.items() if r["status"] == "done"}
    assert 2 <= len(done_before) < 10, "the run must be killed midway"
    assert not out.exists()
    shards_before = set(shards_dir(out).glob("*.json"))

    summary = annotate(gt, engine, out, workers=2, batch_size=2, progress=False)
    assert summary.total == 10 and summary.done + summary.failed == summary.total
    assert summary.skipped == len(done_before) and summary.failed == 1
    rerun = set()  # what the rerun computed: the shards it added
    for shard in set(shards_dir(out).glob("*.json")) - shards_before - {shards_dir(out) / "run.json"}:
        rerun |= {json.loads(line)["index"] for line in shard.read_text().splitlines()}
    assert rerun and not rerun & done_before  # no finished image redone
    assert rerun | done_before == set(range(10))
    errors = json.loads(summary.errors.read_text())
    assert [e["file"] for e in errors] == [str(broken)]
    assert errors[0]["error"].startswith("ImageError") and "truncated" in errors[0]["error"]
    ref = [p for p in _reference_skipping(engine, gt, doc["images"][6]["id"])]
    assert json.loads(out.read_text()) == ref


def _reference_skipping(engine: Path, gt: Path, image_id: int) -> list[dict]:
    """`locllm predict` results of the file without one image."""
    doc = json.loads(gt.read_text())
    doc["images"] = [im for im in doc["images"] if im["id"] != image_id]
    other = gt.with_name("without_one_" + gt.name)
    other.write_text(json.dumps(doc))
    return _reference(engine, other)


def test_shards_cut_short_are_not_records(tmp_path):
    from locllm_sdk.annotate import read_shards

    (tmp_path / "a.json").write_text(
        json.dumps({"index": 0, "status": "failed", "error": "x"}) + "\n"
        + json.dumps({"index": 1, "status": "done", "predictions": "[]"}) + "\n"
        + '{"index": 2, "status": "do'
    )  # fmt: skip
    (tmp_path / "b.json").write_text(json.dumps({"index": 0, "status": "done", "predictions": "[]"}) + "\n")
    records = read_shards(tmp_path)
    assert sorted(records) == [0, 1] and records[0]["status"] == "done"


def test_refusals_before_ray_starts(engine, dataset, tmp_path):
    from locllm_sdk.annotate import annotate
    from locllm_sdk.errors import ArgumentError, DataError

    with pytest.raises(DataError, match="does not exist"):
        annotate(dataset, engine, tmp_path / "missing" / "out.json")
    with pytest.raises(ArgumentError, match="workers"):
        annotate(dataset, engine, tmp_path / "out.json", workers=0)
    with pytest.raises(DataError, match="no image files"):
        annotate(tmp_path, engine, tmp_path / "out.json")
    # a rerun with other settings does not mix its shards with the earlier run's
    (tmp_path / "out.json.parts").mkdir()
    (tmp_path / "out.json.parts" / "run.json").write_text(json.dumps({"flip": True}))
    with pytest.raises(ArgumentError, match="other settings"):
        annotate(dataset, engine, tmp_path / "out.json", limit=1)


def test_cli_annotate_usage_error_is_one_line(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "locllm_sdk.cli", "annotate", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
