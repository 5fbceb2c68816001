"""Per-person latency of the C++ runtime vs Python ``Pose`` on one engine, side by side in one run,
and the C++ start-up time.

    python benchmarks/cpp_latency.py [--engine DIR] [--images 20] [--repeat 3] [--threads N]

Each ground-truth person of the first ``--images`` SynthPose val images is one call (one box,
the 17 COCO keypoints), alternately through ``Pose.locate`` (ONNX Runtime backend) and through
the C API (``liblocllm.so`` via ctypes, the same ONNX Runtime library); the image is decoded
once beforehand for both. Start-up: ``locllm_create`` (manifest, sha256 of every engine file,
tokenizer checks, three ONNX Runtime sessions) as ``locllm_cpp --timing`` reports it, and the
whole process's wall time. The C++ build is made (``cmake``) when ``build/`` lacks it.

Also the ctypes binding the parity test uses (``CppPose``, ``cpp_crop``, ``cpp_load_image``).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SYNTHPOSE = Path("/work/data/synthpose")


def build_dir() -> Path:
    return Path(os.environ.get("LOCLLM_CPP_BUILD") or ROOT / "build")


def ensure_built(build: Path | None = None) -> Path:
    """The build folder holding ``locllm_cpp`` and ``liblocllm.so`` (configured and built here if absent)."""
    build = build or build_dir()
    if not (build / "locllm_cpp").is_file() or not (build / "liblocllm.so").is_file():
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, stdout=subprocess.DEVNULL)
    return build


class _Keypoint(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("description", ctypes.c_char_p)]


class _Point(ctypes.Structure):
    _fields_ = [
        ("x", ctypes.c_double),
        ("y", ctypes.c_double),
        ("z", ctypes.c_double),
        ("score", ctypes.c_double),
        ("name", ctypes.c_char_p),
        ("answer", ctypes.c_char_p),
    ]


class _Options(ctypes.Structure):
    _fields_ = [("verify", ctypes.c_int), ("threads", ctypes.c_int)]


def _library(build: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build / "liblocllm.so"))
    vp, sz, dp = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_double)
    u8p = ctypes.POINTER(ctypes.c_uint8)
    lib.locllm_last_error.restype = ctypes.c_char_p
    lib.locllm_create.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Options), ctypes.POINTER(vp)]
    lib.locllm_destroy.argtypes = [vp]
    lib.locllm_locate.argtypes = [vp, u8p, ctypes.c_int, ctypes.c_int, sz, dp, sz, ctypes.POINTER(_Keypoint), sz,
                                  ctypes.POINTER(vp)]  # fmt: skip
    lib.locllm_result_persons.argtypes = lib.locllm_result_keypoints.argtypes = [vp]
    lib.locllm_result_persons.restype = lib.locllm_result_keypoints.restype = sz
    lib.locllm_result_point.argtypes = [vp, sz, sz, ctypes.POINTER(_Point)]
    lib.locllm_result_free.argtypes = [vp]
    lib.locllm_crop.argtypes = [u8p, ctypes.c_int, ctypes.c_int, sz, dp, ctypes.c_int, u8p]
    lib.locllm_load_image.argtypes = [ctypes.c_char_p, ctypes.POINTER(u8p), ctypes.POINTER(ctypes.c_int),
                                      ctypes.POINTER(ctypes.c_int)]  # fmt: skip
    lib.locllm_image_free.argtypes = [u8p]
    return lib


def _check(lib, status: int) -> None:
    if status != 0:
        raise RuntimeError(f"C API status {status}: {lib.locllm_last_error().decode()}")


def _u8(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


class CppPose:
    """The C++ runtime through its C API: ``locate`` -> per person, per keypoint (x, y, score, answer)."""

    def __init__(self, engine: str | Path, build: Path | None = None, threads: int = 0):
        self.lib = _library(ensure_built(build))
        self.handle = ctypes.c_void_p()
        _check(self.lib, self.lib.locllm_create(str(engine).encode(), _Options(1, threads), ctypes.byref(self.handle)))

    def locate(self, rgb: np.ndarray, names: list[str], boxes: list[list[float]]) -> list[list[tuple]]:
        rgb = np.ascontiguousarray(rgb, np.uint8)
        h, w = rgb.shape[:2]
        flat = np.ascontiguousarray(boxes, np.float64).reshape(-1)
        kps = (_Keypoint * len(names))(*[_Keypoint(n.encode(), None) for n in names])
        res = ctypes.c_void_p()
        status = self.lib.locllm_locate(
            self.handle, _u8(rgb), w, h, w * 3, flat.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), len(boxes),
            kps, len(names), ctypes.byref(res),
        )  # fmt: skip
        _check(self.lib, status)
        out = []
        point = _Point()
        for p in range(self.lib.locllm_result_persons(res)):
            row = []
            for j in range(self.lib.locllm_result_keypoints(res)):
                _check(self.lib, self.lib.locllm_result_point(res, p, j, ctypes.byref(point)))
                row.append((point.x, point.y, point.score, point.answer.decode()))
            out.append(row)
        self.lib.locllm_result_free(res)
        return out

    def close(self) -> None:
        if self.handle:
            self.lib.locllm_destroy(self.handle)
            self.handle = ctypes.c_void_p()


def cpp_crop(build: Path, rgb: np.ndarray, box: list[float], size: int) -> np.ndarray:
    """The C++ runtime's model crop of ``box`` (``locllm_crop``)."""
    lib = _library(build)
    rgb = np.ascontiguousarray(rgb, np.uint8)
    out = np.zeros((size, size, 3), np.uint8)
    b = np.asarray(box, np.float64)
    h, w = rgb.shape[:2]
    _check(
        lib, lib.locllm_crop(_u8(rgb), w, h, w * 3, b.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), size, _u8(out))
    )
    return out


