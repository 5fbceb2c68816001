"""Checkpoint -> engine directory (ONNX target), verified against PyTorch before success."""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from locllm_sdk.descriptions import default_library_path
from locllm_sdk.loader import checkpoint_confidence, read_config
from locllm_sdk.manifest import (
    DESCRIPTIONS_FILE,
    ORT_CPU,
    TOKENIZER_DIR,
    VISION_INPUT,
    VISION_OUTPUT,
    EngineManifest,
    ModelInfo,
    MoeLoraInfo,
    OnnxRuntimeEntry,
    Precision,
    TokenizerInfo,
    decoder_io_names,
    files_section,
    sha256_file,
    shared_step_io_names,
)
from locllm_sdk.protocol import PromptTokenizer, build_grammar
from locllm_training.graphs import DecoderStep, SharedPrefixStep, VisionTower, empty_past, head_dim_of
from locllm_training.model import LLM_LORA_TARGETS, TOKENIZER_FILES, LocLLM, load_checkpoint, merge_lora

from .onnx_files import graphs_external_data, share_external_data
from .onnx_graphs import OPSET, export_decoder, export_shared_step, export_vision
from .quantize import PrecisionOptions, reduce_engine

MERGE_TOLERANCE = 1e-4  # relative to the output scale
GRAPH_TOLERANCE = 1e-4


class ExportVerificationError(RuntimeError):
    """An exported graph (or the LoRA merge) does not reproduce the PyTorch model."""


@dataclass
class BuildReport:
    engine_dir: Path
    checks: dict = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"engine written to {self.engine_dir} in {self.seconds:.1f}s"]
        for name, value in self.checks.items():
            lines.append(f"  {name:<34} {value}")
        return "\n".join(lines)


def _fixed_inputs(model: LocLLM, seed: int = 1234):
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    pixels = torch.randn(2, 3, s, s, generator=g)
    cfg = model.llm.config
    ids = torch.randint(3, cfg.vocab_size, (2, 7), generator=g)
    return pixels, ids


def _rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(1.0, float(np.abs(b).max())))


def _run_step(step: DecoderStep, embeds, mask, pos, index, past):
    with torch.inference_mode():
        out = step(embeds, mask, pos, index, *past)
    return out[0], list(out[1:])


def check_merge(unmerged: LocLLM, merged: LocLLM) -> float:
    """Merged and unmerged models agree on a fixed input (image tokens and logits)."""
    pixels, ids = _fixed_inputs(unmerged)
    diffs = []
    with torch.inference_mode():
        a = VisionTower(unmerged)(pixels).numpy()
        b = VisionTower(merged)(pixels).numpy()
        diffs.append(_rel_diff(b, a))
        for model_a, model_b in [(unmerged, merged)]:
            embeds = model_a.embed_tokens(ids)
            mask = torch.ones_like(ids)
            pos = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
            index = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)
            la, _ = _run_step(DecoderStep(model_a.llm), embeds, mask, pos, index, empty_past(model_a.llm.config, 2))
            lb, _ = _run_step(DecoderStep(model_b.llm), embeds, mask, pos, index, empty_past(model_b.llm.config, 2))
            diffs.append(_rel_diff(lb.numpy(), la.numpy()))
    worst = max(diffs)
    if worst > MERGE_TOLERANCE:
        raise ExportVerificationError(f"LoRA merge changed outputs by {worst:.2e} (> {MERGE_TOLERANCE})")
    return worst


