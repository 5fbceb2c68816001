"""The forgetting benchmark's parts: the Python-documentation corpus, text blocks, perplexity,
the zero expert's routing share, and the init that puts a text LM into the demo model."""

from __future__ import annotations

import forgetting
import pytest
import torch
from locllm_sdk.protocol import PromptTokenizer
from locllm_training.text_lm import load_corpus, perplexity, token_blocks


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(holdout_every=10)


def test_corpus_is_python_documentation_with_every_tenth_document_held_out(corpus):
    again = load_corpus(holdout_every=10)
    assert again.sha256 == corpus.sha256  # a pure function of the Python version
    names = [d.name for d in corpus.train] + [d.name for d in corpus.heldout]
    assert len(set(names)) == len(names)
    train_texts = {d.text for d in corpus.train}
    assert not any(d.text in train_texts for d in corpus.heldout)  # held out means never trained on
    total = len(names)
    assert len(corpus.heldout) == total // 10
    assert any(d.name.startswith("topic:") for d in corpus.train)  # pydoc topics
    assert any(d.name.startswith("json/") for d in corpus.train + corpus.heldout)  # stdlib docstrings
    assert min(len(d.text) for d in corpus.train + corpus.heldout if not d.name.startswith("topic:")) >= 200
    assert corpus.facts["licence"] == "PSF License 2.0"


def test_token_blocks_concatenate_documents_with_bos_and_eos(tiny_checkpoint, corpus):
    tok = PromptTokenizer.from_dir(tiny_checkpoint)
    docs = corpus.heldout[:5]
    ids = []
    for d in docs:
        ids += tok.encode(d.text) + [tok.spec.eos_id]
    blocks = token_blocks(tok, docs, 64)
    assert blocks.shape == (len(ids) // 64, 64)
    assert blocks.reshape(-1).tolist() == ids[: blocks.numel()]
    assert blocks[0, 0] == tok.spec.bos_id


class _Uniform(torch.nn.Module):
    """A causal LM whose logits are all equal: every next token has probability 1/V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size():
    blocks = torch.randint(0, 7, (5, 9))
    assert perplexity(_Uniform(50), blocks, batch_size=2) == pytest.approx(50.0, rel=1e-6)
    assert perplexity(_Uniform(7), blocks) == pytest.approx(7.0, rel=1e-6)


def _routed_tiny(tiny_checkpoint, to: int):
    """The tiny model with MoE LoRA (2 experts + zero expert, top-1) whose gates send every
    token to choice ``to`` (2 = the zero expert)."""
    from locllm_training.model import load_checkpoint, to_moe_lora
    from locllm_training.moe_lora import MoeLoraSettings, moe_layers

    model = to_moe_lora(load_checkpoint(tiny_checkpoint), MoeLoraSettings(experts=2, top_k=1, zero_expert=True)).eval()
    for layer in moe_layers(model.llm):
        with torch.no_grad():
            layer.lora_gate.weight.zero_()
            layer.lora_gate.bias.zero_()
            layer.lora_gate.bias[to] = 5.0
    return model


def _keypoint_batch(model, tiny_checkpoint) -> dict:
    from locllm_training.data import collate

    tok = PromptTokenizer.from_dir(tiny_checkpoint)
    size = model.config.image_size
    items = []
    for name, answer in (("neck", "[0.25,0.50]"), ("left wrist", "[0.75,0.125]")):
        ids = tok.prefix_ids(model.config.num_patches) + tok.round_ids(name, f"the {name} of the person", answer)
        items.append({"input_ids": ids, "labels": ids, "pixel_values": torch.randn(3, size, size).numpy()})
    return collate(items, tok.spec.pad_id)


@pytest.mark.parametrize("to,share", [(2, 1.0), (0, 0.0)])
def test_zero_expert_share_counts_the_slots_routed_to_it(tiny_checkpoint, to, share):
    model = _routed_tiny(tiny_checkpoint, to)
    text = torch.randint(3, 1000, (3, 12))
    shares = forgetting.zero_expert_shares(model, text, [_keypoint_batch(model, tiny_checkpoint)])
    assert shares == {"heldout_text": share, "keypoint_text": share, "keypoint_image": share}


def test_zero_expert_share_separates_image_patches_from_text(tiny_checkpoint):
    """Image tokens made to point along one hidden coordinate (projector weight 0, bias
    along it), a first-layer gate that sends exactly that direction to the zero expert and
    everything else to expert 0: image share 1, text share 0."""
    from locllm_training.moe_lora import moe_layers

    model = _routed_tiny(tiny_checkpoint, 0)
    width = model.config.llm_config().hidden_size
    model.llm.model.layers = model.llm.model.layers[:1]  # only the first layer's gates are set
    norm = model.llm.model.layers[0].input_layernorm.weight
    with torch.no_grad():
        model.projector.weight.zero_()
        model.projector.bias.zero_()
        model.projector.bias[0] = 100.0  # after RMSNorm: sqrt(width) on coordinate 0, 0 elsewhere
        for gate in (m.lora_gate for m in moe_layers(model.llm)):  # q_proj's and v_proj's
            gate.weight.zero_()
            gate.bias.zero_()
            gate.bias[1] = -100.0  # expert 1 never chosen
            gate.weight[2, 0] = 10.0 / float(norm[0])
            gate.bias[2] = -10.0 * (width**0.5) / 2  # zero expert iff coordinate 0 > sqrt(width) / 2
    text = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    shares = forgetting.zero_expert_shares(model, text, [_keypoint_batch(model, tiny_checkpoint)])
    assert shares["keypoint_image"] == 1.0
    assert shares["keypoint_text"] == 0.0
    assert shares["heldout_text"] == 0.0


@pytest.mark.slow  # loads the demo model and writes a 100 MB init checkpoint
def test_init_is_the_demo_model_speaking_through_the_text_lm(tmp_path):
    from locllm_training.model import load_checkpoint
    from locllm_training.presets import PRESETS
    from locllm_training.text_lm import llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    text_lm = LlamaForCausalLM(llama_config(PRESETS["demo"]["llm"])).eval()
    init = forgetting.make_init(text_lm, tmp_path / "init", rank=4, alpha=8)
    model = load_checkpoint(init, with_lora=True)
    assert not model.config.lora_vision.enabled and model.config.vision_weights is None
    assert model.config.lora_llm.r == 4 and model.config.lora_llm.alpha == 8
    ids = torch.randint(3, 32000, (2, 10))
    with torch.no_grad():  # fresh LoRA (B = 0): the LM answers as the text LM
        torch.testing.assert_close(model.llm(input_ids=ids).logits, text_lm(input_ids=ids).logits)
    demo = load_checkpoint(forgetting.DEMO, with_lora=False)
    pixels = torch.randn(1, 3, demo.config.image_size, demo.config.image_size)
    with torch.no_grad():  # the demo's ViT (LoRA merged) and projector
        torch.testing.assert_close(model.encode_images(pixels), demo.encode_images(pixels))
