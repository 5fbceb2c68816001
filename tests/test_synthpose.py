"""SynthPose generator: determinism, keypoints on the body, occlusion, COCO/3D files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from locllm_training.synthpose.pose import forward_kinematics, sample_pose, sample_shape
from locllm_training.synthpose.render import PART_BITS, Camera, Painter, look_at, render_person
from locllm_training.synthpose.scene import ROOT, generate_sample, sample_appearance
from locllm_training.synthpose.skeleton import JOINT_NAMES, J

ROOT_DIR = Path(__file__).resolve().parents[1]


def _make(tmp: Path, n: int = 4, extra: list[str] | None = None) -> Path:
    from make_synthpose import main  # training/ is on sys.path via locllm_training's parent

    assert main(["--output", str(tmp), "--images", str(n), "--seed", "3", "--size", "128", *(extra or [])]) == 0
    return tmp


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sys

    sys.path.insert(0, str(ROOT_DIR / "training"))
    return _make(tmp_path_factory.mktemp("sp"), 6, ["--captions", "--persons", "2-3"])


def test_names_match_descriptions_yaml() -> None:
    import yaml

    doc = yaml.safe_load((ROOT_DIR / "descriptions" / "keypoints.yaml").read_text())
    assert JOINT_NAMES[:17] == doc["skeletons"]["coco17"]["keypoints"]
    assert set(JOINT_NAMES) <= set(doc["keypoints"])
    assert JOINT_NAMES[17:] == ["neck", "pelvis", "head_top", "thorax", "torso"]


def test_deterministic_bytes(dataset: Path, tmp_path: Path) -> None:
    other = _make(tmp_path / "again", 6, ["--captions", "--persons", "2-3"])
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert len(files) == 6 + 3
    for rel in files:
        assert (dataset / rel).read_bytes() == (other / rel).read_bytes(), rel
    a = generate_sample(3, 0, 128).image
    b = generate_sample(4, 0, 128).image
    assert not np.array_equal(a, b)  # the seed matters


def test_visible_keypoints_on_their_person() -> None:
    checked = 0
    for i in range(8):
        s = generate_sample(11, i, 160, (1, 3))
        slots = s.label // PART_BITS
        for p in s.persons:
            for k in np.nonzero(p.vis == 2)[0]:
                x, y = np.round(p.joints_2d[k]).astype(int)
                nb = slots[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
                assert (nb == p.slot).any(), (i, JOINT_NAMES[k])
                checked += 1
            # v = 0 exactly when the joint projects outside the image
            inside = ((p.joints_2d >= -0.5) & (p.joints_2d < 159.5)).all(1)
            assert np.array_equal(p.vis == 0, ~inside)
            x0, y0, w, h = p.bbox
            ys, xs = np.nonzero(slots == p.slot)
            assert (x0, y0, w, h) == (xs.min() - 0.5, ys.min() - 0.5, np.ptp(xs) + 1, np.ptp(ys) + 1)
            assert p.area == len(xs)
    assert checked > 100


def test_occlusion_flags_follow_depth_order() -> None:
    cross = 0
    for i in range(30):
        s = generate_sample(5, i, 128, (3, 3), photometric=False)
        depth = {p.slot: p.joints_cam[ROOT, 2] for p in s.persons}
        for p in s.persons:
            for k in np.nonzero(p.vis == 1)[0]:
                x, y = np.round(p.joints_2d[k]).astype(int)
                other = int(s.label[y, x]) // PART_BITS
                if other not in (0, p.slot) and other in depth:
                    # the occluder was drawn later, so it must be nearer the camera
                    assert other > p.slot and depth[other] < depth[p.slot]
                    cross += 1
    assert cross > 5  # the scenes really contain people hiding each other


def test_left_right_and_face_from_the_front() -> None:
    rng = np.random.default_rng(0)
    shape, pose = sample_shape(rng, child=False), sample_pose(rng, "standing")
    pose.angles["head_yaw"] = 0.0
    skel = forward_kinematics(shape, pose, yaw_deg=0.0)  # faces +z
    R, t = look_at(np.array([0.0, 1200.0, 5000.0]), np.array([0.0, 900.0, 0.0]))
    cam = Camera(300.0, 300.0, 127.5, 127.5, R, t)
    uv = cam.project(cam.to_cam(skel.joints))
    # facing the camera: the person's left is on the image right
    assert uv[J["left shoulder"], 0] > uv[J["right shoulder"], 0]
    assert uv[J["left eye"], 0] > uv[J["right eye"], 0]
    img = np.full((256, 256, 3), 128, np.uint8)
    lab = np.zeros((256, 256), np.uint16)
    render_person(Painter(img, lab, cam, np.array([0.0, -0.6, -0.8])), skel, shape, sample_appearance(rng), 1)
    x, y = np.round(uv[J["nose"]]).astype(int)
    assert lab[y, x] // PART_BITS == 1
    # from behind the same person shows hair where the face was
    skel_b = forward_kinematics(shape, pose, yaw_deg=180.0)
    uvb = cam.project(cam.to_cam(skel_b.joints))
    assert uvb[J["left shoulder"], 0] < uvb[J["right shoulder"], 0]


def test_coco_json_loads_in_pycocotools(dataset: Path) -> None:
    from pycocotools.coco import COCO

    coco = COCO(str(dataset / "annotations" / "person_keypoints_train.json"))
    cat = coco.loadCats(1)[0]
    assert cat["keypoints"][5] == "left shoulder" and len(cat["keypoint_names_ext"]) == 22
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 6 * 2 - 2
    for a in anns:
        kp = np.array(a["keypoints"]).reshape(-1, 3)
        assert a["num_keypoints"] == int((kp[:, 2] > 0).sum())
        assert a["keypoints_ext"][:51] == a["keypoints"] and a["iscrowd"] == 0
        assert a["area"] > 0 and a["bbox"][2] > 0


def test_3d_round_trip(dataset: Path) -> None:
    comp = json.loads((dataset / "annotations" / "synthpose3d_train.json").read_text())
    coco = json.loads((dataset / "annotations" / "person_keypoints_train.json").read_text())
    kps = {a["id"]: np.array(a["keypoints_ext"]).reshape(-1, 3) for a in coco["annotations"]}
    cams = {im["id"]: im["camera"] for im in comp["images"]}
    for a in comp["annotations"]:
        c = cams[a["image_id"]]
        X = np.array(a["joints_cam_mm"])
        uv = X[:, :2] / X[:, 2:] * [c["fx"], c["fy"]] + [c["cx"], c["cy"]]
        np.testing.assert_allclose(uv, np.array(a["joints_2d"]), atol=0.02)
        kp = kps[a["id"]]
        v = kp[:, 2] > 0
        np.testing.assert_allclose(kp[v, :2], uv[v], atol=0.02)
        z = (X[:, 2] - X[ROOT, 2]) / 2000 + 0.5
        np.testing.assert_allclose(a["z_norm"], z, atol=1e-5)
        assert a["z_norm"][ROOT] == 0.5 and a["root_depth_mm"] == X[ROOT, 2]


def test_captions_llava_format(dataset: Path) -> None:
    caps = json.loads((dataset / "annotations" / "captions_train.json").read_text())
    assert len(caps) == 6
    for c in caps:
        assert (dataset / c["image"]).is_file()
        human, gpt = c["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and ("Two people" in gpt["value"] or "Three people" in gpt["value"])
