"""The grouped protocol (locllm-grouped-v1): body-part rounds whose answer lists the group's
joints in order. Its grammar accepts exactly its answers (property-style over random answers
and random corruptions), the per-keypoint protocol is untouched, and a format-taught tiny
grouped checkpoint answers per joint through the one pipeline, identically on ONNX Runtime
and torch, with one row per group."""

import json
import re

import numpy as np
import pytest
from locllm_sdk import KeypointError, Pose
from locllm_sdk.backends import gpu_logic
from locllm_sdk.descriptions import bundled_library, coco17
from locllm_sdk.errors import BackendUnavailable, CheckpointError, EngineError
from locllm_sdk.protocol import (
    GROUPED_PROTOCOL_VERSION,
    JOINT_GROUPS,
    PROTOCOL_VERSION,
    JointGroup,
    PromptTokenizer,
    build_grammar,
    build_group_grammar,
    format_answer,
    format_group_answer,
    parse_group_answer,
    plan_groups,
)

SYNTHPOSE_JOINTS = [*coco17().keypoints, "neck", "pelvis", "head_top", "thorax", "torso"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from locllm_training.tokenizer_files import write_tokenizer

    return PromptTokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


def _answer_tokens(tok: PromptTokenizer, text: str) -> list[int]:
    """The tokens a grouped round's answer ``text`` is trained as (EOS included)."""
    group = JOINT_GROUPS[2]
    descriptions = ["x"] * len(group.joints)
    head = tok.group_round_ids(group, descriptions)
    full = tok.group_round_ids(group, descriptions, answer=text)
    assert full[: len(head)] == head
    return full[len(head) :]


def _random_values(rng, dims: int, joints: int) -> list[list[float]]:
    out = []
    for _ in range(joints):
        v = list(rng.integers(0, 1000, dims) / 1000.0)
        if dims == 3:
            v[2] = int(rng.integers(0, 10**6)) / 1e6
        out.append(v)
    return out


def _digits(text: str) -> list[int]:
    """The digits after each "0." of an answer text, in order."""
    return [int(c) for number in re.findall(r"0\.(\d+)", text) for c in number]


# ------------------------------------------------------------------------------------------
# the groups and the prompt


def test_groups_partition_the_synthpose_joints():
    joints = [j for g in JOINT_GROUPS for j in g.joints]
    assert sorted(joints) == sorted(SYNTHPOSE_JOINTS)  # each joint in exactly one group
    assert all(j in bundled_library().descriptions for j in joints)


def test_plan_covers_the_asked_joints_in_group_order():
    names = ["left wrist", "nose", "left shoulder", "right ankle"]
    plan = plan_groups(names, JOINT_GROUPS)
    assert [g.name for g, _ in plan] == [g.name for g in JOINT_GROUPS if set(g.joints) & set(names)]
    for group, members in plan:
        for i, position in members:
            assert group.joints[position] == names[i]
    assert sorted(i for _, m in plan for i, _ in m) == list(range(len(names)))
    with pytest.raises(KeypointError, match="'chin' is in none of this grouped model's body-part groups"):
        plan_groups(["nose", "chin"], JOINT_GROUPS)


def test_group_round_ids_are_the_full_text_tokenised(tokenizer):
    """prefix + grouped round (+ answer) == the whole text tokenised at once, as the
    one-keypoint rounds are (so training and serving see the same ids)."""
    from locllm_sdk.protocol import IMAGE_PATCH_TOKEN, group_round_text, image_text

    lib = bundled_library()
    for group in JOINT_GROUPS:
        descriptions = [lib.descriptions[j] for j in group.joints]
        answer = format_group_answer([[0.1 * (k + 1), 0.05 * (k + 2)] for k in range(len(group.joints))])
        text = image_text(16) + group_round_text(group, descriptions, answer)
        assert tokenizer.prefix_ids(16) + tokenizer.group_round_ids(group, descriptions, answer) == tokenizer.encode(
            text
        )
        assert IMAGE_PATCH_TOKEN not in group_round_text(group, descriptions)


def test_grouped_text_refuses_control_tokens(tokenizer):
    from locllm_sdk.errors import ProtocolError

    with pytest.raises(ProtocolError, match="the description of 'left elbow' contains </s>"):
        tokenizer.group_round_ids(JOINT_GROUPS[2], ["a", "b </s>", "c"])


# ------------------------------------------------------------------------------------------
# the grammar accepts exactly its answers


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("joints", [1, 2, 3, 4])
def test_group_grammar_accepts_every_answer(tokenizer, dims, joints):
    g = build_group_grammar(tokenizer, dims, joints)
    single = build_grammar(tokenizer, dims)
    assert g.joints == joints and len(g.slots) == joints * len(single.slots)
    assert len(g.free_positions) == joints * len(single.free_positions)
    regex = re.compile(gpu_logic.answer_regex(g, lambda t: gpu_logic.piece_text(tokenizer.piece(t))))
    rng = np.random.default_rng(10 * dims + joints)
    answers = [
        format_group_answer([[0.0] * dims] * joints),
        format_group_answer([[0.999, 0.999, 0.999999][:dims]] * joints),
    ]
    answers += [format_group_answer(_random_values(rng, dims, joints)) for _ in range(150)]
    for text in answers:
        tokens = _answer_tokens(tokenizer, text)
        digits = g.digits_of(tokens)
        assert digits == _digits(text), text
        assert g.fill(digits) == tokens  # the grammar writes exactly the trained tokens
        assert tokenizer.decode(tokens) == text
        assert regex.fullmatch(" " + text), text  # generated text starts with the space of "▁["


def _corruptions(text: str, dims: int, joints: int, rng) -> list[tuple[str, str]]:
    """Near misses of a well-formed group answer ``text``, each with what is wrong."""
    parts = text.split(" ")
    numbers = list(re.finditer(r"0\.\d+", text))
    k = numbers[int(rng.integers(len(numbers)))]
    other = format_answer(_random_values(rng, dims, 1)[0])
    out = [
        ("one joint too many", text + " " + other),
        ("no separator", "".join(parts)),
        ("comma separator", ",".join(parts)),
        ("extra digit", text[: k.end()] + str(int(rng.integers(10))) + text[k.end() :]),
        ("missing digit", text[: k.end() - 1] + text[k.end() :]),
        ("integer part 1", text[: k.start()] + "1" + text[k.start() + 1 :]),
        ("missing bracket", text[:-1]),
        ("double space", text.replace(" ", "  ", 1) if joints > 1 else " " + text),
    ]
    if joints > 1:
        out.append(("one joint too few", " ".join(parts[:-1])))
    return out


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("joints", [2, 3, 4])
def test_group_grammar_rejects_malformed_answers(tokenizer, dims, joints):
    g = build_group_grammar(tokenizer, dims, joints)
    regex = re.compile(gpu_logic.answer_regex(g, lambda t: gpu_logic.piece_text(tokenizer.piece(t))))
    rng = np.random.default_rng(100 + 10 * dims + joints)
    rejected = 0
    for _ in range(40):
        text = format_group_answer(_random_values(rng, dims, joints))
        for what, bad in _corruptions(text, dims, joints, rng):
            assert g.digits_of(_answer_tokens(tokenizer, bad)) is None, (what, bad)
            assert regex.fullmatch(" " + bad) is None, (what, bad)
            rejected += 1
        # token-level: a non-digit in a free slot, another token in a forced slot
        tokens = _answer_tokens(tokenizer, text)
        free = g.free_positions
        forced = [i for i in range(len(g.slots)) if i not in free]
        at_forced = forced[int(rng.integers(len(forced)))]
        for pos, replacement in (
            (free[int(rng.integers(len(free)))], g.slots[forced[0]]),
            (at_forced, [d for d in g.digit_ids if d != tokens[at_forced]][int(rng.integers(9))]),
        ):
            bad = list(tokens)
            bad[pos] = replacement
            assert g.digits_of(bad) is None
        # another digit in a free slot is another answer, accepted with that digit
        pos = int(rng.integers(len(free)))
        changed = list(tokens)
        new_digit = (g.digit_ids.index(tokens[free[pos]]) + 1) % 10
        changed[free[pos]] = g.digit_ids[new_digit]
        assert g.digits_of(changed)[pos] == new_digit
    assert rejected >= 40 * 8


def test_group_grammar_round_trips_and_keeps_the_one_keypoint_dict(tokenizer):
    from locllm_sdk.protocol import AnswerGrammar

    single = build_grammar(tokenizer, 2)
    assert "joints" not in single.to_dict()  # existing manifests' answer_grammar unchanged
    g = build_group_grammar(tokenizer, 2, 3)
    assert AnswerGrammar.from_dict(g.to_dict()) == g and g.to_dict()["joints"] == 3
    assert build_group_grammar(tokenizer, 2, 1) == single


def test_parse_group_answer_scores_each_number_at_its_own_tokens(tokenizer):
    g = build_group_grammar(tokenizer, 2, 3)
    digits = [1, 2, 3, 4, 5, 6] * 3  # three joints with the same numbers
    ids = g.fill(digits)
    conf = np.arange(1.0, len(g.slots) + 1.0)  # a distinct confidence per answer token
    parsed = parse_group_answer(tokenizer.decode(ids), tokenizer.char_confidence(ids, conf), 2, 3)
    assert parsed.values == (0.123, 0.456) * 3 and parsed.numbers_found == 6
    for k, (a, b) in enumerate(g.number_spans):
        assert parsed.scores[k] == pytest.approx(conf[a:b].mean())
    assert len(set(parsed.scores)) == 6  # repeated numbers are not scored at the first one
    part = parsed.part(1, 2)
    assert part.values == (0.123, 0.456) and part.scores == parsed.scores[2:4] and part.complete
    short = parse_group_answer("[0.5,0.25] [0.75", np.ones(16), 2, 3)
    assert short.values == (0.5, 0.25, 0.75, 0.0, 0.0, 0.0) and short.numbers_found == 3
    assert short.part(1, 2).numbers_found == 1 and not short.part(1, 2).complete
    assert short.part(2, 2).scores == (0.0, 0.0)


# ------------------------------------------------------------------------------------------
# a grouped model end to end


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    """A tiny checkpoint format-taught the grouped protocol, and its ONNX engine."""
    from locllm_export.build import build_onnx_engine
    from locllm_training.init import init_checkpoint

    root = tmp_path_factory.mktemp("grouped")
    ckpt = init_checkpoint(
        "tiny", root / "ckpt", seed=5, image_size=56, teach_format_steps=200, protocol=GROUPED_PROTOCOL_VERSION
    )
    build_onnx_engine(ckpt, root / "engine")
    return ckpt, root / "engine"


@pytest.fixture(scope="module")
def poses(grouped):
    ckpt, engine = grouped
    return {"ort": Pose(engine), "torch": Pose(ckpt, backend="torch"), "free": Pose(engine, decoding="free")}


def _scene(seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (int(rng.integers(120, 300)), int(rng.integers(120, 300)), 3)).astype(np.uint8)
    h, w = img.shape[:2]
    boxes = [[rng.uniform(0, w / 3), rng.uniform(0, h / 3), w / 2, h / 2] for _ in range(2)]
    return img, boxes


def test_protocol_is_recorded_in_config_and_manifest(grouped):
    ckpt, engine = grouped
    assert json.loads((ckpt / "config.json").read_text())["protocol_version"] == GROUPED_PROTOCOL_VERSION
    manifest = json.loads((engine / "manifest.json").read_text())
    assert manifest["protocol_version"] == GROUPED_PROTOCOL_VERSION
    assert manifest["tokenizer"]["answer_grammar"] == build_grammar(PromptTokenizer.from_dir(ckpt), 2).to_dict()


def test_onnxruntime_matches_torch_on_a_grouped_model(poses):
    distinct, pairs, worst = set(), 0, 0.0
    for seed in range(3):
        img, boxes = _scene(seed)
        a = poses["ort"].locate(img, SYNTHPOSE_JOINTS, boxes)
        b = poses["torch"].locate(img, SYNTHPOSE_JOINTS, boxes)
        for pa, pb in zip(a, b, strict=True):
            for ka, kb in zip(pa, pb, strict=True):
                assert ka.answer == kb.answer and (ka.x, ka.y) == (kb.x, kb.y)
                worst = max(worst, abs(ka.score - kb.score))
                distinct.add(ka.answer)
                pairs += 1
    assert pairs == 3 * 2 * len(SYNTHPOSE_JOINTS) and worst <= 1e-4
    assert len(distinct) >= 3, "the test model answers everything alike: parity would be vacuous"


def test_results_are_per_joint_from_one_row_per_group(poses):
    from locllm_sdk.pipeline import locate_in_image

    pose = poses["ort"]
    img, boxes = _scene(7)
    asked = ["left_wrist", "nose", "left shoulder", "right ankle", "left eye"]
    res = pose.locate(img, asked, boxes)
    assert res.keypoint_names == [n.replace("_", " ") for n in asked]  # the order asked, as always
    requests = pose.library.resolve(asked)
    run = locate_in_image(pose.backend, pose.spec, img, boxes, requests)
    plan = plan_groups([r.name for r in requests], JOINT_GROUPS)
    assert run.stats.rows == len(boxes) * len(plan) == 2 * 3  # face, left arm, right leg
    assert run.stats.decoder_passes == 6 * 3  # one 3-joint answer: 18 free digits
    full = pose.locate(img, SYNTHPOSE_JOINTS, boxes)
    for person, whole in zip(res, full, strict=True):
        for kp in person:
            group = next(g for g in JOINT_GROUPS if kp.name in g.joints)
            # the joint's numbers are its part of its group's answer
            numbers = [float(v) for v in re.findall(r"0\.\d+", kp.answer)]
            assert len(numbers) == 2 * len(group.joints)
            # the same group row whatever else is asked
            assert whole[kp.name].answer == kp.answer
            assert (whole[kp.name].x, whole[kp.name].y) == (kp.x, kp.y)
        # joints of one group share one answer; of two groups, two answers
        assert person["left wrist"].answer == person["left shoulder"].answer
        assert person["nose"].answer == person["left eye"].answer != person["left wrist"].answer


def test_joint_values_are_their_part_of_the_group_answer(poses):
    from locllm_sdk import crop as cropping

    pose = poses["ort"]
    img, boxes = _scene(11)
    res = pose.locate(img, "coco17", boxes)
    for person, box in zip(res, boxes, strict=True):
        geom = cropping.crop_geometry(box, img.shape[:2], pose.spec.image_size)
        for kp in person:
            group = next(g for g in JOINT_GROUPS if kp.name in g.joints)
            p = group.joints.index(kp.name)
            x, y = (float(v) for v in re.findall(r"0\.\d+", kp.answer)[2 * p : 2 * p + 2])
            px = cropping.to_image_coords(np.array([[x, y]]) * pose.spec.image_size, geom.inverse)[0]
            assert (kp.x, kp.y) == pytest.approx(tuple(px))


@pytest.mark.parametrize("names", [list(coco17().keypoints), SYNTHPOSE_JOINTS])
def test_rows_and_passes_per_person(poses, names):
    from locllm_sdk.pipeline import locate_in_image

    pose = poses["ort"]
    img, boxes = _scene(3)
    run = locate_in_image(pose.backend, pose.spec, img, boxes[:1], pose.library.resolve(names))
    groups = [g for g in JOINT_GROUPS if set(g.joints) & set(names)]
    sizes = {len(g.joints) for g in groups}
    free_per_joint = len(pose.spec.grammar.free_positions)
    assert run.stats.rows == len(groups) < len(names)
    # each group size decodes its own rows: one pass per free digit of its answer
    assert run.stats.decoder_passes == sum(n * free_per_joint for n in sizes)


def test_flip_and_free_decoding_on_a_grouped_model(poses):
    img, boxes = _scene(5)
    plain = poses["ort"].locate(img, "coco17", boxes)
    flipped = poses["ort"].locate(img, "coco17", boxes, flip=True)
    assert flipped.numpy().shape == plain.numpy().shape
    for p, f in zip(plain, flipped, strict=True):
        for kp, kf in zip(p, f, strict=True):
            assert kf.answer == kp.answer and kf.flip_answer  # the plain crop's answer, and the mirrored one's
    free = poses["free"].locate(img, "coco17", boxes)
    same = 0
    for p, f in zip(plain, free, strict=True):
        for kp, kf in zip(p, f, strict=True):
            if kf.answer == kp.answer:  # a well-formed greedy answer is the constrained one
                assert (kf.x, kf.y) == (kp.x, kp.y) and kf.score == pytest.approx(kp.score, abs=1e-6)
                same += 1
    assert same >= len(plain) * 17 // 2, "free decoding rarely gave the grammar's answer: the check is vacuous"


def test_grouped_model_refuses_what_it_cannot_ask(poses):
    pose = poses["ort"]
    img, boxes = _scene(1)
    with pytest.raises(KeypointError, match="'chin' is in none of this grouped model's body-part groups"):
        pose.locate(img, {"nose": None, "chin": "The chin is the lowest point of the face."}, boxes)
    with pytest.raises(KeypointError, match="'left wrist': a grouped model asks its body parts with its own"):
        pose.locate(img, {"left wrist": "The left wrist is where the watch is."}, boxes)


def test_tensorrt_refuses_a_grouped_engine(grouped, monkeypatch):
    """The TensorRT backend decodes one-keypoint answers only: a grouped engine is refused
    before anything TensorRT is imported (backend="auto" then falls back)."""
    from locllm_sdk import loader
    from locllm_sdk.manifest import EngineManifest

    _, engine = grouped
    manifest = EngineManifest.read(engine)
    spec = loader.ModelSpec.from_manifest(engine, manifest)
    with pytest.raises(
        BackendUnavailable, match="decodes one-keypoint answers only, and this engine speaks the grouped protocol"
    ):
        loader._tensorrt_factory(engine, manifest, spec, None, 0)


def test_tensorrt_and_triton_builds_refuse_a_grouped_model(grouped):
    from locllm_export.tensorrt_plan import ModelFacts, PlanError
    from locllm_export.triton import RepositoryFacts
    from locllm_sdk.manifest import EngineManifest

    ckpt, engine = grouped
    with pytest.raises(PlanError, match="this model speaks the grouped protocol 'locllm-grouped-v1'"):
        ModelFacts.from_checkpoint(ckpt)
    with pytest.raises(EngineError, match="asks one keypoint per round .* this engine speaks 'locllm-grouped-v1'"):
        RepositoryFacts.from_manifest(engine, EngineManifest.read(engine))


@pytest.mark.slow
def test_cpp_runtime_refuses_a_grouped_engine(grouped, tmp_path):
    """The C++ runtime asks one keypoint per round: a grouped engine is an error naming its
    protocol, not wrong answers (the build folder is brought up to date with the sources)."""
    import shutil
    import subprocess

    import cv2

    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    from cpp_latency import ensure_built

    build = ensure_built()
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, stdout=subprocess.DEVNULL)
    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), _scene(0)[0])
    _, engine = grouped
    run = subprocess.run(
        [str(build / "locllm_cpp"), "locate", str(image), "-m", str(engine), "-k", "nose"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0
    assert "engine protocol 'locllm-grouped-v1' asks body-part groups" in run.stderr + run.stdout


def test_unknown_protocol_versions_are_refused(grouped, tmp_path):
    import shutil

    from locllm_sdk.loader import ModelSpec

    ckpt, engine = grouped
    cfg = json.loads((ckpt / "config.json").read_text())
    tok = PromptTokenizer.from_dir(ckpt)
    with pytest.raises(CheckpointError, match="protocol_version 'locllm-grouped-v0' is not a protocol"):
        ModelSpec.from_config({**cfg, "protocol_version": "locllm-grouped-v0"}, tok)
    assert ModelSpec.from_config({**cfg, "protocol_version": PROTOCOL_VERSION}, tok).groups == ()
    copy = tmp_path / "engine"
    shutil.copytree(engine, copy)
    m = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**m, "protocol_version": "locllm-v2"}))
    with pytest.raises(EngineError, match="protocol_version 'locllm-v2' is not a protocol this runtime knows"):
        Pose(copy)


