"""Trustworthy at the edges: every bad input is a clear error of the SDK's own type (naming the
input and the problem), unusual valid input gives the right answer, memory is chunked without
changing answers, and the CLI never ends in a traceback or a false success."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from locllm_sdk import BoxError, CheckpointError, EngineError, KeypointError, Pose, ProtocolError
from locllm_sdk.inputs import validate_boxes
from locllm_sdk.pipeline import crops_per_chunk

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["nose", "left wrist", "right knee", "pelvis"]


@pytest.fixture(scope="module")
def engine2d(trained):
    return trained[2][1]


@pytest.fixture(scope="module")
def pose(engine2d):
    return Pose(engine2d)


def image(seed: int = 0, h: int = 160, w: int = 200) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3)).astype(np.uint8)


def answers(res):
    return [[k.answer for k in p] for p in res]


# ------------------------------------------------------------------------------ boxes


def test_box_rows_are_never_reshaped():
    hw = (100, 120)
    # two detector rows [x, y, w, h, score, cls] used to become three garbage boxes
    with pytest.raises(BoxError, match=r"box 0 has 6 numbers.*detector output.*box_format='xyxy'"):
        validate_boxes([[1, 2, 30, 40, 0.9, 0], [5, 6, 20, 30, 0.8, 0]], hw)
    with pytest.raises(BoxError, match="box 0 has 5 numbers.*detector"):
        validate_boxes(np.zeros((3, 5)) + 10, hw)
    with pytest.raises(BoxError, match="box 0 has 3 numbers"):
        validate_boxes([[1, 2, 3]], hw)
    with pytest.raises(BoxError, match="box 1 has 2 numbers"):
        validate_boxes([[1, 2, 30, 40], [1, 2]], hw)  # ragged
    for bad, what in ((5, "int"), ({"x": 1}, "dict"), ("0,0,10,10", "str")):
        with pytest.raises(BoxError, match=f"got {what}"):
            validate_boxes(bad, hw)
    with pytest.raises(BoxError, match="not a number"):
        validate_boxes([[1, 2, None, 40]], hw)
    with pytest.raises(BoxError, match="non-finite"):
        validate_boxes([[1, 2, np.nan, 40]], hw)
    with pytest.raises(BoxError, match="dtype bool"):
        validate_boxes(np.ones((1, 4), bool), hw)
    with pytest.raises(BoxError, match="shape"):
        validate_boxes(np.ones((1, 1, 4)), hw)
    with pytest.raises(BoxError, match="box_format"):
        validate_boxes([[1, 2, 30, 40]], hw, box_format="xywhr")


def test_degenerate_and_outside_boxes():
    hw = (100, 120)
    for box in ([10, 10, 1.5, 30], [10, 10, 30, 0], [10, 10, -5, 30], [10, 10, 1, 1]):
        with pytest.raises(BoxError, match="degenerate.*under 2 pixels"):
            validate_boxes([box], hw)
    with pytest.raises(BoxError, match="outside the 120x100 image"):
        validate_boxes([[500, 10, 20, 20]], hw)
    with pytest.raises(BoxError, match="xyxy.*degenerate"):
        validate_boxes([[50, 50, 40, 60]], hw, box_format="xyxy")  # x2 < x1
    assert validate_boxes([], hw) == [] and validate_boxes(np.zeros((0, 4)), hw) == []  # no person


def test_box_formats_and_shapes():
    hw = (100, 120)
    xywh = [[10.0, 20.0, 30.0, 40.0]]
    assert validate_boxes([10, 20, 30, 40], hw) == xywh  # one flat box
    assert validate_boxes(np.array([[10, 20, 30, 40]], np.int32), hw) == xywh
    assert validate_boxes([[10, 20, 40, 60]], hw, "xyxy") == xywh
    assert validate_boxes([(25, 40, 30, 40)], hw, "cxcywh") == xywh
    assert validate_boxes(None, hw) == [[0.0, 0.0, 120.0, 100.0]]


def test_box_formats_give_the_same_answers(pose):
    img = image(1)
    a = pose.locate(img, NAMES, boxes=[[20, 10, 90, 130]])
    b = pose.locate(img, NAMES, boxes=np.array([[20, 10, 110, 140]]), box_format="xyxy")
    c = pose.locate(img, NAMES, boxes=[[65, 75, 90, 130]], box_format="cxcywh")
    assert answers(a) == answers(b) == answers(c)
    assert a[0].box == b[0].box == c[0].box == (20.0, 10.0, 90.0, 130.0)


# ------------------------------------------------------------------------------ images


def test_bgr_arrays_and_tiny_images(pose):
    from locllm_sdk import ImageError

    img = image(2)
    a = pose.locate(img, NAMES)
    b = pose.locate(np.ascontiguousarray(img[:, :, ::-1]), NAMES, channels="bgr")
    assert answers(a) == answers(b)
    with pytest.raises(ImageError, match="smaller than 2x2"):
        pose.locate(np.zeros((1, 1, 3), np.uint8), NAMES)


def test_truncated_and_oversized_files_are_refused(pose, tmp_path):
    import cv2
    from locllm_sdk import ImageError

    img = image(3)
    ok, jpg = cv2.imencode(".jpg", img)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(jpg.tobytes()[: len(jpg) // 2])
    with pytest.raises(ImageError, match="cut.jpg"):
        pose.locate(cut, NAMES)
    png = tmp_path / "whole.png"
    cv2.imwrite(str(png), img[:, :, ::-1])
    assert answers(pose.locate(png, NAMES)) == answers(pose.locate(img, NAMES))  # same pixels, same answers


# ------------------------------------------------------------------------------ keypoints and prompt text


def test_keypoint_names_and_non_iterables(pose):
    img = image(4)
    a = pose.locate(img, ["left wrist", "head_top"])
    b = pose.locate(img, ["left_wrist", "head top"])  # COCO's spelling, and head_top with a space
    assert answers(a) == answers(b)
    assert [k.name for k in b[0]] == ["left wrist", "head_top"]  # the library's spelling, as trained
    assert b[0]["left_wrist"] is b[0]["left wrist"]
    for bad in (None, 7, 3.5, b"nose"):
        with pytest.raises(KeypointError, match="keypoints must be"):
            pose.locate(img, bad)
    with pytest.raises(KeypointError, match="requested twice"):
        pose.locate(img, ["left wrist", "left_wrist"])


@pytest.mark.parametrize("token", ["<im_patch>", "</s>", "<s>", "<unk>"])
def test_control_tokens_in_user_text_are_refused(pose, token):
    img = image(5)
    with pytest.raises(ProtocolError, match=f"description of 'chin' contains {token}"):
        pose.locate(img, {"chin": f"The chin {token} is below the mouth."})
    with pytest.raises(ProtocolError, match="keypoint name"):
        pose.locate(img, {f"chin{token}": "The chin is below the mouth."})
    # the protocol's own tokens are never produced from user text
    with pytest.raises(ProtocolError):
        pose.spec.tokenizer.round_ids("chin", f"below {token} the mouth")


def test_prompt_past_the_context_is_refused_before_running(pose):
    img = image(6)
    long = "The chin is the lowest point of the face. " * 240  # ~10,000 characters
    with pytest.raises(ProtocolError, match=r"keypoint 'chin': its prompt is \d+ tokens.*past the model's context of"):
        pose.locate(img, {"chin": long})


# ------------------------------------------------------------------------------ memory


def test_crop_chunks_keep_the_answers(engine2d):
    whole = Pose(engine2d)
    tiny = Pose(engine2d, memory_budget_mb=0.01)
    suffix = [whole.spec.tokenizer.round_ids(r.name, r.description) for r in whole.library.resolve(NAMES)]
    assert crops_per_chunk(tiny.spec, tiny.backend, len(NAMES), max(map(len, suffix)), 0.01) == 1
    img = image(7, 240, 300)
    rng = np.random.default_rng(0)
    boxes = [[float(rng.uniform(0, 150)), float(rng.uniform(0, 100)), 120.0, 130.0] for _ in range(5)]
    for flip in (False, True):
        a, b = whole.locate(img, NAMES, boxes, flip=flip), tiny.locate(img, NAMES, boxes, flip=flip)
        assert answers(a) == answers(b)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
    assert b.info["decoder_passes"] > a.info["decoder_passes"]  # it really ran in chunks


# ------------------------------------------------------------------------------ engine and checkpoint files


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _copy(engine: Path, tmp: Path) -> Path:
    out = tmp / "engine"
    shutil.copytree(engine, out)
    return out


def _manifest(engine: Path) -> dict:
    return json.loads((engine / "manifest.json").read_text())


def _write(engine: Path, m: dict, refresh: tuple[str, ...] = ()) -> None:
    for name in refresh:  # the file changed and the checksum updated with it
        m["files"][name] = {"bytes": (engine / name).stat().st_size, "sha256": _sha(engine / name)}
    (engine / "manifest.json").write_text(json.dumps(m))


def test_malformed_manifests_name_the_field(engine2d, tmp_path):
    e = _copy(engine2d, tmp_path)
    m = _manifest(e)
    (e / "manifest.json").write_text(json.dumps([m]))
    with pytest.raises(EngineError, match="a manifest is a JSON object, got list"):
        Pose(e)
    (e / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        Pose(e)
    bad = json.loads(json.dumps(m))
    del bad["model"]["num_patches"]
    _write(e, bad)
    with pytest.raises(EngineError, match="'model.num_patches' is missing"):
        Pose(e)
    bad = json.loads(json.dumps(m))
    bad["model"]["num_layers"] = "four"
    _write(e, bad)
    with pytest.raises(EngineError, match="'model.num_layers' must be an integer"):
        Pose(e)


def test_every_opened_file_is_listed_and_inside(engine2d, tmp_path):
    e = _copy(engine2d, tmp_path)
    m = _manifest(e)
    # a backend entry naming a file the files section does not list is never opened
    bad = json.loads(json.dumps(m))
    shutil.copyfile(e / "decoder.onnx", e / "other.onnx")
    bad["backends"]["onnxruntime"]["decoder"] = "other.onnx"
    _write(e, bad)
    with pytest.raises(EngineError, match="does not list"):
        Pose(e)
    # a listed path that leaves the engine directory
    outside = tmp_path / "outside.onnx"
    shutil.copyfile(e / "decoder.onnx", outside)
    bad = json.loads(json.dumps(m))
    bad["backends"]["onnxruntime"]["decoder"] = "../outside.onnx"
    bad["files"]["../outside.onnx"] = {"bytes": outside.stat().st_size, "sha256": _sha(outside)}
    _write(e, bad)
    with pytest.raises(EngineError, match="outside the engine directory"):
        Pose(e)
    # a tokenizer file the manifest does not list
    bad = json.loads(json.dumps(m))
    del bad["files"]["tokenizer/tokenizer_config.json"]
    _write(e, bad)
    with pytest.raises(EngineError, match="tokenizer_config.json' is not listed"):
        Pose(e)


def test_tokenizer_flags_that_change_ids_are_refused(engine2d, tmp_path):
    e = _copy(engine2d, tmp_path)
    m = _manifest(e)
    cfg_path = e / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["legacy"] = not cfg["legacy"]
    cfg_path.write_text(json.dumps(cfg))
    _write(e, m, refresh=("tokenizer/tokenizer_config.json",))  # checksums updated: only the ids can tell
    with pytest.raises(EngineError, match="legacy .* differ from the manifest's"):
        Pose(e)


def test_damaged_files_with_updated_checksums(engine2d, tmp_path):
    e = _copy(engine2d, tmp_path)
    m = _manifest(e)
    (e / "descriptions.yaml").write_text("keypoints: [unclosed\n  - :")
    _write(e, m, refresh=("descriptions.yaml",))
    with pytest.raises(EngineError, match="descriptions.yaml"):
        Pose(e)
    shutil.copyfile(engine2d / "descriptions.yaml", e / "descriptions.yaml")
    graph = e / "vision.onnx"
    graph.write_bytes(graph.read_bytes()[:5000])
    _write(e, m, refresh=("descriptions.yaml", "vision.onnx"))
    with pytest.raises(EngineError, match="vision.onnx: ONNX Runtime cannot load"):
        Pose(e)


def test_malformed_checkpoints(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[2][0], ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the weights"):
        Pose(ckpt, backend="torch")
    (ckpt / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        Pose(ckpt, backend="torch")


# ------------------------------------------------------------------------------ CLI


def _cli(*args, env=None) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT / "sdk"), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "locllm_sdk.cli", *args], capture_output=True, text=True, env=full)


def _one_line_error(run: subprocess.CompletedProcess, pattern: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("locllm: error:"), run.stderr
    assert "Traceback" not in run.stderr
    assert pattern in lines[0], lines[0]


def test_cli_failures_are_one_line(engine2d, tmp_path):
    import cv2

    img = tmp_path / "person.png"
    cv2.imwrite(str(img), image(8))
    _one_line_error(
        _cli("locate", str(img), "-m", str(engine2d), "--draw", str(tmp_path / "no" / "x.png")), "does not exist"
    )
    _one_line_error(_cli("locate", str(img), "-m", str(engine2d), "--draw", str(tmp_path / "x.nope")), "extension")
    assert not list(tmp_path.glob("x.*"))
    _one_line_error(_cli("locate", str(img), "-m", str(engine2d), "-k", "tail tip"), "unknown keypoint 'tail tip'")
    _one_line_error(_cli("locate", str(tmp_path / "missing.png"), "-m", str(engine2d)), "not found")
    _one_line_error(_cli("locate", str(img), "-m", str(tmp_path / "nope")), "does not exist")
    _one_line_error(_cli("info", str(tmp_path)), "manifest.json is missing")
    _one_line_error(_cli("locate", str(img), "--box", "1,2,3"), "4 numbers")  # usage errors: one line too
    out = tmp_path / "ok.png"
    run = _cli("locate", str(img), "-m", str(engine2d), "-k", "nose", "--draw", str(out))
    assert run.returncode == 0 and cv2.imread(str(out)) is not None


# ------------------------------------------------------------------------------ engine cache


def test_cache_builds_are_locked_and_atomic(trained, tmp_path, monkeypatch):
    """Two processes asking for the same engine: one builds, the other waits and reuses it; a
    failed build leaves no .partial directory and a stale one is replaced."""
    ckpt = trained[2][0]
    cache = tmp_path / "cache"
    code = "from locllm_sdk.demo import engine_for; import sys; print(engine_for(sys.argv[1]))"
    env = {**os.environ, "LOCLLM_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join(str(ROOT / s) for s in ("sdk", "training", "export"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(ckpt)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum("building the engine" in err for _, err in outs) == 1  # the second one reused it
    engines = list((cache / "engines").iterdir())
    assert len(engines) == 1 and outs[0][0].strip() == outs[1][0].strip() == str(engines[0])

    import locllm_export.build as build
    from locllm_sdk.demo import engine_for

    monkeypatch.setenv("LOCLLM_CACHE", str(tmp_path / "cache2"))
    stale = tmp_path / "cache2" / "engines" / f"{engines[0].name}.partial"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("left by a killed build")

    def fail(*a, **k):
        raise KeyboardInterrupt  # a build interrupted midway

    monkeypatch.setattr(build, "verify_onnx", fail)
    with pytest.raises(KeyboardInterrupt):
        engine_for(ckpt)
    assert not stale.exists() and not list((tmp_path / "cache2" / "engines").iterdir())


def test_graphs_and_facts_that_disagree_with_the_manifest(engine2d, tmp_path):
    e = _copy(engine2d, tmp_path)
    m = _manifest(e)
    shutil.copyfile(e / "decoder.onnx", e / "vision.onnx")  # a graph in another role, checksum updated
    _write(e, m, refresh=("vision.onnx",))
    with pytest.raises(EngineError, match="vision.onnx: the graph's inputs"):
        Pose(e)
    shutil.copyfile(engine2d / "vision.onnx", e / "vision.onnx")
    bad = json.loads(json.dumps(m))
    bad["model"]["coord_dims"] = 3
    _write(e, bad, refresh=("vision.onnx",))
    with pytest.raises(EngineError, match="'model.coord_dims' is 3, but its answer grammar answers 2"):
        Pose(e)
    table = np.load(e / "embeddings.npy")
    np.save(e / "embeddings.npy", table.astype(np.int32))
    _write(e, m, refresh=("vision.onnx", "embeddings.npy"))
    with pytest.raises(EngineError, match="embedding table of int32"):
        Pose(e)


def test_arguments_are_checked(engine2d):
    from locllm_sdk import ArgumentError

    for kwargs, what in (({"backend": "gpu"}, "backend must be"), ({"decoding": "greedy"}, "decoding must be")):
        with pytest.raises(ArgumentError, match=what):
            Pose(engine2d, **kwargs)
    for budget in (0, -5, "big", True):
        with pytest.raises(ArgumentError, match="memory_budget_mb"):
            Pose(engine2d, memory_budget_mb=budget)


def test_checkpoint_config_that_does_not_fit_its_weights(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[2][0], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "llm": {**cfg["llm"], "hidden_size": 32}}))
    with pytest.raises(CheckpointError, match="weights do not match config.json.*size mismatch"):
        Pose(ckpt, backend="torch")
    (ckpt / "config.json").write_text(json.dumps({**cfg, "protocol_version": "locllm-v0"}))
    with pytest.raises(CheckpointError, match="protocol_version 'locllm-v0'"):
        Pose(ckpt, backend="torch")


def test_malformed_coco_files(pose, tmp_path):
    from locllm_sdk import DataError
    from locllm_sdk.predict import predict_coco

    gt = tmp_path / "gt.json"
    for content, what in (
        ("{oops", "not valid JSON"),
        ("[]", "JSON object, got list"),
        (json.dumps({"images": [], "categories": []}), "no 'annotations' list"),
        (
            json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1}], "categories": [{"keypoints": []}]}),
            "bbox",
        ),
    ):
        gt.write_text(content)
        with pytest.raises(DataError, match=what):
            predict_coco(pose, gt)
    with pytest.raises(DataError, match="not found"):
        predict_coco(pose, tmp_path / "missing.json")


def test_checkpoint_image_size_that_does_not_fit_num_patches(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained[2][0], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "image_size": 2 * cfg["image_size"]}))
    with pytest.raises(CheckpointError, match="num_patches .* does not fit image_size"):
        Pose(ckpt, backend="torch")
