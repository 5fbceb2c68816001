"""Loading: a model path + a backend name -> what the pipeline runs.

A model path is one of three kinds (``model_kind``): an engine directory (``manifest.json``),
our checkpoint format (``config.json`` with ``format: locllm-sdk-checkpoint``), or a public
LocLLM checkpoint (``config.json`` with ``model_type: locllm``). ``load`` returns a
``LoadedModel``: the ``ModelSpec`` (what the runtime must know about the model), the backend
that runs its graphs, and the keypoint description library it was built with.

Backends are made by one factory per backend name (``BACKEND_FACTORIES``); each verifies
the engine files it opens against the manifest before opening them.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import Backend, RequestBackend
from .descriptions import DescriptionLibrary
from .errors import ArgumentError, BackendUnavailable, CheckpointError, EngineError, ProtocolError, read_json
from .manifest import (
    AUTO,
    BACKEND_NAMES,
    DESCRIPTIONS_FILE,
    ENTRY_OF_BACKEND,
    MANIFEST,
    ORT_CPU,
    ORT_CUDA,
    TENSORRT,
    TORCH,
    TORCH_CUDA,
    ConfidenceCalibration,
    EngineManifest,
    kv_bytes_per_token,
    llm_head_dim,
)
from .protocol import (
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    TOKENIZER_READS,
    AnswerGrammar,
    JointGroup,
    PromptTokenizer,
    build_grammar,
    build_group_grammar,
    protocol_groups,
)

ENGINE, CHECKPOINT, OFFICIAL = "engine", "checkpoint", "official"
OFFICIAL_MODEL_TYPE = "locllm"


CONFIDENCE_FIELD = "confidence_calibration"  # in our checkpoint's config.json; the manifest's "confidence"


def checkpoint_confidence(config: dict, source: str = "config.json") -> ConfidenceCalibration | None:
    """The confidence calibration a checkpoint's config records (``CONFIDENCE_FIELD``), if any."""
    if config.get(CONFIDENCE_FIELD) is None:
        return None
    try:
        return ConfidenceCalibration.from_dict(config[CONFIDENCE_FIELD], source)
    except EngineError as e:
        raise CheckpointError(str(e)) from e


