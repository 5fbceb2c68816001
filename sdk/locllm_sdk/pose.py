"""``Pose``: image -> crop -> vision -> prefix -> suffixes -> digits -> coordinates."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import crop as cropping
from .backends.base import Backend
from .decoding import DecodeStats, constrained_decode, free_decode, prefill_prefix, split_common_head
from .descriptions import DescriptionLibrary
from .engine import MANIFEST, EngineError, files_of_backend, read_manifest, verify_files
from .protocol import MAX_NEW_TOKENS, PROTOCOL_VERSION, AnswerGrammar, PromptTokenizer, build_grammar, unit_to_depth
from .results import Keypoint, Person, Results

BACKENDS = ("auto", "onnxruntime", "onnxruntime-cuda", "tensorrt", "torch")
DECODING = ("constrained", "free")


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


def _spec_from_manifest(engine_dir: Path, manifest: dict) -> ModelSpec:
    m, t = manifest["model"], manifest["tokenizer"]
    if manifest.get("protocol_version") != PROTOCOL_VERSION:
        raise EngineError(
            f"engine protocol {manifest.get('protocol_version')!r} differs from this runtime's {PROTOCOL_VERSION!r}"
        )
    tokenizer = PromptTokenizer.from_dir(engine_dir / t["dir"])
    grammar = AnswerGrammar.from_dict(t["answer_grammar"])
    # The ids the engine was built with must be the ids this runtime produces.
    prefix = tuple(tokenizer.prefix_ids(int(m["num_patches"])))
    if list(prefix) != t["prefix_ids"] or build_grammar(tokenizer, grammar.dims) != grammar:
        raise EngineError(
            f"{engine_dir}: tokenizer ids differ from the manifest's (tokenizer files or runtime changed)"
        )
    return ModelSpec(
        image_size=int(m["image_size"]),
        num_patches=int(m["num_patches"]),
        coord_dims=int(m["coord_dims"]),
        norm_mean=tuple(m["norm_mean"]),
        norm_std=tuple(m["norm_std"]),
        tokenizer=tokenizer,
        grammar=grammar,
        prefix_ids=prefix,
        kv_bytes_per_token=8 * int(m["num_layers"]) * int(m["num_kv_heads"]) * int(m["head_dim"]),
    )


def _spec_from_checkpoint(checkpoint: Path) -> ModelSpec:
    cfg = json.loads((checkpoint / "config.json").read_text())
    tokenizer = PromptTokenizer.from_dir(checkpoint)
    if tokenizer.spec.im_patch_id != int(cfg["im_patch_token_id"]):
        raise EngineError(f"{checkpoint}: <im_patch> id in the tokenizer differs from config.json")
    dims = int(cfg["coord_dims"])
    return ModelSpec(
        image_size=int(cfg["image_size"]),
        num_patches=int(cfg["num_patches"]),
        coord_dims=dims,
        norm_mean=tuple(cfg["norm_mean"]),
        norm_std=tuple(cfg["norm_std"]),
        tokenizer=tokenizer,
        grammar=build_grammar(tokenizer, dims),
        prefix_ids=tuple(tokenizer.prefix_ids(int(cfg["num_patches"]))),
        kv_bytes_per_token=_kv_bytes_per_token(cfg["llm"]),
    )


def _kv_bytes_per_token(llm: dict) -> int:
    heads = int(llm["num_attention_heads"])
    kv_heads = int(llm.get("num_key_value_heads") or heads)
    head_dim = int(llm.get("head_dim") or int(llm["hidden_size"]) // heads)
    return 8 * int(llm["num_hidden_layers"]) * kv_heads * head_dim  # K and V, fp32


def _is_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / MANIFEST).is_file()


def _is_official(path: Path) -> bool:
    """A public LocLLM checkpoint (HF save_pretrained, ``model_type: "locllm"``), not our format."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "locllm"
    except (OSError, ValueError, AttributeError):
        return False