def cpp_load_image(build: Path, path: str | Path) -> np.ndarray:
    """The C++ runtime's decoding of an image file (``locllm_load_image``)."""
    lib = _library(build)
    buf, w, h = ctypes.POINTER(ctypes.c_uint8)(), ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.locllm_load_image(str(path).encode(), ctypes.byref(buf), ctypes.byref(w), ctypes.byref(h)))
    out = np.ctypeslib.as_array(buf, shape=(h.value, w.value, 3)).copy()
    lib.locllm_image_free(buf)
    return out


def val_people(n_images: int, data: Path = SYNTHPOSE) -> list[tuple[Path, list[list[float]]]]:
    """(image path, GT boxes) of the first ``n_images`` images of the SynthPose val split."""
    gt = json.loads((data / "annotations" / "person_keypoints_val.json").read_text())
    boxes: dict[int, list] = {}
    for a in gt["annotations"]:
        boxes.setdefault(a["image_id"], []).append(a["bbox"])
    images = sorted(gt["images"], key=lambda im: im["id"])[:n_images]
    return [(data / "images" / "val" / im["file_name"], boxes.get(im["id"], [])) for im in images]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", help="engine directory (default: the bundled demo model's)")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per person and runtime")
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: its default), both runtimes")
    ap.add_argument("--startups", type=int, default=3, help="locllm_cpp processes timed for the start-up")
    args = ap.parse_args(argv)
    from locllm_sdk import Pose
    from locllm_sdk.crop import load_image
    from locllm_sdk.demo import engine_for, resolve_model
    from locllm_sdk.descriptions import coco17

    engine = Path(args.engine) if args.engine else engine_for(resolve_model("demo"))
    build = ensure_built()
    names = list(coco17().keypoints)
    people = [(load_image(p), b) for p, boxes in val_people(args.images) for b in boxes]
    t = time.perf_counter()
    py = Pose(engine, backend="onnxruntime", threads=args.threads or None)
    py_start = time.perf_counter() - t
    t = time.perf_counter()
    cpp = CppPose(engine, build, threads=args.threads)
    cpp_start_inproc = time.perf_counter() - t
    py.locate(people[0][0], names, boxes=[people[0][1]])  # warm-up of both
    cpp.locate(people[0][0], names, [people[0][1]])
    py_ms, cpp_ms = [], []
    for img, box in people:
        for _ in range(args.repeat):
            t = time.perf_counter()
            py.locate(img, names, boxes=[box])
            py_ms.append(1e3 * (time.perf_counter() - t))
            t = time.perf_counter()
            cpp.locate(img, names, [box])
            cpp_ms.append(1e3 * (time.perf_counter() - t))
    cpp.close()
    first = val_people(1)[0]
    startup, process = [], []
    for _ in range(args.startups):
        t = time.perf_counter()
        p = subprocess.run(
            [str(build / "locllm_cpp"), "locate", str(first[0]), "-m", str(engine), "-k", "neck", "--timing",
             "--box", ",".join(map(str, first[1][0]))],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        process.append(1e3 * (time.perf_counter() - t))
        startup.append(float(re.search(r"start-up ([\d.]+) ms", p.stderr).group(1)))
    print(f"engine {engine}; {len(people)} persons x {args.repeat} calls, 17 keypoints, one box per call; "
          f"threads {args.threads or 'ORT default'}; {os.cpu_count()} CPUs")  # fmt: skip
    print("| runtime | p50 ms/person | p90 ms/person | mean ms/person |")
    print("|---|---|---|---|")
    for label, ms in (("Python Pose (onnxruntime)", py_ms), ("C++ (C API)", cpp_ms)):
        print(f"| {label} | {_pct(ms, 50):.1f} | {_pct(ms, 90):.1f} | {statistics.mean(ms):.1f} |")
    print(f"C++ start-up (locllm_create, sha256 verify on): median {statistics.median(startup):.0f} ms "
          f"(in-process {1e3 * cpp_start_inproc:.0f} ms); whole locllm_cpp process with one keypoint: median "
          f"{statistics.median(process):.0f} ms; Python Pose(...) construction: {1e3 * py_start:.0f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
