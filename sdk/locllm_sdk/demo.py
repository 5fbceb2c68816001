"""The bundled demo model, its cached engine, and ``locllm demo``.

``locllm demo`` renders a SynthPose scene (seeded, never seen in training), builds the demo
model's engine on first use (cached by checkpoint content), locates every keypoint of every
person - the 17 COCO joints and the keypoints held out of training (neck, pelvis), from
their descriptions alone - prints a table, writes an overlay PNG and scores the answers
against the scene's exact ground truth.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from pathlib import Path

import numpy as np

from .errors import BackendUnavailable
from .filecache import cache_dir
from .loader import read_config
from .manifest import GRAPH_REVISION, MANIFEST, TORCH, TORCH_CUDA, read_manifest

TORCH_BACKENDS = (TORCH, TORCH_CUDA)
_REPO_MODELS = Path(__file__).resolve().parents[2] / "models"
_WHOLE_FILE_LIMIT = 256 * 2**20  # larger weight files are keyed by name, size and mtime


def bundled_model_dir(name: str, marker: str) -> Path:
    """A folder shipped with the package (``locllm_sdk._models``, the repo's models/) holding ``marker``."""
    try:
        from importlib.resources import files

        path = Path(str(files("locllm_sdk._models") / name))
        if (path / marker).is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    path = _REPO_MODELS / name
    if not (path / marker).is_file():
        raise FileNotFoundError(f"bundled model {name!r} not found (looked in locllm_sdk._models and {_REPO_MODELS})")
    return path


def bundled_model(name: str = "demo") -> Path:
    """A checkpoint shipped with the package."""
    return bundled_model_dir(name, "config.json")


def resolve_model(model: str | Path | None) -> Path:
    """-m's value: None, "demo" or "demo3d" name the bundled checkpoints (unless a directory
    of that name exists here); anything else is a path."""
    if model is None or (str(model) in ("demo", "demo3d") and not Path(model).is_dir()):
        return bundled_model(str(model or "demo"))
    return Path(model)


def model_path(model: str | Path | None, backend: str = "auto") -> Path:
    """What ``Pose`` opens for a ``-m`` value (see ``resolve_model``): an engine directory as is,
    a checkpoint's cached engine, or with a torch backend the checkpoint itself (a cached engine
    records the path it was built from, which may be another, since deleted, copy)."""
    from .loader import ENGINE, model_kind

    path = resolve_model(model)
    if not path.exists():
        raise FileNotFoundError(f"model {path} does not exist")
    if model_kind(path) == ENGINE or backend in TORCH_BACKENDS:
        return path
    return engine_for(path)


def checkpoint_digest(checkpoint: str | Path) -> str:
    """Content key of a checkpoint, its delta parents' content included: a delta checkpoint
    whose parent was replaced must not be served the engine built from the old parent."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha256()
    for f in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        st = f.stat()
        digest.update(f.name.encode())
        if st.st_size <= _WHOLE_FILE_LIMIT:
            digest.update(f.read_bytes())
        else:
            digest.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    config = checkpoint / "config.json"
    parent = read_config(checkpoint).get("parent_weights") if config.is_file() else None
    if parent:
        digest.update(checkpoint_digest(checkpoint / parent["path"]).encode())
    return digest.hexdigest()


def engine_for(checkpoint: str | Path, rebuild: bool = False) -> Path:
    """The checkpoint's ONNX engine, made once per checkpoint content and cached.

    A checkpoint shipping an engine template of its content and this SDK's graph revision (the
    bundled models do) has its engine assembled from it without torch, byte-identical to the
    torch build and checked against its manifest (``engine_assembly``; seconds instead of about
    a minute, so also where torch is installed); any other checkpoint is built with the export
    extra. Both are atomic (the engine appears complete or not at all) and locked per engine: a
    second process asking for the same engine waits for the first and reuses its engine."""
    from .engine_assembly import assemble_engine, checkpoint_template

    checkpoint = Path(checkpoint)
    engines = cache_dir() / "engines"
    digest = checkpoint_digest(checkpoint)
    engine = engines / f"{checkpoint.name}-{digest[:16]}"
    if _usable(engine) and not rebuild:
        return engine
    locks = cache_dir() / "locks"  # beside the engines, so the engines folder holds engines only
    locks.mkdir(parents=True, exist_ok=True)
    engines.mkdir(parents=True, exist_ok=True)
    with _locked(locks / f"{engine.name}.lock"):
        if _usable(engine) and not rebuild:
            return engine  # another process built it while we waited
        # under the lock no other build of this engine runs: a .partial left here is stale
        template = checkpoint_template(checkpoint, digest)
        if template is not None:
            print(f"assembling the engine for {checkpoint} from its template once -> {engine}", file=sys.stderr)
            return assemble_engine(template, checkpoint, engine)
        try:
            from locllm_export.build import build_onnx_engine
        except ImportError as e:
            raise BackendUnavailable(
                f"{checkpoint} has no engine template for its content and graph revision {GRAPH_REVISION}, and "
                "building an engine needs the export extra (torch, transformers, onnx): "
                "pip install 'locllm-sdk[export]'"
            ) from e
        print(f"building the engine for {checkpoint} once -> {engine}", file=sys.stderr)
        build_onnx_engine(checkpoint, engine, overwrite=True, progress=True)
    return engine


def _usable(engine: Path) -> bool:
    if not (engine / MANIFEST).is_file():
        return False
    revision = read_manifest(engine).graph_revision
    if revision != GRAPH_REVISION:
        print(f"the cached engine's graphs are revision {revision}, not {GRAPH_REVISION}: rebuilding", file=sys.stderr)
        return False
    return True


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock file (flock: released by the OS if the holder dies)."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def held_out_keypoints(checkpoint: Path) -> list[str]:
    """Keypoints the checkpoint was trained without (recorded by training/train.py)."""
    return list((read_config(checkpoint).get("trained") or {}).get("exclude") or [])


def _match_by_iou(pred_boxes: list, gt_boxes: list, threshold: float = 0.5) -> list[int | None]:
    """For each predicted [x, y, w, h] box, the GT box it overlaps best (IoU >= threshold),
    greedily, best pairs first; None when none is left."""
    from .tracking import greedy_match, iou_matrix

    def xyxy(b):
        return np.array([[x, y, x + w, y + h] for x, y, w, h in b], np.float64).reshape(-1, 4)

    out: list[int | None] = [None] * len(pred_boxes)
    for p, g in greedy_match(iou_matrix(xyxy(pred_boxes), xyxy(gt_boxes)), threshold):
        out[p] = g
    return out


def rendered_set(seed: int, images: int, size: int = 256) -> tuple[dict, list[tuple[int, np.ndarray]]]:
    """``images`` SynthPose scenes of the test split (never trained on) as a COCO document and
    (image id, RGB) pairs."""
    from locllm_training.synthpose.dataset_io import coco_document, sample_records
    from locllm_training.synthpose.scene import generate_sample

    records, anns, pairs = [], [], []
    for i in range(images):
        sample = generate_sample(seed, i, size, (1, 3), "test")
        im, an, _, _ = sample_records(sample, i + 1, len(anns) + 1, f"{i + 1:08d}.png")
        records.append(im)
        anns += an
        pairs.append((i + 1, np.ascontiguousarray(sample.image[:, :, ::-1])))
    return coco_document(records, anns, "test", seed), pairs


def run_demo(
    seed: int = 7,
    persons: tuple[int, int] = (2, 3),
    out: str | Path = "demo.png",
    backend: str = "auto",
    model: str | Path | None = None,
    size: int = 384,
    detector: str | None = "person",
    eval_images: int = 20,
) -> dict:
    """``detector="person"``: people found by the bundled detector (None: the scene's
    ground-truth boxes); ``eval_images``: rendered test scenes on which detection AP50 and the
    keypoint AP with detected and with ground-truth boxes are measured (0: skipped)."""
    from locllm_training.synthpose.scene import ROOT, generate_sample
    from locllm_training.synthpose.skeleton import JOINT_NAMES

    from .draw import draw_results
    from .evaluation import pck
    from .pose import Pose

    checkpoint = resolve_model(model)
    novel = held_out_keypoints(checkpoint)
    pose = Pose(model_path(checkpoint, backend), backend=backend)
    sample = generate_sample(seed, 0, size, persons, "test")  # the test split: never trained on
    image = np.ascontiguousarray(sample.image[:, :, ::-1])  # renderer's BGR -> RGB
    coco = list(pose.library.skeletons["coco17"].keypoints)
    names = coco + [n for n in novel if n not in coco]
    gt_boxes = [p.bbox for p in sample.persons]
    if detector is None:
        res = pose.locate(image, names, boxes=gt_boxes)
        match: list[int | None] = list(range(len(gt_boxes)))
    else:
        res = pose.locate(image, names, detector=detector)
        match = _match_by_iou([p.box for p in res], gt_boxes)
    idx = [JOINT_NAMES.index(n) for n in names]
    gt = np.stack([p.joints_2d[idx] for p in sample.persons])
    vis = np.stack([p.vis[idx] for p in sample.persons]) > 0
    # every GT person, with the answers of the detected person matched to it (nan: missed)
    pred = np.full(gt.shape, np.nan)
    for i, j in enumerate(match):
        if j is not None:
            pred[j] = res.numpy()[i, :, :2]
    three_d = pose.spec.coord_dims == 3
    # ground-truth depth relative to the pelvis (mm), the 3D models' convention
    gt_z = np.stack([p.joints_cam[idx, 2] - p.joints_cam[ROOT, 2] for p in sample.persons])
    z_err: list[float] = []
    z_blind: list[float] = []  # answering the pelvis depth for every joint
    norm = np.array([max(b[2], b[3]) for b in gt_boxes])
    seen = [i for i, n in enumerate(names) if n not in novel]
    unseen = [i for i, n in enumerate(names) if n in novel]
    pck_seen = pck(pred[:, seen], gt[:, seen], vis[:, seen], norm, 0.1)["mean"]
    pck_novel = pck(pred[:, unseen], gt[:, unseen], vis[:, unseen], norm, 0.1)["mean"] if unseen else None
    for i, person in enumerate(res):
        j = match[i]
        found = f"  detector score {person.box_score:.2f}" if person.box_score is not None else ""
        print(f"person {i}  box={[round(v) for v in person.box]}  score={person.score:.3f}{found}")
        if j is None:
            print("  (matches no person of the scene: a false detection)")
        zhead = f"{'z mm':>8}{'gt z':>8}" if three_d else ""
        print(f"  {'keypoint':<16}{'x':>8}{'y':>8}{'gt x':>8}{'gt y':>8}{'err px':>8}{zhead}{'score':>7}")
        for k_i, k in enumerate(person):
            gx, gy = gt[j, k_i] if j is not None else (np.nan, np.nan)
            err = float(np.hypot(k.x - gx, k.y - gy))
            note = "  novel: held out of training" if k.name in novel else ""
            note += "" if j is None or vis[j, k_i] else "  (outside the image)"
            zcols = ""
            if three_d and k.z is not None and j is not None:
                zcols = f"{k.z:>8.0f}{gt_z[j, k_i]:>8.0f}"
                z_err.append(abs(k.z - float(gt_z[j, k_i])))
                z_blind.append(abs(float(gt_z[j, k_i])))
            print(f"  {k.name:<16}{k.x:>8.1f}{k.y:>8.1f}{gx:>8.1f}{gy:>8.1f}{err:>8.1f}{zcols}{k.score:>7.2f}{note}")
    missed = len(gt_boxes) - sum(j is not None for j in match)
    draw_results(image, res, out, library=pose.library, labels=True)
    if detector is not None:
        print(f"the detector found {len(res)} of the scene's {len(gt_boxes)} people ({missed} missed)")
    line = f"PCK@0.1 against the scene's ground truth: {pck_seen:.3f} on the {len(seen)} trained keypoints"
    if pck_novel is not None:
        line += f", {pck_novel:.3f} on the held-out {', '.join(novel)}"
    if z_err:
        line += (
            f"; mean depth error {np.mean(z_err):.0f} mm (pelvis-relative; answering the pelvis depth"
            f" everywhere: {np.mean(z_blind):.0f} mm)"
        )
    print(line)
    print(f"overlay written to {out}  ({res.info['backend']} backend, {res.info['decoder_passes']} decoder passes)")
    report = {
        "pck_trained": pck_seen,
        "pck_novel": pck_novel,
        "depth_error_mm": float(np.mean(z_err)) if z_err else None,
        "depth_error_blind_mm": float(np.mean(z_blind)) if z_blind else None,
        "persons": len(res),
        "scene_persons": len(gt_boxes),
        "overlay": str(out),
    }
    if detector is not None and eval_images > 0:
        report["top_down"] = _report_top_down(pose, seed, eval_images)
    return report


def _report_top_down(pose, seed: int, images: int) -> dict:
    from .person_detector import PersonDetector
    from .topdown_eval import BOX_AP_THRESHOLD, evaluate_top_down

    gt, pairs = rendered_set(10_000 + seed, images)
    print(f"measuring on {images} more rendered scenes ({len(gt['annotations'])} people, test split) ...")
    r = evaluate_top_down(pose, PersonDetector(score_threshold=BOX_AP_THRESHOLD), pairs, gt)
    print(
        f"person detection AP50 {r['box']['AP50']:.3f} (AP {r['box']['AP']:.3f}); keypoint AP (COCO OKS, 17 joints) "
        f"{r['keypoints_detected_boxes']['AP']:.3f} with detected boxes, {r['keypoints_gt_boxes']['AP']:.3f} with "
        f"ground-truth boxes ({r['keypoint_ap_ratio']:.0%}); detector {r['detector_ms_median']:.1f} ms/image"
    )
    return r