def verify_onnx(engine_dir: Path, merged: LocLLM, files: OnnxRuntimeEntry) -> dict:
    """Run the exported graphs in ONNX Runtime against the torch model they were exported
    from (LoRA merged; an MoE-LoRA LM unmerged, its gate and experts live): the vision tower
    on fixed crops; the decoder as a prefill from an empty cache then a multi-token step on
    top of it with right padding (the runtime's exact pattern)."""
    import onnxruntime as ort

    vision = ort.InferenceSession(str(engine_dir / files.vision), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(engine_dir / files.decoder), providers=["CPUExecutionProvider"])
    pixels, ids = _fixed_inputs(merged)
    with torch.inference_mode():
        ref_img = VisionTower(merged)(pixels).numpy()
    got_img = vision.run([VISION_OUTPUT], {VISION_INPUT: pixels.numpy()})[0]
    checks = {"vision max rel diff": _rel_diff(got_img, ref_img)}

    step = DecoderStep(merged.llm).eval()
    cfg = merged.llm.config
    n_layers = cfg.num_hidden_layers
    step_names, _ = decoder_io_names(n_layers)
    past_names = step_names[4:]
    with torch.inference_mode():
        embeds = merged.embed_tokens(ids)
    b, t = ids.shape
    mask = torch.ones(b, t, dtype=torch.int64)
    pos = torch.arange(t).repeat(b, 1)
    index = torch.tensor([[t - 1], [t - 2]])
    ref_logits, ref_past = _run_step(step, embeds, mask, pos, index, empty_past(cfg, b))
    feeds = dict(zip(step_names, (embeds.numpy(), mask.numpy(), pos.numpy(), index.numpy())))
    feeds.update({n: p.numpy() for n, p in zip(past_names, empty_past(cfg, b))})
    out = decoder.run(None, feeds)
    d1 = _rel_diff(out[0], ref_logits.numpy())
    # second pass: 3 new tokens, row 1 right-padded by one
    g = torch.Generator().manual_seed(7)
    new = torch.randn(b, 3, cfg.hidden_size, generator=g)
    mask2 = torch.cat([mask, torch.tensor([[1, 1, 1], [1, 1, 0]])], dim=1)
    pos2 = torch.tensor([[t, t + 1, t + 2], [t, t + 1, t + 1]])
    index2 = torch.tensor([[2, 0], [1, 0]])
    ref2, _ = _run_step(step, new, mask2, pos2, index2, ref_past)
    feeds2 = dict(zip(step_names, (new.numpy(), mask2.numpy(), pos2.numpy(), index2.numpy())))
    feeds2.update(dict(zip(past_names, out[1:])))
    out2 = decoder.run(None, feeds2)
    d2 = _rel_diff(out2[0], ref2.numpy())
    checks["decoder prefill max rel diff"] = d1
    checks["decoder cached step max rel diff"] = d2
    if files.decoder_shared:
        # cascade step: the prefill's 2 rows as 2 crops, 2 rows each, one right-padded; it must
        # agree with the plain step over copied prefixes, in torch and in ONNX Runtime
        shared = ort.InferenceSession(str(engine_dir / files.decoder_shared), providers=["CPUExecutionProvider"])
        rows = torch.tensor([0, 0, 1, 1])
        new4 = torch.randn(4, 3, cfg.hidden_size, generator=g)
        own = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
        pos4 = torch.tensor([[t, t + 1, t + 2], [t, t + 1, t + 1], [t, t + 1, t + 2], [t, t, t]])
        index4 = torch.tensor([[2, 0], [1, 0], [2, 1], [0, 0]])
        copied = [p.index_select(0, rows) for p in ref_past]
        mask4 = torch.cat([torch.ones(4, t, dtype=torch.int64), own], dim=1)
        ref4, _ = _run_step(step, new4, mask4, pos4, index4, copied)
        with torch.inference_mode():
            torch4 = SharedPrefixStep(merged.llm).eval()(new4, own, pos4, index4, *ref_past, *empty_past(cfg, 4))[0]
        shared_names = shared_step_io_names(n_layers)[0]
        feeds4 = dict(zip(shared_names, (new4.numpy(), own.numpy(), pos4.numpy(), index4.numpy())))
        feeds4.update(dict(zip(shared_names[4 : 4 + 2 * n_layers], out[1:])))
        feeds4.update({n: p.numpy() for n, p in zip(past_names, empty_past(cfg, 4))})
        got4 = shared.run(None, feeds4)[0]
        checks["cascade step (torch) max rel diff"] = _rel_diff(torch4.numpy(), ref4.numpy())
        checks["cascade step (onnx) max rel diff"] = _rel_diff(got4, ref4.numpy())
    worst = max(checks.values())
    if not np.isfinite(worst) or worst > GRAPH_TOLERANCE:
        raise ExportVerificationError(
            f"exported ONNX graphs disagree with PyTorch: {checks} (tolerance {GRAPH_TOLERANCE})"
        )
    return checks


def _versions() -> dict:
    import locllm_sdk
    import onnx
    import onnxruntime
    import transformers

    return {
        "locllm_sdk": locllm_sdk.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "onnx_opset": OPSET,
    }


def _weights_sha256(checkpoint: Path) -> str:
    """sha256 of model.safetensors, or of the shard digests in order for a sharded checkpoint."""
    single = checkpoint / "model.safetensors"
    if single.is_file():
        return sha256_file(single)
    import hashlib

    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    shards = dict.fromkeys(index["weight_map"].values())
    return hashlib.sha256("".join(sha256_file(checkpoint / s) for s in shards).encode()).hexdigest()


