"""training/train.py on a few SynthPose images: loss falls, resume works, and the final
checkpoint serves through Pose with torch and ORT backends agreeing."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from locllm_sdk import Pose

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    for split, n, seed in (("train", 12, 1), ("val", 3, 2)):
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "training" / "make_synthpose.py"),
                "--output",
                str(out),
                "--images",
                str(n),
                "--seed",
                str(seed),
                "--split",
                split,
                "--persons",
                "1",
            ],
            check=True,
            capture_output=True,
        )
    return out


def train(init, out, synth, steps, save_every):
    cmd = [
        sys.executable,
        str(ROOT / "training" / "train.py"),
        "--init",
        str(init),
        "--output",
        str(out),
        "--train-coco",
        str(synth / "annotations" / "person_keypoints_train.json"),
        "--val-coco",
        str(synth / "annotations" / "person_keypoints_val.json"),
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--train-llm",
        "full",
        "--save-every",
        str(save_every),
        "--eval-every",
        "1000",
        "--eval-persons",
        "3",
        "--workers",
        "0",
        "--log-every",
        "2",
        "--seed",
        "0",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.mark.slow
def test_train_resume_and_serve(synth, tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    train(tiny_checkpoint, out, synth, steps=8, save_every=8)
    first = json.loads((out / "trainer" / "checkpoint-8" / "trainer_state.json").read_text())
    # a second invocation with more steps resumes from checkpoint-8 instead of restarting
    run = train(tiny_checkpoint, out, synth, steps=16, save_every=8)
    assert "resuming from" in run.stdout and "checkpoint-8" in run.stdout
    state = json.loads((out / "trainer" / "checkpoint-16" / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert state["global_step"] == 16
    # the resumed run continues the first run's history rather than restarting it
    assert state["log_history"][: len(first["log_history"])] == first["log_history"]
    assert losses[-1] < losses[0] - 1.5, losses  # ~10.5 (uniform over 32k tokens) falls fast
    final = out / "final"
    assert (final / "validation.json").is_file()
    metrics = json.loads((final / "validation.json").read_text())
    assert {"pck", "loss_true_images", "loss_swapped_images"} <= set(metrics)
    # the trained checkpoint serves: torch and ORT agree
    from locllm_export.build import build_onnx_engine

    engine = tmp_path / "engine"
    build_onnx_engine(final, engine)
    img = np.random.default_rng(0).integers(0, 255, (200, 150, 3)).astype(np.uint8)
    a = Pose(final, backend="torch").locate(img, ["nose", "left knee", "right wrist"])
    b = Pose(engine).locate(img, ["nose", "left knee", "right wrist"])
    assert [k.answer for k in a[0]] == [k.answer for k in b[0]]


def test_conversation_sample_and_patch_targets(synth):
    """A training sample: rounds tokenised by the protocol, labels only on answers (+ </s>),
    answers equal to the augmented joint positions, aux targets = the joints' patches."""
    import random

    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.data import ConversationConfig, ConversationDataset, load_coco
    from locllm_training.tokenizer_files import write_tokenizer

    tok = PromptTokenizer.from_dir(write_tokenizer(synth / "tok"))
    recs = load_coco(synth / "annotations" / "person_keypoints_train.json")
    joints = ("left wrist", "right ankle", "nose")
    cfg = ConversationConfig(image_size=56, patch_size=14, aux_joints=joints, augment=True)
    ds = ConversationDataset(recs, tok, num_patches=16, config=cfg, seed=3)
    checked = 0
    for idx in range(len(ds)):
        item = ds[idx]
        # recompute the augmented crop with the same rng the item used
        rng = random.Random(hash((ds.seed, ds.epoch, idx)))
        _, pts, names = ds.crop(ds.records[idx], rng)
        for j, name in enumerate(joints):
            i = names.index(name)
            inside = ds.records[idx].visible[i] and 0 <= pts[i, 0] < 56 and 0 <= pts[i, 1] < 56
            expected = int(pts[i, 1] // 14) * 4 + int(pts[i, 0] // 14) if inside else -100
            assert item["aux_targets"][j] == expected
            checked += expected >= 0
        labelled = [t for t, lab in zip(item["input_ids"], item["labels"]) if lab != -100]
        assert labelled.count(tok.spec.eos_id) == item["rounds"]  # each answer closes with </s>
    assert checked > 5


@pytest.mark.slow
def test_two_process_data_parallel_on_cpu(synth, tiny_checkpoint, tmp_path):
    """torchrun with 2 CPU processes (gloo): both train, rank 0 writes one final checkpoint."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    cmd += [str(ROOT / "training" / "train.py"), "--init", str(tiny_checkpoint), "--output", str(out)]
    cmd += ["--train-coco", str(synth / "annotations" / "person_keypoints_train.json"), "--steps", "4"]
    cmd += ["--batch-size", "2", "--warmup-steps", "1", "--save-every", "4", "--eval-every", "1000"]
    cmd += ["--workers", "0", "--log-every", "1", "--no-bf16"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "data parallel: 2 processes (gloo), 4 samples per optimizer step" in run.stdout
    state = json.loads((out / "trainer" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # 12 images / 4 per step: the epoch counter moves 2x faster than with one process of 2
    assert state["epoch"] == pytest.approx(4 * 4 / 12, rel=0.01)
    img = np.random.default_rng(1).integers(0, 255, (120, 90, 3)).astype(np.uint8)
    assert len(Pose(out / "final", backend="torch").locate(img, ["nose"])[0]) == 1


def test_delta_checkpoint_stores_only_differences_and_checks_its_parent(tiny_checkpoint, tmp_path):
    import hashlib
    import shutil

    import torch
    from locllm_training.model import CheckpointError, load_checkpoint, save_checkpoint
    from safetensors.torch import load_file, save_file

    parent = tmp_path / "parent"
    shutil.copytree(tiny_checkpoint, parent)
    model = load_checkpoint(parent)
    with torch.no_grad():  # a fine-tune that touched only the projector (LM, ViT frozen)
        model.projector.weight.add_(0.01)
        model.config.coord_dims = 3
    child = tmp_path / "models" / "child"
    save_checkpoint(model, parent, child, parent=parent)
    stored = load_file(str(child / "model.safetensors"))
    assert sorted(stored) == ["projector.weight"]
    ref = json.loads((child / "config.json").read_text())["parent_weights"]
    assert ref["path"] == "../../parent"
    back = load_checkpoint(child)
    assert back.config.coord_dims == 3
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert ref["sha256"] == hashlib.sha256((parent / "model.safetensors").read_bytes()).hexdigest()
    # a delta of a delta: only its own change is stored; loading walks both parents
    with torch.no_grad():
        model.llm.model.norm.weight.add_(0.5)
    grandchild = tmp_path / "models" / "grandchild"
    save_checkpoint(model, parent, grandchild, parent=child)
    assert sorted(load_file(str(grandchild / "model.safetensors"))) == ["llm.model.norm.weight"]
    again = load_checkpoint(grandchild)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    from locllm_export.build import build_onnx_engine
    from locllm_sdk.demo import checkpoint_digest
    from locllm_sdk.manifest import read_manifest

    manifest = read_manifest(build_onnx_engine(child, tmp_path / "engine").engine_dir)
    assert list(manifest.model.parent_checkpoint_sha256) == [ref["sha256"]]
    engine_key = checkpoint_digest(child)

    # the parent changes under it: the child refuses to load instead of mixing weights
    state = load_file(str(parent / "model.safetensors"))
    key = next(k for k in state if k.startswith("llm.") and state[k].is_floating_point())
    state[key] = state[key] + 1
    save_file(state, str(parent / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="parent checkpoint was changed"):
        load_checkpoint(child)
    # and the engine cache does not serve the engine built on the old parent
    assert checkpoint_digest(child) != engine_key


def test_regrid_to_another_crop_size(tiny_checkpoint, tmp_path):
    """repack_checkpoint.py --image-size: the start of a fine-tune at a larger crop. Every
    trained weight is kept; the ViT position embeddings are the pretrained ones interpolated
    for the new grid (what a fresh checkpoint at that size gets)."""
    import torch
    from locllm_training.model import load_checkpoint
    from locllm_training.pretrained import dinov2_small_for_locllm

    src = ROOT / "models" / "demo"
    size = json.loads((src / "config.json").read_text())["image_size"] + 28  # two more patches a side
    grid = size // 14
    out = tmp_path / "regridded"
    repack = [sys.executable, str(ROOT / "training" / "repack_checkpoint.py")]
    run = subprocess.run([*repack, str(src), str(out), "--image-size", str(size)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["num_patches"]) == (size, grid * grid)
    assert "trained" not in config  # those steps were at the old crop size
    old, new = load_checkpoint(src), load_checkpoint(out)
    pos = "vision.embeddings.position_embeddings"
    old_grid = old.config.image_size // 14
    assert old.state_dict()[pos].shape == (1, old_grid**2 + 1, 384)
    assert new.state_dict()[pos].shape == (1, grid * grid + 1, 384)
    assert torch.equal(new.state_dict()[pos], dinov2_small_for_locllm(size)[1]["embeddings.position_embeddings"])
    for key, value in old.state_dict().items():
        if key != pos:
            assert torch.equal(new.state_dict()[key], value), key
    pose = Pose(out, backend="torch")  # serves at the new size: a grid*grid-patch prefix
    assert pose.spec.image_size == size and pose.spec.num_patches == grid * grid
    assert pose.locate(np.full((300, 200, 3), 128, np.uint8), ["nose"])[0]["nose"].answer.startswith("[")

    for args, message in (
        ([str(tiny_checkpoint), str(tmp_path / "a"), "--image-size", "70"], "references its pretrained ViT"),
        ([str(src), str(tmp_path / "b"), "--image-size", "230"], "not a multiple of the patch size"),
    ):
        run = subprocess.run(
            [sys.executable, str(ROOT / "training" / "repack_checkpoint.py"), *args], capture_output=True, text=True
        )
        assert run.returncode != 0 and message in run.stderr, run.stderr[-2000:]


def test_teach_format_on_the_last_layers_leaves_the_rest_untouched(tmp_path):
    """``teach_format(layers=1)`` (how the 1B-class preset is taught) moves the last LM layer, the
    final norm and the LM head only, and still teaches well-formed greedy answers."""
    import torch
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.init import init_checkpoint, preset_config, random_model, teach_format
    from locllm_training.tokenizer_files import write_tokenizer

    model = random_model(preset_config("tiny", image_size=56), seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teach_format(model, PromptTokenizer.from_dir(write_tokenizer(tmp_path / "tok")), steps=3, seed=3, layers=1)
    last = len(model.llm.model.layers) - 1
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = (f"llm.model.layers.{last}.", "llm.model.norm.", "llm.lm_head.")
    assert moved and all(k.startswith(allowed) for k in moved), sorted(moved)
    assert any(k.startswith("llm.lm_head.") for k in moved) and any(k.startswith(allowed[0]) for k in moved)
    with pytest.raises(ValueError, match="layers must be in"):
        teach_format(model, PromptTokenizer.from_dir(tmp_path / "tok"), steps=1, layers=99)

    ckpt = init_checkpoint(
        "tiny", tmp_path / "ckpt", seed=3, image_size=56, teach_format_steps=150, teach_format_layers=1,
        teach_format_lr=3e-3,
    )  # fmt: skip
    recorded = json.loads((ckpt / "config.json").read_text())
    assert recorded["taught_format_layers"] == 1
    assert (recorded["taught_format_lr"], recorded["taught_format_warmup"]) == (3e-3, 0)
    import re

    from locllm_sdk.descriptions import DescriptionLibrary
    from locllm_training.model import load_checkpoint
    from locllm_training.reference import reference_locate

    taught = load_checkpoint(ckpt).eval()
    lib = DescriptionLibrary.load()
    requests = [(n, lib.descriptions[n]) for n in ("nose", "left wrist", "right knee")]
    pixels = np.random.default_rng(0).normal(size=(2, 3, 56, 56)).astype(np.float32)
    answers = [
        a.text for crop in reference_locate(taught, PromptTokenizer.from_dir(ckpt), pixels, requests) for a in crop
    ]
    assert all(re.fullmatch(r"\[0\.\d+,0\.\d+\]\s*", a) for a in answers), answers


def test_teach_format_warmup_starts_the_learning_rate_near_zero(tmp_path):
    """``warmup=W``: step 1 runs at lr/(W+1), so a huge W leaves the weights (nearly) where they were
    while the same step without warm-up moves them by about lr (Adam's first step)."""
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.init import preset_config, random_model, teach_format
    from locllm_training.tokenizer_files import write_tokenizer

    tok = PromptTokenizer.from_dir(write_tokenizer(tmp_path / "tok"))
    moves = {}
    for warmup in (0, 10**6):
        model = random_model(preset_config("tiny", image_size=56), seed=3)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        teach_format(model, tok, steps=1, seed=3, lr=1e-2, batch=1, warmup=warmup)
        moves[warmup] = max((v - before[k]).abs().max().item() for k, v in model.state_dict().items())
    assert moves[0] > 5e-3 and moves[10**6] < 1e-6, moves
    with pytest.raises(ValueError, match="warmup and check_every must be >= 0"):
        teach_format(model, tok, steps=1, warmup=-1)


def test_teach_format_check_stops_once_greedy_answers_are_well_formed(tmp_path):
    """``check_every``: the fit stops at the first check whose greedy answers are all well-formed
    and says how many steps it took; too short a fit reports that its answers are not."""
    from locllm_sdk.protocol import GROUPED_PROTOCOL_VERSION, PromptTokenizer
    from locllm_training.init import init_checkpoint, preset_config, random_model, teach_format
    from locllm_training.tokenizer_files import write_tokenizer

    ckpt = init_checkpoint("tiny", tmp_path / "ckpt", seed=3, image_size=56, teach_format_steps=600,
                           teach_format_check_every=20)  # fmt: skip
    config = json.loads((ckpt / "config.json").read_text())
    assert config["taught_format_well_formed"] is True
    assert 0 < config["taught_format_steps"] < 600 and config["taught_format_steps"] % 20 == 0

    tok = PromptTokenizer.from_dir(write_tokenizer(tmp_path / "tok"))
    model = random_model(preset_config("tiny", image_size=56), seed=3)
    fit = teach_format(model, tok, steps=3, seed=3, check_every=2)  # checked at step 2 and at the end
    assert (fit.steps, fit.well_formed) == (3, False)
    assert not model.training
    with pytest.raises(ValueError, match="grouped protocol"):
        teach_format(model, tok, steps=1, check_every=1, protocol=GROUPED_PROTOCOL_VERSION)
    assert not model.training  # refused before the model was touched


def test_init_checkpoint_refuses_bad_teach_format_layers_before_building(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "training"))
    from init_checkpoint import main

    for argv, message in (
        (["--teach-format", "5", "--teach-format-layers", "3"], r"must be in \[0, 2\] for the tiny preset"),
        (["--teach-format-layers", "1"], "needs --teach-format STEPS"),
        (["--teach-format", "5", "--teach-format-batch", "0"], "--teach-format-batch must be >= 1"),
        (["--teach-format", "5", "--teach-format-warmup", "-1"], "--teach-format-warmup and"),
        (["--teach-format", "5", "--teach-format-check-every", "-1"], "--teach-format-check-every >= 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["--preset", "tiny", "--output", str(tmp_path / "ckpt"), *argv])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "ckpt").exists()


def test_teach_format_script_continues_a_fit_with_new_samples(tmp_path, capsys):
    """training/teach_format.py: more steps on an init_checkpoint.py checkpoint, the steps of both
    fits recorded, the init's facts kept; new samples (data_seed), the same keypoint positions."""
    import torch
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.init import init_checkpoint, preset_config, random_model, teach_format
    from locllm_training.model import load_checkpoint

    sys.path.insert(0, str(ROOT / "training"))
    import teach_format as script

    ckpt = init_checkpoint("tiny", tmp_path / "ckpt", seed=3, image_size=56, teach_format_steps=10)
    out = tmp_path / "more"
    assert script.main(["--checkpoint", str(ckpt), "--output", str(out), "--steps", "4", "--check-every", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["preset"], config["seed"], config["taught_format_steps"]) == ("tiny", 3, 14)
    assert config["taught_format_continued"] == [{"steps": 4, "layers": None, "lr": 3e-3, "warmup": 0, "batch": 4}]
    assert config["taught_format_well_formed"] is False and "NOT well-formed" in capsys.readouterr().out
    before, after = load_checkpoint(ckpt).state_dict(), load_checkpoint(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    tok = PromptTokenizer.from_dir(ckpt)
    fits = {}
    for name, data_seed in (("a", 7), ("b", 7), ("c", 8)):
        model = random_model(preset_config("tiny", image_size=56), seed=3)
        teach_format(model, tok, steps=2, seed=3, batch=1, data_seed=data_seed)
        fits[name] = model.state_dict()
    assert all(torch.equal(fits["a"][k], fits["b"][k]) for k in fits["a"])
    assert any(not torch.equal(fits["a"][k], fits["c"][k]) for k in fits["a"])

    for argv, message in (
        (["--checkpoint", str(ckpt), "--output", str(ckpt), "--steps", "1"], "--output must differ"),
        (["--checkpoint", str(tmp_path), "--output", str(out), "--steps", "1"], "no config.json"),
        (["--checkpoint", str(ckpt), "--output", str(out), "--steps", "0"], "--steps and --batch must be >= 1"),
        (["--checkpoint", str(ckpt), "--output", str(out), "--steps", "1", "--layers", "9"], r"must be in \[0, 2\]"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
        assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err), argv
