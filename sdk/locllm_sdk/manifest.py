"""The engine directory: the contract between export and runtime, as typed data.

ENGINE_DIR/
  manifest.json        format version, model facts, tokenizer ids, precision, files+sha256
  vision.onnx          crops [N,3,S,S] -> image tokens [N,P,H]
  decoder.onnx         one decoder pass with KV cache, logits at asked positions
  decoder_shared.onnx  the same pass with cascade attention over a per-crop prefix KV
  embeddings.npy       the LM's token embedding table [V,H]
  tokenizer/           tokenizer.model, tokenizer_config.json, added_tokens.json
  descriptions.yaml    the keypoint description library the engine was built with
  tensorrt/            (NVIDIA builds) vision plan + TensorRT-LLM engine

``EngineManifest`` is the one reading and writing of ``manifest.json``: the exporter builds
one and calls ``write``; every backend gets the typed object from ``EngineManifest.read``,
which names the field when one is missing or malformed. The graphs' input and output names
are defined here too, once, for the exporter and the backends.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import EngineError, read_json

ENGINE_FORMAT = "locllm-engine"
ENGINE_FORMAT_VERSION = 1
# Revision of the exported graphs' computation (same inputs and outputs, faster or fixed
# internals): an engine of an older revision still runs, but cached engines are rebuilt.
# 2: the cascade step runs per-token layers on real tokens only and a two-part softmax.
GRAPH_REVISION = 2
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DESCRIPTIONS_FILE = "descriptions.yaml"

# Backend names, one vocabulary for the API, the CLI, the manifest and auto-selection.
ORT_CPU = "onnxruntime"
ORT_CUDA = "onnxruntime-cuda"
TENSORRT = "tensorrt"
TORCH = "torch"
TORCH_CUDA = "torch-cuda"
AUTO = "auto"
BACKEND_NAMES = (AUTO, ORT_CPU, ORT_CUDA, TENSORRT, TORCH, TORCH_CUDA)
# the manifest's ``backends`` entry each engine backend runs from (the CUDA provider runs the
# same ONNX graphs as the CPU one)
ENTRY_OF_BACKEND = {ORT_CPU: ORT_CPU, ORT_CUDA: ORT_CPU, TENSORRT: TENSORRT}

# --------------------------------------------------------------------------------------
# Graph input / output names (ONNX graphs and the TensorRT vision plan)

VISION_INPUT = "pixel_values"
VISION_OUTPUT = "image_tokens"
STEP_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "logits_index")
LOGITS = "logits"


def past_names(num_layers: int) -> list[str]:
    return [n for i in range(num_layers) for n in (f"past_key_{i}", f"past_value_{i}")]


def prefix_names(num_layers: int) -> list[str]:
    return [n for i in range(num_layers) for n in (f"prefix_key_{i}", f"prefix_value_{i}")]


def present_names(num_layers: int) -> list[str]:
    return [n for i in range(num_layers) for n in (f"present_key_{i}", f"present_value_{i}")]


def decoder_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of ``decoder.onnx``."""
    return [*STEP_INPUTS, *past_names(num_layers)], [LOGITS, *present_names(num_layers)]


def shared_step_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of ``decoder_shared.onnx``: the prefix KV before the rows' own."""
    return [*STEP_INPUTS, *prefix_names(num_layers), *past_names(num_layers)], [LOGITS, *present_names(num_layers)]


def llm_head_dim(hidden_size: int, num_attention_heads: int, head_dim: int | None = None) -> int:
    """A Llama config's attention head width: its ``head_dim`` when set, else hidden / heads."""
    return int(head_dim or int(hidden_size) // int(num_attention_heads))


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: int = 4) -> int:
    """One sequence position's K and V over all layers."""
    return 2 * itemsize * int(num_layers) * int(num_kv_heads) * int(head_dim)


# --------------------------------------------------------------------------------------
# Files


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------
# Typed reading with errors that name the field


