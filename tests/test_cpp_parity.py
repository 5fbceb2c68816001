"""The C++ runtime answers as Python ``Pose.locate`` does: the ``locllm_cpp`` program on the demo
engine, 20 SynthPose val images x 19 keypoints (the 17 COCO joints, neck, pelvis) with their GT
boxes: identical answer texts, coordinates and scores within 1e-4; its image decoding and crops
equal to the Python SDK's bit for bit. Builds the C++ tree (``build/``) when it is absent."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.slow

N_IMAGES = 20
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    from cpp_latency import SYNTHPOSE, ensure_built, val_people
    from locllm_sdk.demo import engine_for, resolve_model

    if not (SYNTHPOSE / "annotations" / "person_keypoints_val.json").is_file():
        pytest.skip(f"SynthPose val data missing under {SYNTHPOSE} (training/make_synthpose.py makes it)")
    return ensure_built(), engine_for(resolve_model("demo")), val_people(N_IMAGES)


def test_cli_answers_equal_pose_locate(setup):
    from locllm_sdk import Pose
    from locllm_sdk.descriptions import coco17

    build, engine, people = setup
    names = [*coco17().keypoints, "neck", "pelvis"]
    pose = Pose(engine, backend="onnxruntime")
    rows = same = 0
    worst = {"x": 0.0, "y": 0.0, "score": 0.0}
    for path, boxes in people:
        assert boxes, f"{path} has no GT person"
        args = [str(build / "locllm_cpp"), "locate", str(path), "-m", str(engine), "--json"]
        args += [a for n in names for a in ("-k", n)]
        args += [a for b in boxes for a in ("--box", ",".join(repr(float(v)) for v in b))]
        got = json.loads(subprocess.run(args, capture_output=True, text=True, check=True).stdout)
        want = pose.locate(str(path), names, boxes=boxes)
        assert len(got["persons"]) == len(want.persons)
        for g, w in zip(got["persons"], want.persons):
            for gk, wk in zip(g["keypoints"], w.keypoints, strict=True):
                assert gk["name"] == wk.name
                rows += 1
                same += gk["answer"] == wk.answer
                assert gk["answer"] == wk.answer, f"{path} {wk.name}: C++ {gk['answer']} vs Python {wk.answer}"
                for key in worst:
                    worst[key] = max(worst[key], abs(gk[key] - getattr(wk, key)))
    print(f"\nC++ vs Pose.locate: {same}/{rows} identical answers; max |dx| {worst['x']:.2e}, "
          f"|dy| {worst['y']:.2e}, |dscore| {worst['score']:.2e}")  # fmt: skip
    assert rows == sum(len(b) for _, b in people) * len(names)
    assert max(worst.values()) <= TOLERANCE, worst


def test_decoding_and_crops_are_bit_identical(setup):
    from cpp_latency import cpp_crop, cpp_load_image
    from locllm_sdk import crop as cropping

    build, _, people = setup
    rng = np.random.default_rng(0)
    crops = 0
    for path, boxes in people:
        img = cropping.load_image(path)
        np.testing.assert_array_equal(cpp_load_image(build, path), img, err_msg=str(path))
        h, w = img.shape[:2]
        # the GT boxes, and boxes partly outside the image, fractional, small and large
        corners = rng.uniform(-0.3, 0.9, (10, 2)) * [w, h]
        sizes = rng.uniform(2 / min(w, h), 1.5, (10, 2)) * [w, h]
        extra = np.concatenate([corners, sizes], axis=1).tolist()
        for box in boxes + extra:
            if box[0] + box[2] <= 0 or box[1] + box[3] <= 0:
                continue
            want = cropping.warp(img, cropping.crop_geometry(box, (h, w), 224))
            np.testing.assert_array_equal(cpp_crop(build, img, box, 224), want, err_msg=f"{path} box {box}")
            crops += 1
    assert crops > 10 * len(people)
