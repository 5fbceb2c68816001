"""Results people can use (ultralytics-style arrays, plot) and boxes from detector output."""

from __future__ import annotations

import numpy as np
import pytest
from locllm_sdk import BoxError, Pose
from locllm_sdk.detectors import boxes_from_detections

NAMES = ["nose", "left wrist", "right knee"]


@pytest.fixture(scope="module")
def pose(trained):
    return Pose(trained[2][1])


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 255, (160, 200, 3)).astype(np.uint8)


def test_detection_rows_to_boxes():
    dets = np.array([[10, 20, 60, 120, 0.9, 0], [30, 30, 90, 100, 0.2, 0], [5, 5, 50, 50, 0.95, 2]])
    assert boxes_from_detections(dets) == [[10, 20, 50, 100], [30, 30, 60, 70], [5, 5, 45, 45]]
    assert boxes_from_detections(dets, score_threshold=0.5) == [[10, 20, 50, 100], [5, 5, 45, 45]]
    assert boxes_from_detections(dets, score_threshold=0.5, classes=[0]) == [[10, 20, 50, 100]]
    assert boxes_from_detections(dets[:, :4]) == [[10, 20, 50, 100], [30, 30, 60, 70], [5, 5, 45, 45]]
    assert boxes_from_detections(dets[:, :5], score_threshold=0.5) == [[10, 20, 50, 100], [5, 5, 45, 45]]
    assert boxes_from_detections(np.zeros((0, 6))) == [] and boxes_from_detections([]) == []
    with pytest.raises(BoxError, match="class column"):
        boxes_from_detections(dets[:, :5], classes=[0])
    with pytest.raises(BoxError, match="shape"):
        boxes_from_detections(np.zeros((2, 3)))
    with pytest.raises(BoxError, match="non-finite"):
        boxes_from_detections([[0, 0, np.nan, 4]])


def test_detector_callable_equals_its_boxes(pose):
    img = image(1)
    seen = []

    def detector(rgb):
        seen.append(rgb.shape)
        return np.array([[20, 10, 110, 140, 0.8, 0], [0, 0, 200, 160, 0.1, 0], [60, 20, 170, 150, 0.7, 3]])

    a = pose.locate(img, NAMES, detector=detector, score_threshold=0.5, classes=[0])
    b = pose.locate(img, NAMES, boxes=[[20, 10, 90, 130]])
    assert seen == [img.shape] and len(a) == 1
    assert [k.answer for k in a[0]] == [k.answer for k in b[0]] and a[0].box == b[0].box
    nobody = pose.locate(img, NAMES, detector=lambda rgb: np.zeros((0, 6)))  # an empty frame
    assert len(nobody) == 0 and nobody.xy.shape == (0, 3, 2) and nobody.conf.shape == (0, 3)
    with pytest.raises(ValueError, match="not both"):
        pose.locate(img, NAMES, boxes=[[0, 0, 50, 50]], detector=detector)


def test_xy_conf_and_plot(pose):
    img = image(2)
    res = pose.locate(img, NAMES, boxes=[[10, 10, 120, 140], [60, 20, 130, 140]])
    assert res.xy.shape == (2, 3, 2) and res.conf.shape == (2, 3)
    np.testing.assert_array_equal(res.xy, res.numpy()[:, :, :2])
    np.testing.assert_array_equal(res.conf, res.numpy()[:, :, 2])
    drawn = res.plot()
    assert drawn.shape == img.shape and (drawn != img).any()
    assert (res.plot(labels=False) != drawn).any()  # the labels are drawn
    hidden = res.plot(labels=False, kpt_thr=float(res.conf.max()) + 1)  # every keypoint under the threshold
    all_kpts = res.plot(labels=False)
    assert (all_kpts != hidden).sum() > 0
    assert (hidden != img).any()  # the boxes stay
    from locllm_sdk import ArgumentError

    with pytest.raises(ArgumentError, match="kpt_thr must be a number"):
        res.plot(kpt_thr="high")