class Pose:
    """A LocLLM keypoint localizer.

    >>> pose = Pose("engines/tiny")                       # an engine dir (or a checkpoint dir)
    >>> res = pose.locate("person.jpg", ["neck", "pelvis"], boxes=[[10, 20, 200, 380]])
    >>> res[0]["neck"].x, res[0]["neck"].y, res[0]["neck"].score
    """

    def __init__(
        self,
        model: str | Path,
        backend: str = "auto",
        decoding: str = "constrained",
        threads: int | None = None,
        verify: bool = True,
        kv_budget_mb: float = 1024.0,
    ):
        """``kv_budget_mb`` bounds the KV cache of one decoding chunk: requests beyond it
        (many persons x keypoints on a large model) are decoded in several chunks."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if decoding not in DECODING:
            raise ValueError(f"decoding must be one of {DECODING}, got {decoding!r}")
        path = Path(model)
        if not path.is_dir():
            raise EngineError(f"model path not found or not a directory: {path}")
        self.path, self.decoding = path, decoding
        self.kv_budget_mb = kv_budget_mb
        if _is_checkpoint(path):
            if backend not in ("auto", "torch"):
                raise EngineError(
                    f"{path} is a checkpoint, not an engine: build one with export/build_engines.py, "
                    "or use backend='torch'"
                )
            self.backend_name = "torch"
            checkpoint = self._usable_checkpoint(path)
            self.spec = _spec_from_checkpoint(checkpoint)
            self.library = DescriptionLibrary.load()
            self.backend: Backend = self._torch_backend(checkpoint, threads)
            self._drop_converted_weights()
            return
        manifest = read_manifest(path)
        self.manifest = manifest
        if backend == "auto":
            from .backends.select import choose_backend

            backend = choose_backend(manifest)
        self.backend_name = backend
        if backend == "torch":
            source = Path(manifest["model"].get("source_checkpoint", ""))
            if not (source / "config.json").is_file():
                raise EngineError(
                    f"backend='torch' needs the source checkpoint; the manifest names {str(source)!r}, "
                    "which is not there"
                )
            verify_files(
                path,
                manifest,
                [n for n in manifest["files"] if n.startswith("tokenizer/") or n == "descriptions.yaml"],
                checksums=verify,
            )
            self.spec = _spec_from_manifest(path, manifest)
            self.backend = self._torch_backend(self._usable_checkpoint(source), threads)
            self._drop_converted_weights()
        elif backend == "tensorrt":
            verify_files(path, manifest, files_of_backend(manifest, backend), checksums=verify)
            self.spec = _spec_from_manifest(path, manifest)
            from .backends.tensorrt import TensorRTBackend

            self.backend = TensorRTBackend(path, manifest, self.spec.tokenizer, self.spec.grammar, self.spec.prefix_ids)
        else:  # onnxruntime (CPU) or onnxruntime-cuda: the same graphs, another provider
            verify_files(path, manifest, files_of_backend(manifest, "onnxruntime"), checksums=verify)
            self.spec = _spec_from_manifest(path, manifest)
            from .backends.onnxruntime import OnnxRuntimeBackend

            providers = ["CUDAExecutionProvider"] if backend == "onnxruntime-cuda" else None
            self.backend = OnnxRuntimeBackend(path, manifest, providers=providers, threads=threads)
        self.library = DescriptionLibrary.load(path / "descriptions.yaml")

    def _usable_checkpoint(self, path: Path) -> Path:
        """Our-format checkpoint for the torch backend: a public LocLLM directory is converted
        (streamed, prompt ids verified) into a temporary directory that lives with this Pose."""
        if not _is_official(path):
            return path
        import tempfile

        try:
            from locllm_training.official import convert_official
        except ImportError as e:
            raise ImportError(
                "loading a public LocLLM checkpoint needs the training extra: pip install 'locllm-sdk[train]'"
            ) from e
        self._converted = tempfile.TemporaryDirectory(prefix="locllm-official-")
        return convert_official(path, Path(self._converted.name) / "checkpoint").output

    def _drop_converted_weights(self) -> None:
        # The backend holds the weights in memory now; keep only config and tokenizer files.
        converted = getattr(self, "_converted", None)
        if converted is not None:
            for f in (Path(converted.name) / "checkpoint").glob("model*.safetensors*"):
                f.unlink()

    @staticmethod
    def _torch_backend(checkpoint: Path, threads: int | None) -> Backend:
        from .backends.torch_ref import TorchBackend

        return TorchBackend(checkpoint, threads=threads)

    # ----------------------------------------------------------------------------------
    def locate(
        self,
        image: object,
        keypoints: str | Iterable[str] | Mapping[str, str | None],
        boxes: Sequence[Sequence[float]] | None = None,
        flip: bool = False,
    ) -> Results:
        """Locate ``keypoints`` (names, a skeleton name like ``"coco17"``, or a
        ``{name: description}`` mapping) for each person box ``[x, y, w, h]`` (default: the
        whole image). Coordinates come back in image pixels.

        ``flip=True`` is flip test-time augmentation: each crop is also run mirrored, asking
        for the mirrored keypoint (left <-> right), and the two answers are averaged (x, y, z
        and score). About twice the cost; the result is then no longer one answer of the
        model, so ``Keypoint.answer`` holds the plain crop's answer and ``flip_answer`` the
        mirrored crop's."""
        img = cropping.load_image(image)
        requests = self.library.resolve(keypoints)
        h, w = img.shape[:2]
        if boxes is None:
            boxes = [[0.0, 0.0, float(w), float(h)]]
        boxes = [list(map(float, b)) for b in np.asarray(boxes, dtype=np.float64).reshape(-1, 4)] if len(boxes) else []
        if not boxes:
            raise ValueError("boxes is empty: give at least one [x, y, w, h] box or None for the whole image")
        geoms = [cropping.crop_geometry(b, (h, w), self.spec.image_size) for b in boxes]
        crops = np.stack([cropping.warp(img, g) for g in geoms])
        pixels = cropping.normalize(crops, self.spec.norm_mean, self.spec.norm_std)
        size = float(self.spec.image_size)
        n, k = len(boxes), len(requests)
        if flip:
            # One run over the plain and the mirrored crops with the union of the requests and
            # their mirrors (a left/right-symmetric set like coco17 is its own mirror: no extra rows).
            mirrored = [self.library.mirror(r) for r in requests]
            union = list(dict.fromkeys(requests + mirrored))
            row_of = {r: j for j, r in enumerate(union)}
            both = np.concatenate([pixels, pixels[..., ::-1]])  # a copy: contiguous
            values, answers, stats = self._run(both, union)
            plain = [i * len(union) + row_of[r] for i in range(n) for r in requests]
            other = [(n + i) * len(union) + row_of[m] for i in range(n) for m in mirrored]
            v_plain, v_other = values[plain], values[other].copy()
            # a flipped crop's pixel column u is the plain crop's column size - 1 - u
            v_other[:, 0] = (size - 1.0) / size - v_other[:, 0]
            # an incomplete answer (free decoding only) has no value to average: the other one stands
            ok_plain = np.array([answers[a].complete for a in plain])
            ok_other = np.array([answers[b].complete for b in other])
            w_plain = np.where(ok_plain & ok_other, 0.5, np.where(ok_other, 0.0, 1.0))
            values = w_plain[:, None] * v_plain + (1.0 - w_plain[:, None]) * v_other
            scores = [wp * answers[a].score + (1.0 - wp) * answers[b].score for a, b, wp in zip(plain, other, w_plain)]
            texts = [answers[a].text for a in plain]
            flip_texts = [answers[b].text for b in other]
        else:
            values, answers, stats = self._run(pixels, requests)
            scores = [a.score for a in answers]
            texts = [a.text for a in answers]
            flip_texts = [""] * len(answers)
        persons = []
        for i, (box, g) in enumerate(zip(boxes, geoms)):
            vals = values[i * k : (i + 1) * k]
            xy = cropping.to_image_coords(vals[:, :2] * size, g.inverse)
            kps = []
            for j, req in enumerate(requests):
                r = i * k + j
                z = unit_to_depth(float(vals[j, 2])) if self.spec.coord_dims == 3 else None
                kps.append(Keypoint(req.name, float(xy[j, 0]), float(xy[j, 1]), scores[r], z, texts[r], flip_texts[r]))
            persons.append(Person(tuple(box), tuple(kps)))
        info = {
            "backend": self.backend_name,
            "decoding": self.decoding,
            "decoder_passes": stats.decoder_passes,
            "flip": flip,
        }
        return Results(persons, [r.name for r in requests], (h, w), info)

    __call__ = locate

    def _run(self, pixels: np.ndarray, requests) -> tuple[np.ndarray, list, DecodeStats]:
        spec = self.spec
        image_tokens = self.backend.encode_images(pixels)  # once per crop
        suffix = [spec.tokenizer.round_ids(r.name, r.description) for r in requests]
        n_crops, k = pixels.shape[0], len(requests)
        crop_of_row = np.repeat(np.arange(n_crops), k)
        if hasattr(self.backend, "locate_rows"):  # whole-request engines (tensorrt) schedule themselves
            answers, stats = self.backend.locate_rows(image_tokens, crop_of_row, suffix * n_crops, self.decoding)
            return np.array([a.values for a in answers], dtype=np.float64), answers, stats
        # The rounds' common first tokens join the prefix: computed once per crop, not per row.
        head, suffix = split_common_head(suffix)
        suffixes = suffix * n_crops
        prefix_ids = list(spec.prefix_ids) + head
        prefix_cache = prefill_prefix(self.backend, prefix_ids, spec.tokenizer.spec.im_patch_id, image_tokens)
        # Rows are decoded in chunks that bound the KV cache (the rows' own tokens, plus a copy
        # of the prefix per row without cascade attention), whole persons per chunk where they
        # fit (cascade attention wants equal runs per crop; free decoding's stop rule too).
        answers, stats = [], None
        for rows in self._row_chunks(n_crops, k, max(map(len, suffix)), len(prefix_ids)):
            sub = [suffixes[i] for i in rows]
            if self.decoding == "constrained":
                part, stats = constrained_decode(
                    self.backend,
                    prefix_cache,
                    len(prefix_ids),
                    crop_of_row[rows],
                    sub,
                    spec.grammar,
                    spec.tokenizer,
                )
            else:
                part, stats = free_decode(
                    self.backend,
                    prefix_cache,
                    len(prefix_ids),
                    crop_of_row[rows],
                    sub,
                    crop_of_row[rows],
                    MAX_NEW_TOKENS[spec.coord_dims],
                    spec.coord_dims,
                    spec.tokenizer,
                )
            answers += part
        values = np.array([a.values for a in answers], dtype=np.float64)
        return values, answers, stats

    def _row_chunks(self, n_crops: int, k: int, max_suffix: int, prefix_len: int) -> list[np.ndarray]:
        """Row index chunks whose KV cache fits ``kv_budget_mb``."""
        tokens = max_suffix + len(self.spec.grammar.slots)
        if not self.backend.supports_shared_prefix:
            tokens += prefix_len
        per_row = max(1, self.spec.kv_bytes_per_token * tokens)
        max_rows = max(1, int(self.kv_budget_mb * 2**20 // per_row))
        n = n_crops * k
        if max_rows >= n:
            return [np.arange(n)]
        if self.decoding == "free" or max_rows >= k:  # whole persons per chunk (at least one)
            per_chunk = max(1, max_rows // k) * k
        else:
            per_chunk = max_rows
        return [np.arange(i, min(i + per_chunk, n)) for i in range(0, n, per_chunk)]

    def __repr__(self) -> str:
        return (
            f"Pose({str(self.path)!r}, backend={self.backend_name!r}, decoding={self.decoding!r}, "
            f"dims={self.spec.coord_dims})"
        )