def test_grouped_conversations(tmp_path):
    """Training rounds of the grouped protocol: one group per round, its joints in order,
    labels on the answers; a group with a held-out joint is never asked."""
    import random

    from locllm_training.data import ConversationConfig, ConversationDataset, PersonRecord
    from locllm_training.tokenizer_files import write_tokenizer

    tok = PromptTokenizer.from_dir(write_tokenizer(tmp_path / "tok"))
    rng = np.random.default_rng(0)
    image = tmp_path / "person.png"
    import cv2

    cv2.imwrite(str(image), rng.integers(0, 255, (120, 100, 3)).astype(np.uint8))
    joints = rng.uniform(20, 80, (len(SYNTHPOSE_JOINTS), 2))
    rec = PersonRecord(image, (10, 10, 80, 100), tuple(SYNTHPOSE_JOINTS), joints, np.ones(len(joints), bool))
    cfg = ConversationConfig(
        image_size=56, augment=False, exclude=("neck",), max_rounds=7, protocol=GROUPED_PROTOCOL_VERSION
    )
    ds = ConversationDataset([rec], tok, 16, cfg)
    crop, pts, names = ds.crop(rec, random.Random(0))
    rounds = ds.rounds_for(rec, pts, names, random.Random(0))
    asked = [r[0] for r in rounds]
    assert all(isinstance(g, JointGroup) for g in asked)
    assert sorted(g.name for g in asked) == sorted(g.name for g in JOINT_GROUPS if "neck" not in g.joints)
    for group, descriptions, values in rounds:
        assert descriptions == [ds.library.descriptions[j] for j in group.joints]
        for j, v in zip(group.joints, values, strict=True):
            assert v == pytest.approx(list(pts[names.index(j)] / 56))
    item = ds[0]
    labelled = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
    expected = []
    for _, _, values in rounds:
        clipped = [[min(max(x, 0.0), 0.999) for x in v] for v in values]
        expected += _answer_tokens(tok, format_group_answer(clipped))
    assert sorted(labelled) == sorted(expected)  # the rounds' answers and their </s>, nothing else
    assert labelled.count(tok.spec.eos_id) == item["rounds"] == len(rounds)


