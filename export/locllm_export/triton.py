"""A Triton Inference Server model repository for an engine's TensorRT build.

``build_engines.py --targets triton`` writes it from the engine's manifest (``backends.tensorrt``).
The layout follows tensorrtllm_backend's multimodal deployment (an ensemble whose steps are a
Python-backend preprocessor, the vision encoder and the ``tensorrtllm`` backend fed a prompt
embedding table), with our own models:

* ``locllm_preprocessing`` (Python backend): one image, one person box and one keypoint per
  request -> the SDK's normalised crop, the prompt ids (``<im_patch>`` positions as fake ids
  ``vocab_size + k``, then the keypoint's round), the answer length, the end id, greedy top-k and
  the crop -> image affine the client maps the answer back with;
* ``locllm_vision`` (``tensorrt_plan``): the vision plan, fp32 pixels in, fp32 image tokens out;
* ``locllm_prompt_table`` (Python backend): image tokens cast to the decoder's dtype (the
  ensemble passes tensors unconverted, and the plan's output is fp32) and the table's row count;
* ``tensorrt_llm`` (``tensorrtllm`` backend, in-flight batching) on the TensorRT-LLM engine dir;
* ``locllm`` (ensemble) wiring them: image, box, keypoint, description in; output ids, sequence
  length and the crop inverse out (the client parses the answer with ``locllm_sdk.protocol``).

Everything here is pure (manifest -> layout and config text) except :func:`write_repository`,
which writes the repository into a temporary sibling and moves it into place complete.
The repository has never been served here (no GPU, no Triton): see docs/gpu.md.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from locllm_sdk.engine_assembly import publish_directory
from locllm_sdk.errors import EngineError
from locllm_sdk.manifest import TENSORRT, EngineManifest, TensorRTEntry
from locllm_sdk.protocol import MAX_NEW_TOKENS, PROTOCOL_VERSION

ENSEMBLE = "locllm"
PREPROCESSING = "locllm_preprocessing"
VISION = "locllm_vision"
PROMPT_TABLE = "locllm_prompt_table"
DECODER = "tensorrt_llm"
VERSION = "1"
CONFIG = "config.pbtxt"
VISION_PLAN_FILE = "model.plan"  # the tensorrt_plan backend's default file name in a version dir
PYTHON_MODEL_FILE = "model.py"

# Triton data types of the TensorRT-LLM checkpoint dtypes (TensorRTEntry.decoder_dtype)
DECODER_TRITON_DTYPE = {"float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


class Enum(str):
    """A protobuf enum value: written bare, not quoted (``TYPE_FP32``, ``KIND_GPU``)."""


def tensor(name: str, dtype: str, dims: list[int], **extra) -> dict:
    return {"name": name, "data_type": Enum(dtype), "dims": dims, **extra}


def _params(values: dict) -> list[dict]:
    """``parameters`` entries of a model config (every value a string_value)."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def _scalar(shape_less: str, dtype: str = "TYPE_INT32", **extra) -> dict:
    """A per-request scalar the tensorrtllm backend reads without its [1] dimension."""
    return tensor(shape_less, dtype, [1], reshape={"shape": []}, **extra)


@dataclass(frozen=True)
class RepositoryFacts:
    """What the configs need from the manifest."""

    engine_dir: str  # absolute
    image_size: int
    num_patches: int
    hidden_size: int
    answer_tokens: int
    vision_input: str
    vision_output: str
    vision_plan: str  # absolute
    vision_max_batch: int
    decoder_dir: str  # absolute
    decoder_dtype: str  # Triton TYPE_*
    decoder_max_batch: int

    @classmethod
    def from_manifest(cls, engine_dir: str | Path, manifest: EngineManifest) -> RepositoryFacts:
        if manifest.protocol_version != PROTOCOL_VERSION:
            raise EngineError(
                f"{engine_dir}: a Triton repository asks one keypoint per round (protocol {PROTOCOL_VERSION!r}), "
                f"and this engine speaks {manifest.protocol_version!r}"
            )
        try:
            entry = manifest.backend(TENSORRT)
        except EngineError as e:
            raise EngineError(
                f"{engine_dir}: a Triton repository serves the TensorRT build, and {e}: "
                "build it first with --targets tensorrt,trtllm"
            ) from e
        assert isinstance(entry, TensorRTEntry)
        if entry.decoder_dtype not in DECODER_TRITON_DTYPE:
            raise EngineError(
                f"{engine_dir}: backends.tensorrt.decoder_dtype {entry.decoder_dtype!r} is not one of "
                f"{sorted(DECODER_TRITON_DTYPE)}"
            )
        root = Path(engine_dir).resolve()
        profile = entry.vision_profile.get(entry.vision_input, {})
        vision_max = int(profile["max"][0]) if profile.get("max") else 1
        m = manifest.model
        return cls(
            engine_dir=str(root),
            image_size=m.image_size,
            num_patches=m.num_patches,
            hidden_size=m.hidden_size,
            answer_tokens=MAX_NEW_TOKENS[m.coord_dims],
            vision_input=entry.vision_input,
            vision_output=entry.vision_output,
            vision_plan=str(root / entry.vision_plan),
            vision_max_batch=vision_max,
            decoder_dir=str(root / entry.trtllm_dir),
            decoder_dtype=DECODER_TRITON_DTYPE[entry.decoder_dtype],
            decoder_max_batch=int(entry.prompt_table.get("max_batch_size", 1)),
        )

    @property
    def ensemble_max_batch(self) -> int:
        # every step must take a batch as large as the ensemble's
        return min(self.vision_max_batch, self.decoder_max_batch)


