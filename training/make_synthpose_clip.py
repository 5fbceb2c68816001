#!/usr/bin/env python
"""Render a short SynthPose video of 1-3 people moving, with per-frame ground truth.

    python training/make_synthpose_clip.py --output data/clip [--name clip] [--frames 45] [--fps 15] \
        [--seed 0] [--size 256] [--persons 1-3]

writes ``OUTPUT/NAME.mp4`` (OpenCV's ``mp4v``) and ``OUTPUT/NAME.json``: a COCO keypoints file
with one image per frame (``frame_index``, ``file_name`` ``NAME.mp4#i`` as ``locllm_sdk.sources``
names video frames) whose annotations carry ``person_id``, the identity of the person across
frames, and a ``video`` record (fps, frame count, size, each person's motion).

The scene is built once from the seed, as ``generate_sample`` builds an image: body shapes,
clothes, a fixed camera, background and lighting. What moves is the people: each walks a
straight path on the ground at a speed set by their pose kind, facing where they go, and
their joint angles change smoothly. Walking and running people swing between their sampled
pose and its mirror (left and right legs and arms swapped) once per stride; the others blend
from one sampled pose of their kind to a second one over the clip. The camera is fixed and
framed on every frame's people, so the background is rendered once. Every frame is rendered
from the geometry (no pixel warping), so its boxes, keypoints and visibility flags are exact.
The same arguments always give the same frames and the same JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

try:
    import locllm_training  # noqa: F401
except ImportError:  # run from a checkout: python training/make_synthpose_clip.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import cv2
import numpy as np
from locllm_training.synthpose.dataset_io import coco_document, sample_records, write_json
from locllm_training.synthpose.pose import BodyShape, Pose, forward_kinematics, sample_pose, sample_shape
from locllm_training.synthpose.render import PART_BITS, Appearance, Camera, Painter, look_at, render_person
from locllm_training.synthpose.scene import (
    ROOT,
    PersonAnn,
    Sample,
    _facing,
    _photometric,
    _shadow,
    _visibility,
    make_background,
    sample_appearance,
)
from make_synthpose import parse_persons

CLIP_STREAM = 7  # RNG stream of clips, apart from generate_sample's splits (0-2, 9)
# Pose kinds that look natural in motion (sitting and lying people do not walk), how often a
# clip's person takes each, and their ground speed range in mm/s (who waves or points shuffles).
SPEEDS_MM_S: dict[str, tuple[float, float]] = {
    "walking": (900.0, 1500.0),
    "running": (2200.0, 3200.0),
    "standing": (0.0, 300.0),
    "waving": (0.0, 300.0),
    "pointing": (0.0, 300.0),
    "arms_raised": (0.0, 300.0),
}
KIND_WEIGHTS = {"walking": 0.45, "running": 0.15, "standing": 0.1, "waving": 0.1, "pointing": 0.1, "arms_raised": 0.1}
MAX_PATH_MM = 3500.0  # a longer path would make the fixed camera frame everyone small
STRIDE_HZ = {"walking": 0.9, "running": 1.4}  # stride cycles per second (both legs)
MIN_GAP_MM = 700.0  # closest two people's pelvises may come (ground plane)
SWING_ANGLES = ("hip_flex", "knee", "sh_flex", "elbow")


@dataclass(frozen=True)
class Walker:
    """One person of a clip and their motion."""

    person_id: int
    kind: str
    shape: BodyShape
    appearance: Appearance
    pose_a: Pose
    pose_b: Pose
    start: np.ndarray  # ground position (mm) at t = 0
    velocity: np.ndarray  # mm/s on the ground (x, 0, z)
    yaw: float  # degrees; the person faces along the velocity (or a sampled way when still)
    phase: float  # stride phase at t = 0 (radians)

    def pose_at(self, t: float, seconds: float) -> Pose:
        """The pose at ``t`` seconds into a clip of ``seconds``."""
        if self.kind in STRIDE_HZ:
            s = 0.5 - 0.5 * np.cos(2 * np.pi * STRIDE_HZ[self.kind] * t + self.phase)
        else:
            s = float(np.clip(t / seconds, 0.0, 1.0)) if seconds > 0 else 0.0
            s = s * s * (3 - 2 * s)  # smoothstep: starts and ends at rest
        a, b = self.pose_a.angles, self.pose_b.angles
        return replace(self.pose_a, angles={k: (1 - s) * a[k] + s * b[k] for k in a})

    def position_at(self, t: float) -> np.ndarray:
        return self.start + self.velocity * t


def _mirrored(pose: Pose) -> Pose:
    """The pose with the left and right swing angles swapped: the other half of a stride."""
    ang = dict(pose.angles)
    for name in SWING_ANGLES:
        ang[f"{name}_l"], ang[f"{name}_r"] = pose.angles[f"{name}_r"], pose.angles[f"{name}_l"]
    return replace(pose, angles=ang)


def _walkers(rng: np.random.Generator, n: int, seconds: float) -> list[Walker]:
    kinds = sorted(SPEEDS_MM_S)
    weights = np.array([KIND_WEIGHTS[k] for k in kinds])
    out: list[Walker] = []
    for pid in range(n):
        shape, app = sample_shape(rng), sample_appearance(rng)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        pose_a = sample_pose(rng, kind)
        pose_b = _mirrored(pose_a) if kind in STRIDE_HZ else sample_pose(rng, kind)
        for _ in range(50):  # a path that keeps its distance from the others' paths
            heading = float(rng.uniform(0, 360))
            speed = min(float(rng.uniform(*SPEEDS_MM_S[kind])), MAX_PATH_MM / max(seconds, 1e-9))
            direction = np.array([np.sin(np.radians(heading)), 0.0, np.cos(np.radians(heading))])
            start = np.array([rng.uniform(-1800, 1800), 0.0, rng.uniform(-1500, 1500)])
            w = Walker(pid, kind, shape, app, pose_a, pose_b, start, direction * speed, heading, rng.uniform(0, 6.3))
            ts = np.linspace(0, seconds, 12)
            if all(np.hypot(*(w.position_at(t) - o.position_at(t))[[0, 2]]) > MIN_GAP_MM for o in out for t in ts):
                break
        out.append(w)
    return out


def _skeleton(w: Walker, t: float, seconds: float):  # noqa: ANN202 - a Skeleton3D
    return forward_kinematics(w.shape, w.pose_at(t, seconds), w.yaw, w.position_at(t))


def _camera(rng: np.random.Generator, joints: np.ndarray, size: int) -> Camera:
    """A fixed camera framing every frame's joints (as generate_sample frames one image)."""
    centre = 0.5 * (joints.min(0) + joints.max(0))
    dist = rng.uniform(3500, 7000) + np.ptp(joints[:, [0, 2]], axis=0).max()
    az = rng.uniform(0, 2 * np.pi)
    cam_pos = centre + np.array([np.sin(az) * dist, 0.0, np.cos(az) * dist])
    cam_pos[1] = rng.uniform(600, 2200)
    R, t = look_at(cam_pos, centre, roll_deg=float(rng.normal(0, 2)))
    xc = joints @ R.T + t
    ext = float(np.max(np.abs(xc[:, :2] / xc[:, 2:3])))
    f = size * 0.5 * 0.9 / (ext * 1.12)  # 0.9 fill, 12 % for heads and hands past the joints
    return Camera(fx=f, fy=f, cx=(size - 1) / 2, cy=(size - 1) / 2, R=R, t=t)