class _Fields:
    """Reads one JSON object of the manifest; errors name ``where.key``."""

    def __init__(self, source: str, where: str, data: Any):
        if not isinstance(data, Mapping):
            raise EngineError(f"{source}: manifest field {where!r} must be an object, got {type(data).__name__}")
        self.source, self.where, self.data = source, where, data

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _bad(self, key: str, what: str) -> EngineError:
        return EngineError(f"{self.source}: manifest field {self._name(key)!r} {what}")

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = ...) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self._bad(key, "is missing")
            return default
        return self.data[key]

    def int(self, key: str, default: Any = ...) -> int:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if isinstance(v, bool) or not isinstance(v, int):
            raise self._bad(key, f"must be an integer, got {v!r}")
        return v

    def float(self, key: str, default: Any = ...) -> float:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self._bad(key, f"must be a number, got {v!r}")
        return float(v)

    def str(self, key: str, default: Any = ...) -> str:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if not isinstance(v, str):
            raise self._bad(key, f"must be a string, got {v!r}")
        return v

    def bool(self, key: str, default: Any = ...) -> bool:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if not isinstance(v, bool):
            raise self._bad(key, f"must be true or false, got {v!r}")
        return v

    def ints(self, key: str, default: Any = ...) -> tuple[int, ...]:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            raise self._bad(key, "must be a list of integers")
        return tuple(v)

    def floats(self, key: str, length: int | None = None) -> tuple[float, ...]:
        v = self.raw(key)
        if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise self._bad(key, "must be a list of numbers")
        if length is not None and len(v) != length:
            raise self._bad(key, f"must hold {length} numbers, got {len(v)}")
        return tuple(float(x) for x in v)

    def strs(self, key: str, default: Any = ...) -> tuple[str, ...]:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise self._bad(key, "must be a list of strings")
        return tuple(v)

    def obj(self, key: str, default: Any = ...) -> _Fields | Any:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        return _Fields(self.source, self._name(key), v)

    def dict(self, key: str, default: Any = ...) -> dict:
        v = self.raw(key, default)
        if v is default and default is not ...:
            return v
        if not isinstance(v, Mapping):
            raise self._bad(key, "must be an object")
        return dict(v)