def _parent_sha256(checkpoint: Path) -> list[str]:
    """The weight sha256 of each delta parent, nearest first (verified on load); [] for none."""
    chain = []
    config = checkpoint / "config.json"
    while config.is_file() and (ref := json.loads(config.read_text()).get("parent_weights")):
        chain.append(ref["sha256"])
        checkpoint = checkpoint / ref["path"]
        config = checkpoint / "config.json"
    return chain


def build_onnx_engine(
    checkpoint: str | Path,
    output: str | Path,
    overwrite: bool = False,
    layerscale: str = "checkpoint",
    dino_weights: str | Path | None = None,
    progress: bool = False,
    precision: PrecisionOptions | None = None,
) -> BuildReport:
    """Build an engine from our checkpoint format or from a public LocLLM directory (converted
    first into a temporary checkpoint, prompt ids verified against its slow tokenizer;
    ``layerscale``/``dino_weights`` apply to that conversion only). ``progress``: a tqdm bar
    over the build's stages (on stderr). ``precision``: reduced-precision graphs, parity-gated
    (``quantize.reduce_engine``; an EngineError and no engine directory below the gate)."""
    from locllm_training.official import SOURCE_FORMAT, convert_official, is_official_checkpoint

    checkpoint, output = Path(checkpoint).resolve(), Path(output)
    if not is_official_checkpoint(checkpoint):
        return _build_onnx_engine(checkpoint, output, overwrite, progress=progress, precision=precision)
    if output.exists() and not overwrite and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    import tempfile

    with tempfile.TemporaryDirectory(prefix="locllm-official-") as tmp:
        converted = convert_official(
            checkpoint, Path(tmp) / "checkpoint", layerscale=layerscale, dino_weights=dino_weights
        )
        return _build_onnx_engine(
            converted.output,
            output,
            overwrite,
            source=checkpoint,
            source_format=SOURCE_FORMAT,
            notes=converted.notes,
            progress=progress,
            precision=precision,
        )


