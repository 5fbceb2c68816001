"""``convert_official``: a public LocLLM directory -> our checkpoint format, streamed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from locllm_sdk.loader import read_official_config

from ..model import TOKENIZER_FILES, LocLLM, LocLLMConfig
from ..safetensors_stream import write_safetensors_streaming
from .architecture import VisionLayout, build_config, infer_vision_layout
from .errors import SOURCE_FORMAT, OfficialCheckpointError
from .keymap import LAYERSCALE_SOURCES, KeyMapper, load_dino_gammas
from .prompt_ids import verify_prompt_ids
from .shards import _ShardCache, _weight_map


@dataclass
class ConversionReport:
    output: Path
    config: LocLLMConfig
    vision: VisionLayout
    shards: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes: int = 0
    prompts_checked: int = 0
    notes: list[str] = field(default_factory=list)


def _expected_state(config: LocLLMConfig) -> dict[str, tuple]:
    with torch.device("meta"):
        model = LocLLM(config, with_lora=True)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("rotary_emb.inv_freq")}


def convert_official(
    official_dir: str | Path,
    output: str | Path,
    layerscale: str = "checkpoint",
    dino_weights: str | Path | None = None,
    coord_dims: int = 2,
    vision_heads: int | None = None,
    overwrite: bool = False,
    verify_prompts: bool = True,
    log: Callable[[str], None] = print,
) -> ConversionReport:
    """Convert a public LocLLM directory into our checkpoint format (see the module doc)."""
    src, output = Path(official_dir).resolve(), Path(output)
    official = read_official_config(src)
    if official is None:
        raise OfficialCheckpointError(f"{src}: not a public LocLLM checkpoint (config.json model_type != 'locllm')")
    if layerscale not in LAYERSCALE_SOURCES:
        raise OfficialCheckpointError(f"layerscale must be one of {LAYERSCALE_SOURCES}, got {layerscale!r}")
    if layerscale == "dino-file" and not dino_weights:
        raise OfficialCheckpointError(
            "--layerscale dino-file needs --dino-weights FILE (e.g. dinov2_vitl14_pretrain.pth)"
        )
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty (pass overwrite to replace it)")
        shutil.rmtree(output)

    weight_map = _weight_map(src)
    files = list(dict.fromkeys(weight_map.values()))
    cache = _ShardCache(src)

    def shape_of(key: str) -> tuple:
        return tuple(cache.get(weight_map[key])[key].shape)

    vision = infer_vision_layout(weight_map, shape_of, heads=vision_heads)
    config = build_config(official, vision, coord_dims=coord_dims, log=log)
    report = ConversionReport(output, config, vision)

    # Tokenizer first: fail before the heavy part.
    if verify_prompts:
        report.prompts_checked = verify_prompt_ids(src, config.num_patches)
    from locllm_sdk.protocol import read_tokenizer_spec

    spec = read_tokenizer_spec(src)
    if spec.im_patch_id != config.im_patch_token_id:
        raise OfficialCheckpointError(
            f"config.json im_patch_token {config.im_patch_token_id} != tokenizer's <im_patch> id {spec.im_patch_id}"
        )

    gammas = None
    has_gamma = any(k.endswith(".ls1.gamma") for k in weight_map)
    if layerscale == "dino-file":
        gammas = load_dino_gammas(dino_weights, vision.depth)
        note = f"LayerScale gammas from {dino_weights} (as the original, which never loads the checkpoint's)"
    else:
        if not has_gamma:
            raise OfficialCheckpointError(
                "the checkpoint has no ls1/ls2.gamma: pass --layerscale dino-file --dino-weights <DINOv2 file>"
            )
        note = (
            "LayerScale gammas taken from the checkpoint. The original code (transformers 4.31) never loads "
            f"them and keeps those of dino_path={official.get('dino_path')!r}; they are identical when the "
            "ViT base was frozen (public models). Use --layerscale dino-file --dino-weights FILE to take them "
            "from that file."
        )
    report.notes.append(note)
    log(f"note: {note}")

    expected = _expected_state(config)
    mapper = KeyMapper(config, vision, gammas)
    tmp = output.with_name(output.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    seen: dict[str, str] = {}
    out_names = (
        ["model.safetensors"]
        if len(files) == 1
        else [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    )
    try:
        for file, out_name in zip(files, out_names):
            tensors = cache.get(file)
            entries: list[tuple[str, torch.Tensor, bool]] = []
            for key in [k for k, f in weight_map.items() if f == file]:
                if key not in tensors:
                    raise OfficialCheckpointError(f"{file}: index names {key!r} but the shard lacks it")
                source = tensors[key]
                for new_key, t in mapper(key, source):
                    if new_key not in expected:
                        raise OfficialCheckpointError(f"{key} -> {new_key}: not a tensor of the converted model")
                    if tuple(t.shape) != expected[new_key]:
                        raise OfficialCheckpointError(
                            f"{key} -> {new_key}: shape {tuple(t.shape)}, the config needs {expected[new_key]}"
                        )
                    if new_key in seen:
                        raise OfficialCheckpointError(f"{new_key} produced twice ({seen[new_key]}, {key})")
                    seen[new_key] = out_name
                    view = cache.mapped and t.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
                    entries.append((new_key, t, view))
            report.bytes += write_safetensors_streaming(tmp / out_name, entries)
            report.tensors += len(entries)
            report.shards.append(out_name)
            del entries, tensors
            cache.close()
        missing = sorted(set(expected) - set(seen))
        if missing:
            raise OfficialCheckpointError(f"the checkpoint lacks tensors of the model: {missing[:6]}...")
        if len(out_names) > 1:
            index = {"metadata": {"total_size": report.bytes}, "weight_map": seen}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        extra = {
            "source_format": SOURCE_FORMAT,
            "source_checkpoint": str(src),
            "layerscale_source": layerscale if layerscale == "checkpoint" else f"dino-file:{dino_weights}",
            "official": {
                k: official.get(k) for k in ("crop_size", "num_patches", "im_patch_token", "dino_path", "llama_path")
            },
        }
        (tmp / "config.json").write_text(json.dumps({**config.to_dict(), **extra}, indent=2) + "\n")
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        cache.close()
    report.output = output
    return report
