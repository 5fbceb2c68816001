"""Pure logic of the NVIDIA path, tested without a GPU, TensorRT or TensorRT-LLM:
answer regex and guided vocabulary, prompt-table layout and fake ids, extra-id hashing,
build-machine compatibility, ``auto`` backend selection (probes faked), the build plan and
the trtllm-build command line, the --dry-run output, the precision-typed vision ONNX, and the
ORT CUDA backend refusing to pretend on a CPU-only onnxruntime."""

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from locllm_sdk.backends import gpu_logic
from locllm_sdk.backends.select import choose_backend
from locllm_sdk.protocol import AnswerGrammar, PromptTokenizer, build_grammar, format_answer

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return PromptTokenizer.from_dir(tiny_checkpoint)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return {dims: build_grammar(tokenizer, dims) for dims in (2, 3)}


@pytest.fixture(scope="module")
def text_of(tokenizer):
    return lambda t: gpu_logic.piece_text(tokenizer.piece(t))


@pytest.fixture(scope="module")
def regexes(grammars, text_of):
    return {dims: re.compile(gpu_logic.answer_regex(g, text_of)) for dims, g in grammars.items()}


@pytest.fixture(scope="module")
def onnx_engine(tiny_checkpoint, tmp_path_factory):
    from locllm_export.build import build_onnx_engine

    engine = tmp_path_factory.mktemp("gpu_logic") / "engine"
    build_onnx_engine(tiny_checkpoint, engine)
    return engine


# ------------------------------------------------------------------------------------------
# answer regex


def _valid_answers(dims, n, seed):
    rng = np.random.default_rng(seed)
    out = [
        "[0.000,0.000]" if dims == 2 else "[0.000,0.000,0.000000]",
        "[0.999,0.999]" if dims == 2 else "[0.999,0.999,0.999999]",
    ]
    for _ in range(n):
        values = rng.integers(0, 1000, dims) / 1000.0
        if dims == 3:
            values[2] = rng.integers(0, 10**6) / 1e6
        out.append(format_answer(values))
    return [" " + a for a in out]  # generated text starts with the space of "▁["


@pytest.mark.parametrize("dims", [2, 3])
def test_regex_accepts_every_protocol_answer(regexes, dims):
    answers = _valid_answers(dims, 2000, seed=dims)
    assert all(regexes[dims].fullmatch(a) for a in answers)


@pytest.mark.parametrize("dims", [2, 3])
def test_regex_matches_the_grammar_token_texts(grammars, regexes, text_of, dims):
    g, rng = grammars[dims], np.random.default_rng(5)
    for _ in range(300):
        digits = rng.integers(0, 10, len(g.free_positions)).tolist()
        ids = g.fill(digits)[:-1]  # EOS is not text: xgrammar handles stop tokens itself
        assert regexes[dims].fullmatch("".join(text_of(t) for t in ids))


def _near_misses(answer: str, dims: int) -> list[str]:
    """Invalid variants of a valid answer (with its leading space)."""
    body = answer[1:]  # "[0.123,0.456]"
    misses = [
        body,  # no leading space
        "  " + body,  # two spaces
        answer + " ",  # trailing space
        answer + "</s>",
        answer[:-1],  # missing "]"
        " " + body[1:],  # missing "["
        answer.replace("[", "(").replace("]", ")"),
        answer.replace(",", ", "),  # space after comma
        answer.replace(",", " ,", 1),
        answer.replace(",", ".", 1),
        answer.replace(",", "", 1),
        answer.replace("0.", "1.", 1),  # "1." instead of "0."
        answer.replace("0.", ".", 1),  # missing leading 0
        answer.replace("0.", "0,", 1),
        answer.replace("0.", "-0.", 1),
        answer.replace("0.", "00.", 1),
        answer.replace("[0.", "[0. ", 1),
        answer.upper().replace("[", "{"),
        answer + ",0.500",  # extra number
    ]
    # missing / extra / non-digit at each digit position
    for m in re.finditer(r"\d+", body):
        if body[m.start() - 1] != ".":
            continue
        s = m.start() + 1  # index in answer
        e = m.end() + 1
        misses.append(answer[: e - 1] + answer[e:])  # one digit fewer
        misses.append(answer[:e] + "7" + answer[e:])  # one digit more
        misses.append(answer[:s] + "a" + answer[s + 1 :])
        misses.append(answer[:s] + " " + answer[s + 1 :])
    if dims == 3:
        parts = body[1:-1].split(",")
        misses.append(" [" + ",".join(parts[:2] + [parts[2][:5]]) + "]")  # z with 3 decimals
        misses.append(" [" + ",".join(parts[:2]) + "]")  # 2D answer to a 3D model
    else:
        misses.append(" [" + body[1:-1] + ",0.500000]")  # 3D answer to a 2D model
    return [m for m in misses if m != answer]


