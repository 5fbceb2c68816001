"""Detector output of the libraries users run (ultralytics, supervision, rtmlib) as person boxes,
and Results.to_supervision(), with the libraries' real objects.

ultralytics reads torchvision's version when it is imported (``ultralytics/utils/__init__.py``)
and imports torchvision only for its NMS. PyPI's torchvision does not load beside the CPU torch
wheel this project installs, so where torchvision is absent the import is given the version of
the torchvision release paired with torch 2.13 and the YOLO model runs its NMS-free head
(``nms=False``, YOLO26), which never imports torchvision.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import math
import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from locllm_sdk import BoxError, Pose
from locllm_sdk.detectors import boxes_from_detections, detect, to_bgr, ultralytics_detector

NAMES = ["nose", "left wrist", "right knee"]
# [x1, y1, x2, y2, score, class] and the same boxes as [x, y, w, h]
ROWS = [[10, 20, 60, 120, 0.9, 0], [30, 30, 90, 100, 0.2, 0], [5, 5, 50, 50, 0.95, 2]]
XYWH = [[10, 20, 50, 100], [30, 30, 60, 70], [5, 5, 45, 45]]
TORCHVISION_FOR_TORCH_2_13 = "0.28.0"


@pytest.fixture(scope="module")
def pose(trained):
    return Pose(trained[2][1])


@pytest.fixture(scope="module")
def ultralytics(tmp_path_factory):
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics is not installed (pip install --no-deps ultralytics, as .ci/run does)")
    pytest.importorskip("torch", reason="ultralytics needs torch")
    try:
        importlib.metadata.version("torchvision")
        torchvision_version = contextlib.nullcontext()
    except importlib.metadata.PackageNotFoundError:  # see the module's docstring
        real = importlib.metadata.version
        torchvision_version = mock.patch(
            "importlib.metadata.version",
            lambda name: TORCHVISION_FOR_TORCH_2_13 if name == "torchvision" else real(name),
        )
    env = {"YOLO_CONFIG_DIR": str(tmp_path_factory.mktemp("ultralytics")), "YOLO_OFFLINE": "1"}
    with mock.patch.dict(os.environ, env), torchvision_version:
        import ultralytics
    return ultralytics


@pytest.fixture(scope="module")
def sv():
    return pytest.importorskip("supervision", reason="supervision is not installed (pip install -e '.[integrations]')")


@pytest.fixture(scope="module")
def yolo(ultralytics):
    """A YOLO26n built from its yaml (no download), NMS-free head. Its random weights are
    He-initialised (ultralytics' own init lets activations vanish through the depth, so every
    image gave the same boxes and scores) and the person logit's bias is 0: scores near 0.5 that
    vary with the image."""
    import torch

    torch.manual_seed(0)
    model = ultralytics.YOLO("yolo26n.yaml")
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        for branch in model.model.model[-1].one2one_cv3:
            branch[-1].bias[0] = 0.0
    model.overrides["nms"] = False  # also for model(image) called as it is
    return model


def image(seed=0, hw=(160, 200)):
    return np.random.default_rng(seed).integers(0, 255, (*hw, 3)).astype(np.uint8)


def expected_boxes(xyxy, scores, classes, score_threshold=0.0, keep_classes=None):
    """[x, y, w, h] of the rows that pass, written out from the library's own columns."""
    return [
        [x1, y1, x2 - x1, y2 - y1]
        for (x1, y1, x2, y2), s, c in zip(np.asarray(xyxy).tolist(), np.asarray(scores).tolist(), np.asarray(classes))
        if s >= score_threshold and (keep_classes is None or int(c) in keep_classes)
    ]


def test_ultralytics_results(ultralytics):
    import torch
    from ultralytics.engine.results import Results

    names = {0: "person", 1: "bicycle", 2: "car"}
    res = Results(image(), path="frame.jpg", names=names, boxes=torch.tensor(ROWS, dtype=torch.float32))
    for given in (res, [res], res.boxes, res.numpy(), res.numpy().boxes):
        assert boxes_from_detections(given) == XYWH
        assert boxes_from_detections(given, score_threshold=0.5) == [XYWH[0], XYWH[2]]
        assert boxes_from_detections(given, score_threshold=0.5, classes=[0]) == [XYWH[0]]
        assert boxes_from_detections(given, classes=[2]) == [XYWH[2]]
    empty = Results(image(), path="frame.jpg", names=names, boxes=torch.zeros((0, 6)))
    assert boxes_from_detections(empty) == [] and boxes_from_detections([empty], classes=[0]) == []
    with pytest.raises(BoxError, match="list of 2 ultralytics results"):
        boxes_from_detections([res, res])
    classified = Results(image(), path="frame.jpg", names=names, probs=torch.tensor([0.7, 0.2, 0.1]))
    with pytest.raises(BoxError, match="ultralytics Results without boxes"):
        boxes_from_detections(classified)