def _annotate(slot: int, w: Walker, skel, label: np.ndarray, cam: Camera) -> PersonAnn | None:  # noqa: ANN001
    """What generate_sample records for a rendered person (None when no pixel of them shows)."""
    jc = cam.to_cam(skel.joints)
    uv = cam.project(jc)
    ys, xs = np.nonzero(label // PART_BITS == slot)
    if len(xs) == 0:
        return None
    x0, y0 = float(xs.min()), float(ys.min())
    bbox = [x0 - 0.5, y0 - 0.5, float(xs.max()) - x0 + 1, float(ys.max()) - y0 + 1]
    return PersonAnn(
        slot=slot,
        kind=w.kind,
        facing=_facing(skel.aux["R_root"], skel.joints[ROOT], cam),
        joints_cam=jc,
        joints_2d=uv,
        vis=_visibility(uv, jc, label, slot, skel, cam),
        bbox=bbox,
        area=int(len(xs)),
        appearance=w.appearance,
    )


@dataclass
class Clip:
    frames: list[Sample]  # BGR images and the annotations of the people who show
    person_ids: list[list[int]]  # per frame, the person_id of each of frames[i].persons
    walkers: list[Walker]
    fps: float


def render_clip(
    seed: int = 0, frames: int = 45, fps: float = 15.0, size: int = 256, persons: tuple[int, int] = (1, 3)
) -> Clip:
    """The clip's frames and ground truth, a pure function of the arguments."""
    rng = np.random.default_rng([int(seed), CLIP_STREAM])
    n = int(rng.integers(persons[0], persons[1] + 1))
    seconds = (frames - 1) / fps
    walkers = _walkers(rng, n, seconds)
    times = [i / fps for i in range(frames)]
    skeletons = [[_skeleton(w, t, seconds) for w in walkers] for t in times]
    cam = _camera(rng, np.concatenate([s.joints for frame in skeletons for s in frame]), size)
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.9, -0.2), -rng.uniform(0.3, 1.0)])
    light /= np.linalg.norm(light)
    background, bg_desc = make_background(rng, size, cam)
    photo_seed = int(rng.integers(2**31))
    out, ids = [], []
    for frame in skeletons:
        img, label = background.copy(), np.zeros((size, size), np.uint16)
        painter = Painter(img, label, cam, light)
        order = sorted(range(n), key=lambda i: -float(cam.to_cam(frame[i].joints[ROOT][None])[0, 2]))
        for rank, i in enumerate(order):  # far to near, slot = rank + 1 as in generate_sample
            if bg_desc.startswith("a room"):
                _shadow(img, cam, frame[i], walkers[i].shape)
            render_person(painter, frame[i], walkers[i].shape, walkers[i].appearance, rank + 1)
        anns, pids = [], []
        for rank, i in sorted(enumerate(order), key=lambda ri: ri[1]):
            ann = _annotate(rank + 1, walkers[i], frame[i], label, cam)
            if ann is not None:
                anns.append(ann)
                pids.append(walkers[i].person_id)
        # one photometric draw for the whole clip: the same exposure, blur and noise every frame
        img = _photometric(img, np.random.default_rng(photo_seed))
        out.append(Sample(image=img, label=label, camera=cam, persons=anns, background=bg_desc))
        ids.append(pids)
    return Clip(out, ids, walkers, fps)