def _one_of(f: _Fields, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = f.str(key, default)
    if value not in allowed:
        raise f._bad(key, f"must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _read_llm_adapter(f: _Fields) -> dict:
    """``llm_adapter`` (absent: "lora", as in every engine before the field) and ``moe_lora``,
    which must be there exactly for "moe-lora"."""
    adapter = _one_of(f, "llm_adapter", LLM_ADAPTERS, "lora")
    if (adapter == "moe-lora") != f.has("moe_lora"):
        what = "is missing" if adapter == "moe-lora" else "is given"
        raise f._bad("moe_lora", f"{what}, but the field 'llm_adapter' is {adapter!r}")
    moe = MoeLoraInfo._read(f.obj("moe_lora")) if adapter == "moe-lora" else None
    return {"llm_adapter": adapter, "moe_lora": moe}


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# --------------------------------------------------------------------------------------
# The manifest's sections


@dataclass(frozen=True)
class FileEntry:
    bytes: int
    sha256: str


# The LM adapters an engine may hold. "lora" is merged into the weights at export (engines
# without the field are such); "moe-lora" stays unmerged in the decoder graphs (gate and experts).
LLM_ADAPTERS = ("lora", "moe-lora")


@dataclass(frozen=True)
class MoeLoraInfo:
    """The LM's MoE LoRA (``model.moe_lora`` when ``model.llm_adapter`` is "moe-lora"): per token
    a gate picks ``top_k`` of ``experts`` LoRA experts (+ the parameter-free zero expert), on the
    ``targets`` projections of the decoder blocks ``layers`` (None: all)."""

    experts: int
    top_k: int
    zero_expert: bool
    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...] | None = None

    @classmethod
    def _read(cls, f: _Fields) -> MoeLoraInfo:
        return cls(
            experts=f.int("experts"),
            top_k=f.int("top_k"),
            zero_expert=f.bool("zero_expert"),
            rank=f.int("rank"),
            alpha=f.float("alpha"),
            targets=f.strs("targets"),
            layers=f.ints("layers", None),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["layers"] = None if self.layers is None else list(self.layers)
        return _drop_none(d)


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the model the engine was built from (all the runtime needs to know)."""

    coord_dims: int
    image_size: int
    patch_size: int
    num_patches: int
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    vision_hidden_size: int
    vision_layers: int
    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    parameters: int
    source_checkpoint: str = ""
    source_format: str = "locllm-sdk-checkpoint"
    checkpoint_sha256: str = ""
    # a delta checkpoint's own file holds only its differences: what it sits on, nearest first
    parent_checkpoint_sha256: tuple[str, ...] = ()
    # per part, for FLOP accounting (tied or untied embeddings, any ViT width ratio)
    vision_parameters: int | None = None
    decoder_layer_parameters: int | None = None
    conversion_notes: tuple[str, ...] = ()
    llm_adapter: str = "lora"
    moe_lora: MoeLoraInfo | None = None

    def __post_init__(self):
        if self.llm_adapter not in LLM_ADAPTERS:
            raise EngineError(f"model.llm_adapter must be one of {LLM_ADAPTERS}, got {self.llm_adapter!r}")
        if (self.llm_adapter == "moe-lora") != (self.moe_lora is not None):
            raise EngineError(
                f"model.llm_adapter {self.llm_adapter!r} needs a model.moe_lora section exactly when 'moe-lora'"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """One row position's K and V over all layers, fp32 (the ORT cache dtype)."""
        return kv_bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim)

    @classmethod
    def _read(cls, f: _Fields) -> ModelInfo:
        heads = f.int("num_heads")
        hidden = f.int("hidden_size")
        return cls(
            coord_dims=f.int("coord_dims"),
            image_size=f.int("image_size"),
            patch_size=f.int("patch_size"),
            num_patches=f.int("num_patches"),
            norm_mean=f.floats("norm_mean", 3),
            norm_std=f.floats("norm_std", 3),
            vision_hidden_size=f.int("vision_hidden_size"),
            vision_layers=f.int("vision_layers"),
            hidden_size=hidden,
            vocab_size=f.int("vocab_size"),
            num_layers=f.int("num_layers"),
            num_heads=heads,
            num_kv_heads=f.int("num_kv_heads", heads),
            head_dim=f.int("head_dim", llm_head_dim(hidden, heads)),
            max_position_embeddings=f.int("max_position_embeddings"),
            parameters=f.int("parameters", 0),
            source_checkpoint=f.str("source_checkpoint", ""),
            source_format=f.str("source_format", "locllm-sdk-checkpoint"),
            checkpoint_sha256=f.str("checkpoint_sha256", ""),
            parent_checkpoint_sha256=f.strs("parent_checkpoint_sha256", ()),
            vision_parameters=f.int("vision_parameters", None),
            decoder_layer_parameters=f.int("decoder_layer_parameters", None),
            conversion_notes=f.strs("conversion_notes", ()),
            **_read_llm_adapter(f),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("norm_mean", "norm_std", "parent_checkpoint_sha256", "conversion_notes"):
            d[k] = list(d[k])
        if not d["conversion_notes"]:
            del d["conversion_notes"]
        if self.llm_adapter == "lora":  # merged: written as every engine before the field was
            del d["llm_adapter"]
        d["moe_lora"] = self.moe_lora.to_dict() if self.moe_lora else None
        return _drop_none(d)


@dataclass(frozen=True)
class TokenizerInfo:
    """The ids the engine was built with; the runtime re-derives them and must agree."""

    legacy: bool
    bos_id: int
    eos_id: int
    pad_id: int
    im_patch_id: int
    digit_ids: tuple[int, ...]
    answer_grammar: dict  # AnswerGrammar.to_dict() (protocol.py reads it)
    prefix_ids: tuple[int, ...]
    dir: str = TOKENIZER_DIR

    @classmethod
    def _read(cls, f: _Fields) -> TokenizerInfo:
        grammar = f.dict("answer_grammar")
        return cls(
            legacy=f.bool("legacy"),
            bos_id=f.int("bos_id"),
            eos_id=f.int("eos_id"),
            pad_id=f.int("pad_id"),
            im_patch_id=f.int("im_patch_id"),
            digit_ids=f.ints("digit_ids"),
            answer_grammar=grammar,
            prefix_ids=f.ints("prefix_ids"),
            dir=f.str("dir", TOKENIZER_DIR),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["digit_ids"], d["prefix_ids"] = list(self.digit_ids), list(self.prefix_ids)
        return d


@dataclass(frozen=True)
class OnnxRuntimeEntry:
    """``backends.onnxruntime``: the ONNX graphs (CPU, and CUDA with onnxruntime-gpu)."""

    vision: str
    decoder: str
    embeddings: str
    decoder_shared: str | None = None  # engines from format-1 builds before the cascade graph lack it
    opset: int | None = None
    # ONNX external-data files the graphs read their weights from (graphs past protobuf's 2 GiB
    # limit): opened by ONNX Runtime, not by us, so listed here to be checksummed with the graphs
    external_data: tuple[str, ...] = ()

    @classmethod
    def _read(cls, f: _Fields) -> OnnxRuntimeEntry:
        return cls(
            vision=f.str("vision"),
            decoder=f.str("decoder"),
            embeddings=f.str("embeddings"),
            decoder_shared=f.str("decoder_shared", None),
            opset=f.int("opset", None),
            external_data=f.strs("external_data", ()),
        )

    def graphs(self) -> list[str]:
        return [n for n in (self.vision, self.decoder, self.decoder_shared) if n]

    def files(self) -> list[str]:
        return [*self.graphs(), self.embeddings, *self.external_data]

    def to_dict(self) -> dict:
        out = _drop_none(asdict(self))
        if not self.external_data:  # manifests of graphs without external data stay as they were
            del out["external_data"]
        else:
            out["external_data"] = list(self.external_data)
        return out


@dataclass(frozen=True)
class TensorRTEntry:
    """``backends.tensorrt``: TensorRT vision plan + TensorRT-LLM decoder engine."""

    vision_plan: str
    trtllm_engine: str
    trtllm_config: str
    trtllm_dir: str
    vision_precision: str
    decoder_precision: str
    decoder_dtype: str
    vision_input: str
    vision_output: str
    prompt_table_rows: int
    max_input_len: int
    # build records kept as written (profile, lengths, flags, parity): read by people, not code
    vision_profile: dict = field(default_factory=dict)
    prompt_table: dict = field(default_factory=dict)
    lengths: dict = field(default_factory=dict)
    tokens_per_block: int | None = None
    build_flags: dict = field(default_factory=dict)
    parity: dict | None = None

    @classmethod
    def _read(cls, f: _Fields) -> TensorRTEntry:
        io = f.obj("vision_io")
        table = f.obj("prompt_table")
        lengths = f.obj("lengths")
        return cls(
            vision_plan=f.str("vision_plan"),
            trtllm_engine=f.str("trtllm_engine"),
            trtllm_config=f.str("trtllm_config"),
            trtllm_dir=f.str("trtllm_dir"),
            vision_precision=f.str("vision_precision"),
            decoder_precision=f.str("decoder_precision"),
            decoder_dtype=f.str("decoder_dtype"),
            vision_input=io.str("input"),
            vision_output=io.str("output"),
            prompt_table_rows=table.int("rows_per_request"),
            max_input_len=lengths.int("max_input_len"),
            vision_profile=f.dict("vision_profile", {}),
            prompt_table=dict(table.data),
            lengths=dict(lengths.data),
            tokens_per_block=f.int("tokens_per_block", None),
            build_flags=f.dict("build_flags", {}),
            parity=f.dict("parity", None),
        )

    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> TensorRTEntry:
        return cls._read(_Fields(source, f"backends.{TENSORRT}", data))

    def files(self) -> list[str]:
        return [self.vision_plan, self.trtllm_engine, self.trtllm_config]

    def to_dict(self) -> dict:
        d = {
            "vision_plan": self.vision_plan,
            "trtllm_engine": self.trtllm_engine,
            "trtllm_config": self.trtllm_config,
            "trtllm_dir": self.trtllm_dir,
            "vision_precision": self.vision_precision,
            "decoder_precision": self.decoder_precision,
            "decoder_dtype": self.decoder_dtype,
            "vision_io": {"input": self.vision_input, "output": self.vision_output},
            "vision_profile": self.vision_profile,
            "prompt_table": {**self.prompt_table, "rows_per_request": self.prompt_table_rows},
            "lengths": {**self.lengths, "max_input_len": self.max_input_len},
            "tokens_per_block": self.tokens_per_block,
            "build_flags": self.build_flags,
            "parity": self.parity,
        }
        return _drop_none(d)


_ENTRY_TYPES: dict[str, type] = {ORT_CPU: OnnxRuntimeEntry, TENSORRT: TensorRTEntry}


@dataclass(frozen=True)
class Precision:
    vision: str = "fp32"
    decoder: str = "fp32"
    lora: str = "merged-fp32"
    # how a reduced-precision part was made (export's quantize.METHODS); empty (and not written) for fp32
    vision_method: str = ""
    decoder_method: str = ""


@dataclass(frozen=True)
class ConfidenceCalibration:
    """A keypoint confidence in [0, 1] from the official score: ``sigmoid(slope * score +
    intercept)`` (Platt scaling), fitted so that it estimates the probability that the
    keypoint is correct by ``target`` (e.g. within PCK@0.1 of the truth) on ``fitted_on``.
    The official score stays as it is (the reference's definition); this sits beside it."""

    slope: float
    intercept: float
    target: str = "PCK@0.1"
    fitted_on: str = ""
    method: str = "platt"

    def __call__(self, score):
        import numpy as np

        return 1.0 / (1.0 + np.exp(-(self.slope * np.asarray(score, np.float64) + self.intercept)))

    @classmethod
    def from_dict(cls, data: Any, source: str = "confidence") -> ConfidenceCalibration:
        f = _Fields(source, "confidence", data)
        method = f.str("method", "platt")
        if method != "platt":
            raise f._bad("method", f"must be 'platt', got {method!r}")
        return cls(f.float("slope"), f.float("intercept"), f.str("target", "PCK@0.1"), f.str("fitted_on", ""))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EngineManifest:
    model: ModelInfo
    tokenizer: TokenizerInfo
    backends: dict[str, OnnxRuntimeEntry | TensorRTEntry]
    files: dict[str, FileEntry]
    protocol_version: str
    graph_revision: int = GRAPH_REVISION
    precision: Precision = field(default_factory=Precision)
    created: str = ""
    built_with: dict = field(default_factory=dict)
    verification: dict = field(default_factory=dict)
    build_machine: dict | None = None
    format_version: int = ENGINE_FORMAT_VERSION
    confidence: ConfidenceCalibration | None = None  # optional: engines without one report no confidence

    # -- reading ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = MANIFEST) -> EngineManifest:
        """Validate and type a manifest; an EngineError names the field that is wrong."""
        if not isinstance(data, Mapping):
            raise EngineError(f"{source}: a manifest is a JSON object, got {type(data).__name__}")
        f = _Fields(source, "", data)
        if data.get("format") != ENGINE_FORMAT:
            raise EngineError(f"{source}: not a {ENGINE_FORMAT} manifest (format={data.get('format')!r})")
        version = data.get("format_version")
        if version != ENGINE_FORMAT_VERSION:
            raise EngineError(
                f"{source}: engine format_version {version!r} is not supported by this locllm_sdk "
                f"(it reads version {ENGINE_FORMAT_VERSION}); rebuild the engine with "
                "export/build_engines.py or install the matching locllm-sdk"
            )
        for key in ("model", "tokenizer", "files", "backends"):
            if key not in data:
                raise EngineError(f"{source}: manifest has no {key!r} section")
        backends = {}
        for name, entry in f.dict("backends").items():
            kind = _ENTRY_TYPES.get(name)
            if kind is None:
                raise EngineError(f"{source}: unknown backend {name!r} in manifest field 'backends'")
            backends[name] = kind._read(_Fields(source, f"backends.{name}", entry))
        files = {}
        files_f = f.obj("files")
        for name in files_f.data:
            entry = files_f.obj(name)
            files[name] = FileEntry(bytes=entry.int("bytes"), sha256=entry.str("sha256"))
        precision = f.obj("precision", None)
        return cls(
            model=ModelInfo._read(f.obj("model")),
            tokenizer=TokenizerInfo._read(f.obj("tokenizer")),
            backends=backends,
            files=files,
            protocol_version=f.str("protocol_version"),
            graph_revision=f.int("graph_revision", 1),  # engines before the field were revision 1
            precision=Precision(**{k: precision.str(k) for k in precision.data}) if precision else Precision(),
            created=f.str("created", ""),
            built_with=f.dict("built_with", {}),
            verification=f.dict("verification", {}),
            build_machine=f.dict("build_machine", None),
            format_version=version,
            confidence=ConfidenceCalibration.from_dict(data["confidence"], source) if f.has("confidence") else None,
        )

    @classmethod
    def read(cls, engine_dir: str | Path) -> EngineManifest:
        engine_dir = Path(engine_dir)
        path = engine_dir / MANIFEST
        if not engine_dir.is_dir():
            raise EngineError(f"engine directory not found: {engine_dir}")
        if not path.is_file():
            raise EngineError(f"{engine_dir} is not an engine directory: {MANIFEST} is missing")
        return cls.from_dict(read_json(path, EngineError), str(path))

    # -- writing ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "format": ENGINE_FORMAT,
            "format_version": self.format_version,
            "graph_revision": self.graph_revision,
            "protocol_version": self.protocol_version,
            "created": self.created,
            "model": self.model.to_dict(),
            "tokenizer": self.tokenizer.to_dict(),
            "precision": {k: v for k, v in asdict(self.precision).items() if v},
            "backends": {name: entry.to_dict() for name, entry in self.backends.items()},
            "built_with": self.built_with,
            "verification": self.verification,
            "files": {name: asdict(e) for name, e in self.files.items()},
        }
        if self.build_machine is not None:
            d["build_machine"] = self.build_machine
        if self.confidence is not None:
            d["confidence"] = self.confidence.to_dict()
        return d

    def write(self, engine_dir: str | Path) -> None:
        """Atomically (write + rename): a reader never sees half a manifest."""
        engine_dir = Path(engine_dir)
        tmp = engine_dir / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, engine_dir / MANIFEST)

    def replace(self, **changes) -> EngineManifest:
        return replace(self, **changes)

    # -- files --------------------------------------------------------------------------
    def shared_files(self) -> list[str]:
        """Files every backend opens: the tokenizer and the description library."""
        prefix = self.tokenizer.dir.rstrip("/") + "/"
        return [n for n in self.files if n.startswith(prefix) or n == DESCRIPTIONS_FILE]

    def backend(self, name: str) -> OnnxRuntimeEntry | TensorRTEntry:
        entry = self.backends.get(name)
        if entry is None:
            raise EngineError(f"this engine has no {name!r} build (it has: {', '.join(self.backends) or 'none'})")
        return entry

    def files_of_backend(self, name: str) -> list[str]:
        """Every file the backend ``name`` opens, shared files included; each must be listed."""
        own = self.backend(name).files()
        missing = [n for n in own if n not in self.files]
        if missing:
            raise EngineError(
                f"backends.{name} names {missing}, which the manifest's files section does not list "
                "(every file the runtime opens must carry a checksum)"
            )
        return self.shared_files() + own

    def verify_files(
        self, engine_dir: str | Path, names: Sequence[str] | None = None, checksums: bool | str = True
    ) -> None:
        """Every listed file (or those of ``names``) exists with its recorded size, and its
        sha256 unless ``checksums`` is ``False``/``"sizes"`` (``"cached"``: hashed once per
        unchanged file, ``filecache.verified_sha256``)."""
        from .filecache import verified_sha256, verify_mode

        mode = verify_mode(checksums)
        engine_dir = Path(engine_dir)
        for name in self.files if names is None else names:
            meta = self.files.get(name)
            if meta is None:
                raise EngineError(f"{engine_dir}: {name} is not listed in the manifest's files")
            path = self.path(engine_dir, name)
            if not path.is_file():
                raise EngineError(f"{engine_dir}: engine file {name} is missing")
            size = path.stat().st_size
            if size != meta.bytes:
                raise EngineError(
                    f"{path}: size {size} differs from the manifest's {meta.bytes} (truncated or replaced)"
                )
            if mode != "sizes" and verified_sha256(path, mode) != meta.sha256:
                raise EngineError(f"{path}: sha256 differs from the manifest (corrupt or modified file)")

    def path(self, engine_dir: str | Path, name: str) -> Path:
        """The file ``name`` of the engine: listed in the manifest and inside the directory."""
        if name not in self.files:
            raise EngineError(f"{engine_dir}: {name!r} is not listed in the manifest's files")
        root = Path(engine_dir).resolve()
        path = (root / name).resolve()
        if path != root and root not in path.parents:
            raise EngineError(f"{engine_dir}: manifest file {name!r} lies outside the engine directory")
        return Path(engine_dir) / name


def files_section(root: Path) -> dict[str, FileEntry]:
    """``files`` for every file under ``root`` (bytes + sha256), sorted."""
    return {
        str(p.relative_to(root)): FileEntry(bytes=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def read_manifest(engine_dir: str | Path) -> EngineManifest:
    return EngineManifest.read(engine_dir)
