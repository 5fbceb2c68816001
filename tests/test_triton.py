"""The Triton model repository of a TensorRT build: layout, configs read back, ensemble wiring,
agreement with the manifest, and the preprocessing model run through a stand-in for Triton's
Python-backend module (CPU; Triton itself is never started here)."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from locllm_sdk.errors import EngineError
from locllm_sdk.manifest import TENSORRT, read_manifest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "export"))

from locllm_export import triton  # noqa: E402
from locllm_export.tensorrt_plan import BuildOptions, ModelFacts, make_plan, tensorrt_entry  # noqa: E402

# -- a small reader of protobuf text format: every field -> list of its values ---------------

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([^\s{}\[\]:,"]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            if text[pos:].strip():
                raise ValueError(f"unreadable pbtxt at {text[pos : pos + 20]!r}")
            break
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def _value(tok: str):
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    return {"true": True, "false": False}.get(tok, tok)


def _message(toks: list[str], i: int, end: str | None) -> tuple[dict, int]:
    msg: dict = {}

    def sub_message(key: str, i: int) -> int:  # toks[i] is "{"; returns the index after "}"
        sub, i = _message(toks, i + 1, "}")
        msg.setdefault(key, []).append(sub)
        return i + 1

    while i < len(toks) and toks[i] != end:
        key = toks[i]
        i += 1
        if toks[i] == ":":
            i += 1
        if toks[i] == "{":
            i = sub_message(key, i)
        elif toks[i] == "[":
            i += 1
            items = []
            while toks[i] != "]":
                if toks[i] == "{":
                    i = sub_message(key, i)
                elif toks[i] == ",":
                    i += 1
                else:
                    items.append(_value(toks[i]))
                    i += 1
            if items or key not in msg:
                msg.setdefault(key, []).append(items)
            i += 1
        else:
            msg.setdefault(key, []).append(_value(toks[i]))
            i += 1
    return msg, i


def read_pbtxt(text: str) -> dict:
    msg, _ = _message(_tokens(text), 0, None)
    return msg


def one(msg: dict, key: str):
    (value,) = msg[key]
    return value


def tensors(config: dict, kind: str) -> dict[str, dict]:
    return {one(t, "name"): t for t in config.get(kind, [])}


def params(config: dict) -> dict[str, str]:
    return {one(p, "key"): one(one(p, "value"), "string_value") for p in config.get("parameters", [])}


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    """The demo ONNX engine's manifest with the TensorRT build the planner would record."""
    from locllm_sdk.demo import engine_for, resolve_model

    engine_dir = Path(engine_for(resolve_model("demo")))
    manifest = read_manifest(engine_dir)
    opts = BuildOptions(precision="bf16", max_batch_size=12, vision_batch=(1, 4, 16))
    plan = make_plan(ModelFacts.from_manifest(engine_dir, manifest), opts, "/w", str(engine_dir))
    backends = {**manifest.backends, TENSORRT: tensorrt_entry(plan)}
    return engine_dir, dataclasses.replace(manifest, backends=backends)


@pytest.fixture(scope="module")
def repo(engine, tmp_path_factory):
    engine_dir, manifest = engine
    out = tmp_path_factory.mktemp("triton") / "repository"
    assert triton.write_repository(engine_dir, manifest, out) == out
    configs = {p.parent.name: read_pbtxt(p.read_text()) for p in out.glob(f"*/{triton.CONFIG}")}
    return out, configs


# -- tests -------------------------------------------------------------------------------------


def test_layout_one_config_and_version_dir_per_model(repo, engine):
    out, configs = repo
    engine_dir, manifest = engine
    models = {triton.ENSEMBLE, triton.PREPROCESSING, triton.VISION, triton.PROMPT_TABLE, triton.DECODER}
    assert {p.name for p in out.iterdir()} == models
    for name in models:
        assert (out / name / "1").is_dir()
        assert one(configs[name], "name") == name  # Triton requires the folder's name
    assert (out / triton.PREPROCESSING / "1" / "model.py").is_file()
    assert (out / triton.PROMPT_TABLE / "1" / "model.py").is_file()
    plan = out / triton.VISION / "1" / "model.plan"
    assert plan.is_symlink()
    assert Path(plan.readlink()) == engine_dir.resolve() / manifest.backend(TENSORRT).vision_plan
    assert not list(out.parent.glob(".repository.*"))  # the temporary directory is gone