@pytest.mark.parametrize("dims", [2, 3])
def test_regex_rejects_near_misses(regexes, dims):
    count = 0
    for answer in _valid_answers(dims, 200, seed=10 + dims):
        for miss in _near_misses(answer, dims):
            assert not regexes[dims].fullmatch(miss), (answer, miss)
            count += 1
    assert count > 4000


def test_regex_is_quantifier_free_and_starts_with_the_space_of_the_first_token(grammars, text_of):
    g = grammars[2]
    rx = gpu_logic.answer_regex(g, text_of)
    assert rx.startswith(r"\ \[") or rx.startswith(" \\[")
    assert "{" not in rx and "+" not in rx and "*" not in rx
    assert rx.count("[0-9]") == len(g.free_positions) == 6


def test_piece_text():
    assert gpu_logic.piece_text("\u2581[") == " ["
    assert gpu_logic.piece_text("<0x0A>") == "\n"
    assert gpu_logic.piece_text("<0xE2>") == "<0xE2>"  # non-ASCII byte pieces never match an answer
    assert gpu_logic.piece_text("7") == "7"


# ------------------------------------------------------------------------------------------
# guided vocabulary


def _segmentations(text: str, vocab: list[str]) -> int:
    """Number of ways to spell ``text`` with the (non-empty) vocabulary entries."""
    ways = [0] * (len(text) + 1)
    ways[0] = 1
    for i in range(len(text)):
        if ways[i]:
            for v in set(vocab):
                if v and text.startswith(v, i):
                    ways[i + len(v)] += ways[i]
    return ways[-1]


@pytest.mark.parametrize("dims", [2, 3])
def test_guided_vocabulary_spells_only_the_answer_tokens(tokenizer, grammars, text_of, dims):
    g = grammars[dims]
    vocab = gpu_logic.guided_vocabulary(tokenizer.vocab_size, g, text_of)
    assert len(vocab) == tokenizer.vocab_size
    allowed = gpu_logic.answer_token_ids(g)
    spelled = {i for i, v in enumerate(vocab) if v != gpu_logic.BLOCKED_TOKEN_TEXT}
    assert spelled == allowed
    assert all(vocab[d] == str(k) for k, d in enumerate(g.digit_ids))
    # With this vocabulary an answer text has exactly one tokenisation: the grammar's.
    allowed_texts = [vocab[i] for i in sorted(allowed)]
    for answer in _valid_answers(dims, 30, seed=3):
        assert _segmentations(answer, allowed_texts) == 1


def test_answer_from_tokens(grammars):
    g = grammars[2]
    digits = [1, 2, 3, 4, 5, 6]
    ids = g.fill(digits)
    assert gpu_logic.answer_from_tokens(g, ids) == digits  # with EOS
    assert gpu_logic.answer_from_tokens(g, ids[:-1]) == digits  # without
    bad = list(ids)
    bad[0] = g.digit_ids[0]
    assert gpu_logic.answer_from_tokens(g, bad) is None
    assert gpu_logic.answer_from_tokens(g, ids[:-2]) is None
    free = g.free_positions[0]
    bad = list(ids)
    bad[free] = g.slots[0]
    assert gpu_logic.answer_from_tokens(g, bad) is None


# ------------------------------------------------------------------------------------------
# prompt table layout, fake ids, extra ids


