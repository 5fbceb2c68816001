"""The TensorRT / TensorRT-LLM build plan: pure, no torch, no tensorrt.

Everything ``build_engines.py --targets tensorrt,trtllm`` will do is decided here from the
model's facts (a checkpoint's config.json + tokenizer, or an engine manifest) and the build
options, so ``--dry-run`` can print it on any machine and tests can check it:

* vision: TensorRT builder settings, the optimization profile, precision handling for
  TensorRT 10 (builder flags + fp32 layers) and TensorRT >= 11 (strongly typed network from
  an ONNX graph that carries its own precisions), plan/timing-cache paths, parity gate;
* decoder: the Hugging Face Llama export, the TensorRT-LLM checkpoint conversion (Python API
  call) and the exact ``trtllm-build`` command line, with lengths derived from the protocol;
* the manifest entries the build writes.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from locllm_sdk.loader import ModelSpec
from locllm_sdk.manifest import TENSORRT, VISION_INPUT, VISION_OUTPUT, EngineManifest, TensorRTEntry
from locllm_sdk.protocol import MAX_NEW_TOKENS, PromptTokenizer

DECODER_PRECISIONS = ("fp16", "bf16", "fp8")
VISION_PRECISIONS = ("fp16", "bf16")
# TensorRT-LLM checkpoint dtype of each decoder precision (fp8: FP8 weights/activations and
# KV cache on top of a bf16 model, the reference LLM's own dtype).
TRTLLM_DTYPE = {"fp16": "float16", "bf16": "bfloat16", "fp8": "bfloat16"}
VISION_COSINE_MIN = 0.999  # per image token, TensorRT vs ONNX Runtime fp32, on the build machine

# Engine-directory layout of the NVIDIA build (relative to the engine dir).
TRT_DIR = "tensorrt"
VISION_PLAN = f"{TRT_DIR}/vision.plan"
VISION_TIMING_CACHE = f"{TRT_DIR}/vision.timing_cache"
VISION_TYPED_ONNX = f"{TRT_DIR}/vision_{{precision}}.onnx"  # TensorRT >= 11 only
TRTLLM_DIR = f"{TRT_DIR}/trtllm"
TRTLLM_ENGINE = f"{TRTLLM_DIR}/rank0.engine"
TRTLLM_CONFIG = f"{TRTLLM_DIR}/config.json"
TRTLLM_TIMING_CACHE = f"{TRT_DIR}/trtllm.timing_cache"


class PlanError(ValueError):
    """The requested build cannot be planned (bad option, lengths beyond the model)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the plan needs to know about a model."""

    image_size: int
    num_patches: int
    coord_dims: int
    vision_hidden_size: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    max_position_embeddings: int
    prefix_len: int  # <s> Image : <im_patch>*P
    template_suffix_len: int  # one round with an empty description
    library_suffix_len: int  # longest round of the description library

    @classmethod
    def from_spec(cls, spec: ModelSpec, library=None) -> ModelFacts:
        if spec.groups:
            raise PlanError(
                f"the TensorRT build serves one-keypoint rounds, and this model speaks the grouped protocol "
                f"{spec.protocol_version!r}: build its ONNX engine (--targets onnx) and serve it with "
                "onnxruntime-cuda or torch-cuda"
            )
        return cls(
            image_size=spec.image_size,
            num_patches=spec.num_patches,
            coord_dims=spec.coord_dims,
            vision_hidden_size=spec.vision_hidden_size,
            hidden_size=spec.hidden_size,
            vocab_size=spec.vocab_size,
            num_layers=spec.num_layers,
            max_position_embeddings=spec.max_positions or 4096,
            **_lengths(spec.tokenizer, spec.num_patches, library),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, library=None) -> ModelFacts:
        return cls.from_spec(ModelSpec.from_checkpoint(Path(checkpoint)), library)

    @classmethod
    def from_manifest(cls, engine_dir: str | Path, manifest: EngineManifest, library=None) -> ModelFacts:
        return cls.from_spec(ModelSpec.from_manifest(Path(engine_dir), manifest), library)


def _lengths(tokenizer: PromptTokenizer, num_patches: int, library) -> dict:
    from locllm_sdk.descriptions import DescriptionLibrary

    library = library or DescriptionLibrary.load()
    rounds = [len(tokenizer.round_ids(name, desc)) for name, desc in library.descriptions.items()]
    return {
        "prefix_len": len(tokenizer.prefix_ids(num_patches)),
        "template_suffix_len": len(tokenizer.round_ids("x", "")),
        "library_suffix_len": max(rounds) if rounds else 0,
    }


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"  # decoder: fp16 | bf16 | fp8
    vision_precision: str = "fp16"  # fp16 | bf16 (LayerNorm and softmax stay fp32)
    max_batch_size: int = 64  # keypoint requests in flight (e.g. 17 keypoints x 3-4 persons)
    vision_batch: tuple[int, int, int] = (1, 4, 32)  # crops per ViT call: min / opt / max
    tokens_per_block: int = 16  # small, so the ~260-token image prefix is reused in full blocks
    max_description_tokens: int = 96  # room for descriptions beyond the library's
    workspace_gib: float = 4.0
    calib_dataset: str = "cnn_dailymail"  # fp8 only: TensorRT-LLM/ModelOpt calibration set
    calib_size: int = 512

    def validate(self) -> None:
        if self.precision not in DECODER_PRECISIONS:
            raise PlanError(f"--precision must be one of {DECODER_PRECISIONS}, got {self.precision!r}")
        if self.vision_precision not in VISION_PRECISIONS:
            raise PlanError(f"vision precision must be one of {VISION_PRECISIONS}, got {self.vision_precision!r}")
        lo, opt, hi = self.vision_batch
        if not 1 <= lo <= opt <= hi:
            raise PlanError(f"vision batch profile must satisfy 1 <= min <= opt <= max, got {self.vision_batch}")
        tpb = self.tokens_per_block
        if tpb < 1 or tpb & (tpb - 1):
            raise PlanError(f"tokens_per_block must be a power of 2, got {tpb}")
        if self.max_batch_size < 1:
            raise PlanError("max_batch_size must be >= 1")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Lengths:
    prefix_len: int
    suffix_budget: int
    max_new_tokens: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_batch_size: int
    prompt_table_rows_per_request: int
    max_prompt_embedding_table_size: int
    reusable_prefix_blocks: int


def plan_lengths(facts: ModelFacts, opts: BuildOptions) -> Lengths:
    """Engine limits from the protocol: prompt = prefix (BOS, "Image :", P image tokens) +
    one round (keypoint description, question, "Answer:"); answer = 13 tokens (2D) / 22 (3D)."""
    suffix_budget = max(facts.library_suffix_len, facts.template_suffix_len + opts.max_description_tokens)
    max_input_len = _round_up(facts.prefix_len + suffix_budget, opts.tokens_per_block)
    max_new = MAX_NEW_TOKENS[facts.coord_dims]
    max_seq_len = max_input_len + max_new
    if max_seq_len > facts.max_position_embeddings:
        raise PlanError(
            f"max_seq_len {max_seq_len} exceeds the model's max_position_embeddings "
            f"{facts.max_position_embeddings}: lower --max-description-tokens"
        )
    # Tokens per engine step (padding removed): a step holds at most max_batch_size requests;
    # with the prefix reused only suffixes are computed, but a request whose prefix is not yet
    # cached needs max_input_len at once.
    max_num_tokens = max(max_input_len, min(opts.max_batch_size * max_input_len, 8192))
    return Lengths(
        prefix_len=facts.prefix_len,
        suffix_budget=suffix_budget,
        max_new_tokens=max_new,
        max_input_len=max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        max_batch_size=opts.max_batch_size,
        prompt_table_rows_per_request=facts.num_patches,
        # TensorRT-LLM multimodal docs: the table is [batch_size * num_visual_features, hidden]
        max_prompt_embedding_table_size=opts.max_batch_size * facts.num_patches,
        reusable_prefix_blocks=facts.prefix_len // opts.tokens_per_block,
    )


@dataclass(frozen=True)
class VisionPlan:
    onnx: str
    typed_onnx: str
    plan: str
    timing_cache: str
    input_name: str
    output_name: str
    profile: dict  # input name -> {"min": shape, "opt": shape, "max": shape}
    output_shape: list  # [-1, P, H]
    precision: str
    workspace_bytes: int
    tensorrt10: dict
    tensorrt11: dict
    parity: dict


def vision_profile(facts: ModelFacts, opts: BuildOptions) -> dict:
    s = facts.image_size
    lo, opt, hi = opts.vision_batch
    return {VISION_INPUT: {"min": [lo, 3, s, s], "opt": [opt, 3, s, s], "max": [hi, 3, s, s]}}


def plan_vision(facts: ModelFacts, opts: BuildOptions) -> VisionPlan:
    flag = {"fp16": "FP16", "bf16": "BF16"}[opts.vision_precision]
    typed = VISION_TYPED_ONNX.format(precision=opts.vision_precision)
    return VisionPlan(
        onnx="vision.onnx",
        typed_onnx=typed,
        plan=VISION_PLAN,
        timing_cache=VISION_TIMING_CACHE,
        input_name=VISION_INPUT,
        output_name=VISION_OUTPUT,
        profile=vision_profile(facts, opts),
        output_shape=[-1, facts.num_patches, facts.hidden_size],
        precision=opts.vision_precision,
        workspace_bytes=int(opts.workspace_gib * (1 << 30)),
        tensorrt10={
            "source_onnx": "vision.onnx",
            "network_flags": [],  # explicit batch is the only mode in TensorRT 10
            "builder_flags": [flag, "OBEY_PRECISION_CONSTRAINTS"],
            "fp32_layer_types": ["NORMALIZATION", "SOFTMAX"],  # layer.precision + set_output_type
        },
        tensorrt11={
            "source_onnx": typed,
            "network_flags": ["STRONGLY_TYPED"],  # precision comes from the ONNX graph
            "builder_flags": [],
            "onnx_precisions": f"weights and activations {opts.vision_precision}; LayerNorm and softmax fp32",
        },
        parity={"reference": "vision.onnx on ONNX Runtime (fp32)", "min_token_cosine": VISION_COSINE_MIN},
    )


@dataclass(frozen=True)
class DecoderPlan:
    precision: str
    dtype: str
    hf_dir: str
    checkpoint_dir: str
    engine_dir: str
    convert: dict
    trtllm_build: list = field(default_factory=list)
    lengths: Lengths | None = None


def convert_call(precision: str, hf_dir: str, checkpoint_dir: str, opts: BuildOptions) -> dict:
    """The TensorRT-LLM checkpoint conversion, as run by tensorrt_build.convert_checkpoint."""
    dtype = TRTLLM_DTYPE[precision]
    if precision == "fp8":
        return {
            "api": "tensorrt_llm.models.LLaMAForCausalLM.quantize",
            "args": [hf_dir, checkpoint_dir],
            "kwargs": {
                "dtype": dtype,
                "quant_config": "QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8)",
                "calib_dataset": opts.calib_dataset,
                "calib_batches": opts.calib_size,
            },
        }
    return {
        "api": "tensorrt_llm.models.LLaMAForCausalLM.from_hugging_face",
        "args": [hf_dir],
        "kwargs": {"dtype": dtype},
        "then": f"save_checkpoint({checkpoint_dir!r}, save_config=True)",
    }


def trtllm_build_command(
    checkpoint_dir: str, output_dir: str, lengths: Lengths, opts: BuildOptions, timing_cache: str | None = None
) -> list[str]:
    """The exact ``trtllm-build`` argv (TensorRT-LLM 1.2, TensorRT engine backend)."""
    cmd = [
        "trtllm-build",
        "--checkpoint_dir", checkpoint_dir,
        "--output_dir", output_dir,
        "--gemm_plugin", "auto",
        "--gpt_attention_plugin", "auto",
        "--max_batch_size", str(lengths.max_batch_size),
        "--max_input_len", str(lengths.max_input_len),
        "--max_seq_len", str(lengths.max_seq_len),
        "--max_num_tokens", str(lengths.max_num_tokens),
        "--max_beam_width", "1",
        "--max_prompt_embedding_table_size", str(lengths.max_prompt_embedding_table_size),
        "--kv_cache_type", "paged",
        "--tokens_per_block", str(opts.tokens_per_block),
        "--use_paged_context_fmha", "enable",
        "--remove_input_padding", "enable",
        "--gather_generation_logits",
        "--workers", "1",
    ]  # fmt: skip
    if timing_cache:
        cmd += ["--input_timing_cache", timing_cache, "--output_timing_cache", timing_cache]
    return cmd


def plan_decoder(
    facts: ModelFacts, opts: BuildOptions, work_dir: str = "<work>", engine_dir: str = "<engine>"
) -> DecoderPlan:
    lengths = plan_lengths(facts, opts)
    hf_dir = f"{work_dir}/hf_llama"
    ckpt = f"{work_dir}/trtllm_checkpoint_{opts.precision}"
    out = f"{engine_dir}/{TRTLLM_DIR}"
    return DecoderPlan(
        precision=opts.precision,
        dtype=TRTLLM_DTYPE[opts.precision],
        hf_dir=hf_dir,
        checkpoint_dir=ckpt,
        engine_dir=out,
        convert=convert_call(opts.precision, hf_dir, ckpt, opts),
        trtllm_build=trtllm_build_command(ckpt, out, lengths, opts, f"{engine_dir}/{TRTLLM_TIMING_CACHE}"),
        lengths=lengths,
    )


@dataclass(frozen=True)
class TensorRTPlan:
    facts: ModelFacts
    options: BuildOptions
    vision: VisionPlan
    decoder: DecoderPlan


def make_plan(
    facts: ModelFacts, opts: BuildOptions, work_dir: str = "<work>", engine_dir: str = "<engine>"
) -> TensorRTPlan:
    opts.validate()
    return TensorRTPlan(facts, opts, plan_vision(facts, opts), plan_decoder(facts, opts, work_dir, engine_dir))


def tensorrt_entry(plan: TensorRTPlan, parity: dict | None = None, vision_used: dict | None = None) -> TensorRTEntry:
    """``backends.tensorrt`` of the manifest. Its file names are checksummed at load
    (``EngineManifest.files_of_backend``); the TensorRT-LLM engine directory is named separately."""
    lengths = plan.decoder.lengths
    flags = {
        "vision_tensorrt10": plan.vision.tensorrt10,
        "vision_tensorrt11": plan.vision.tensorrt11,
        "vision_workspace_bytes": plan.vision.workspace_bytes,
        "convert": plan.decoder.convert,
        "trtllm_build": plan.decoder.trtllm_build,
    }
    if vision_used is not None:
        flags["vision_used"] = vision_used
    return TensorRTEntry(
        vision_plan=plan.vision.plan,
        trtllm_engine=TRTLLM_ENGINE,
        trtllm_config=TRTLLM_CONFIG,
        trtllm_dir=TRTLLM_DIR,
        vision_precision=plan.vision.precision,
        decoder_precision=plan.decoder.precision,
        decoder_dtype=plan.decoder.dtype,
        vision_input=plan.vision.input_name,
        vision_output=plan.vision.output_name,
        prompt_table_rows=lengths.prompt_table_rows_per_request,
        max_input_len=lengths.max_input_len,
        vision_profile=plan.vision.profile,
        prompt_table={
            "rows_per_request": lengths.prompt_table_rows_per_request,
            "max_batch_size": lengths.max_batch_size,
            "max_prompt_embedding_table_size": lengths.max_prompt_embedding_table_size,
            "fake_id_base": plan.facts.vocab_size,
            "extra_ids": "blake2b-63 of the crop's image tokens at fake ids, 0 at text ids",
        },
        lengths=asdict(lengths),
        tokens_per_block=plan.options.tokens_per_block,
        build_flags=flags,
        parity=parity,
    )


def manifest_entries(plan: TensorRTPlan, build_machine: dict | None = None, parity: dict | None = None) -> dict:
    """What the build adds to manifest.json, as JSON: ``backends.tensorrt`` and ``build_machine``."""
    machine = (
        build_machine
        if build_machine is not None
        else {
            k: "<probed on the build machine>"
            for k in ("gpu_name", "compute_capability", "cuda", "tensorrt", "tensorrt_llm")
        }
    )
    return {"backends": {TENSORRT: tensorrt_entry(plan, parity).to_dict()}, "build_machine": machine}


def format_plan(plan: TensorRTPlan, onnx_note: str) -> str:
    """The human-readable dry-run output."""
    v, d, lengths = plan.vision, plan.decoder, plan.decoder.lengths
    lines = [
        "== TensorRT / TensorRT-LLM build plan (dry run: nothing is built) ==",
        f"ONNX target: {onnx_note}",
        "",
        "-- vision tower: TensorRT Python API --",
        f"  source (TensorRT 10.x): {v.tensorrt10['source_onnx']}   network flags: explicit batch (TRT 10 default)",
        f"  source (TensorRT >= 11): {v.tensorrt11['source_onnx']}   network flags: {v.tensorrt11['network_flags']}"
        f"  ({v.tensorrt11['onnx_precisions']})",
        f"  precision: {v.precision}; TRT 10 builder flags {v.tensorrt10['builder_flags']},"
        f" fp32 layers {v.tensorrt10['fp32_layer_types']} (layer.precision + set_output_type)",
        f"  workspace: MemoryPoolType.WORKSPACE = {v.workspace_bytes} bytes",
        f"  optimization profile: {json.dumps(v.profile)}",
        f"  output: {v.output_name} {v.output_shape}",
        f"  timing cache: {v.timing_cache} (loaded if present, saved after the build)",
        f"  plan: {v.plan}",
        f"  parity gate: per-token cosine >= {v.parity['min_token_cosine']} vs {v.parity['reference']}",
        "",
        "-- decoder: TensorRT-LLM 1.2 --",
        f"  1. merged LLM saved as a plain HF LlamaForCausalLM (vocab {plan.facts.vocab_size}, no <im_patch> row)"
        f" -> {d.hf_dir}",
        f"  2. conversion ({d.precision}): {_call_text(d.convert)}",
        f"  3. {shlex.join(d.trtllm_build)}",
        f"  lengths: prefix {lengths.prefix_len} + suffix budget {lengths.suffix_budget} -> max_input_len"
        f" {lengths.max_input_len}; + {lengths.max_new_tokens} answer tokens -> max_seq_len {lengths.max_seq_len}",
        f"  prompt table: {lengths.prompt_table_rows_per_request} rows/request x max_batch_size"
        f" {lengths.max_batch_size} = {lengths.max_prompt_embedding_table_size}; fake ids"
        f" {plan.facts.vocab_size}..{plan.facts.vocab_size + lengths.prompt_table_rows_per_request - 1}",
        f"  KV reuse: tokens_per_block {plan.options.tokens_per_block} -> {lengths.reusable_prefix_blocks} full"
        f" prefix blocks ({lengths.reusable_prefix_blocks * plan.options.tokens_per_block} of"
        f" {lengths.prefix_len} prefix tokens) shared by a crop's keypoints",
        "",
        "-- manifest entries to be written --",
        compact_json(manifest_entries(plan)),
    ]
    return "\n".join(lines)


def compact_json(obj) -> str:
    """Indented JSON with lists of scalars kept on one line."""
    text = json.dumps(obj, indent=2)
    return re.sub(
        r"\[\s*([^\[\]{}]*?)\s*\]",
        lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",")) + "]" if m.group(1).strip() else "[]",
        text,
    )


def _call_text(call: dict) -> str:
    args = [repr(a) for a in call["args"]] + [
        f"{k}={v!r}" if k != "quant_config" else f"{k}={v}" for k, v in call["kwargs"].items()
    ]
    text = f"{call['api']}({', '.join(args)})"
    if "then" in call:
        text += f".{call['then']}"
    return text
