"""Train LocLLM (HF Trainer; torchrun / accelerate launch for several processes).

    python training/train.py --init CKPT --output runs/demo \
        --train-coco data/train/annotations/person_keypoints_train.json [--train-companion ...] \
        --val-coco data/val/annotations/person_keypoints_val.json --steps 2000 --batch-size 16
    python training/train.py --config train.yaml          # the same fields in YAML

Stage 1 (--stage 1 --captions LLAVA.json --caption-images DIR) trains the projector on
captions; stage 2 trains LoRA on both towers + the projector on keypoint conversations
(--adapter moe-lora --experts E --top-k K [--zero-expert]: MoE LoRA on the LM's q/v instead;
--protocol grouped: one body-part group per round, answers listing its joints in order).
A run resumes from its last saved state in OUTPUT/trainer/ when restarted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "sdk"))

from locllm_training.train import TrainConfig, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, help="YAML with TrainConfig fields (CLI flags override)")
    ap.add_argument("--init", help="checkpoint to start from (our format)")
    ap.add_argument("--output")
    ap.add_argument("--stage", type=int, choices=(1, 2))
    ap.add_argument("--train-coco", action="append", default=[], help="COCO-keypoints JSON (repeatable)")
    ap.add_argument("--train-companion", action="append", default=[], help="3D companion JSON, same order")
    ap.add_argument("--train-weight", action="append", type=float, default=[], help="mixing weight, same order")
    ap.add_argument("--val-coco")
    ap.add_argument("--val-companion")
    ap.add_argument("--captions")
    ap.add_argument("--caption-images")
    for name, typ in (
        ("steps", int),
        ("batch-size", int),
        ("grad-accum", int),
        ("lr", float),
        ("warmup-steps", int),
        ("eval-every", int),
        ("eval-persons", int),
        ("save-every", int),
        ("seed", int),
        ("workers", int),
        ("midpoint-prob", float),
        ("aux-weight", float),
        ("max-rounds", int),
        ("log-every", int),
        ("coord-dims", int),
        ("experts", int),
        ("top-k", int),
        ("expert-rank", int),
        ("balance-weight", float),
    ):
        ap.add_argument(f"--{name}", type=typ)
    ap.add_argument("--storage-dtype", choices=("float16", "bfloat16", "float32"), help="final checkpoint dtype")
    ap.add_argument("--train-llm", choices=("lora", "full"), help="LoRA on q/v (paper) or the whole LM")
    ap.add_argument("--exclude", help="comma-separated keypoints held out of training")
    ap.add_argument("--delta-of", help="write the final checkpoint as its differences from this checkpoint")
    ap.add_argument("--adapter", choices=("lora", "moe-lora"), help="the LM's adapter (default lora)")
    ap.add_argument("--zero-expert", action="store_true", help="MoE LoRA: add the zero expert (HMVLM)")
    ap.add_argument(
        "--protocol",
        choices=("per-keypoint", "grouped"),
        help="prompt protocol: one keypoint per round (default, the public checkpoints') or one body-part "
        "group per round (locllm-grouped-v1); recorded in the checkpoint (default: the init's)",
    )
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--no-augment", action="store_true")
    args = ap.parse_args(argv)
    d: dict = {}
    if args.config:
        import yaml

        d = yaml.safe_load(args.config.read_text()) or {}
    for key in (
        "init",
        "output",
        "stage",
        "captions",
        "caption_images",
        "steps",
        "batch_size",
        "grad_accum",
        "lr",
        "warmup_steps",
        "eval_every",
        "eval_persons",
        "save_every",
        "seed",
        "workers",
        "midpoint_prob",
        "aux_weight",
        "max_rounds",
        "train_llm",
        "log_every",
        "storage_dtype",
        "coord_dims",
        "delta_of",
        "adapter",
        "experts",
        "top_k",
        "expert_rank",
        "balance_weight",
        "protocol",
    ):
        v = getattr(args, key)
        if v is not None:
            d[key] = v
    if args.train_coco:
        comps = args.train_companion + [None] * (len(args.train_coco) - len(args.train_companion))
        weights = args.train_weight + [1.0] * (len(args.train_coco) - len(args.train_weight))
        d["train"] = [{"coco": c, "companion": p, "weight": w} for c, p, w in zip(args.train_coco, comps, weights)]
    if args.val_coco:
        d["val"] = {"coco": args.val_coco, "companion": args.val_companion}
    if args.exclude:
        d["exclude"] = [s.strip() for s in args.exclude.split(",") if s.strip()]
    if args.zero_expert:
        d["zero_expert"] = True
    if args.no_bf16:
        d["bf16"] = False
    if args.no_augment:
        d["augment"] = False
    for required in ("init", "output"):
        if required not in d:
            ap.error(f"--{required} is required (or in --config)")
    cfg = TrainConfig.from_dict(d)
    if cfg.stage == 2 and not cfg.train:
        ap.error("stage 2 needs --train-coco")
    final = run(cfg)
    print(f"final checkpoint: {final}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
