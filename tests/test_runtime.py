"""Pose.locate end to end: ONNX Runtime engine vs the PyTorch reference, decoding modes,
batching invariance, and clear errors on bad input."""

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from locllm_sdk import BoxError, EngineError, ImageError, Pose, UnknownKeypointError
from locllm_sdk.pipeline import crop_bytes, row_bytes, row_chunks

KEYPOINTS = ["nose", "left eye", "right shoulder", "left wrist", "right hip", "neck", "pelvis", "left ankle"]


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = int(rng.integers(120, 320)), int(rng.integers(120, 320))
        base = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
        out.append(base)
    return out


def boxes_for(img, rng, n):
    h, w = img.shape[:2]
    out = []
    for _ in range(n):
        bw, bh = rng.uniform(0.3, 1.0) * w, rng.uniform(0.3, 1.0) * h
        out.append([rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh])
    return out


@pytest.fixture(scope="module")
def poses(trained):
    return {
        dims: {
            "ort": Pose(engine),
            "torch": Pose(ckpt, backend="torch"),
            "ort_free": Pose(engine, decoding="free"),
        }
        for dims, (ckpt, engine) in trained.items()
    }


@pytest.mark.parametrize("dims", [2, 3])
def test_onnxruntime_matches_torch(poses, dims):
    rng = np.random.default_rng(dims)
    pairs, distinct = 0, set()
    max_score_diff = 0.0
    for img in images(4, seed=dims):
        boxes = boxes_for(img, rng, 2)
        a = poses[dims]["ort"].locate(img, KEYPOINTS, boxes)
        b = poses[dims]["torch"].locate(img, KEYPOINTS, boxes)
        assert a.info["backend"] == "onnxruntime" and b.info["backend"] == "torch"
        for pa, pb in zip(a, b):
            for ka, kb in zip(pa, pb):
                assert ka.answer == kb.answer
                assert (ka.x, ka.y, ka.z) == (kb.x, kb.y, kb.z)
                max_score_diff = max(max_score_diff, abs(ka.score - kb.score))
                pairs += 1
                distinct.add(ka.answer)
    assert pairs >= 64
    assert max_score_diff <= 1e-4
    assert len(distinct) >= 3, "the test model answers everything alike: parity would be vacuous"


@pytest.mark.parametrize("dims", [2, 3])
def test_constrained_answers_are_well_formed(poses, dims):
    pattern = r"\[0\.\d{3},0\.\d{3}\]" if dims == 2 else r"\[0\.\d{3},0\.\d{3},0\.\d{6}\]"
    for img in images(3, seed=10 + dims):
        res = poses[dims]["ort"].locate(img, KEYPOINTS)
        assert res.info["decoder_passes"] == (6 if dims == 2 else 12)
        for kp in res[0]:
            assert __import__("re").fullmatch(pattern, kp.answer), kp.answer
            assert 0.0 < kp.score <= 1.0


@pytest.mark.parametrize("dims", [2, 3])
def test_free_agrees_with_constrained_where_well_formed(poses, dims):
    agreed = 0
    for img in images(4, seed=20 + dims):
        c = poses[dims]["ort"].locate(img, KEYPOINTS)
        f = poses[dims]["ort_free"].locate(img, KEYPOINTS)
        for kc, kf in zip(c[0], f[0]):
            n_numbers = kf.answer.count(".")
            if kf.answer.startswith("[") and kf.answer.endswith("]") and n_numbers == dims:
                assert kf.answer == kc.answer
                assert (kf.x, kf.y) == (kc.x, kc.y)
                assert kf.score == pytest.approx(kc.score, abs=1e-6)  # passes chunk tokens differently
                agreed += 1
    assert agreed >= 5, "too few well-formed free answers to compare"


