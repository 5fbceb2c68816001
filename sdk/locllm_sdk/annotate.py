"""``locllm annotate``: COCO keypoint results for a whole dataset, as a Ray Data pipeline.

SOURCE is a COCO keypoints file (its ground-truth person boxes) or an image folder / glob (boxes
from the bundled person detector). The pipeline: the list of images -> read and decode (Ray
tasks, in parallel) -> ``Pose`` on actors (one engine load per actor, ``threads`` ONNX Runtime
threads each) -> JSON-lines shards written by Ray Data as blocks finish (``RESULTS.parts/``) ->
one merged COCO results file and an errors file at the end.

Resumable: a rerun reads the shards already written and runs only the images without a
result (failed images are tried again). An image that cannot be read or decoded becomes an
errors-file entry with its reason, and the run goes on: done + failed = total, always.
Ray runs embedded (``ray.init()`` on this machine) unless ``address`` names a cluster.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .coco_files import guess_image_dir, read_coco
from .errors import ArgumentError, BackendUnavailable, DataError, LocLLMError
from .predict import image_predictions, keypoint_names, people_by_image
from .sources import image_files

DONE, FAILED = "done", "failed"
SETTINGS_FILE = "run.json"  # in the shards folder: what the shards were computed with


@dataclass(frozen=True)
class Summary:
    total: int
    done: int
    failed: int
    skipped: int  # done by an earlier run, not redone
    results: Path
    errors: Path

    def __str__(self) -> str:
        return (
            f"{self.done} done + {self.failed} failed = {self.total} images ({self.skipped} already done by an "
            f"earlier run); results: {self.results}; errors: {self.errors}"
        )


def errors_path(results: Path) -> Path:
    return results.with_name(results.stem + ".errors.json")


def shards_dir(results: Path) -> Path:
    return results.with_name(results.name + ".parts")


def source_tasks(
    source: str | os.PathLike, image_dir: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[list[dict], dict | None]:
    """The images to annotate, in the source's order, as rows (``index``, ``image_id``, ``path``,
    ``people``: the JSON of the COCO annotations, "" for detector boxes, ``exif``), and the COCO
    category (None for a folder or glob)."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() == ".json":
        doc = read_coco(path)
        folder = Path(image_dir) if image_dir else guess_image_dir(path, doc)
        rows = [
            # COCO boxes are in the stored pixel grid: no EXIF rotation (as `locllm predict`)
            {"image_id": im["id"], "path": str(folder / im["file_name"]), "people": json.dumps(people), "exif": False}
            for im, people in people_by_image(doc, limit)
        ]
        category = doc["categories"][0]
    else:
        files = image_files(source)[:limit]
        rows = [{"image_id": i, "path": str(f), "people": "", "exif": True} for i, f in enumerate(files)]
        category = None
    if not rows:
        raise DataError(f"{source}: no image to annotate")
    return [{"index": i, **r} for i, r in enumerate(rows)], category


def read_shards(folder: Path) -> dict[int, dict]:
    """Each image's record from the shards (by ``index``); a result beats a failure. A line cut
    short by an interrupted write is not a record (that image runs again)."""
    records: dict[int, dict] = {}
    for shard in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if shard.name == SETTINGS_FILE:
            continue
        for line in shard.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                index = int(rec["index"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if rec.get("status") == DONE or index not in records:
                records[index] = rec
    return records


def read_and_decode(row: dict) -> dict:
    """Ray task: the image of ``row`` decoded (``crop.load_image``, all its checks), or the
    reason it cannot be (``image`` then empty)."""
    from .crop import load_image

    try:
        row["image"] = load_image(row["path"], exif_orientation=bool(row["exif"]))
        row["error"] = ""
    except (LocLLMError, OSError) as e:
        row["image"] = np.zeros((0, 0, 3), np.uint8)
        row["error"] = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return row


def person_detector():
    """The bundled person detector (``locllm_sdk.person_detector``), for sources without boxes."""
    try:
        from .person_detector import PersonDetector
    except ImportError as e:
        raise BackendUnavailable(
            "a folder or glob source takes its boxes from the bundled person detector "
            "(locllm_sdk.person_detector), which this installation lacks: annotate a COCO file with boxes instead"
        ) from e
    return PersonDetector()


class PoseActor:
    """One Ray actor: one ``Pose`` (one engine load), then batches of decoded images -> records."""

    def __init__(self, engine: str, settings: dict, category: dict | None):
        from .pose import Pose

        self.pose = Pose(
            engine, backend=settings["backend"], decoding=settings["decoding"], threads=settings["threads"]
        )
        keypoints = "coco17" if category is None and settings["keypoints"] == "auto" else settings["keypoints"]
        self.keypoints = keypoint_names({"categories": [category or {}]}, self.pose, keypoints)
        self.detector = None if category is not None else person_detector()
        self.flip = settings["flip"]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        status, preds, errors = [], [], []
        for i in range(len(batch["index"])):
            error = str(batch["error"][i])
            result = []
            if not error:
                people = json.loads(batch["people"][i]) if batch["people"][i] else None
                try:
                    result = image_predictions(
                        self.pose,
                        batch["image"][i],
                        int(batch["image_id"][i]),
                        self.keypoints,
                        people,
                        self.flip,
                        None if people is not None else self.detector,
                    )
                except LocLLMError as e:  # this image's boxes or content: recorded, the run goes on
                    error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            status.append(FAILED if error else DONE)
            preds.append(json.dumps(result))  # a string column: floats written exactly as json writes them
            errors.append(error)
        return {
            "index": batch["index"],
            "image_id": batch["image_id"],
            "path": batch["path"],
            "status": np.array(status),
            "predictions": np.array(preds),
            "error": np.array(errors),
        }


def _check_settings(folder: Path, settings: dict) -> None:
    """A rerun continues the shards of the same run only (same source, model, keypoints, ...)."""
    path = folder / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if k != "threads" and before.get(k) != v}
        if changed:
            raise ArgumentError(
                f"{folder} holds shards of a run with other settings {changed} (before, now): "
                "remove that folder or choose another --out"
            )
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=1) + "\n")


