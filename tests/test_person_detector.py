"""The bundled person detector, detector="person", and `locllm locate` over many frames."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from locllm_sdk.errors import ArgumentError, EngineError
from locllm_sdk.person_detector import GRAPH, Letterbox, PersonDetector, bundled_detector_dir, decode, letterbox

ROOT = Path(__file__).resolve().parents[1]


def test_decode_turns_a_peak_into_its_box():
    g = 8
    peaks = np.zeros((1, g, g), np.float32)
    offsets = np.zeros((2, g, g), np.float32)
    sizes = np.zeros((2, g, g), np.float32)
    peaks[0, 3, 5] = 0.9  # a person centred in cell (x=5, y=3), offset (0.25, 0.5), 2 x 4 cells
    offsets[:, 3, 5] = (0.25, 0.5)
    sizes[:, 3, 5] = np.log([2.0, 4.0])
    peaks[0, 6, 1] = 0.2  # under the threshold
    rows = decode(peaks, offsets, sizes, stride=8, score_threshold=0.3)
    cx, cy = 5.25 * 8, 3.5 * 8
    np.testing.assert_allclose(rows, [[cx - 8, cy - 16, cx + 8, cy + 16, 0.9]], rtol=1e-6)
    assert decode(peaks, offsets, sizes, 8, 0.1).shape == (2, 5)
    assert decode(peaks, offsets, sizes, 8, 0.1, max_detections=1)[0, 4] == pytest.approx(0.9)


def test_letterbox_maps_boxes_back_to_the_image():
    img = np.zeros((100, 300, 3), np.uint8)
    x, box = letterbox(img, 256, (0.5,) * 3, (0.25,) * 3)
    assert x.shape == (1, 3, 256, 256) and box.scale == pytest.approx(256 / 300)
    assert (x[0, :, 86:, :] == 0).all()  # padding below the resized image is zero after normalisation
    rows = np.array([[0.0, 0.0, 128.0, 40.0, 0.7], [-5.0, 10.0, 300.0, 300.0, 0.5]], np.float32)
    back = Letterbox(256 / 300, 256).to_image(rows, (100, 300))
    np.testing.assert_allclose(back[0, :4], [0, 0, 150, 46.875], rtol=1e-5)
    np.testing.assert_allclose(back[1, :4], [0, 11.71875, 300, 100], rtol=1e-5)  # clipped to the image
    assert back[1, 4] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def scenes():
    from locllm_sdk.demo import rendered_set

    return rendered_set(seed=4242, images=6)


def test_bundled_detector_finds_rendered_people(scenes):
    from locllm_sdk.tracking import greedy_match, iou_matrix

    gt, pairs = scenes
    det = PersonDetector()
    found = total = 0
    for image_id, rgb in pairs:
        rows = det(rgb)
        assert rows.dtype == np.float32 and rows.shape[1] == 5
        assert (np.diff(rows[:, 4]) <= 0).all()  # best first
        truth = np.array([[x, y, x + w, y + h] for a in gt["annotations"] if a["image_id"] == image_id
                          for x, y, w, h in [a["bbox"]]])  # fmt: skip
        found += len(greedy_match(iou_matrix(truth, rows[:, :4]), 0.5))
        total += len(truth)
    assert found >= 0.7 * total, (found, total)


def test_detector_refuses_bad_settings_and_a_modified_graph(tmp_path):
    with pytest.raises(ArgumentError, match="score_threshold"):
        PersonDetector(score_threshold=1.5)
    with pytest.raises(ArgumentError, match="max_detections"):
        PersonDetector(max_detections=0)
    copy = tmp_path / "det"
    shutil.copytree(bundled_detector_dir(), copy)
    data = bytearray((copy / GRAPH).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / GRAPH).write_bytes(bytes(data))
    with pytest.raises(EngineError, match="sha256"):
        PersonDetector(copy)


def test_locate_with_the_bundled_detector_keeps_box_scores_and_timings(trained, scenes):
    from locllm_sdk import Pose

    _, engine = trained[2]
    pose = Pose(engine)
    _, pairs = scenes
    rgb = pairs[0][1]
    res = pose.locate(rgb, ["nose", "neck"], detector="person", score_threshold=0.3)
    rows = PersonDetector()(rgb)
    kept = rows[rows[:, 4] >= 0.3]
    assert len(res) == len(kept) > 0
    np.testing.assert_allclose([p.box_score for p in res], kept[:, 4], rtol=1e-6)
    np.testing.assert_allclose([p.box[2] for p in res], kept[:, 2] - kept[:, 0], rtol=1e-5)
    coco = res.to_coco(7)
    assert coco[0]["box_score"] == pytest.approx(res[0].box_score)
    assert coco[0]["score"] == pytest.approx(res[0].box_score * res[0].score)
    assert {"detect", "crop", "vision", "prefix", "decode"} <= set(res.info["timings_ms"])
    assert all(v >= 0 for v in res.info["timings_ms"].values()) and res.info["timings_ms"]["vision"] > 0
    assert pose.locate(rgb, ["nose"], boxes=[[0, 0, 10, 10]])[0].box_score is None
    with pytest.raises(ArgumentError, match="'person'"):
        pose.locate(rgb, ["nose"], detector="car")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "locllm_sdk.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)  # fmt: skip


def test_locate_a_folder_writes_annotated_images_and_coco_results(trained, scenes, tmp_path):
    from locllm_sdk.evaluation import coco_ap
    from pycocotools.coco import COCO

    _, engine = trained[2]
    gt, pairs = scenes
    folder = tmp_path / "frames"
    folder.mkdir()
    for image_id, rgb in pairs[:3]:
        cv2.imwrite(str(folder / f"{image_id:08d}.png"), rgb[:, :, ::-1])
    out, res = tmp_path / "annotated", tmp_path / "res.json"
    run = _cli("locate", folder, "-m", engine, "--out-dir", out, "--coco", res, "--no-progress")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == [f"{i:08d}.jpg" for i in (1, 2, 3)]
    assert cv2.imread(str(out / "00000001.jpg")).shape == pairs[0][1].shape
    preds = json.loads(res.read_text())
    images = json.loads((tmp_path / "res.images.json").read_text())
    assert [im["file_name"] for im in images] == [str(folder / f"{i:08d}.png") for i in (1, 2, 3)]
    assert preds and {p["image_id"] for p in preds} <= {1, 2, 3} and all("box_score" in p for p in preds)
    sub = gt | {"images": gt["images"][:3], "annotations": [a for a in gt["annotations"] if a["image_id"] <= 3]}
    coco = COCO()
    coco.dataset = sub
    coco.createIndex()
    coco.loadRes(preds)  # pycocotools reads it
    assert 0.0 <= coco_ap(sub, preds)["AP"] <= 1.0
    # the same folder as a glob, on the command line's evaluation path
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(sub))
    score = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--gt", gt_file, "--pred", res, "--json"],
                           capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert score.returncode == 0 and "coco" in json.loads(score.stdout), score.stderr


def test_locate_a_video_writes_an_annotated_video_with_tracking(trained, scenes, tmp_path):
    _, engine = trained[2]
    _, pairs = scenes
    video = tmp_path / "clip.mp4"
    h, w = pairs[0][1].shape[:2]
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (w, h))
    for _, rgb in pairs[:4]:
        writer.write(np.ascontiguousarray(rgb[:, :, ::-1]))
    writer.release()
    out, res = tmp_path / "annotated.mp4", tmp_path / "video.json"
    run = _cli("locate", video, "-m", engine, "-k", "nose", "-k", "left hip", "--video", out, "--coco", res,
               "--track", "--det-frequency", "2", "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr
    cap = cv2.VideoCapture(str(out))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4 and cap.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    cap.release()
    preds = json.loads(res.read_text())
    assert {p["image_id"] for p in preds} <= {1, 2, 3, 4} and all("track_id" in p for p in preds)
    bad = _cli("locate", video, "-m", engine, "--draw", tmp_path / "x.png")
    assert bad.returncode == 2 and "--draw is for one image" in bad.stderr


def test_detector_slivers_and_boxes_off_the_frame_are_dropped_not_refused(trained):
    from locllm_sdk import Pose
    from locllm_sdk.inputs import usable_detections

    kept, scores = usable_detections([[-10, 5, 30, 40], [5, 5, 1, 40], [100, 100, 20, 20]], [0.9, 0.8, 0.7], (64, 64))
    assert kept == [[0.0, 5.0, 20.0, 40.0]] and scores == [0.9]
    _, engine = trained[2]
    rows = np.array([[-10, 5, 20, 45, 0.9], [5, 5, 6, 45, 0.8], [100, 100, 120, 120, 0.7]], np.float32)
    res = Pose(engine).locate(np.zeros((64, 64, 3), np.uint8), ["nose"], detector=lambda _: rows)
    assert [p.box for p in res] == [(0.0, 5.0, 20.0, 40.0)] and res[0].box_score == pytest.approx(0.9)


def test_a_tracked_person_keeps_the_colour_of_its_track():
    from locllm_sdk.draw import _PALETTE
    from locllm_sdk.results import Keypoint, Person, Results

    def frame(ids_and_x):
        persons = [
            Person((x, 10.0, 20.0, 30.0), (Keypoint("nose", x + 10, 20.0, 0.9),), track_id=t) for t, x in ids_and_x
        ]
        return Results(persons, ["nose"], (64, 96), orig_img=np.zeros((64, 96, 3), np.uint8))

    # the same two tracks listed in the other order: each box is drawn in its track's colour
    a, b = frame([(3, 5.0), (7, 50.0)]).plot(labels=False), frame([(7, 50.0), (3, 5.0)]).plot(labels=False)
    assert np.array_equal(a, b)
    assert tuple(a[25, 5]) == _PALETTE[3 % len(_PALETTE)] and tuple(a[25, 50]) == _PALETTE[7 % len(_PALETTE)]