def test_fake_ids_and_layout(tokenizer):
    v, im = tokenizer.vocab_size, tokenizer.spec.im_patch_id
    prefix = tokenizer.prefix_ids(256)
    fake = gpu_logic.fake_prompt_ids(prefix, im, v)
    n_text = len(prefix) - 256
    assert fake[:n_text] == prefix[:n_text]
    assert fake[n_text:] == list(range(v, v + 256))  # row k of the table at the k-th image token
    suffix = tokenizer.round_ids("nose", "the nose")
    lay = gpu_logic.request_layout(prefix, im, v, suffix, key=77)
    assert lay.input_ids == fake + suffix
    assert lay.table_rows == 256
    assert lay.extra_ids == [0] * n_text + [77] * 256 + [0] * len(suffix)
    prime = gpu_logic.request_layout(prefix, im, v, [], key=77)
    assert prime.input_ids == fake and lay.input_ids[: len(fake)] == prime.input_ids
    assert prime.extra_ids == lay.extra_ids[: len(fake)]  # the primed prefix is a prefix of every request
    with pytest.raises(ValueError):
        gpu_logic.request_layout(prefix, im, v, [v + 1], key=77)
    with pytest.raises(ValueError):
        gpu_logic.extra_ids(fake, v, 0)
    with pytest.raises(ValueError):
        gpu_logic.fake_prompt_ids([1, 2, 3], im, v)


def test_fake_ids_with_patch_id_equal_to_vocab_size():
    # Vicuna layout: <im_patch> = 32000 = vocab size; fake ids restart at 32000 for row 0.
    assert gpu_logic.fake_prompt_ids([1, 5, 32000, 32000, 32000], 32000, 32000) == [1, 5, 32000, 32001, 32002]


def test_image_key():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 64)).astype(np.float32)
    k = gpu_logic.image_key(a)
    assert 0 < k < 2**63
    assert gpu_logic.image_key(a.copy()) == k
    assert gpu_logic.image_key(a.astype(np.float64)) == k  # the table's values decide, not the dtype given
    b = a.copy()
    b[17, 3] += 1e-3
    assert gpu_logic.image_key(b) != k
    assert gpu_logic.image_key(a.reshape(128, 128)) != k  # shape is part of the key
    keys = {gpu_logic.image_key(rng.standard_normal((4, 8)).astype(np.float32)) for _ in range(2000)}
    assert len(keys) == 2000


def test_shared_prefix_blocks():
    assert gpu_logic.shared_prefix_blocks(259, 16) == 16
    assert gpu_logic.shared_prefix_blocks(259, 128) == 2
    assert gpu_logic.shared_prefix_blocks(10, 16) == 0


# ------------------------------------------------------------------------------------------
# build-machine compatibility

BUILT = {
    "gpu_name": "NVIDIA L4",
    "compute_capability": "8.9",
    "cuda": "12.8",
    "tensorrt": "10.13.3.9",
    "tensorrt_llm": "1.2.0",
}


def test_same_machine_is_compatible():
    assert gpu_logic.compatibility_problems(BUILT, dict(BUILT)) == []
    gpu_logic.check_compatibility(BUILT, {**BUILT, "cuda": "12.9"})  # CUDA minor: recorded, not enforced


@pytest.mark.parametrize(
    "key,value,label",
    [
        ("gpu_name", "NVIDIA A100-SXM4-80GB", "GPU"),
        ("compute_capability", "8.0", "compute capability"),
        ("tensorrt", "10.11.0.33", "TensorRT"),
        ("tensorrt_llm", "1.2.1", "TensorRT-LLM"),
    ],
)
def test_other_machine_is_refused_naming_both_sides(key, value, label):
    here = {**BUILT, key: value}
    with pytest.raises(gpu_logic.IncompatibleEngine) as e:
        gpu_logic.check_compatibility(BUILT, here)
    msg = str(e.value)
    assert label in msg and repr(BUILT[key]) in msg and repr(value) in msg and "rebuild" in msg


def test_missing_build_record_is_refused():
    with pytest.raises(gpu_logic.IncompatibleEngine, match="records no GPU"):
        gpu_logic.check_compatibility({}, BUILT)


# ------------------------------------------------------------------------------------------
# auto backend selection (probes faked)


