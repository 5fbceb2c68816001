"""Convert a public LocLLM checkpoint directory (kennethwdk/LocLLM) into our checkpoint format.

    python training/convert_official.py OFFICIAL_DIR OUT_DIR [--layerscale checkpoint|dino-file]
                                        [--dino-weights dinov2_vitl14_pretrain.pth] [--dims 2|3]

Reads config.json (model_type "locllm") and the pickled pytorch_model*.bin shards with
torch.load(weights_only=True), one shard at a time; writes config.json, safetensors shards
and the tokenizer files. Prompt ids are checked against the checkpoint's own slow
LlamaTokenizer for every keypoint of descriptions/keypoints.yaml before anything is written.

LayerScale: the original code (transformers 4.31) never loads the checkpoint's ls1/ls2.gamma
and keeps those of the DINOv2 file it was built from (identical when the ViT base was
frozen, as in the public models). The default takes them from the checkpoint; pass
--layerscale dino-file --dino-weights FILE to take them from that DINOv2 file instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a clone without install
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

from locllm_training.official import LAYERSCALE_SOURCES, OfficialCheckpointError, convert_official  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("official_dir", type=Path, help="public LocLLM checkpoint directory")
    ap.add_argument("output", type=Path, help="checkpoint directory to write (our format)")
    ap.add_argument("--layerscale", choices=LAYERSCALE_SOURCES, default="checkpoint")
    ap.add_argument("--dino-weights", type=Path, help="DINOv2 weights file for --layerscale dino-file")
    ap.add_argument("--dims", type=int, choices=(2, 3), default=2, help="coordinate dims (3 for Human3.6M models)")
    ap.add_argument("--vision-heads", type=int, help="ViT heads (default: width / 64, as every DINOv2)")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    try:
        report = convert_official(
            args.official_dir,
            args.output,
            layerscale=args.layerscale,
            dino_weights=args.dino_weights,
            coord_dims=args.dims,
            vision_heads=args.vision_heads,
            overwrite=args.overwrite,
        )
    except (OfficialCheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    v = report.vision
    print(
        f"converted {args.official_dir} -> {report.output}: ViT {v.width}w x {v.depth} ({v.heads} heads, {v.ffn}), "
        f"{report.tensors} tensors, {report.bytes / 2**20:.1f} MiB in {len(report.shards)} shard(s); "
        f"prompt ids checked for {report.prompts_checked} keypoints"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