# -- model configs (nested dicts; rendered by to_pbtxt) ---------------------------------------


def _model(name: str, runtime: dict, max_batch_size: int, batching: dict | None = None) -> dict:
    """The head of a model config; ``batching`` given: Triton's dynamic batcher with it."""
    head = {"name": name, **runtime, "max_batch_size": max_batch_size}
    return head if batching is None else {**head, "dynamic_batching": batching}


def _pixels(f: RepositoryFacts) -> dict:
    return tensor(f.vision_input, "TYPE_FP32", [3, f.image_size, f.image_size])


def _image_tokens(f: RepositoryFacts) -> dict:
    return tensor(f.vision_output, "TYPE_FP32", [f.num_patches, f.hidden_size])


def preprocessing_config(f: RepositoryFacts) -> dict:
    return {
        **_model(PREPROCESSING, {"backend": "python"}, f.ensemble_max_batch, {}),
        "input": [
            tensor("image", "TYPE_UINT8", [-1, -1, 3]),  # decoded RGB
            tensor("box", "TYPE_FP32", [4]),  # x, y, w, h in image pixels
            tensor("keypoint", "TYPE_STRING", [1]),
            tensor("description", "TYPE_STRING", [1]),  # empty: the engine's library description
        ],
        "output": [
            _pixels(f),
            tensor("input_ids", "TYPE_INT32", [-1]),
            tensor("input_lengths", "TYPE_INT32", [1]),
            tensor("request_output_len", "TYPE_INT32", [1]),
            tensor("end_id", "TYPE_INT32", [1]),
            tensor("runtime_top_k", "TYPE_INT32", [1]),
            tensor("crop_inverse", "TYPE_FP32", [2, 3]),
        ],
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": _params({"engine_dir": f.engine_dir}),
    }


def vision_config(f: RepositoryFacts) -> dict:
    return {
        **_model(VISION, {"platform": "tensorrt_plan"}, f.vision_max_batch, {}),
        "default_model_filename": VISION_PLAN_FILE,
        "input": [_pixels(f)],
        "output": [_image_tokens(f)],
        "instance_group": [{"count": 1, "kind": Enum("KIND_GPU")}],
    }


def prompt_table_config(f: RepositoryFacts) -> dict:
    return {
        **_model(PROMPT_TABLE, {"backend": "python"}, f.ensemble_max_batch),
        "input": [_image_tokens(f)],
        "output": [
            tensor("prompt_embedding_table", f.decoder_dtype, [f.num_patches, f.hidden_size]),
            tensor("prompt_vocab_size", "TYPE_INT32", [1]),
        ],
        "instance_group": [{"count": 1, "kind": Enum("KIND_GPU")}],
    }


def decoder_config(f: RepositoryFacts) -> dict:
    ragged = {"allow_ragged_batch": True}
    return {
        **_model(DECODER, {"backend": "tensorrtllm"}, f.decoder_max_batch, {"max_queue_delay_microseconds": 0}),
        "model_transaction_policy": {"decoupled": False},
        "input": [
            tensor("input_ids", "TYPE_INT32", [-1], **ragged),
            _scalar("input_lengths"),
            _scalar("request_output_len"),
            _scalar("end_id", optional=True),
            _scalar("runtime_top_k", optional=True),
            tensor("prompt_embedding_table", f.decoder_dtype, [-1, -1], optional=True, **ragged),
            _scalar("prompt_vocab_size", optional=True),
        ],
        "output": [
            tensor("output_ids", "TYPE_INT32", [-1, -1]),
            tensor("sequence_length", "TYPE_INT32", [-1]),
        ],
        # the backend places the engine on the GPUs itself
        "instance_group": [{"count": 1, "kind": Enum("KIND_CPU")}],
        "parameters": _params(
            {
                "gpt_model_type": "inflight_fused_batching",
                "gpt_model_path": f.decoder_dir,
                "max_beam_width": 1,
                "batch_scheduler_policy": "guaranteed_no_evict",
                "exclude_input_in_output": "true",
                # reuse across a crop's keypoints needs per-crop extra ids (SDK: gpu_logic.image_key),
                # which this ensemble does not send: without them two crops would share KV blocks
                "enable_kv_cache_reuse": "false",
            }
        ),
    }