def clip_document(clip: Clip, video_name: str, seed: int) -> dict:
    """The clip's ground truth: COCO keypoints, one image per frame, ``person_id`` per person."""
    images, anns = [], []
    for i, (sample, pids) in enumerate(zip(clip.frames, clip.person_ids, strict=True)):
        im, an, _, _ = sample_records(sample, i + 1, len(anns) + 1, f"{video_name}#{i}")
        images.append(im | {"frame_index": i})
        anns += [a | {"person_id": pid} for a, pid in zip(an, pids, strict=True)]
    doc = coco_document(images, anns, "clip", seed)
    h, w = clip.frames[0].image.shape[:2]
    doc["video"] = {
        "file_name": video_name,
        "fps": clip.fps,
        "frames": len(clip.frames),
        "width": w,
        "height": h,
        "persons": [
            {"person_id": p.person_id, "kind": p.kind, "speed_mm_s": round(float(np.linalg.norm(p.velocity)), 1)}
            for p in clip.walkers
        ],
    }
    return doc


def write_clip(clip: Clip, video: Path, gt: Path, seed: int) -> None:
    h, w = clip.frames[0].image.shape[:2]
    video.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), clip.fps, (w, h))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write an mp4v video to {video}")
    for sample in clip.frames:
        writer.write(sample.image)
    writer.release()
    write_json(gt, clip_document(clip, video.name, seed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, help="folder for NAME.mp4 and NAME.json")
    ap.add_argument("--name", default="clip")
    ap.add_argument("--frames", type=int, default=45)
    ap.add_argument("--fps", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=256, help="square frame size in pixels")
    ap.add_argument("--persons", type=parse_persons, default=(1, 3), help="people in the clip, e.g. 1-3")
    args = ap.parse_args(argv)
    if args.frames < 1 or args.fps <= 0 or args.size < 32:
        ap.error("--frames must be >= 1, --fps > 0 and --size >= 32")
    cv2.setNumThreads(1)
    t0 = time.perf_counter()
    clip = render_clip(args.seed, args.frames, args.fps, args.size, args.persons)
    out = Path(args.output)
    write_clip(clip, out / f"{args.name}.mp4", out / f"{args.name}.json", args.seed)
    shown = sum(len(p) for p in clip.person_ids)
    print(
        f"wrote {out / args.name}.mp4 ({args.frames} frames, {len(clip.walkers)} people: "
        f"{', '.join(w.kind for w in clip.walkers)}; {shown} person-frames) in {time.perf_counter() - t0:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
