"""The official procedure (HF generate, left padding, same crop K times) against our runtime."""

import numpy as np
from locllm_sdk import Pose
from locllm_sdk.crop import crop_geometry
from locllm_sdk.descriptions import DescriptionLibrary
from locllm_sdk.pipeline import crop_batch
from locllm_sdk.protocol import PromptTokenizer
from locllm_training.model import load_checkpoint
from locllm_training.reference import reference_locate

NAMES = ["nose", "neck", "pelvis", "left wrist", "right knee", "left ear"]


def test_free_decoding_reproduces_the_official_procedure(trained):
    lib = DescriptionLibrary.load()
    for dims in (2, 3):
        ckpt, engine = trained[dims]
        model = load_checkpoint(ckpt)
        tok = PromptTokenizer.from_dir(ckpt)
        free_torch = Pose(ckpt, backend="torch", decoding="free")
        free_ort = Pose(engine, decoding="free")
        rng = np.random.default_rng(dims)
        for _ in range(2):
            img = rng.integers(0, 255, (180, 140, 3)).astype(np.uint8)
            box = [5.0, 10.0, 120.0, 160.0]
            g = crop_geometry(box, img.shape[:2], model.config.image_size)
            pixels = crop_batch(img, [g], free_ort.spec)  # the model's own normalisation
            ref = reference_locate(model, tok, pixels, [(n, lib.descriptions[n]) for n in NAMES])
            for pose in (free_torch, free_ort):
                got = pose.locate(img, NAMES, boxes=[box])
                assert [k.answer for k in got[0]] == [a.text for a in ref[0]]
                np.testing.assert_allclose([k.score for k in got[0]], [a.score for a in ref[0]], atol=1e-5)


def test_reference_answers_a_model_that_ends_at_once(tiny_checkpoint):
    """A model whose first token is EOS for every row: empty answers (values and scores 0),
    as the official parse gives for an answer without numbers, not a crash on zero scored steps."""
    import torch

    model = load_checkpoint(tiny_checkpoint).eval()
    tok = PromptTokenizer.from_dir(tiny_checkpoint)
    llm = model.llm
    head = torch.nn.Linear(llm.config.hidden_size, llm.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.spec.eos_id] = 10.0
    llm.lm_head = head
    lib = DescriptionLibrary.load()
    pixels = np.zeros((2, 3, model.config.image_size, model.config.image_size), np.float32)
    out = reference_locate(model, tok, pixels, [(n, lib.descriptions[n]) for n in ("nose", "neck")])
    assert len(out) == 2 and all(len(crop) == 2 for crop in out)
    for answer in (a for crop in out for a in crop):
        assert (answer.text, answer.values, answer.scores, answer.numbers_found) == ("", (0.0, 0.0), (0.0, 0.0), 0)