def _build_onnx_engine(
    checkpoint: Path,
    output: Path,
    overwrite: bool = False,
    source: Path | None = None,
    source_format: str = "locllm-sdk-checkpoint",
    notes: list[str] | None = None,
    progress: bool = False,
    precision: PrecisionOptions | None = None,
) -> BuildReport:
    start = time.perf_counter()
    if output.exists() and not overwrite and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty (pass --overwrite to replace it)")
    tmp = output.with_name(output.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    report = BuildReport(output)
    from tqdm import tqdm

    bar = tqdm(total=len(BUILD_STAGES), desc="building the engine", unit="stage", disable=not progress)
    try:
        _write_engine(checkpoint, tmp, report, source, source_format, notes, bar)
        if precision is not None and precision.reduced:
            _reduce_precision(tmp, precision, report)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted or failed build leaves nothing
        raise
    # the engine appears only once complete and verified; a replaced one goes only then
    old = output.with_name(output.name + ".old")
    if output.exists():
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
    tmp.rename(output)
    shutil.rmtree(old, ignore_errors=True)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _reduce_precision(tmp: Path, precision: PrecisionOptions, report: BuildReport) -> None:
    """Replace the verified fp32 engine in ``tmp`` by its gated reduced-precision version."""
    reduced = tmp.with_name(tmp.name + ".reduced")
    agreement = reduce_engine(
        tmp,
        reduced,
        vision=precision.vision,
        decoder=precision.decoder,
        min_agreement=precision.min_agreement,
        force=precision.force,
        calibration_images=precision.calibration_images,
    )
    shutil.rmtree(tmp)
    reduced.rename(tmp)
    report.checks[f"{precision.vision}/{precision.decoder} answers == fp32"] = (
        f"{agreement.identical}/{agreement.answers} ({agreement.fraction:.1%}; gate {precision.min_agreement:.1%})"
    )


# the manifest's precision.lora of an MoE-LoRA engine (a plain one keeps Precision's default)
MOE_LORA_PRECISION = "vision merged-fp32, LM moe-lora unmerged-fp32"


def _llm_adapter_facts(config) -> dict:
    """ModelInfo's llm_adapter and moe_lora for a model config (plain LoRA: the defaults)."""
    if config.llm_adapter != "moe-lora":
        return {}
    moe, lora = config.moe_llm, config.lora_llm
    info = MoeLoraInfo(
        experts=moe.experts,
        top_k=moe.top_k,
        zero_expert=moe.zero_expert,
        rank=lora.r,
        alpha=float(lora.alpha),
        targets=tuple(LLM_LORA_TARGETS),
        layers=None if lora.layers is None else tuple(lora.layers),
    )
    return {"llm_adapter": "moe-lora", "moe_lora": info}


BUILD_STAGES = ("LoRA merge", "vision graph", "decoder graph", "cascade decoder graph", "verification")


def _write_engine(
    checkpoint: Path,
    tmp: Path,
    report: BuildReport,
    source: Path | None,
    source_format: str,
    notes: list[str] | None,
    bar,
) -> None:
    def stage(i: int) -> None:  # the bar shows the stage now running
        if i:
            bar.update()
        bar.set_postfix_str(BUILD_STAGES[i])

    stage(0)
    torch.manual_seed(0)
    unmerged = load_checkpoint(checkpoint, with_lora=True)
    # an MoE-LoRA LM stays unmerged (its gate picks experts per token): the decoder graphs
    # carry the gate and the experts, verified below against this same unmerged mixture
    merged = merge_lora(unmerged, keep_moe=True)
    report.checks["LoRA merge max rel diff"] = check_merge(unmerged, merged)
    del unmerged

    tokenizer = PromptTokenizer.from_dir(checkpoint)
    cfg = merged.config
    grammar = build_grammar(tokenizer, cfg.coord_dims)
    stage(1)
    export_vision(merged, tmp / "vision.onnx")
    stage(2)
    export_decoder(merged, tmp / "decoder.onnx")
    stage(3)
    export_shared_step(merged, tmp / "decoder_shared.onnx")
    share_external_data(tmp / "decoder.onnx", tmp / "decoder_shared.onnx")
    np.save(tmp / "embeddings.npy", merged.llm.get_input_embeddings().weight.detach().float().numpy())
    (tmp / TOKENIZER_DIR).mkdir()
    for name in TOKENIZER_FILES:
        if (checkpoint / name).exists():
            shutil.copyfile(checkpoint / name, tmp / TOKENIZER_DIR / name)
    shutil.copyfile(default_library_path(), tmp / DESCRIPTIONS_FILE)

    llm = merged.llm.config
    heads = llm.num_attention_heads
    model = ModelInfo(
        source_checkpoint=str(source or checkpoint),
        source_format=source_format,
        checkpoint_sha256=_weights_sha256(checkpoint),
        parent_checkpoint_sha256=tuple(_parent_sha256(checkpoint)),
        coord_dims=cfg.coord_dims,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_patches=cfg.num_patches,
        norm_mean=tuple(cfg.norm_mean),
        norm_std=tuple(cfg.norm_std),
        vision_hidden_size=merged.vision.config.hidden_size,
        vision_layers=merged.vision.config.num_hidden_layers,
        hidden_size=llm.hidden_size,
        vocab_size=llm.vocab_size,
        num_layers=llm.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=llm.num_key_value_heads or heads,
        head_dim=head_dim_of(llm),
        max_position_embeddings=llm.max_position_embeddings,
        parameters=sum(p.numel() for p in merged.parameters()),
        vision_parameters=sum(p.numel() for p in merged.vision.parameters())
        + sum(p.numel() for p in merged.projector.parameters()),
        decoder_layer_parameters=sum(p.numel() for p in merged.llm.model.layers.parameters()),
        conversion_notes=tuple(notes or ()),
        **_llm_adapter_facts(cfg),
    )
    spec = tokenizer.spec
    tokenizer_info = TokenizerInfo(
        legacy=spec.legacy,
        bos_id=spec.bos_id,
        eos_id=spec.eos_id,
        pad_id=spec.pad_id,
        im_patch_id=spec.im_patch_id,
        digit_ids=tuple(grammar.digit_ids),
        answer_grammar=grammar.to_dict(),
        prefix_ids=tuple(tokenizer.prefix_ids(cfg.num_patches)),
        dir=TOKENIZER_DIR,
    )
    onnx_files = OnnxRuntimeEntry(
        vision="vision.onnx",
        decoder="decoder.onnx",
        decoder_shared="decoder_shared.onnx",
        embeddings="embeddings.npy",
        opset=OPSET,
    )
    onnx_files = replace(onnx_files, external_data=graphs_external_data(tmp, onnx_files))
    stage(4)
    report.checks.update(verify_onnx(tmp, merged, onnx_files))
    bar.update()
    manifest = EngineManifest(
        model=model,
        tokenizer=tokenizer_info,
        backends={ORT_CPU: onnx_files},
        precision=Precision(lora=MOE_LORA_PRECISION) if model.moe_lora else Precision(),
        files=files_section(tmp),
        protocol_version=cfg.protocol_version,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        built_with=_versions(),
        verification={k: float(v) for k, v in report.checks.items()},
        confidence=checkpoint_confidence(read_config(checkpoint)),
    )
    manifest.write(tmp)