def _fake_probes(monkeypatch, gpu, trt, ort_cuda, here=BUILT):
    monkeypatch.setattr(gpu_logic, "has_cuda_gpu", lambda: gpu)
    monkeypatch.setattr(gpu_logic, "has_tensorrt_runtime", lambda: trt)
    monkeypatch.setattr(gpu_logic, "ort_cuda_provider_listed", lambda: ort_cuda)
    monkeypatch.setattr(gpu_logic, "this_machine", lambda device=0: dict(here))


# choose_backend reads only which backends an engine has and its build machine
ONNX_ONLY = SimpleNamespace(backends={"onnxruntime": None}, build_machine=None)
WITH_TRT = SimpleNamespace(backends={"onnxruntime": None, "tensorrt": None}, build_machine=BUILT)


@pytest.mark.parametrize(
    "manifest,gpu,trt,ort_cuda,expected",
    [
        (WITH_TRT, True, True, True, "tensorrt"),
        (WITH_TRT, True, True, False, "tensorrt"),
        (WITH_TRT, True, False, True, "onnxruntime-cuda"),  # engines but no TensorRT installed
        (WITH_TRT, False, True, True, "onnxruntime"),  # no GPU: ORT lists CUDA but cannot run it
        (WITH_TRT, True, False, False, "onnxruntime"),
        (ONNX_ONLY, True, True, True, "onnxruntime-cuda"),  # GPU box, engine without TensorRT build
        (ONNX_ONLY, False, False, False, "onnxruntime"),
    ],
)
def test_auto_selection(monkeypatch, manifest, gpu, trt, ort_cuda, expected):
    _fake_probes(monkeypatch, gpu, trt, ort_cuda)
    assert choose_backend(manifest) == expected


def test_auto_skips_tensorrt_built_for_another_gpu(monkeypatch):
    _fake_probes(monkeypatch, True, True, True, here={**BUILT, "gpu_name": "NVIDIA H100 80GB HBM3"})
    assert choose_backend(WITH_TRT) == "onnxruntime-cuda"
    _fake_probes(monkeypatch, True, True, False, here={**BUILT, "tensorrt_llm": "1.1.0"})
    assert choose_backend(WITH_TRT) == "onnxruntime"


def test_auto_without_any_runnable_backend(monkeypatch):
    from locllm_sdk import EngineError

    _fake_probes(monkeypatch, False, False, False)
    with pytest.raises(EngineError):
        choose_backend(SimpleNamespace(backends={"tensorrt": None}, build_machine=BUILT))


def test_real_probes_on_this_machine():
    # Whatever the machine: the probes answer without raising and without importing GPU stacks.
    assert isinstance(gpu_logic.probe_cuda_devices(), list)
    assert isinstance(gpu_logic.has_tensorrt_runtime(), bool)
    assert isinstance(gpu_logic.ort_cuda_provider_listed(), bool)
    assert set(gpu_logic.this_machine()) == {"gpu_name", "compute_capability", "tensorrt", "tensorrt_llm"}
    assert "tensorrt" not in sys.modules and "tensorrt_llm" not in sys.modules


# ------------------------------------------------------------------------------------------
# the build plan


def _facts(**kw):
    from locllm_export.tensorrt_plan import ModelFacts

    base = dict(
        image_size=224,
        num_patches=256,
        coord_dims=2,
        vision_hidden_size=1024,
        hidden_size=4096,
        vocab_size=32000,
        num_layers=32,
        max_position_embeddings=4096,
        prefix_len=259,
        template_suffix_len=28,
        library_suffix_len=66,
    )
    base.update(kw)
    return ModelFacts(**base)