def test_supervision_detections(sv):
    rows = np.array(ROWS)
    full = sv.Detections(xyxy=rows[:, :4], confidence=rows[:, 4], class_id=rows[:, 5].astype(int))
    assert boxes_from_detections(full) == XYWH
    assert boxes_from_detections(full, score_threshold=0.5, classes=[0]) == [XYWH[0]]
    bare = sv.Detections(xyxy=rows[:, :4])  # no confidence, no class_id: every box passes a threshold
    assert boxes_from_detections(bare, score_threshold=0.99) == XYWH
    with pytest.raises(BoxError, match="class filter"):
        boxes_from_detections(bare, classes=[0])
    assert boxes_from_detections(sv.Detections.empty(), score_threshold=0.5, classes=[0]) == []
    full.xyxy = np.zeros((3, 5))
    with pytest.raises(BoxError, match=r"supervision Detections boxes must be \(N, 4\) xyxy, got shape \(3, 5\)"):
        boxes_from_detections(full)
    bare.confidence = np.ones(2)
    with pytest.raises(BoxError, match="supervision Detections has 2 scores for 3 boxes"):
        boxes_from_detections(bare)


def test_yolo_model_output_and_channel_order(yolo, sv):
    rgb = image(1)
    seen = []  # the images ultralytics' predictor was handed
    yolo.add_callback("on_predict_batch_start", lambda predictor: seen.append(predictor.batch[1][0].copy()))
    results = ultralytics_detector(yolo, conf=0.0, imgsz=160, max_det=20)(rgb)
    assert len(seen) == 1 and np.array_equal(seen[0], rgb[..., ::-1])  # BGR, as ultralytics reads arrays
    assert type(results) is list and len(results) == 1 and len(results[0].boxes) == 20
    b = results[0].boxes
    scores = b.conf.numpy()
    threshold = float(np.sort(scores)[-5])  # the five best
    want = expected_boxes(b.xyxy.numpy(), scores, b.cls.numpy(), threshold)
    assert len(want) == 5
    assert boxes_from_detections(results, score_threshold=threshold) == want
    from_sv = sv.Detections.from_ultralytics(results[0])
    assert boxes_from_detections(from_sv, score_threshold=threshold) == want
    # the model itself as the detector gets BGR too (ultralytics' default conf=0.25 applies)
    direct = detect(yolo, rgb, 0.5, None)
    assert np.array_equal(seen[-1], rgb[..., ::-1])
    assert len(direct) > 5 and direct == boxes_from_detections(yolo(to_bgr(rgb), verbose=False), 0.5)
    assert direct != boxes_from_detections(yolo(rgb, verbose=False), 0.5)  # the channel order shows in the boxes


def test_pose_locate_with_yolo(pose, yolo, sv):
    rgb = image(2)
    detector = ultralytics_detector(yolo, conf=0.0, imgsz=160, max_det=3)
    b = detector(rgb)[0].boxes
    want = expected_boxes(b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy())
    assert len(want) == 3
    got = pose.locate(rgb, NAMES, detector=detector)
    assert [list(p.box) for p in got] == want
    same = pose.locate(rgb, NAMES, boxes=want)
    assert [[k.answer for k in p] for p in got] == [[k.answer for k in p] for p in same]
    via_sv = pose.locate(rgb, NAMES, detector=lambda img: sv.Detections.from_ultralytics(detector(img)[0]))
    assert [p.box for p in via_sv] == [p.box for p in got]


