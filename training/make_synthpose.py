#!/usr/bin/env python
"""Render a SynthPose split: images (JPEG by default, or PNG) + COCO-keypoints JSON + 3D companion
(+ captions).

    python training/make_synthpose.py --output data/synthpose --images 2000 --split train \
        [--seed 0] [--size 256] [--persons 1-3] [--preview preview.png] [--captions]

The same arguments always produce byte-identical files (each image has its own RNG seeded by
(seed, split, index)), so --workers only changes the speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

try:
    import locllm_training  # noqa: F401
except ImportError:  # run from a checkout: python training/make_synthpose.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
from locllm_training.synthpose.dataset_io import (
    caption_record,
    coco_document,
    companion_document,
    sample_records,
    write_json,
)
from locllm_training.synthpose.scene import Sample, generate_sample
from locllm_training.synthpose.skeleton import EXT_LIMBS, FLIP_PAIRS

# Huffman-only deflate: ~2x faster than the default on noisy images and smaller files;
# JPEG (quality 95) as real datasets ship: ~0.4 ms to encode a 256 px image where PNG takes
# ~4-5 ms (a third of the whole render); the ground truth comes from geometry, not pixels.
# --format png keeps the pixels lossless (Huffman-only: fast, never changes pixels).
IMAGE_PARAMS = {
    "jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],
    "png": [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY],
}


def parse_persons(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    a, b = int(lo), int(hi or lo)
    if not 1 <= a <= b <= 6:
        raise argparse.ArgumentTypeError("--persons must look like 1-3 (between 1 and 6)")
    return a, b


def draw_skeleton(img: np.ndarray, sample: Sample) -> np.ndarray:
    """Overlay: box, limbs, joints (left = green, right = red, centre = cyan;
    filled = visible, ring = occluded)."""
    out = img.copy()
    left = {a for a, _ in FLIP_PAIRS}
    right = {b for _, b in FLIP_PAIRS}
    for p in sample.persons:
        x, y, w, h = p.bbox
        cv2.rectangle(out, (int(x), int(y)), (int(x + w), int(y + h)), (255, 255, 255), 1)
        for a, b in EXT_LIMBS:
            if p.vis[a] > 0 and p.vis[b] > 0:
                cv2.line(
                    out,
                    tuple(int(v) for v in np.round(p.joints_2d[a] * 4)),
                    tuple(int(v) for v in np.round(p.joints_2d[b] * 4)),
                    (0, 220, 255),
                    1,
                    cv2.LINE_AA,
                    2,
                )
        for k, (u, v) in enumerate(p.joints_2d):
            if p.vis[k] == 0:
                continue
            col = (0, 255, 0) if k in left else (0, 0, 255) if k in right else (255, 255, 0)
            cv2.circle(out, (int(round(u * 4)), int(round(v * 4))), 8, col, -1 if p.vis[k] == 2 else 1, cv2.LINE_AA, 2)
    return out


def _render(job: tuple[int, int, int, tuple[int, int], str, bool]) -> Sample:
    seed, i, size, persons, split, _ = job
    return generate_sample(seed, i, size, persons, split)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="dataset root directory")
    ap.add_argument("--images", type=int, required=True, help="number of images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256, help="square image size in pixels")
    ap.add_argument("--persons", type=parse_persons, default=(1, 3), help="people per image, e.g. 1-3")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"])
    ap.add_argument("--preview", help="write a grid of samples with skeletons to this PNG")
    ap.add_argument("--format", choices=sorted(IMAGE_PARAMS), default="jpg", help="image files (default jpg)")
    ap.add_argument("--preview-count", type=int, default=16)
    ap.add_argument("--captions", action="store_true", help="also write LLaVA caption JSON")
    ap.add_argument("--workers", type=int, default=1, help="processes (output is identical)")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)

    root = Path(args.output)
    img_dir = root / "images" / args.split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, anns, images3d, anns3d, caps, previews = [], [], [], [], [], []
    next_ann = 1
    jobs = [(args.seed, i, args.size, args.persons, args.split, False) for i in range(args.images)]
    t0 = time.perf_counter()
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("fork").Pool(args.workers)
        it = pool.imap(_render, jobs, chunksize=16)
    else:
        pool, it = None, map(_render, jobs)
    for i, sample in enumerate(it):
        image_id = i + 1
        name = f"{image_id:08d}.{args.format}"
        cv2.imwrite(str(img_dir / name), sample.image, IMAGE_PARAMS[args.format])
        im, an, im3, an3 = sample_records(sample, image_id, next_ann, name)
        next_ann += len(an)
        images.append(im)
        anns += an
        images3d.append(im3)
        anns3d += an3
        if args.captions:
            caps.append(caption_record(sample, image_id, f"images/{args.split}/{name}", i))
        if args.preview and len(previews) < args.preview_count:
            previews.append(draw_skeleton(sample.image, sample))
    if pool is not None:
        pool.close()
        pool.join()
    dt = time.perf_counter() - t0
    ann_dir = root / "annotations"
    write_json(ann_dir / f"person_keypoints_{args.split}.json", coco_document(images, anns, args.split, args.seed))
    write_json(ann_dir / f"synthpose3d_{args.split}.json", companion_document(images3d, anns3d, args.split, args.seed))
    if args.captions:
        write_json(ann_dir / f"captions_{args.split}.json", caps)
    if args.preview and previews:
        cols = int(np.ceil(np.sqrt(len(previews))))
        rows = int(np.ceil(len(previews) / cols))
        blank = np.zeros_like(previews[0])
        previews += [blank] * (rows * cols - len(previews))
        grid = np.concatenate([np.concatenate(previews[r * cols : (r + 1) * cols], 1) for r in range(rows)], 0)
        os.makedirs(os.path.dirname(os.path.abspath(args.preview)), exist_ok=True)
        cv2.imwrite(args.preview, grid)
    print(
        f"wrote {len(images)} images, {len(anns)} persons to {root} "
        f"in {dt:.2f}s ({len(images) / max(dt, 1e-9):.1f} images/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