def _argv_value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_plan_lengths_and_trtllm_build_command():
    from locllm_export.tensorrt_plan import BuildOptions, make_plan

    plan = make_plan(_facts(), BuildOptions(max_batch_size=48, tokens_per_block=16), "/w", "/e")
    lengths, argv = plan.decoder.lengths, plan.decoder.trtllm_build
    assert lengths.suffix_budget == max(66, 28 + 96)
    assert lengths.max_input_len == 384 and lengths.max_input_len % 16 == 0
    assert lengths.max_input_len >= 259 + 124
    assert lengths.max_seq_len == 384 + 13
    assert lengths.max_prompt_embedding_table_size == 48 * 256
    assert lengths.reusable_prefix_blocks == 16
    assert argv[0] == "trtllm-build"
    assert _argv_value(argv, "--checkpoint_dir") == "/w/trtllm_checkpoint_fp16"
    assert _argv_value(argv, "--output_dir") == "/e/tensorrt/trtllm"
    assert _argv_value(argv, "--max_batch_size") == "48"
    assert _argv_value(argv, "--max_input_len") == "384"
    assert _argv_value(argv, "--max_seq_len") == "397"
    assert _argv_value(argv, "--max_prompt_embedding_table_size") == str(48 * 256)
    assert _argv_value(argv, "--kv_cache_type") == "paged"
    assert _argv_value(argv, "--tokens_per_block") == "16"
    assert _argv_value(argv, "--use_paged_context_fmha") == "enable"
    assert _argv_value(argv, "--gemm_plugin") == "auto"
    assert _argv_value(argv, "--gpt_attention_plugin") == "auto"
    assert _argv_value(argv, "--max_beam_width") == "1"
    assert "--gather_generation_logits" in argv
    assert int(_argv_value(argv, "--max_num_tokens")) >= lengths.max_input_len
    assert _argv_value(argv, "--output_timing_cache") == "/e/tensorrt/trtllm.timing_cache"


def test_plan_3d_answer_budget():
    from locllm_export.tensorrt_plan import BuildOptions, make_plan

    plan = make_plan(_facts(coord_dims=3), BuildOptions())
    assert plan.decoder.lengths.max_new_tokens == 22  # official 3D budget = the 22 answer tokens


@pytest.mark.parametrize(
    "precision,dtype,api",
    [
        ("fp16", "float16", "from_hugging_face"),
        ("bf16", "bfloat16", "from_hugging_face"),
        ("fp8", "bfloat16", "quantize"),
    ],
)
def test_plan_precisions(precision, dtype, api):
    from locllm_export.tensorrt_plan import BuildOptions, make_plan

    d = make_plan(_facts(), BuildOptions(precision=precision), "/w").decoder
    assert d.dtype == dtype and d.convert["api"].endswith(api) and d.convert["kwargs"]["dtype"] == dtype
    assert d.checkpoint_dir == f"/w/trtllm_checkpoint_{precision}"
    if precision == "fp8":
        assert "FP8" in d.convert["kwargs"]["quant_config"] and d.convert["kwargs"]["calib_dataset"]


def test_vision_plan_profile_and_precision_handling():
    from locllm_export.tensorrt_plan import BuildOptions, make_plan

    v = make_plan(_facts(), BuildOptions(vision_batch=(1, 17, 64), vision_precision="bf16", workspace_gib=2)).vision
    assert v.profile == {"pixel_values": {"min": [1, 3, 224, 224], "opt": [17, 3, 224, 224], "max": [64, 3, 224, 224]}}
    assert v.output_shape == [-1, 256, 4096]
    assert v.workspace_bytes == 2 << 30
    assert v.tensorrt10["builder_flags"] == ["BF16", "OBEY_PRECISION_CONSTRAINTS"]
    assert v.tensorrt10["fp32_layer_types"] == ["NORMALIZATION", "SOFTMAX"]
    assert v.tensorrt11["network_flags"] == ["STRONGLY_TYPED"] and v.tensorrt11["builder_flags"] == []
    assert v.tensorrt11["source_onnx"] == "tensorrt/vision_bf16.onnx"
    assert v.parity["min_token_cosine"] == 0.999
    assert v.plan == "tensorrt/vision.plan" and v.timing_cache == "tensorrt/vision.timing_cache"


@pytest.mark.parametrize(
    "kw",
    [
        {"precision": "int8"},
        {"vision_precision": "fp8"},
        {"tokens_per_block": 24},
        {"vision_batch": (2, 1, 8)},
        {"max_batch_size": 0},
    ],
)
def test_bad_options_are_refused(kw):
    from locllm_export.tensorrt_plan import BuildOptions, PlanError, make_plan

    with pytest.raises(PlanError):
        make_plan(_facts(), BuildOptions(**kw))