# rtmlib: a YOLOX-layout ONNX graph made here (rtmlib's detectors need downloaded weights), run
# by rtmlib's own YOLOX / RTMDet (preprocess, onnxruntime session, grid decoding, NMS). The
# 64x64 input has 8*8 + 4*4 + 2*2 = 84 anchors (strides 8, 16, 32); columns [dx, dy, log w,
# log h, objectness, person, car]. Anchor 0 (stride 8, cell 0, 0) is a person whose objectness is
# the mean of the input's first channel / 255 (blue in BGR); anchor 64 (stride 16, cell 0, 0) a car
# with objectness 0.8. Decoded on a 128x128 image (scale 0.5): anchor 0 is centre (2, 3) * 8,
# size (2, 4) * 8 -> xyxy [8, 8, 24, 40] / 0.5; anchor 64 is centre (3, 2) * 16, size (2, 3) * 16
# -> xyxy [32, 8, 64, 56] / 0.5.
PERSON_XYWH = [16.0, 16.0, 32.0, 64.0]
CAR_XYWH = [64.0, 16.0, 64.0, 96.0]


def yolox_graph(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    anchors, cols = 84, 7
    bias = np.zeros((anchors, cols), np.float32)
    bias[0, :4] = [2, 3, math.log(2), math.log(4)]
    bias[0, 5] = 0.9
    bias[64, :4] = [3, 2, math.log(2), math.log(3)]
    bias[64, 4], bias[64, 6] = 0.8, 0.9
    weight = np.zeros((3, anchors, cols), np.float32)
    weight[0, 0, 4] = 1 / 255
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["means"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["means", "weight"], ["mixed"]),
        helper.make_node("Add", ["mixed", "bias"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["outputs"]),
    ]
    inits = [
        numpy_helper.from_array(weight.reshape(3, -1), "weight"),
        numpy_helper.from_array(bias.reshape(-1), "bias"),
        numpy_helper.from_array(np.array([1, anchors, cols], np.int64), "shape"),
    ]
    graph = helper.make_graph(
        nodes,
        "yolox_layout",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("outputs", TensorProto.FLOAT, [1, anchors, cols])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return str(path)


@pytest.fixture(scope="module")
def rtmlib_graph(tmp_path_factory):
    pytest.importorskip("rtmlib", reason="rtmlib is not installed (pip install --no-deps rtmlib, as .ci/run does)")
    return yolox_graph(tmp_path_factory.mktemp("rtmlib") / "yolox.onnx")


def assert_boxes(got, want):
    """rtmlib decodes in float32 (exp, the scale): boxes within 1e-4 pixels of the written-out ones."""
    assert len(got) == len(want)
    np.testing.assert_allclose(np.array(got, float).reshape(-1, 4), np.array(want, float).reshape(-1, 4), atol=1e-4)


def plain(rgb_colour):
    return np.full((128, 128, 3), rgb_colour, np.uint8)


def test_rtmlib_detectors(rtmlib_graph):
    from rtmlib import YOLOX, RTMDet

    blue, red = plain((0, 0, 255)), plain((255, 0, 0))
    human = YOLOX(rtmlib_graph, model_input_size=(64, 64), score_thr=0.5, backend="onnxruntime")
    raw = human(to_bgr(blue))
    assert isinstance(raw, np.ndarray) and raw.shape == (2, 4)  # rtmlib's own output: boxes only
    assert_boxes(detect(human, blue, 0.0, None), [PERSON_XYWH, CAR_XYWH])
    # the tool gets BGR: a red RGB image has no blue, so anchor 0 is not found (RGB would find it)
    assert_boxes(detect(human, red, 0.0, None), [CAR_XYWH])
    assert_boxes(detect(human, blue, 0.99, None), [PERSON_XYWH, CAR_XYWH])  # no scores: all pass
    with pytest.raises(BoxError, match="class filter"):
        detect(human, blue, 0.0, [0])
    multi = YOLOX(rtmlib_graph, model_input_size=(64, 64), score_thr=0.5, backend="onnxruntime", det_mode="multiclass")
    boxes, class_ids = multi(to_bgr(blue))
    assert class_ids.tolist() == [0, 1]
    assert_boxes(detect(multi, blue, 0.0, None), [PERSON_XYWH, CAR_XYWH])
    assert_boxes(detect(multi, blue, 0.0, [0]), [PERSON_XYWH])
    assert detect(multi, red, 0.0, [0]) == []
    # RTMDet's human mode keeps class 0 itself (same decoding; mean 0, std 1 leaves the pixels as they are)
    rtmdet = RTMDet(rtmlib_graph, (64, 64), mean=(0, 0, 0), std=(1, 1, 1), backend="onnxruntime", score_thr=0.5)
    assert_boxes(detect(rtmdet, blue, 0.0, None), [PERSON_XYWH])
    # a plain tuple of two rows from anything else is two boxes, not (boxes, class ids)
    assert boxes_from_detections(([8, 8, 24, 40], [32, 8, 64, 56])) == [[8, 8, 16, 32], [32, 8, 32, 48]]


def test_pose_locate_with_rtmlib(pose, rtmlib_graph):
    from rtmlib import YOLOX

    yolox = YOLOX(rtmlib_graph, model_input_size=(64, 64), score_thr=0.5, backend="onnxruntime")
    blue = plain((0, 0, 255))
    got = pose.locate(blue, NAMES, detector=yolox)
    assert_boxes([list(p.box) for p in got], [PERSON_XYWH, CAR_XYWH])
    same = pose.locate(blue, NAMES, boxes=[PERSON_XYWH, CAR_XYWH])
    assert [[k.answer for k in p] for p in got] == [[k.answer for k in p] for p in same]


def segment_distance(point, a, b):
    ab, ap = b - a, point - a
    t = np.clip(ap @ ab / max(ab @ ab, 1e-12), 0.0, 1.0)
    return float(np.linalg.norm(ap - t * ab))


def test_to_supervision_and_annotators(pose, sv):
    rgb = image(3)
    res = pose.locate(rgb, NAMES, boxes=[[10, 10, 120, 140], [60, 20, 130, 140]])
    kp = res.to_supervision()
    assert isinstance(kp, sv.KeyPoints) and len(kp) == 2
    assert kp.xy.dtype == np.float32 and kp.keypoint_confidence.dtype == np.float32
    np.testing.assert_array_equal(kp.xy, res.xy.astype(np.float32))
    np.testing.assert_array_equal(kp.keypoint_confidence, res.conf.astype(np.float32))
    np.testing.assert_array_equal(kp.detection_confidence, np.float32([p.score for p in res]))
    assert kp.class_id.tolist() == [0, 0] and res.to_supervision(class_id=3).class_id.tolist() == [3, 3]
    assert kp.data["keypoint_names"].tolist() == [NAMES, NAMES]
    assert kp[1:].data["keypoint_names"].tolist() == [NAMES]  # per-person data follows supervision's indexing
    bgr = to_bgr(rgb)  # supervision's annotators draw with OpenCV, on BGR scenes
    drawn = sv.VertexAnnotator(color=sv.Color(255, 0, 0), radius=2).annotate(bgr.copy(), kp)
    h, w = rgb.shape[:2]
    for x, y in res.xy.reshape(-1, 2):  # supervision centres its circles on int(x), int(y)
        assert drawn[min(int(y), h - 1), min(int(x), w - 1)].tolist() == [0, 0, 255]  # red, in BGR
    edges = sv.EdgeAnnotator(color=sv.Color(0, 255, 0), thickness=1, edges=[(1, 2)]).annotate(bgr.copy(), kp)
    changed = np.argwhere((edges != bgr).any(axis=-1))[:, ::-1] + 0.5  # pixel centres (x, y)
    assert len(changed) > 0
    # every changed pixel lies on an edge nose - left wrist of one of the persons
    assert max(min(segment_distance(c, *p[:2]) for p in res.xy) for c in changed) <= 2.0
    nobody = pose.locate(rgb, NAMES, boxes=[]).to_supervision()
    assert len(nobody) == 0 and nobody.xy.shape == (0, 3, 2) and nobody.data["keypoint_names"].shape == (0, 3)
    assert np.array_equal(sv.VertexAnnotator().annotate(rgb.copy(), nobody), rgb)


def test_runtime_imports_no_library():
    """The adapters recognise library objects without importing the libraries (or torch)."""
    code = (
        "import sys, numpy as np\n"
        "from locllm_sdk import detectors\n"
        "rows = np.array([[10, 20, 60, 120, 0.9, 0]])\n"
        "assert detectors.boxes_from_detections(rows, 0.5, [0]) == [[10, 20, 50, 100]]\n"
        "assert detectors.detect(lambda img: rows, np.zeros((8, 8, 3), np.uint8), 0.0, None) == [[10, 20, 50, 100]]\n"
        "print(sorted({'ultralytics', 'supervision', 'rtmlib', 'torch'} & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_integrations_extra_keeps_headless_opencv(tmp_path):
    """supervision from [integrations] must not bring opencv-python (its cv2 would overwrite
    opencv-python-headless's) nor torch."""
    from test_packaging import resolved

    names = resolved("integrations", tmp_path)
    assert "supervision" in names and "opencv-python-headless" in names
    assert not {"opencv-python", "opencv-contrib-python", "torch", "torchvision"} & set(names), names