def test_free_decoding_malformed_answer_official_zeros(tiny_checkpoint):
    """An untrained model babbles: free decoding keeps x = y = 0 in crop space (then
    back-projected to the image, as the official code does) and score 0."""
    from locllm_sdk.crop import crop_geometry, to_image_coords

    pose = Pose(tiny_checkpoint, backend="torch", decoding="free")
    img = images(1, seed=41)[0]
    box = [10.0, 20.0, 60.0, 90.0]
    res = pose.locate(img, ["nose", "neck"], boxes=[box])
    origin = to_image_coords(np.zeros((1, 2)), crop_geometry(box, img.shape[:2], 224).inverse)[0]
    for kp in res[0]:
        assert "0." not in kp.answer, kp.answer
        assert kp.score == 0.0
        assert (kp.x, kp.y) == pytest.approx(tuple(origin))
    assert origin[0] < box[0]  # the square crop pads the narrow box: (0, 0) lies left of it
    # flip: two malformed answers average to nothing; the plain one's zeros stand (a naive
    # mean with the mirrored crop's zeros would land mid-crop)
    for kp in pose.locate(img, ["nose", "neck"], boxes=[box], flip=True)[0]:
        assert "0." not in kp.answer and "0." not in kp.flip_answer and kp.flip_answer
        assert kp.score == 0.0
        assert (kp.x, kp.y) == pytest.approx(tuple(origin))


def test_batching_invariance(poses):
    pose = poses[2]["ort"]
    rng = np.random.default_rng(5)
    img = images(1, seed=50)[0]
    boxes = boxes_for(img, rng, 3)
    together = pose.locate(img, KEYPOINTS, boxes)
    for i, box in enumerate(boxes):
        alone = pose.locate(img, KEYPOINTS, [box])
        assert [k.answer for k in alone[0]] == [k.answer for k in together[i]]
        for name in KEYPOINTS:
            one = pose.locate(img, [name], [box])
            assert one[0][name].answer == together[i][name].answer
            assert one[0][name].x == together[i][name].x
            assert one[0][name].score == pytest.approx(together[i][name].score, abs=1e-5)


def test_results_object(poses):
    res = poses[3]["ort"].locate(images(1)[0], ["nose", "neck"], boxes=[[0, 0, 100, 100], [20, 20, 80, 90]])
    arr = res.numpy()
    assert arr.shape == (2, 2, 4)
    d = json.loads(res.to_json())
    assert d["keypoint_names"] == ["nose", "neck"] and len(d["persons"]) == 2
    assert d["persons"][0]["keypoints"][0]["z"] == res[0]["nose"].z
    assert res[1].score == pytest.approx(np.mean([k.score for k in res[1]]))


def test_custom_description_and_skeleton(poses):
    pose = poses[2]["ort"]
    img = images(1)[0]
    res = pose.locate(img, {"nose": None, "chin": "The chin is the lowest point of the face, below the mouth."})
    assert [k.name for k in res[0]] == ["nose", "chin"]
    assert len(pose.locate(img, "coco17")[0]) == 17


def test_mirror_request():
    from locllm_sdk.descriptions import DescriptionLibrary, KeypointRequest, mirror_text

    lib = DescriptionLibrary.load()
    left = KeypointRequest("left wrist", lib.descriptions["left wrist"])
    assert lib.mirror(left) == KeypointRequest("right wrist", lib.descriptions["right wrist"])
    assert lib.mirror(lib.mirror(left)) == left
    neck = KeypointRequest("neck", lib.descriptions["neck"])
    assert lib.mirror(neck) == neck
    # a caller's own text is mirrored word by word (not replaced by the library's sentence)
    own = KeypointRequest("left wrist", "The left wrist is near the Left hip, not the rightmost point.")
    mirrored = "The right wrist is near the Right hip, not the rightmost point."
    assert lib.mirror(own) == KeypointRequest("right wrist", mirrored)
    assert mirror_text("LEFT-right leftover") == "RIGHT-left leftover"


