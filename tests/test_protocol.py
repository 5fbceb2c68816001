"""The prompt protocol against ids produced by the real transformers 4.31 slow tokenizer.

The oracle (tests/fixtures/hf431_tokenizer_oracle.json) was made by running transformers
4.31.0 (tests/fixtures/make_hf431_oracle.py) on the same SentencePiece model.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from locllm_sdk.protocol import (
    AnswerGrammar,
    PromptTokenizer,
    ProtocolError,
    build_grammar,
    format_answer,
    is_well_formed,
    max_softmax,
    parse_answer,
    prompt_text,
)

FIXTURE = Path(__file__).parent / "fixtures" / "hf431_tokenizer_oracle.json"


@pytest.fixture(scope="module")
def oracle():
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from locllm_training.tokenizer_files import write_tokenizer

    out = {}
    for legacy in (False, True):
        d = write_tokenizer(tmp_path_factory.mktemp(f"tok{legacy}"), legacy=legacy)
        out[legacy] = PromptTokenizer.from_dir(d)
    return out


def test_same_sentencepiece_model(oracle, tokenizers):
    digest = hashlib.sha256(tokenizers[False].spec.model_path.read_bytes()).hexdigest()
    assert digest == oracle["sp_model_sha256"]


def test_prompt_ids_match_transformers_431(oracle, tokenizers):
    checked = 0
    for case in oracle["cases"]:
        if case["kind"] not in ("prompt", "prompt4", "multiround"):
            continue
        tok = tokenizers[case["legacy"]]
        assert tok.encode(case["text"]) == case["ids"], (case["kind"], case["legacy"], case["text"][-80:])
        checked += 1
    assert checked >= 100


def test_prefix_plus_round_is_the_prompt(oracle, tokenizers):
    for case in oracle["cases"]:
        if case["kind"] != "prompt":
            continue
        tok = tokenizers[case["legacy"]]
        name, description = case["keypoint"], case["description"]
        assert prompt_text(name, description, 256) == case["text"]
        split = tok.prefix_ids(256) + tok.round_ids(name, description)
        assert split == case["ids"]


def test_multiround_labels_cover_answers_and_eos(oracle, tokenizers):
    """Concatenated rounds (our training builder's pieces) equal the original's full ids, and
    the tokens after "Answer:" are exactly what the original trained on."""
    for case in oracle["cases"]:
        if case["kind"] != "multiround":
            continue
        tok = tokenizers[case["legacy"]]
        ids = tok.prefix_ids(case["n_patches"])
        trained = []
        for r in case["rounds"]:
            head = tok.round_ids(r["keypoint"], r["description"])
            full = tok.round_ids(r["keypoint"], r["description"], answer=r["answer"])
            assert full[: len(head)] == head
            trained += full[len(head) :]
            ids += full
        assert ids == case["ids"]
        assert trained == case["trained_ids"]


def test_decode_matches_batch_decode(oracle, tokenizers):
    for case in oracle["cases"]:
        if case["kind"] != "answer_decode":
            continue
        tok = tokenizers[case["legacy"]]
        ids = case["ids"]
        assert tok.decode(ids).strip() == case["batch_decode_skip_special_strip"]


@pytest.mark.parametrize("dims", [2, 3])
def test_grammar_from_tokenizer(tokenizers, dims):
    tok = tokenizers[False]
    g = build_grammar(tok, dims)
    # the official decode budget (13 / 22 new tokens) ends on "]": EOS is never generated
    assert len(g.slots) == (13 if dims == 2 else 22)
    assert len(g.free_positions) == (6 if dims == 2 else 12)
    digits = [4, 1, 2, 9, 0, 5] + ([3, 3, 3, 3, 3, 7] if dims == 3 else [])
    ids = g.fill(digits)
    text = tok.decode(ids)
    expected = "[0.412,0.905]" if dims == 2 else "[0.412,0.905,0.333337]"
    assert text == expected
    assert AnswerGrammar.from_dict(g.to_dict()) == g


def test_grammar_refuses_tokenizer_without_single_digit_tokens(tokenizers, monkeypatch):
    tok = tokenizers[False]
    monkeypatch.setattr(tok, "digit_ids", lambda: (_ for _ in ()).throw(ProtocolError("no digits")))
    with pytest.raises(ProtocolError):
        build_grammar(tok, 2)


def test_format_answer():
    assert format_answer([0.1234, 0.5]) == "[0.123,0.500]"
    assert format_answer([0.1, 0.2, 0.75]) == "[0.100,0.200,0.750000]"


def test_is_well_formed_accepts_exactly_what_format_answer_writes():
    rng = np.random.default_rng(0)
    for dims in (2, 3):
        for values in rng.uniform(0, 1, (20, dims)):
            assert is_well_formed(format_answer(values), dims)
            assert is_well_formed(format_answer(values) + " \n", dims)  # trailing whitespace, as decoded
    for text in ("[0.3,0.3,0.3,", "[0.123,0.456", "[0.12,0.456]", "[0.123,0.456,0.789]", "[1.123,0.456]",
                 "0.123,0.456]", "[0.123, 0.456]", " [0.123,0.456]", "[0.123,0.456]]"):  # fmt: skip
        assert not is_well_formed(text, 2), text
    assert not is_well_formed("[0.100,0.200,0.75]", 3)
    with pytest.raises(ProtocolError, match="dims must be 2 or 3"):
        is_well_formed("[0.1]", 1)


def test_parse_answer_official_quirks():
    conf = np.linspace(0.5, 0.6, 12)
    p = parse_answer(" [0.123,0.456]", conf, 2)
    assert p.values == (0.123, 0.456)
    assert p.scores[0] == pytest.approx(conf[1:6].mean())
    assert p.scores[1] == pytest.approx(conf[7:12].mean())
    # y equal to x: y's score is read at x's positions (str.find)
    q = parse_answer("[0.321,0.321]", conf, 2)
    assert q.scores[1] == q.scores[0] == pytest.approx(conf[1:6].mean())
    # unparsable: zeros
    r = parse_answer("[abc]", conf, 2)
    assert r.values == (0.0, 0.0) and r.scores == (0.0, 0.0) and r.numbers_found == 0
    # one number: y and its score stay 0
    s = parse_answer("[0.5]", conf, 2)
    assert s.values == (0.5, 0.0) and s.scores[1] == 0.0 and s.score == pytest.approx(s.scores[0] / 2)


def test_max_softmax():
    logits = np.array([[0.0, 0.0], [10.0, 0.0]])
    np.testing.assert_allclose(max_softmax(logits), [0.5, 1 / (1 + np.exp(-10))])