# ensemble steps: model -> ({its input: ensemble tensor}, {its output: ensemble tensor})
def _steps(f: RepositoryFacts) -> list[tuple[str, dict, dict]]:
    pre_out = ["input_ids", "input_lengths", "request_output_len", "end_id", "runtime_top_k"]
    return [
        (
            PREPROCESSING,
            {n: n for n in ("image", "box", "keypoint", "description")},
            {f.vision_input: "_pixels", "crop_inverse": "crop_inverse", **{n: f"_{n}" for n in pre_out}},
        ),
        (VISION, {f.vision_input: "_pixels"}, {f.vision_output: "_image_tokens"}),
        (
            PROMPT_TABLE,
            {f.vision_output: "_image_tokens"},
            {"prompt_embedding_table": "_prompt_embedding_table", "prompt_vocab_size": "_prompt_vocab_size"},
        ),
        (
            DECODER,
            {
                **{n: f"_{n}" for n in pre_out},
                "prompt_embedding_table": "_prompt_embedding_table",
                "prompt_vocab_size": "_prompt_vocab_size",
            },
            {"output_ids": "output_ids", "sequence_length": "sequence_length"},
        ),
    ]


def ensemble_config(f: RepositoryFacts) -> dict:
    def step(model: str, inputs: dict, outputs: dict) -> dict:
        return {
            "model_name": model,
            "model_version": -1,
            "input_map": [{"key": k, "value": v} for k, v in inputs.items()],
            "output_map": [{"key": k, "value": v} for k, v in outputs.items()],
        }

    pre = preprocessing_config(f)
    return {
        **_model(ENSEMBLE, {"platform": "ensemble"}, f.ensemble_max_batch),
        "input": pre["input"],
        "output": [
            tensor("output_ids", "TYPE_INT32", [-1, -1]),
            tensor("sequence_length", "TYPE_INT32", [-1]),
            tensor("crop_inverse", "TYPE_FP32", [2, 3]),
        ],
        "ensemble_scheduling": {"step": [step(*s) for s in _steps(f)]},
    }


def model_configs(f: RepositoryFacts) -> dict[str, dict]:
    """Model name -> its config, in ensemble order (the ensemble last)."""
    configs = (preprocessing_config, vision_config, prompt_table_config, decoder_config, ensemble_config)
    return {c["name"]: c for c in (make(f) for make in configs)}


# -- protobuf text format ----------------------------------------------------------------------