def annotate(
    source: str | os.PathLike,
    engine: str | os.PathLike,
    out: str | os.PathLike,
    workers: int = 1,
    threads: int | None = None,
    keypoints: str | Sequence[str] = "auto",
    image_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    flip: bool = False,
    backend: str = "auto",
    decoding: str = "constrained",
    batch_size: int = 4,
    address: str | None = None,
    progress: bool = True,
) -> Summary:
    """Annotate ``source`` with the engine directory ``engine``; COCO results to ``out`` (see
    the module doc). ``threads`` per actor: default the machine's cores // ``workers``.
    ``address``: a Ray cluster (``ray.init(address=...)``); default an embedded local Ray, or
    the one this process already started."""
    out = Path(out)
    if not out.parent.is_dir():
        raise DataError(f"cannot write {out}: the folder {out.parent} does not exist")
    for name, value in (("workers", workers), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer, got {value!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ArgumentError(f"threads must be a positive integer, got {threads!r}")
    tasks, category = source_tasks(source, image_dir, limit)
    if category is None:
        person_detector()  # refused here, before Ray starts, when it is missing
    keypoints = keypoints if isinstance(keypoints, str) else ",".join(keypoints)
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    settings = {
        "source": str(Path(source).resolve()),
        "engine": str(Path(engine).resolve()),
        "keypoints": keypoints,
        "flip": flip,
        "backend": backend,
        "decoding": decoding,
        "limit": limit,
        "threads": threads,
    }
    folder = shards_dir(out)
    _check_settings(folder, settings)
    before = read_shards(folder)
    todo = [t for t in tasks if before.get(t["index"], {}).get("status") != DONE]
    if todo:
        _run_ray(todo, str(engine), settings, category, folder, workers, threads, batch_size, address, progress)
    return _merge(tasks, read_shards(folder), out, skipped=len(tasks) - len(todo))


def _run_ray(tasks, engine, settings, category, folder, workers, threads, batch_size, address, progress) -> None:
    try:
        import ray
    except ImportError as e:
        raise BackendUnavailable('locllm annotate runs on Ray Data: pip install "locllm-sdk[ray]"') from e
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = ray.data.from_items(tasks, override_num_blocks=-(-len(tasks) // batch_size))  # a shard per batch
        # The actors hold one logical CPU per ONNX Runtime thread; reading, decoding and writing
        # are light next to the model and ask for none, or on a small machine the actors' CPUs
        # would leave them unscheduled (a hang). A bounded pool of them keeps memory bounded.
        ds = ds.map(read_and_decode, num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(2, workers)))
        ds = ds.map_batches(
            PoseActor,
            fn_constructor_args=(engine, settings, category),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=threads,
        )
        ds.write_json(str(folder), ray_remote_args={"num_cpus": 0})
    finally:
        if started:
            ray.shutdown()


def _merge(tasks: list[dict], records: dict[int, dict], out: Path, skipped: int) -> Summary:
    """One COCO results file (source order) and one errors file, from the shards."""
    missing = [t["path"] for t in tasks if t["index"] not in records]
    if missing:  # every image has a result or a reason: never silently dropped
        raise DataError(f"{len(missing)} image(s) have neither a result nor an error, e.g. {missing[0]}")
    preds, errors = [], []
    for t in tasks:
        rec = records[t["index"]]
        if rec["status"] == DONE:
            preds += json.loads(rec["predictions"])
        else:
            errors.append({"image_id": t["image_id"], "file": t["path"], "error": rec["error"]})
    errs = errors_path(out)
    for path, data in ((out, preds), (errs, errors)):
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(path)  # complete or absent
    return Summary(len(tasks), len(tasks) - len(errors), len(errors), skipped, out, errs)