def test_backends_and_parameters(repo, engine):
    _, configs = repo
    engine_dir, manifest = engine
    entry = manifest.backend(TENSORRT)
    assert one(configs[triton.PREPROCESSING], "backend") == "python"
    assert one(configs[triton.PROMPT_TABLE], "backend") == "python"
    assert one(configs[triton.VISION], "platform") == "tensorrt_plan"
    assert one(configs[triton.ENSEMBLE], "platform") == "ensemble"
    dec = configs[triton.DECODER]
    assert one(dec, "backend") == "tensorrtllm"
    p = params(dec)
    assert Path(p["gpt_model_path"]) == engine_dir.resolve() / entry.trtllm_dir
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert params(configs[triton.PREPROCESSING])["engine_dir"] == str(engine_dir.resolve())
    assert one(one(dec, "model_transaction_policy"), "decoupled") is False
    assert one(one(configs[triton.VISION], "instance_group"), "kind") == "KIND_GPU"
    # batch sizes: the build's TensorRT-LLM max_batch_size and the ViT profile's max; the
    # ensemble no larger than any step
    assert one(dec, "max_batch_size") == 12
    assert one(configs[triton.VISION], "max_batch_size") == 16
    steps = [one(s, "model_name") for s in one(configs[triton.ENSEMBLE], "ensemble_scheduling")["step"]]
    assert all(one(configs[s], "max_batch_size") >= one(configs[triton.ENSEMBLE], "max_batch_size") for s in steps)


def test_names_dtypes_dims_agree_with_the_manifest(repo, engine):
    _, configs = repo
    _, manifest = engine
    entry, m = manifest.backend(TENSORRT), manifest.model
    vis_in = tensors(configs[triton.VISION], "input")
    vis_out = tensors(configs[triton.VISION], "output")
    assert list(vis_in) == [entry.vision_input] and list(vis_out) == [entry.vision_output]
    assert one(vis_in[entry.vision_input], "dims") == [3, m.image_size, m.image_size]
    assert one(vis_in[entry.vision_input], "data_type") == "TYPE_FP32"
    assert one(vis_out[entry.vision_output], "dims") == [m.num_patches, m.hidden_size]
    assert one(vis_out[entry.vision_output], "data_type") == "TYPE_FP32"
    assert entry.decoder_dtype == "bfloat16"
    table_out = tensors(configs[triton.PROMPT_TABLE], "output")["prompt_embedding_table"]
    table_in = tensors(configs[triton.DECODER], "input")["prompt_embedding_table"]
    assert one(table_out, "data_type") == one(table_in, "data_type") == "TYPE_BF16"
    assert one(table_out, "dims") == [entry.prompt_table_rows, m.hidden_size]
    assert one(tensors(configs[triton.PREPROCESSING], "output")[entry.vision_input], "dims") == one(
        vis_in[entry.vision_input], "dims"
    )


def test_every_ensemble_step_reads_what_exists_and_the_outputs_are_produced(repo):
    _, configs = repo
    ens = configs[triton.ENSEMBLE]
    available = set(tensors(ens, "input"))
    produced_dtype: dict[str, str] = {n: one(t, "data_type") for n, t in tensors(ens, "input").items()}
    steps = one(ens, "ensemble_scheduling")["step"]
    assert [one(s, "model_name") for s in steps][-1] == triton.DECODER
    for s in steps:
        model = configs[one(s, "model_name")]
        ins, outs = tensors(model, "input"), tensors(model, "output")
        mapped = {one(kv, "key"): one(kv, "value") for kv in s["input_map"]}
        for key, source in mapped.items():
            assert key in ins, f"{one(s, 'model_name')} has no input {key}"
            assert source in available, f"{one(s, 'model_name')} reads {source} before any step makes it"
            assert produced_dtype[source] == one(ins[key], "data_type"), (key, source)
        required = {n for n, t in ins.items() if not t.get("optional", [False])[0]}
        assert required <= set(mapped), f"{one(s, 'model_name')} misses {required - set(mapped)}"
        for kv in s["output_map"]:
            key, target = one(kv, "key"), one(kv, "value")
            assert key in outs and target not in available  # each ensemble tensor made once
            available.add(target)
            produced_dtype[target] = one(outs[key], "data_type")
    for name, t in tensors(ens, "output").items():
        assert name in available and produced_dtype[name] == one(t, "data_type")


def test_configs_parse_as_tritons_model_config(repo):
    """Where Triton's own schema is installed (tritonclient[grpc]), every config parses into it:
    each field name, enum value and nesting is one Triton knows."""
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format

    out, configs = repo
    for name in configs:
        parsed = text_format.Parse((out / name / triton.CONFIG).read_text(), mc.ModelConfig())
        assert parsed.name == name
    ensemble = text_format.Parse((out / triton.ENSEMBLE / triton.CONFIG).read_text(), mc.ModelConfig())
    assert [s.model_name for s in ensemble.ensemble_scheduling.step][-1] == triton.DECODER


def test_a_manifest_without_a_tensorrt_build_is_refused(engine, tmp_path):
    engine_dir, manifest = engine
    onnx_only = dataclasses.replace(manifest, backends={k: v for k, v in manifest.backends.items() if k != TENSORRT})
    with pytest.raises(EngineError, match="tensorrt"):
        triton.write_repository(engine_dir, onnx_only, tmp_path / "repo")
    assert not (tmp_path / "repo").exists() and not list(tmp_path.iterdir())