def _scalar_text(v) -> str:
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"no text form for {v!r}")


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """Protobuf text format of a nested dict: dict -> message, list of dicts -> repeated
    message, list of scalars -> ``[a, b]``."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if isinstance(value, dict):
            body = to_pbtxt(value, indent + 1)
            lines.append(f"{pad}{key} {{\n{body}{pad}}}\n" if body else f"{pad}{key} {{ }}\n")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(v, indent + 2)}{pad}  }}" for v in value)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]\n")
        elif isinstance(value, list):
            items = ", ".join(_scalar_text(v) for v in value)
            lines.append(f"{pad}{key}: [ {items} ]\n" if items else f"{pad}{key}: [ ]\n")
        else:
            lines.append(f"{pad}{key}: {_scalar_text(value)}\n")
    return "".join(lines)


# -- Python-backend models ---------------------------------------------------------------------

PREPROCESSING_MODEL = '''"""LocLLM preprocessing: one image + one person box + one keypoint per request row."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from locllm_sdk.backends.gpu_logic import fake_prompt_ids
from locllm_sdk.crop import crop_geometry, normalize, warp
from locllm_sdk.descriptions import DescriptionLibrary
from locllm_sdk.errors import LocLLMError
from locllm_sdk.loader import ModelSpec
from locllm_sdk.manifest import DESCRIPTIONS_FILE, read_manifest
from locllm_sdk.protocol import MAX_NEW_TOKENS


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        engine_dir = Path(config["parameters"]["engine_dir"]["string_value"])
        manifest = read_manifest(engine_dir)
        self.spec = ModelSpec.from_manifest(engine_dir, manifest)
        self.library = DescriptionLibrary.load(manifest.path(engine_dir, DESCRIPTIONS_FILE))
        self.prefix = fake_prompt_ids(
            self.spec.prefix_ids, self.spec.tokenizer.spec.im_patch_id, manifest.model.vocab_size
        )
        self.answer_tokens = MAX_NEW_TOKENS[manifest.model.coord_dims]
        self.pixels_name = manifest.backend("tensorrt").vision_input

    def _row(self, image, box, keypoint: str, description: str):
        geometry = crop_geometry([float(v) for v in box], image.shape[:2], self.spec.image_size)
        pixels = normalize(warp(image, geometry)[None], self.spec.norm_mean, self.spec.norm_std)[0]
        mapping = {keypoint: description or None}
        request = self.library.resolve(mapping)[0]
        ids = self.prefix + list(self.spec.tokenizer.round_ids(request.name, request.description))
        return pixels, ids, geometry.inverse

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
                boxes = pb_utils.get_input_tensor_by_name(request, "box").as_numpy()
                names = pb_utils.get_input_tensor_by_name(request, "keypoint").as_numpy()
                texts = pb_utils.get_input_tensor_by_name(request, "description").as_numpy()
                rows = [
                    self._row(images[i], boxes[i], _text(names[i][0]), _text(texts[i][0]))
                    for i in range(len(images))
                ]
            except (LocLLMError, ValueError) as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
                continue
            width = max(len(ids) for _, ids, _ in rows)
            ids = np.zeros((len(rows), width), np.int32)
            for i, (_, row_ids, _) in enumerate(rows):
                ids[i, : len(row_ids)] = row_ids
            n = len(rows)
            out = {
                self.pixels_name: np.stack([p for p, _, _ in rows]).astype(np.float32),
                "input_ids": ids,
                "input_lengths": np.array([[len(r)] for _, r, _ in rows], np.int32),
                "request_output_len": np.full((n, 1), self.answer_tokens, np.int32),
                "end_id": np.full((n, 1), self.spec.tokenizer.spec.eos_id, np.int32),
                "runtime_top_k": np.ones((n, 1), np.int32),  # greedy, as the SDK decodes
                "crop_inverse": np.stack([inv for _, _, inv in rows]).astype(np.float32),
            }
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
        return responses
'''

PROMPT_TABLE_MODEL = '''"""LocLLM prompt table: fp32 image tokens -> the decoder's dtype, and the table's rows."""

import json

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

TORCH_DTYPE = {"TYPE_FP16": torch.float16, "TYPE_BF16": torch.bfloat16}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        table = next(o for o in config["output"] if o["name"] == "prompt_embedding_table")
        self.dtype = TORCH_DTYPE[table["data_type"]]
        self.tokens_name = config["input"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = from_dlpack(pb_utils.get_input_tensor_by_name(request, self.tokens_name).to_dlpack())
            table = tokens.to(self.dtype).contiguous()
            rows = np.full((tokens.shape[0], 1), tokens.shape[1], np.int32)
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor.from_dlpack("prompt_embedding_table", to_dlpack(table)),
                        pb_utils.Tensor("prompt_vocab_size", rows),
                    ]
                )
            )
        return responses
'''


def repository_files(f: RepositoryFacts) -> dict[str, str]:
    """Relative path -> text of every file of the repository (the vision plan is linked)."""
    files = {f"{name}/{CONFIG}": to_pbtxt(config) for name, config in model_configs(f).items()}
    files[f"{PREPROCESSING}/{VERSION}/{PYTHON_MODEL_FILE}"] = PREPROCESSING_MODEL
    files[f"{PROMPT_TABLE}/{VERSION}/{PYTHON_MODEL_FILE}"] = PROMPT_TABLE_MODEL
    return files


def write_repository(
    engine_dir: str | Path, manifest: EngineManifest, output: str | Path, overwrite: bool = False
) -> Path:
    """Write the Triton model repository of ``engine_dir``'s TensorRT build at ``output``.

    Every model gets its version directory ``1/``; the vision model's ``1/model.plan`` is a
    symbolic link to the engine's plan and ``tensorrt_llm`` reads the engine directory named
    in its ``gpt_model_path``, so the repository is only valid next to that engine directory.
    """
    facts = RepositoryFacts.from_manifest(engine_dir, manifest)
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (pass --overwrite to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for name in model_configs(facts):
            (tmp / name / VERSION).mkdir(parents=True)
        for rel, text in repository_files(facts).items():
            (tmp / rel).write_text(text)
        (tmp / VISION / VERSION / VISION_PLAN_FILE).symlink_to(facts.vision_plan)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, output)
    return output