def test_lengths_beyond_the_model_are_refused():
    from locllm_export.tensorrt_plan import BuildOptions, PlanError, make_plan

    with pytest.raises(PlanError, match="max_position_embeddings"):
        make_plan(_facts(max_position_embeddings=300), BuildOptions())


def test_manifest_entries_name_checksummed_files():
    from locllm_export.tensorrt_plan import BuildOptions, make_plan, manifest_entries
    from locllm_sdk.manifest import TensorRTEntry

    plan = make_plan(_facts(), BuildOptions())
    entries = manifest_entries(plan, BUILT, {"vision_min_token_cosine": 0.9999})
    trt = entries["backends"]["tensorrt"]
    assert entries["build_machine"] == BUILT
    assert trt["prompt_table"]["fake_id_base"] == 32000
    assert trt["prompt_table"]["max_prompt_embedding_table_size"] == 64 * 256
    assert trt["decoder_dtype"] == "float16" and trt["tokens_per_block"] == 16
    files = {
        n: {}
        for n in (
            "tokenizer/tokenizer.model",
            "descriptions.yaml",
            trt["vision_plan"],
            trt["trtllm_engine"],
            trt["trtllm_config"],
            "vision.onnx",
        )
    }
    own = [n for n in TensorRTEntry.from_dict(trt).files() if n in files]
    assert {trt["vision_plan"], trt["trtllm_engine"], trt["trtllm_config"]} <= set(own)
    assert "vision.onnx" not in own
    json.dumps(entries)  # serialisable


def test_facts_from_checkpoint_and_manifest_agree(tiny_checkpoint, onnx_engine):
    from locllm_export.tensorrt_plan import ModelFacts
    from locllm_sdk.manifest import read_manifest

    a = ModelFacts.from_checkpoint(tiny_checkpoint)
    b = ModelFacts.from_manifest(onnx_engine, read_manifest(onnx_engine))
    assert a == b
    assert a.prefix_len == len(read_manifest(onnx_engine).tokenizer.prefix_ids)


# ------------------------------------------------------------------------------------------
# build_engines.py --dry-run


def _dry_run(args):
    """Run build_engines.py in a fresh interpreter; it reports which heavy modules it imported."""
    script = str(ROOT / "export" / "build_engines.py")
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}] + sys.argv[1:]\n"
        "rc = 0\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    rc = e.code\n"
        "print('IMPORTED:', [m for m in ('torch', 'tensorrt', 'tensorrt_llm') if m in sys.modules])\n"
        "sys.exit(rc)\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_plan_without_gpu_tensorrt_or_torch(tiny_checkpoint, tmp_path):
    out = tmp_path / "never_written"
    r = _dry_run(
        [
            "--checkpoint",
            str(tiny_checkpoint),
            "--output",
            str(out),
            "--targets",
            "onnx,tensorrt,trtllm",
            "--precision",
            "bf16",
            "--dry-run",
        ]
    )
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert "IMPORTED: []" in text
    assert not out.exists()
    assert "would run build_onnx_engine" in text
    assert "trtllm-build --checkpoint_dir" in text and "--max_prompt_embedding_table_size 16384" in text
    assert "--use_paged_context_fmha enable" in text and "--gather_generation_logits" in text
    assert "LLaMAForCausalLM.from_hugging_face" in text and "dtype='bfloat16'" in text
    assert '"min": [1, 3, 224, 224]' in text and "OBEY_PRECISION_CONSTRAINTS" in text
    assert "STRONGLY_TYPED" in text and "MemoryPoolType.WORKSPACE" in text
    assert '"build_machine"' in text and '"vision_plan": "tensorrt/vision.plan"' in text