def test_an_existing_repository_is_kept_without_overwrite(engine, tmp_path):
    engine_dir, manifest = engine
    out = tmp_path / "repo"
    out.mkdir()
    with pytest.raises(FileExistsError):
        triton.write_repository(engine_dir, manifest, out)
    triton.write_repository(engine_dir, manifest, out, overwrite=True)
    assert (out / triton.ENSEMBLE / triton.CONFIG).is_file()


class _Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


def _python_backend_stand_in() -> types.ModuleType:
    """The part of ``triton_python_backend_utils`` the preprocessing model calls."""
    mod = types.ModuleType("triton_python_backend_utils")
    mod.Tensor = _Tensor
    mod.get_input_tensor_by_name = lambda request, name: request[name]
    mod.TritonError = lambda message: message
    mod.InferenceResponse = lambda tensors=None, error=None: {"tensors": tensors, "error": error}
    return mod


def test_preprocessing_model_gives_the_sdk_crop_and_prompt(repo, engine, monkeypatch):
    from locllm_sdk.crop import crop_geometry
    from locllm_sdk.loader import ModelSpec
    from locllm_sdk.pipeline import crop_batch

    out, configs = repo
    engine_dir, manifest = engine
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _python_backend_stand_in())
    module = types.ModuleType("locllm_preprocessing_model")
    exec(compile((out / triton.PREPROCESSING / "1" / "model.py").read_text(), "model.py", "exec"), module.__dict__)
    model = module.TritonPythonModel()
    config = {"parameters": {"engine_dir": {"string_value": str(engine_dir)}}}
    monkeypatch.setattr(module, "read_manifest", lambda _: manifest)  # the manifest with the planned build
    model.initialize({"model_config": json.dumps(config)})

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[10, 20, 60, 90], [80, 5, 50, 100]], np.float32)
    request = {
        "image": _Tensor("image", np.stack([image, image])),
        "box": _Tensor("box", boxes),
        "keypoint": _Tensor("keypoint", np.array([[b"neck"], [b"left wrist"]], object)),
        "description": _Tensor("description", np.array([[b""], [b"the joint of the left hand"]], object)),
    }
    # a name the library lacks, without a description of its own
    bad = {**request, "keypoint": _Tensor("keypoint", np.array([[b"neck"], [b"no such keypoint"]], object))}
    bad["description"] = _Tensor("description", np.array([[b""], [b""]], object))
    good, refused = model.execute([request, bad])
    assert good["error"] is None and refused["error"] and "no such keypoint" in refused["error"]
    got = {t.name: t.array for t in good["tensors"]}
    assert set(got) == set(tensors(configs[triton.PREPROCESSING], "output"))

    spec = ModelSpec.from_manifest(engine_dir, manifest)
    entry, vocab = manifest.backend(TENSORRT), manifest.model.vocab_size
    geoms = [crop_geometry(b, image.shape[:2], spec.image_size) for b in boxes]
    np.testing.assert_array_equal(got[entry.vision_input], crop_batch(image, geoms, spec))
    np.testing.assert_array_equal(got["crop_inverse"], np.stack([g.inverse for g in geoms]).astype(np.float32))
    library = model.library
    for i, (name, desc) in enumerate([("neck", None), ("left wrist", "the joint of the left hand")]):
        req = library.resolve({name: desc})[0]
        want = spec.tokenizer.round_ids(req.name, req.description)
        n = int(got["input_lengths"][i, 0])
        row = got["input_ids"][i]
        assert n == len(spec.prefix_ids) + len(want)
        assert list(row[len(spec.prefix_ids) : n]) == want
        fakes = [t for t in row[: len(spec.prefix_ids)] if t >= vocab]
        assert fakes == list(range(vocab, vocab + entry.prompt_table_rows))  # one table row per image token
    assert (got["request_output_len"] == triton.MAX_NEW_TOKENS[manifest.model.coord_dims]).all()
    assert (got["end_id"] == spec.tokenizer.spec.eos_id).all()


def test_build_engines_targets_triton(engine, tmp_path, capsys):
    """The CLI path: an engine directory without a TensorRT build is refused with one line."""
    import importlib.util

    engine_dir, _ = engine
    spec = importlib.util.spec_from_file_location("build_engines", ROOT / "export" / "build_engines.py")
    build_engines = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_engines)
    argv = ["--checkpoint", str(tmp_path), "--output", str(engine_dir), "--targets", "triton"]
    assert build_engines.main([*argv, "--triton-repository", str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tensorrt" in err and err.count("\n") == 1
    assert not (tmp_path / "repo").exists()