@pytest.mark.parametrize("dims", [2, 3])
def test_flip_averages_the_plain_and_the_mirrored_crop(poses, dims, monkeypatch):
    """flip=True against two independent plain runs: one on the crop, one on the mirrored
    crop asking for the mirrored keypoints (the crop is pinned so both runs see exactly it)."""
    from locllm_sdk import crop as cropping
    from locllm_sdk.descriptions import mirror_text

    pose = poses[dims]["ort"]
    s = pose.spec.image_size
    crop = np.random.default_rng(9).integers(0, 255, (s, s, 3)).astype(np.uint8)
    img, box = images(1, seed=9)[0], [10.0, 12.0, 90.0, 100.0]
    names = ["left wrist", "nose", "right hip", "left shoulder"]  # not closed under mirroring
    monkeypatch.setattr(cropping, "warp", lambda image, g: crop)
    flipped = pose.locate(img, names, [box], flip=True)[0]
    plain = pose.locate(img, names, [box])[0]
    monkeypatch.setattr(cropping, "warp", lambda image, g: np.ascontiguousarray(crop[:, ::-1]))
    mirrored = pose.locate(img, [mirror_text(n) for n in names], [box])[0]
    inv = cropping.crop_geometry(box, img.shape[:2], s).inverse  # no rotation: x = a * u + b
    a, b = inv[0, 0], inv[0, 2]
    assert inv[0, 1] == 0 and inv[1, 0] == 0
    moved = 0
    for n in names:
        f, p, m = flipped[n], plain[n], mirrored[mirror_text(n)]
        assert f.answer == p.answer and f.flip_answer == m.answer and f.flip_answer
        u_m = (m.x - b) / a  # the mirrored crop's column -> the plain crop's column s - 1 - u
        assert f.x == pytest.approx((p.x + a * (s - 1 - u_m) + b) / 2, abs=1e-6)
        assert f.y == pytest.approx((p.y + m.y) / 2, abs=1e-6)
        assert f.score == pytest.approx((p.score + m.score) / 2, abs=1e-6)
        if dims == 3:
            assert f.z == pytest.approx((p.z + m.z) / 2, abs=1e-6)
        moved += f.x != p.x
    assert moved, "flip changed no coordinate: the test model would not show a wrong averaging"
    assert json.loads(pose.locate(img, names, [box], flip=True).to_json())["info"]["flip"] is True