def test_train_protocol_names():
    from locllm_sdk.errors import ArgumentError
    from locllm_training.train import protocol_version_of

    assert protocol_version_of("grouped") == GROUPED_PROTOCOL_VERSION
    assert protocol_version_of("per-keypoint") == PROTOCOL_VERSION
    assert protocol_version_of(GROUPED_PROTOCOL_VERSION) == GROUPED_PROTOCOL_VERSION
    with pytest.raises(ArgumentError, match="protocol must be one of .* got 'by-limb'"):
        protocol_version_of("by-limb")


@pytest.mark.slow
def test_grouping_benchmark_runs_both_protocols_side_by_side(grouped, trained, tmp_path):
    """benchmarks/grouping.py on two tiny models and 3 rendered val images: scores every GT
    person with each model and reads rows and passes from the pipeline's own counts."""
    import subprocess
    import sys
    from pathlib import Path

    from grouping import main

    root = Path(__file__).resolve().parent.parent
    render = [sys.executable, str(root / "training" / "make_synthpose.py"), "--output", str(tmp_path / "val")]
    subprocess.run([*render, "--images", "3", "--seed", "7", "--split", "val"], check=True, capture_output=True)
    gt = tmp_path / "val" / "annotations" / "person_keypoints_val.json"
    out = tmp_path / "grouping.json"
    args = ["--per-keypoint", str(trained[2][0]), "--grouped", str(grouped[0]), "--gt", str(gt)]
    assert main([*args, "--latency-images", "1", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    doc = json.loads(gt.read_text())
    assert result["persons"] == sum(1 for a in doc["annotations"] if a.get("num_keypoints", 1) > 0)
    per, grp = result["per_keypoint"], result["grouped"]
    assert (per["protocol_version"], grp["protocol_version"]) == ("locllm-v1", GROUPED_PROTOCOL_VERSION)
    # one row per keypoint and 6 passes (2D) vs one row per group and 6 passes per joint of a group
    assert per["per_person"]["coco17"] == {"rows": 17, "decoder_passes": 6, "keypoints": 17}
    assert grp["per_person"]["coco17"] == {"rows": 6, "decoder_passes": 18, "keypoints": 17}
    assert grp["per_person"]["all_22"] == {"rows": 7, "decoder_passes": 18 + 24, "keypoints": 22}
    for model in (per, grp):
        assert 0.0 <= model["PCK@0.1"]["mean"] <= 1.0 and len(model["PCK@0.1"]["per_joint"]) == 22
        assert len(model["latency_ms_per_person"]["all"]) == 3 and len(model["latency_ms_per_person"]["coco17"]) == 1