@dataclass(frozen=True)
class ModelSpec:
    """What the runtime needs to know about a model, from a manifest or a checkpoint."""

    image_size: int
    num_patches: int
    coord_dims: int
    norm_mean: tuple[float, ...]
    norm_std: tuple[float, ...]
    tokenizer: PromptTokenizer
    grammar: AnswerGrammar
    prefix_ids: tuple[int, ...]
    kv_bytes_per_token: int = 0  # one row's K+V over all layers, fp32
    max_positions: int | None = None  # the LM's max_position_embeddings
    hidden_size: int = 0
    vocab_size: int = 0
    vision_hidden_size: int = 0
    num_layers: int = 0
    num_heads: int = 0  # the LM's attention heads
    confidence: ConfidenceCalibration | None = None  # score -> calibrated confidence, when fitted
    protocol_version: str = PROTOCOL_VERSION
    # grouped protocol (protocol.JOINT_GROUPS): the body-part groups, each joint's description
    # (the library's the model was built with) and the answer grammar of each group size
    groups: tuple[JointGroup, ...] = ()
    group_descriptions: tuple[tuple[str, str], ...] = ()
    group_grammars: tuple[AnswerGrammar, ...] = ()

    def grammar_for(self, joints: int) -> AnswerGrammar:
        """The answer grammar of a round asking ``joints`` joints (1: the one-keypoint grammar)."""
        if joints == 1:
            return self.grammar
        for g in self.group_grammars:
            if g.joints == joints:
                return g
        raise ProtocolError(f"this model has no {joints}-joint group (protocol {self.protocol_version!r})")

    @property
    def max_answer_tokens(self) -> int:
        """The longest answer a round of this model decodes (its grammar's tokens, EOS excluded)."""
        return max(len(g.slots) for g in (self.grammar, *self.group_grammars))

    @staticmethod
    def protocol_facts(
        version: str, tokenizer: PromptTokenizer, dims: int, library: DescriptionLibrary, source: str, error: type
    ) -> dict:
        """The grouped protocol's fields of a spec (none for the per-keypoint protocol), ``error``
        (EngineError / CheckpointError) naming ``source`` when the version is unknown or the
        library lacks a group joint's description."""
        try:
            groups = protocol_groups(version, f"{source}: protocol_version")
        except ProtocolError as e:
            raise error(str(e)) from e
        if not groups:
            return {"protocol_version": version}
        joints = [j for g in groups for j in g.joints]
        missing = [j for j in joints if j not in library.descriptions]
        if missing:
            raise error(
                f"{source}: protocol {version!r} asks {missing}, which its description library does not describe"
            )
        return {
            "protocol_version": version,
            "groups": groups,
            "group_descriptions": tuple((j, library.descriptions[j]) for j in joints),
            "group_grammars": tuple(
                build_group_grammar(tokenizer, dims, n) for n in sorted({len(g.joints) for g in groups})
            ),
        }

    @classmethod
    def from_manifest(cls, engine_dir: Path, manifest: EngineManifest) -> ModelSpec:
        m, t = manifest.model, manifest.tokenizer
        if manifest.protocol_version not in PROTOCOL_VERSIONS:
            raise EngineError(
                f"{engine_dir}: manifest field protocol_version {manifest.protocol_version!r} is not a protocol "
                f"this runtime knows ({', '.join(PROTOCOL_VERSIONS)})"
            )
        # every file the tokenizer reads must be one the manifest lists (and so checksums)
        tokenizer_dir = manifest.path(engine_dir, f"{t.dir}/tokenizer.model").parent
        for name in TOKENIZER_READS:
            if (tokenizer_dir / name).exists():
                manifest.path(engine_dir, f"{t.dir}/{name}")
        try:
            tokenizer = PromptTokenizer.from_dir(tokenizer_dir)
        except (ProtocolError, FileNotFoundError) as e:
            raise EngineError(f"{engine_dir}: the engine's tokenizer cannot be read: {e}") from e
        try:
            grammar = AnswerGrammar.from_dict(t.answer_grammar)
        except (KeyError, TypeError, ValueError) as e:
            raise EngineError(f"{engine_dir}: manifest field 'tokenizer.answer_grammar' is malformed ({e})") from e
        if grammar.dims != m.coord_dims:
            raise EngineError(
                f"{engine_dir}: manifest field 'model.coord_dims' is {m.coord_dims}, but its answer grammar "
                f"answers {grammar.dims} coordinates"
            )
        if m.num_patches != (m.image_size // max(m.patch_size, 1)) ** 2:
            raise EngineError(
                f"{engine_dir}: manifest fields 'model.num_patches' {m.num_patches} and 'model.image_size' "
                f"{m.image_size} / 'model.patch_size' {m.patch_size} disagree"
            )
        # The ids the engine was built with must be the ids this runtime produces.
        s = tokenizer.spec
        flags = {
            "legacy": s.legacy,
            "bos_id": s.bos_id,
            "eos_id": s.eos_id,
            "pad_id": s.pad_id,
            "im_patch_id": s.im_patch_id,
        }
        changed = [f"{k} {getattr(t, k)!r} -> {v!r}" for k, v in flags.items() if getattr(t, k) != v]
        if changed:
            raise EngineError(
                f"{engine_dir}: tokenizer settings {', '.join(changed)} differ from the manifest's: they change "
                "the prompt ids, so the engine is refused (rebuild it)"
            )
        prefix = tuple(tokenizer.prefix_ids(m.num_patches))
        if prefix != t.prefix_ids or build_grammar(tokenizer, grammar.dims) != grammar:
            raise EngineError(
                f"{engine_dir}: tokenizer ids differ from the manifest's (tokenizer files or runtime changed)"
            )
        return cls(
            image_size=m.image_size,
            num_patches=m.num_patches,
            coord_dims=m.coord_dims,
            norm_mean=m.norm_mean,
            norm_std=m.norm_std,
            tokenizer=tokenizer,
            grammar=grammar,
            prefix_ids=prefix,
            kv_bytes_per_token=m.kv_bytes_per_token,
            max_positions=m.max_position_embeddings,
            hidden_size=m.hidden_size,
            vocab_size=m.vocab_size,
            vision_hidden_size=m.vision_hidden_size,
            num_layers=m.num_layers,
            num_heads=m.num_heads,
            confidence=manifest.confidence,
            **cls.protocol_facts(
                manifest.protocol_version,
                tokenizer,
                grammar.dims,
                DescriptionLibrary.load(manifest.path(engine_dir, DESCRIPTIONS_FILE))
                if manifest.protocol_version != PROTOCOL_VERSION
                else DescriptionLibrary({}, {}),
                str(engine_dir),
                EngineError,
            ),
        )

    @classmethod
    def from_config(
        cls,
        config: dict,
        tokenizer: PromptTokenizer,
        source: str = "config.json",
        library: DescriptionLibrary | None = None,
    ) -> ModelSpec:
        """From our checkpoint's config.json (as a dict) and its tokenizer; ``library``: the
        descriptions a grouped model asks its groups with (default: the bundled library)."""
        try:
            llm = config["llm"]
            dims = int(config["coord_dims"])
            image_size, num_patches = int(config["image_size"]), int(config["num_patches"])
            patch = int(config.get("patch_size") or 14)
            heads = int(llm["num_attention_heads"])
            head_dim = llm_head_dim(llm["hidden_size"], heads, llm.get("head_dim"))
            kv = kv_bytes_per_token(llm["num_hidden_layers"], llm.get("num_key_value_heads") or heads, head_dim)
            im_patch = int(config["im_patch_token_id"])
            spec = dict(
                image_size=image_size,
                num_patches=num_patches,
                coord_dims=dims,
                norm_mean=tuple(float(v) for v in config["norm_mean"]),
                norm_std=tuple(float(v) for v in config["norm_std"]),
                kv_bytes_per_token=kv,
                max_positions=int(llm.get("max_position_embeddings") or 0) or None,
                hidden_size=int(llm["hidden_size"]),
                vocab_size=int(llm["vocab_size"]),
                vision_hidden_size=int(config["vision"]["hidden_size"]),
                num_layers=int(llm["num_hidden_layers"]),
                num_heads=heads,
            )
        except KeyError as e:
            raise CheckpointError(f"{source}: field {e.args[0]!r} is missing") from e
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: malformed field ({e})") from e
        if num_patches != (image_size // patch) ** 2:
            raise CheckpointError(
                f"{source}: num_patches {num_patches} does not fit image_size {image_size} / patch_size {patch} "
                f"({(image_size // patch) ** 2} patches)"
            )
        if tokenizer.spec.im_patch_id != im_patch:
            raise CheckpointError(f"{source}: <im_patch> id in the tokenizer differs from config.json")
        version = config.get("protocol_version", PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION and library is None:
            from .descriptions import bundled_library

            library = bundled_library()
        return cls(
            tokenizer=tokenizer,
            grammar=build_grammar(tokenizer, dims),
            prefix_ids=tuple(tokenizer.prefix_ids(num_patches)),
            confidence=checkpoint_confidence(config, source),
            **cls.protocol_facts(version, tokenizer, dims, library, source, CheckpointError),
            **spec,
        )

    @classmethod
    def from_checkpoint(cls, checkpoint: Path) -> ModelSpec:
        config = read_config(checkpoint)
        try:
            tokenizer = PromptTokenizer.from_dir(checkpoint)
        except (ProtocolError, FileNotFoundError) as e:
            raise CheckpointError(f"{checkpoint}: the checkpoint's tokenizer cannot be read: {e}") from e
        return cls.from_config(config, tokenizer, str(checkpoint / "config.json"))


# --------------------------------------------------------------------------------------
# What a path is


def read_config(directory: Path) -> dict:
    """A checkpoint's config.json as a dict; CheckpointError naming the file otherwise."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a LocLLM checkpoint directory?)")
    return read_json(path, CheckpointError, "a config")


def read_official_config(path: str | Path) -> dict | None:
    """The official ``config.json`` as a dict, or None when ``path`` is not an official dir."""
    try:
        cfg = read_config(Path(path))
    except CheckpointError:
        return None
    return cfg if cfg.get("model_type") == OFFICIAL_MODEL_TYPE else None


def model_kind(path: str | Path) -> str:
    """``engine``, ``checkpoint`` (ours) or ``official`` (a public LocLLM directory)."""
    path = Path(path)
    if not path.is_dir():
        raise EngineError(f"model path not found or not a directory: {path}")
    if (path / MANIFEST).is_file():
        return ENGINE
    if (path / "config.json").is_file():
        return OFFICIAL if read_official_config(path) is not None else CHECKPOINT
    raise EngineError(f"{path} is not an engine directory: {MANIFEST} is missing (nor a checkpoint: no config.json)")


# --------------------------------------------------------------------------------------
# Loading


@dataclass
class LoadedModel:
    path: Path
    kind: str
    backend_name: str
    spec: ModelSpec
    backend: Backend | RequestBackend
    library: DescriptionLibrary
    manifest: EngineManifest | None = None
    # a public checkpoint is converted into a temporary directory that lives as long as this
    keep_alive: list = field(default_factory=list)


def _torch_backend(
    checkpoint: Path, threads: int | None, name: str = TORCH, device: int = 0
) -> tuple[Backend, ModelSpec, list]:
    """The torch (or torch-cuda) backend of a checkpoint (ours, or a public one converted on the fly)."""

    keep: list = []
    if read_official_config(checkpoint) is not None:
        try:
            from locllm_training.official import convert_official
        except ImportError as e:
            raise ImportError(
                "loading a public LocLLM checkpoint needs the training extra: pip install 'locllm-sdk[train]'"
            ) from e
        tmp = tempfile.TemporaryDirectory(prefix="locllm-official-")
        keep.append(tmp)
        checkpoint = convert_official(checkpoint, Path(tmp.name) / "checkpoint").output
    spec = ModelSpec.from_checkpoint(checkpoint)
    if name == TORCH_CUDA:
        from .backends.torch_cuda import TorchCudaBackend

        backend = TorchCudaBackend(checkpoint, device=device, threads=threads)
    else:
        from .backends.torch_ref import TorchBackend

        backend = TorchBackend(checkpoint, threads=threads)
    for f in checkpoint.glob("model*.safetensors*") if keep else ():
        f.unlink()  # the backend holds the weights in memory now; keep config and tokenizer
    return backend, spec, keep


def _ort_factory(provider: str | None) -> Callable:
    def make(engine_dir: Path, manifest: EngineManifest, spec: ModelSpec, threads: int | None, device: int):
        from .backends.onnxruntime import OnnxRuntimeBackend

        providers = [provider] if provider else None
        return OnnxRuntimeBackend(engine_dir, manifest, providers=providers, threads=threads, device=device)

    return make


def _tensorrt_factory(engine_dir: Path, manifest: EngineManifest, spec: ModelSpec, threads: int | None, device: int):
    if spec.groups:
        raise BackendUnavailable(
            f"{engine_dir}: the TensorRT backend decodes one-keypoint answers only, and this engine speaks the "
            f"grouped protocol {spec.protocol_version!r} (one answer per body part): use backend='onnxruntime-cuda', "
            "'torch-cuda' or 'onnxruntime'"
        )
    from .backends.tensorrt import TensorRTBackend

    return TensorRTBackend(engine_dir, manifest, spec.tokenizer, spec.grammar, spec.prefix_ids, device=device)


# backend name -> (engine dir, manifest, spec, threads, GPU index) -> backend; its files are verified before
BACKEND_FACTORIES: dict[str, Callable] = {
    ORT_CPU: _ort_factory(None),
    ORT_CUDA: _ort_factory("CUDAExecutionProvider"),
    TENSORRT: _tensorrt_factory,
}


def load(
    path: str | Path,
    backend: str = AUTO,
    threads: int | None = None,
    verify: bool | str = "cached",
    device: int = 0,
) -> LoadedModel:
    """Load an engine directory or a checkpoint for ``backend`` (see ``BACKEND_NAMES``).

    ``auto`` tries the fastest backend this machine seems able to run and falls back (with a
    warning) to the next when it cannot start, down to ONNX Runtime on the CPU; an explicit
    backend that cannot run raises ``BackendUnavailable``. ``device``: the GPU index.
    ``verify``: the engine files' sha256, ``"cached"`` (default: hashed once per unchanged
    file, see ``filecache``), ``"always"``/``True`` or ``"sizes"``/``False`` (sizes only)."""
    from .filecache import verify_mode

    verify_mode(verify)  # a bad value is refused before anything is read
    if backend not in BACKEND_NAMES:
        raise ArgumentError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if isinstance(device, bool) or not isinstance(device, int) or device < 0:
        raise ArgumentError(f"device must be a GPU index (an int >= 0), got {device!r}")
    path = Path(path)
    kind = model_kind(path)
    if kind != ENGINE:
        if backend not in (AUTO, TORCH, TORCH_CUDA):
            raise EngineError(
                f"{path} is a checkpoint, not an engine: build one with export/build_engines.py, or use "
                "backend='torch' / 'torch-cuda'"
            )
        name = TORCH if backend == AUTO else backend
        runner, spec, keep = _torch_backend(path, threads, name, device)
        return LoadedModel(path, kind, name, spec, runner, DescriptionLibrary.load(), keep_alive=keep)
    manifest = EngineManifest.read(path)
    if backend == AUTO:
        from .backends.select import backend_candidates

        candidates = backend_candidates(manifest)
        for i, name in enumerate(candidates):
            try:
                return load(path, name, threads=threads, verify=verify, device=device)
            except BackendUnavailable as e:
                if i == len(candidates) - 1:
                    raise
                warnings.warn(
                    f"backend {name!r} cannot run here ({e}); falling back to {candidates[i + 1]!r}", stacklevel=3
                )
    if backend in (TORCH, TORCH_CUDA):
        source = Path(manifest.model.source_checkpoint)
        if not (source / "config.json").is_file():
            raise EngineError(
                f"backend={backend!r} needs the source checkpoint; the manifest names {str(source)!r}, "
                "which is not there"
            )
        manifest.verify_files(path, manifest.shared_files(), checksums=verify)
        spec = ModelSpec.from_manifest(path, manifest)
        runner, _, keep = _torch_backend(source, threads, backend, device)
    else:
        manifest.verify_files(path, manifest.files_of_backend(ENTRY_OF_BACKEND[backend]), checksums=verify)
        spec = ModelSpec.from_manifest(path, manifest)
        runner, keep = BACKEND_FACTORIES[backend](path, manifest, spec, threads, device), []
    library = DescriptionLibrary.load(manifest.path(path, DESCRIPTIONS_FILE))
    return LoadedModel(path, ENGINE, backend, spec, runner, library, manifest, keep)
