"""Pose.stream over every kind of source; COCO results from streamed frames."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from locllm_sdk import DataError, Pose
from locllm_sdk import sources as src

NAMES = ["nose", "left wrist", "pelvis"]


@pytest.fixture(scope="module")
def pose(trained):
    return Pose(trained[2][1])


def pictures(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (96, 80, 3)).astype(np.uint8) for _ in range(n)]


def answers(res):
    return [[k.answer for k in p] for p in res]


def test_folder_glob_image_and_array(pose, tmp_path):
    imgs = pictures(3)
    for i, img in enumerate(imgs):  # PNG: lossless, so the file's pixels are the array's
        cv2.imwrite(str(tmp_path / f"f{i}.png"), img[:, :, ::-1])
    (tmp_path / "notes.txt").write_text("not an image")
    direct = [answers(pose.locate(img, NAMES)) for img in imgs]
    for source, kind in ((tmp_path, "folder"), (str(tmp_path / "f*.png"), "glob")):
        assert src.kind(source) == kind and src.length(source) == 3
        got = list(pose.stream(source, NAMES, progress=False))
        assert [f.index for f, _ in got] == [0, 1, 2]
        assert all(f.name.endswith(f"f{i}.png") for i, (f, _) in enumerate(got))
        assert [answers(r) for _, r in got] == direct
    ((frame, res),) = pose.stream(tmp_path / "f1.png", NAMES)
    assert src.kind(tmp_path / "f1.png") == "image" and answers(res) == direct[1]
    ((frame, res),) = pose.stream(imgs[2], NAMES)
    assert answers(res) == direct[2]
    with pytest.raises(DataError, match="no image files"):
        list(pose.stream(str(tmp_path / "*.jpg"), NAMES))


def test_video_written_here(pose, tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 96))
    assert writer.isOpened()
    imgs = pictures(4, seed=1)
    for img in imgs:
        writer.write(img[:, :, ::-1])
    writer.release()
    assert src.kind(path) == "video" and src.length(path) == 4
    decoded = [f.image for f in src.frames(path)]
    assert len(decoded) == 4 and decoded[0].shape == (96, 80, 3)
    got = list(pose.stream(path, NAMES, progress=False))
    # each frame's answers are locate's on that decoded frame (MJPG is lossy: not the written pixels)
    assert [answers(r) for _, r in got] == [answers(pose.locate(img, NAMES)) for img in decoded]
    assert got[2][0].name == f"{path}#2"
    with pytest.raises(DataError, match="video file not found"):
        list(src.frames(tmp_path / "missing.mp4"))
    with pytest.raises(DataError, match="video file not found"):  # refused before a progress bar starts
        src.length(tmp_path / "missing.mp4")
    with pytest.raises(DataError, match="a source is"):
        list(pose.stream(5.5, NAMES))


def test_streamed_results_are_coco_results(pose, tmp_path):
    from locllm_sdk.evaluation import evaluate_2d

    preds, gt_anns, images = [], [], []
    for i, img in enumerate(pictures(2, seed=3)):
        res = pose.locate(img, "coco17", boxes=[[5, 5, 60, 80]])
        preds += res.to_coco(image_id=i + 1)
        images.append({"id": i + 1, "file_name": f"{i}.png", "height": 96, "width": 80})
        kps = [v for k in res[0] for v in (k.x, k.y, 2)]
        gt_anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [5, 5, 60, 80], "area": 4800,
                        "iscrowd": 0, "num_keypoints": 17, "keypoints": kps})  # fmt: skip
    cats = [{"id": 1, "name": "person", "keypoints": list(pose.library.skeletons["coco17"].keypoints), "skeleton": []}]
    scores = evaluate_2d({"images": images, "annotations": gt_anns, "categories": cats}, preds)
    assert scores["coco"]["AP"] == pytest.approx(1.0)  # the predictions scored as their own ground truth
    assert preds[-1]["keypoints"][2] == pytest.approx(res[0].keypoints[0].score, abs=1e-3)  # [x, y, score] triples