def test_bad_inputs(poses, tmp_path):
    pose = poses[2]["ort"]
    img = images(1)[0]
    with pytest.raises(UnknownKeypointError, match="unknown keypoint 'tail tip'"):
        pose.locate(img, ["nose", "tail tip"])
    with pytest.raises(ValueError, match="no keypoints"):
        pose.locate(img, [])
    with pytest.raises(ImageError, match="not found"):
        pose.locate(tmp_path / "missing.jpg", ["nose"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot decode"):
        pose.locate(bad, ["nose"])
    with pytest.raises(ImageError, match="uint8"):
        pose.locate(img.astype(np.float32), ["nose"])
    with pytest.raises(ImageError, match="HxWx3"):
        pose.locate(img[:, :, 0], ["nose"])
    with pytest.raises(BoxError, match="degenerate"):
        pose.locate(img, ["nose"], boxes=[[10, 10, 0, 20]])
    with pytest.raises(BoxError, match="outside"):
        pose.locate(img, ["nose"], boxes=[[5000, 10, 20, 20]])
    # no box is no person: an empty result, not an error (a frame where a detector found nobody)
    empty = pose.locate(img, ["nose"], boxes=[])
    assert len(empty) == 0 and empty.numpy().shape == (0, 1, 3) and empty.info["decoder_passes"] == 0


def test_engine_dir_errors(trained, tmp_path):
    import shutil

    _, engine = trained[2]
    with pytest.raises(EngineError, match="not found"):
        Pose(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(engine, broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(EngineError, match="manifest.json is missing"):
        Pose(broken)
    # corrupt one byte of the decoder: checksum
    corrupt = tmp_path / "corrupt"
    shutil.copytree(engine, corrupt)
    data = bytearray((corrupt / "decoder.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / "decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(EngineError, match="sha256"):
        Pose(corrupt)
    # missing file
    missing = tmp_path / "missing"
    shutil.copytree(engine, missing)
    (missing / "vision.onnx").unlink()
    with pytest.raises(EngineError, match="vision.onnx is missing"):
        Pose(missing)
    # unknown format version
    future = tmp_path / "future"
    shutil.copytree(engine, future)
    m = json.loads((future / "manifest.json").read_text())
    m["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="format_version 99 is not supported"):
        Pose(future)


def test_runtime_does_not_import_torch(trained):
    _, engine = trained[2]
    code = (
        "import sys, numpy as np\n"
        "import locllm_sdk\n"
        f"p = locllm_sdk.Pose({str(engine)!r}, backend='onnxruntime')\n"
        "r = p.locate(np.zeros((64, 48, 3), np.uint8), ['nose', 'neck'])\n"
        "assert len(r[0]) == 2\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'locllm_training')]\n"
        "print('IMPORTED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert out.returncode == 0, out.stdout + out.stderr


def _env():
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "sdk"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.parametrize("decoding", ["constrained", "free"])
def test_chunked_decoding_gives_the_same_answers(trained, decoding):
    """A tiny KV budget splits the rows into many chunks: the answers must not change."""
    _, engine = trained[2]
    whole = Pose(engine, decoding=decoding)
    chunked = Pose(engine, decoding=decoding, memory_budget_mb=0.05)
    rng = np.random.default_rng(9)
    img = images(1, seed=60)[0]
    boxes = boxes_for(img, rng, 3)
    chunks = row_chunks(
        chunked.spec, chunked.backend, 3, len(KEYPOINTS), 60, len(chunked.spec.prefix_ids), decoding, 0.05
    )
    assert len(chunks) > 2
    a, b = whole.locate(img, KEYPOINTS, boxes), chunked.locate(img, KEYPOINTS, boxes)
    assert [[k.answer for k in p] for p in a] == [[k.answer for k in p] for p in b]
    assert np.allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_crop_layout():
    from locllm_sdk.decoding import crop_layout

    crops, r = crop_layout(np.repeat([0, 1, 2], 4))
    assert crops.tolist() == [0, 1, 2] and r == 4
    crops, r = crop_layout(np.array([2, 2, 5, 5]))
    assert crops.tolist() == [2, 5] and r == 2
    assert crop_layout(np.array([0, 0, 1])) is None  # unequal runs
    assert crop_layout(np.array([0, 1, 0, 1])) is None  # a crop in two runs


@pytest.mark.parametrize("dims", [2, 3])
def test_cascade_attention_matches_copied_prefix(trained, dims):
    """Cascade attention (prefix KV once per crop) gives the answers of the copy path, for
    Pose's crop-by-crop layout, a subset of crops and an arbitrary row -> crop mapping."""
    from locllm_sdk.decoding import constrained_decode, free_decode, prefill_prefix

    _, engine = trained[dims]
    pose = Pose(engine)
    backend, spec = pose.backend, pose.spec
    assert backend.supports_shared_prefix
    tok = spec.tokenizer
    rng = np.random.default_rng(dims)
    img = images(1, seed=70 + dims)[0]
    from locllm_sdk import crop as cropping

    geoms = [cropping.crop_geometry(b, img.shape[:2], spec.image_size) for b in boxes_for(img, rng, 3)]
    pixels = cropping.normalize(np.stack([cropping.warp(img, g) for g in geoms]), spec.norm_mean, spec.norm_std)
    prefix = prefill_prefix(backend, spec.prefix_ids, tok.spec.im_patch_id, backend.encode_images(pixels))
    reqs = pose.library.resolve(KEYPOINTS[:5])
    for crop_of_row in (np.repeat([0, 1, 2], 5), np.repeat([2, 1], 5), np.array([0, 2, 1, 0, 1, 2, 2])):
        suffixes = [tok.round_ids(reqs[i % 5].name, reqs[i % 5].description) for i in range(len(crop_of_row))]
        args = (backend, prefix, len(spec.prefix_ids), crop_of_row, suffixes)
        a, _ = constrained_decode(*args, spec.grammar, tok, shared=True)
        b, _ = constrained_decode(*args, spec.grammar, tok, shared=False)
        assert [x.text for x in a] == [x.text for x in b]
        assert np.allclose([x.score for x in a], [x.score for x in b], atol=1e-5)
        f1, _ = free_decode(*args, crop_of_row, 13 if dims == 2 else 22, dims, tok, shared=True)
        f2, _ = free_decode(*args, crop_of_row, 13 if dims == 2 else 22, dims, tok, shared=False)
        assert [x.text for x in f1] == [x.text for x in f2]
    assert len({x.text for x in a}) >= 2  # not a vacuous comparison


def test_split_common_head():
    from locllm_sdk.decoding import split_common_head

    assert split_common_head([[1, 2, 3, 9], [1, 2, 4]]) == ([1, 2], [[3, 9], [4]])
    assert split_common_head([[1, 2], [1, 2]]) == ([1], [[2], [2]])  # a tail keeps one token
    assert split_common_head([[5, 6, 7]]) == ([5, 6], [[7]])
    assert split_common_head([[1, 2], [3, 2]]) == ([], [[1, 2], [3, 2]])


@pytest.mark.parametrize("dims", [2, 3])
def test_common_head_in_the_prefix_gives_the_same_answers(trained, dims):
    """Prefilling the rounds' common first tokens once per crop with the prefix (as Pose
    does) answers exactly as feeding every row its whole round."""
    from locllm_sdk import crop as cropping
    from locllm_sdk.decoding import constrained_decode, free_decode, prefill_prefix, split_common_head

    _, engine = trained[dims]
    pose = Pose(engine)
    backend, spec, tok = pose.backend, pose.spec, pose.spec.tokenizer
    img = images(1, seed=80 + dims)[0]
    geoms = [
        cropping.crop_geometry(b, img.shape[:2], spec.image_size) for b in boxes_for(img, np.random.default_rng(0), 2)
    ]
    pixels = cropping.normalize(np.stack([cropping.warp(img, g) for g in geoms]), spec.norm_mean, spec.norm_std)
    image_tokens = backend.encode_images(pixels)
    reqs = pose.library.resolve(KEYPOINTS)
    whole = [tok.round_ids(r.name, r.description) for r in reqs]
    head, tails = split_common_head(whole)
    assert len(head) >= 3  # "Keypoint: The" at least
    crop_of_row = np.repeat([0, 1], len(reqs))
    plain = prefill_prefix(backend, spec.prefix_ids, tok.spec.im_patch_id, image_tokens)
    folded = prefill_prefix(backend, list(spec.prefix_ids) + head, tok.spec.im_patch_id, image_tokens)
    a, _ = constrained_decode(backend, plain, len(spec.prefix_ids), crop_of_row, whole * 2, spec.grammar, tok)
    b, _ = constrained_decode(
        backend, folded, len(spec.prefix_ids) + len(head), crop_of_row, tails * 2, spec.grammar, tok
    )
    assert [x.text for x in a] == [x.text for x in b]
    assert np.allclose([x.score for x in a], [x.score for x in b], atol=1e-5)
    assert len({x.text for x in a}) >= 3  # not a vacuous comparison
    n_new = 13 if dims == 2 else 22
    f1, _ = free_decode(backend, plain, len(spec.prefix_ids), crop_of_row, whole * 2, crop_of_row, n_new, dims, tok)
    f2, _ = free_decode(
        backend, folded, len(spec.prefix_ids) + len(head), crop_of_row, tails * 2, crop_of_row, n_new, dims, tok
    )
    assert [x.text for x in f1] == [x.text for x in f2]


def test_kv_budget_counts_only_row_tokens_with_cascade(trained):
    _, engine = trained[2]
    pose = Pose(engine)
    prefix_len = len(pose.spec.prefix_ids)
    per_row = row_bytes(pose.spec, pose.backend, 60 + len(pose.spec.grammar.slots), prefix_len)
    # per-row bytes exclude the (shared) prefix's KV: only a copy-path backend holds a copy per row
    copying = SimpleNamespace(supports_shared_prefix=False)
    extra = row_bytes(pose.spec, copying, 60 + len(pose.spec.grammar.slots), prefix_len) - per_row
    assert extra == 2 * pose.spec.kv_bytes_per_token * prefix_len
    # the budget: the 4 crops' own working set + room for the rows of 2.5 persons
    rows_room = 2.5 * len(KEYPOINTS) * per_row
    budget = (4 * crop_bytes(pose.spec, prefix_len) + rows_room) / 2**20
    chunks = row_chunks(pose.spec, pose.backend, 4, len(KEYPOINTS), 60, prefix_len, "constrained", budget)
    # whole persons per chunk
    assert all(len(c) % len(KEYPOINTS) == 0 for c in chunks) and len(chunks) == 2
    assert max(map(len, chunks)) <= rows_room / per_row


@pytest.mark.parametrize("decoding", ["constrained", "free"])
def test_io_binding_gives_the_plain_answers(trained, decoding):
    """With IO binding (the CUDA default) the KV cache stays in ONNX Runtime's memory as
    OrtValues from pass to pass; on the CPU the same path must give the very same answers."""
    from locllm_sdk.backends.onnxruntime import OnnxRuntimeBackend
    from locllm_sdk.pipeline import locate_in_image

    _, engine = trained[2]
    plain = Pose(engine)
    bound = OnnxRuntimeBackend(plain.path, plain.manifest, io_binding=True)
    assert bound.io_binding and not plain.backend.io_binding
    rng = np.random.default_rng(11)
    img = images(1, seed=61)[0]
    boxes = boxes_for(img, rng, 3)
    requests = plain.library.resolve(KEYPOINTS)
    a = locate_in_image(plain.backend, plain.spec, img, boxes, requests, decoding)
    b = locate_in_image(bound, plain.spec, img, boxes, requests, decoding)
    assert a.texts == b.texts
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.values, b.values)