def test_dry_run_on_an_existing_onnx_engine(onnx_engine):
    before = (onnx_engine / "manifest.json").read_text()
    r = _dry_run(
        [
            "--checkpoint",
            "unused",
            "--output",
            str(onnx_engine),
            "--targets",
            "tensorrt,trtllm",
            "--precision",
            "fp8",
            "--dry-run",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert "reuse the existing ONNX engine" in r.stdout and "LLaMAForCausalLM.quantize" in r.stdout
    assert (onnx_engine / "manifest.json").read_text() == before
    assert not (onnx_engine / "tensorrt").exists()


def test_cli_refuses_half_a_tensorrt_build(tiny_checkpoint, tmp_path):
    r = _dry_run(
        ["--checkpoint", str(tiny_checkpoint), "--output", str(tmp_path / "e"), "--targets", "tensorrt", "--dry-run"]
    )
    assert r.returncode == 2 and "both targets" in r.stderr


def test_real_tensorrt_build_fails_cleanly_without_tensorrt(onnx_engine, tiny_checkpoint):
    pytest.importorskip("torch")
    if gpu_logic.has_tensorrt_runtime():
        pytest.skip("TensorRT is installed here: the gpu tests cover the real build")
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export" / "build_engines.py"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--output",
            str(onnx_engine),
            "--targets",
            "tensorrt,trtllm",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "TensorRT" in r.stderr
    assert not (onnx_engine / "tensorrt").exists()


# ------------------------------------------------------------------------------------------
# precision-typed vision ONNX (the TensorRT >= 11 source) — runs on CPU


def test_typed_vision_onnx_keeps_norms_and_softmax_fp32(tiny_checkpoint, onnx_engine, tmp_path):
    import onnxruntime as ort
    from locllm_export.tensorrt_build import export_typed_vision_onnx, onnx_precision_report, token_cosines
    from locllm_training.model import load_checkpoint

    merged = load_checkpoint(tiny_checkpoint, with_lora=False)
    attn_before = merged.vision.config._attn_implementation
    for precision, low in (("fp16", "FLOAT16"), ("bf16", "BFLOAT16")):
        path = tmp_path / f"vision_{precision}.onnx"
        export_typed_vision_onnx(merged, path, precision)
        report = onnx_precision_report(path)
        assert report["LayerNormalization"] == ["FLOAT"] and report["Softmax"] == ["FLOAT"]
        assert report["MatMul"] == [low] and report["Conv"] == [low]
    assert merged.vision.config._attn_implementation == attn_before  # the model itself is untouched
    # ORT CPU runs the fp16 graph: it must agree with the verified fp32 graph.
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    typed = ort.InferenceSession(str(tmp_path / "vision_fp16.onnx"), providers=["CPUExecutionProvider"])
    ref = ort.InferenceSession(str(onnx_engine / "vision.onnx"), providers=["CPUExecutionProvider"])
    cos = token_cosines(typed.run(None, {"pixel_values": x})[0], ref.run(None, {"pixel_values": x})[0])
    assert cos.shape == (2, 256) and cos.min() >= 0.999


def test_token_cosines():
    from locllm_export.tensorrt_build import token_cosines

    a = np.random.default_rng(1).standard_normal((2, 5, 8))
    assert np.allclose(token_cosines(a, a), 1.0)
    assert np.allclose(token_cosines(a, -a), -1.0)
    assert np.allclose(token_cosines(a, 3 * a), 1.0)


# ------------------------------------------------------------------------------------------
# ONNX Runtime CUDA: never pretends


def test_ort_cuda_refuses_to_pretend_on_cpu_onnxruntime(onnx_engine):
    from locllm_sdk import Pose
    from locllm_sdk.backends.onnxruntime import BackendUnavailable

    if gpu_logic.ort_cuda_provider_listed() and gpu_logic.has_cuda_gpu():
        pytest.skip("this machine really has ORT CUDA (covered by tests/test_gpu.py)")
    with pytest.raises(BackendUnavailable, match="refusing to pretend"):
        Pose(onnx_engine, backend="onnxruntime-cuda")


def test_tensorrt_backend_on_an_engine_without_it(onnx_engine):
    from locllm_sdk import EngineError, Pose

    with pytest.raises(EngineError, match="no 'tensorrt' build"):
        Pose(onnx_engine, backend="tensorrt")


def test_answer_grammar_roundtrip_used_by_the_backend(grammars):
    g = grammars[3]
    assert AnswerGrammar.from_dict(g.to_dict()) == g


class _GpuReportingSession:
    """An onnxruntime-gpu InferenceSession as it behaves: it reports the providers it really
    enabled (here CUDA, except for the one graph ``cpu_only`` names, which ORT placed on the
    CPU) and has ``disable_fallback``; it computes on the real CPU session underneath."""

    made: list = []
    cpu_only: str | None = None

    def __init__(self, path, opts=None, providers=None):
        import onnxruntime as ort

        self.path, self.providers_asked, self.fallback = str(path), providers, True
        self._real = ort.capi.onnxruntime_inference_collection.InferenceSession(
            str(path), opts, providers=["CPUExecutionProvider"]
        )
        _GpuReportingSession.made.append(self)

    def get_providers(self):
        if self.cpu_only and self.path.endswith("/" + self.cpu_only):
            return ["CPUExecutionProvider"]
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def disable_fallback(self):
        self.fallback = False

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_ort_cuda_checks_every_session_and_disables_fallback(onnx_engine, monkeypatch):
    import onnxruntime as ort
    from locllm_sdk import BackendUnavailable, Pose

    monkeypatch.setattr(ort, "InferenceSession", _GpuReportingSession)
    _GpuReportingSession.made, _GpuReportingSession.cpu_only = [], "decoder_shared.onnx"
    with pytest.raises(BackendUnavailable, match="decoder_shared.onnx .*runs on \\['CPUExecutionProvider'\\]"):
        Pose(onnx_engine, backend="onnxruntime-cuda")
    _GpuReportingSession.made, _GpuReportingSession.cpu_only = [], None
    pose = Pose(onnx_engine, backend="onnxruntime-cuda", device=1)
    assert pose.backend_name == "onnxruntime-cuda" and len(_GpuReportingSession.made) == 3
    for s in _GpuReportingSession.made:  # a failing run raises instead of retrying on the CPU
        assert s.fallback is False
        assert s.providers_asked[0] == ("CUDAExecutionProvider", {"device_id": "1"})
    assert len(pose.locate(np.zeros((40, 30, 3), np.uint8), ["nose"])[0]) == 1


def test_auto_falls_back_when_a_gpu_backend_cannot_start(onnx_engine, monkeypatch):
    from locllm_sdk import BackendUnavailable, Pose

    if gpu_logic.ort_cuda_provider_listed() and gpu_logic.has_cuda_gpu():
        pytest.skip("this machine really has ORT CUDA")
    # the probes say: a GPU, and onnxruntime lists CUDA; the real CPU-only onnxruntime cannot run it
    monkeypatch.setattr(gpu_logic, "has_cuda_gpu", lambda: True)
    monkeypatch.setattr(gpu_logic, "ort_cuda_provider_listed", lambda: True)
    with pytest.warns(UserWarning, match="'onnxruntime-cuda' cannot run here.*falling back to 'onnxruntime'"):
        pose = Pose(onnx_engine)
    assert pose.backend_name == "onnxruntime"
    with pytest.raises(BackendUnavailable, match="refusing to pretend"):
        Pose(onnx_engine, backend="onnxruntime-cuda")  # an explicit backend is never swapped


def test_regex_escapes_metacharacters_only(grammars, text_of):
    # re.escape writes "\ " for a space, which xgrammar's regex converter does not know
    for g in grammars.values():
        rx = gpu_logic.answer_regex(g, text_of)
        assert rx.startswith(" \\[") and "\\ " not in rx
    assert gpu_logic.regex_literal("a b.[c]") == "a b\\.\\[c\\]"


def test_hf_export_for_trtllm_carries_a_loadable_tokenizer(tiny_checkpoint, tmp_path):
    """fp8 quantization (ModelOpt) calls AutoTokenizer.from_pretrained on the exported HF dir."""
    from locllm_export.tensorrt_build import export_hf_llama
    from locllm_training.model import load_checkpoint
    from transformers import AutoTokenizer

    export_hf_llama(load_checkpoint(tiny_checkpoint, with_lora=False), tmp_path / "hf", tiny_checkpoint)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ids = tok("The neck is between the shoulders.")["input_ids"]
    assert len(ids) > 5 and tok.decode(ids, skip_special_tokens=True).strip() == "The neck is between the shoulders."
