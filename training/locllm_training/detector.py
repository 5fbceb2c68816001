"""The bundled person detector: network, targets, HF Trainer training, ONNX export, evaluation.

A CenterNet-style single-class detector (Zhou et al., "Objects as Points", 2019): a small
conv encoder (stride 32) with a top-down path back to stride 8, and three 1x1 heads per cell
of the stride-8 grid: the centre heatmap (focal loss against Gaussians at the box centres),
the centre's sub-cell offset and the box's log width/height in cells (L1 at the centres).
The 3x3 peak suppression runs inside the exported graph, so the runtime
(``locllm_sdk.person_detector``) only thresholds and gathers; its ``letterbox`` and ``decode``
are the ones used here, so validation scores exactly what is served.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from locllm_sdk.coco_files import guess_image_dir, read_coco
from locllm_sdk.manifest import sha256_file
from locllm_sdk.person_detector import (
    DETECTOR_INPUT,
    DETECTOR_OUTPUTS,
    GRAPH,
    DetectorCard,
    letterbox,
)
from torch import nn
from torch.nn import functional as F

INPUT_SIZE = 256  # served input (long side)
TRAIN_VIEW = 192  # training views: random 192 px squares at the served scale
STRIDE = 8
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class PersonNet(nn.Module):
    """images [B, 3, S, S] (normalised) -> heatmap logits [B, 1, S/8, S/8], offsets and log
    sizes [B, 2, S/8, S/8]. S a multiple of 32."""

    def __init__(self, widths: tuple[int, ...] = (12, 24, 48, 96, 128), neck: int = 48):
        super().__init__()
        w = widths
        self.stem = _conv(3, w[0], 2)  # /2
        self.s4 = nn.Sequential(_conv(w[0], w[1], 2), _conv(w[1], w[1]))  # /4
        self.s8 = nn.Sequential(_conv(w[1], w[2], 2), _conv(w[2], w[2]))  # /8
        self.s16 = nn.Sequential(_conv(w[2], w[3], 2), _conv(w[3], w[3]))  # /16
        self.s32 = nn.Sequential(_conv(w[3], w[4], 2), _conv(w[4], w[4]), _conv(w[4], w[4]))  # /32
        self.lat32 = nn.Conv2d(w[4], neck, 1)
        self.lat16 = nn.Conv2d(w[3], neck, 1)
        self.lat8 = nn.Conv2d(w[2], neck, 1)
        self.td16 = _conv(neck, neck)
        self.td8 = _conv(neck, neck)
        self.head = _conv(neck, neck)
        self.heat = nn.Conv2d(neck, 1, 1)
        self.offset = nn.Conv2d(neck, 2, 1)
        self.size = nn.Conv2d(neck, 2, 1)
        nn.init.constant_(self.heat.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01: focal loss starts stable

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x8 = self.s8(self.s4(self.stem(images)))
        x16 = self.s16(x8)
        x32 = self.s32(x16)
        p = self.lat32(x32)
        p = self.td16(self.lat16(x16) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        p = self.td8(self.lat8(x8) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        f = self.head(p)
        return self.heat(f), self.offset(f), self.size(f)


class ExportedPersonNet(nn.Module):
    """The served graph: sigmoid + 3x3 peak suppression on the heatmap."""

    def __init__(self, net: PersonNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor):
        heat, offsets, log_sizes = self.net(images)
        heat = heat.sigmoid()
        peaks = heat * (heat == F.max_pool2d(heat, 3, 1, 1)).to(heat.dtype)
        return peaks, offsets, log_sizes


# ----------------------------------------------------------------------------- data
def person_boxes(gt_json: str | Path) -> tuple[list[Path], list[np.ndarray]]:
    """Image files of a COCO file and each one's person boxes [N, 4] xyxy (crowds skipped)."""
    gt_json = Path(gt_json)
    doc = read_coco(gt_json)
    folder = guess_image_dir(gt_json, doc)
    boxes: dict = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        if not a.get("iscrowd"):
            x, y, w, h = a["bbox"]
            boxes[a["image_id"]].append([x, y, x + w, y + h])
    files = [folder / im["file_name"] for im in doc["images"]]
    return files, [np.asarray(boxes[im["id"]], np.float32).reshape(-1, 4) for im in doc["images"]]


def targets(boxes: np.ndarray, grid: int, stride: int) -> dict[str, np.ndarray]:
    """CenterNet targets on a grid x grid map for xyxy boxes in network-input pixels: a
    Gaussian per box (sigma = box size / 6 on each axis, in cells; peak 1 at the centre cell),
    and at each centre cell the sub-cell offset and log size, with a mask."""
    heat = np.zeros((1, grid, grid), np.float32)
    offset = np.zeros((2, grid, grid), np.float32)
    size = np.zeros((2, grid, grid), np.float32)
    mask = np.zeros((1, grid, grid), np.float32)
    ys, xs = np.mgrid[0:grid, 0:grid].astype(np.float32)
    # larger boxes first: where two centres share a cell the smaller person's box is kept
    for x1, y1, x2, y2 in sorted(boxes.tolist(), key=lambda b: -(b[2] - b[0]) * (b[3] - b[1])):
        w, h = (x2 - x1) / stride, (y2 - y1) / stride
        if w <= 0 or h <= 0:
            continue
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        ix, iy = min(int(cx), grid - 1), min(int(cy), grid - 1)
        sx, sy = max(w / 6, 0.5), max(h / 6, 0.5)
        g = np.exp(-((xs - ix) ** 2) / (2 * sx * sx) - ((ys - iy) ** 2) / (2 * sy * sy))
        np.maximum(heat[0], g, out=heat[0])
        offset[:, iy, ix] = (cx - ix, cy - iy)
        size[:, iy, ix] = (math.log(w), math.log(h))
        mask[0, iy, ix] = 1.0
    return {"heatmap": heat, "offset": offset, "log_size": size, "mask": mask}


def augment(
    image: np.ndarray, boxes: np.ndarray, rng: np.random.Generator, out_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """A random ``out_size`` square view: scale 0.6-1.3, random placement, horizontal flip; boxes
    clipped to the view, dropped when less than 40% of the box stays inside. The network is
    fully convolutional, so training views smaller than the served input cost less and keep
    people at their served scale."""
    h, w = image.shape[:2]
    s = float(rng.uniform(0.6, 1.3))
    tx = float(rng.uniform(min(0, out_size - w * s), max(0, out_size - w * s)))
    ty = float(rng.uniform(min(0, out_size - h * s), max(0, out_size - h * s)))
    flip = bool(rng.random() < 0.5)
    # x' = s x + tx, or mirrored inside the placed image: x' = tx + s (w - x)
    a = np.array([[-s, 0, tx + s * w] if flip else [s, 0, tx], [0, s, ty]], np.float32)
    out = cv2.warpAffine(image, a, (out_size, out_size), flags=cv2.INTER_LINEAR, borderValue=0)
    if len(boxes) == 0:
        return out, boxes
    xs = boxes[:, [0, 2]] * a[0, 0] + a[0, 2]
    ys = boxes[:, [1, 3]] * s + ty
    b = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    c = b.clip(0, out_size)
    kept = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) >= 0.4 * np.maximum(area, 1e-6)
    return out, c[kept]


class DetectionDataset(torch.utils.data.Dataset):
    """SynthPose (or any COCO person file) images letterboxed to the network input, with targets."""

    def __init__(self, gt_json: str | Path, train: bool, seed: int = 0, view: int = TRAIN_VIEW):
        self.files, self.boxes = person_boxes(gt_json)
        self.train, self.seed, self.view = train, seed, view

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        image = cv2.cvtColor(cv2.imread(str(self.files[i]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        boxes = self.boxes[i]
        if self.train:
            rng = np.random.default_rng((self.seed, i, torch.initial_seed() % 2**31))
            image, boxes = augment(image, boxes, rng, self.view)
        size = self.view if self.train else INPUT_SIZE
        x, box = letterbox(image, size, MEAN, STD)
        t = targets(boxes * box.scale, size // STRIDE, STRIDE)
        return {"images": torch.from_numpy(x[0])} | {k: torch.from_numpy(v) for k, v in t.items()}


# ----------------------------------------------------------------------------- training
class DetectorWithLoss(nn.Module):
    """PersonNet + CenterNet's losses, in the shape the HF Trainer expects (a dict with ``loss``)."""

    def __init__(self, net: PersonNet, size_weight: float = 1.0, offset_weight: float = 1.0):
        super().__init__()
        self.net, self.size_weight, self.offset_weight = net, size_weight, offset_weight

    def forward(self, images, heatmap, offset, log_size, mask):
        heat, off, size = self.net(images)
        p = heat.sigmoid().clamp(1e-4, 1 - 1e-4)
        pos = heatmap.eq(1).float()
        n = pos.sum().clamp(min=1.0)
        focal = (
            -(pos * (1 - p) ** 2 * torch.log(p) + (1 - pos) * (1 - heatmap) ** 4 * p**2 * torch.log(1 - p)).sum() / n
        )
        m = mask.expand_as(off)
        l_off = (F.l1_loss(off, offset, reduction="none") * m).sum() / n
        l_size = (F.l1_loss(size, log_size, reduction="none") * m).sum() / n
        loss = focal + self.offset_weight * l_off + self.size_weight * l_size
        return {"loss": loss}


@dataclass
class DetectorTrainConfig:
    train_coco: str
    val_coco: str
    output: str
    steps: int = 900
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    seed: int = 0
    workers: int = 1
    eval_images: int = 150
    view: int = TRAIN_VIEW


def train(cfg: DetectorTrainConfig) -> Path:
    """Train with the HF Trainer, export to ONNX (verified against PyTorch), score on the val
    file with pycocotools, and write ``model.onnx`` + ``detector.json`` into ``cfg.output``."""
    from transformers import Trainer, TrainingArguments

    from .train import last_checkpoint

    torch.manual_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    net = PersonNet()
    data = DetectionDataset(cfg.train_coco, train=True, seed=cfg.seed, view=cfg.view)
    args = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=50,
        save_steps=100,
        save_total_limit=1,
        dataloader_num_workers=cfg.workers,
        remove_unused_columns=False,
        report_to=[],
        seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
    )
    start = time.time()
    trainer = Trainer(model=DetectorWithLoss(net), args=args, train_dataset=data)
    last = last_checkpoint(out / "trainer")
    trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - start
    net.eval()
    graph = export_onnx(net, out / GRAPH)
    DetectorCard(INPUT_SIZE, STRIDE, MEAN, STD, sha256_file(graph), {}).write(out)  # the new graph's, for scoring
    metrics = evaluate_boxes(out, cfg.val_coco, limit=cfg.eval_images)
    card = DetectorCard(
        INPUT_SIZE,
        STRIDE,
        MEAN,
        STD,
        sha256_file(graph),
        {
            "architecture": "CenterNet-style: 5-stage conv encoder (stride 32), top-down path to stride 8, "
            "heatmap / offset / log-size heads",
            "parameters": sum(p.numel() for p in net.parameters()),
            "trained": {
                "train_coco": Path(cfg.train_coco).name,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "view": cfg.view,
                "seconds_this_run": round(seconds, 1),
            },
            "val": {"coco": Path(cfg.val_coco).name, **metrics},
        },
    )
    card.write(out)
    return out


def export_onnx(net: PersonNet, path: Path, atol: float = 1e-4) -> Path:
    """ONNX graph with dynamic batch and size, checked against PyTorch on random input."""
    import onnxruntime as ort

    model = ExportedPersonNet(net).eval()
    x = torch.randn(1, 3, INPUT_SIZE, INPUT_SIZE)
    tmp = path.with_name(path.name + ".partial")
    dyn = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        model,
        (x,),
        str(tmp),
        input_names=[DETECTOR_INPUT],
        output_names=list(DETECTOR_OUTPUTS),
        dynamic_axes={DETECTOR_INPUT: dyn} | {n: dyn for n in DETECTOR_OUTPUTS},
        opset_version=17,
        dynamo=False,
    )
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    got = sess.run(list(DETECTOR_OUTPUTS), {DETECTOR_INPUT: x.numpy()})
    with torch.no_grad():
        want = [t.numpy() for t in model(x)]
    for name, g, w in zip(DETECTOR_OUTPUTS, got, want, strict=True):
        err = float(np.abs(g - w).max())
        if err > atol:
            raise RuntimeError(f"ONNX export of the detector differs from PyTorch on {name}: max |diff| {err:.2e}")
    tmp.replace(path)
    return path


def evaluate_boxes(folder: str | Path, val_coco: str | Path, limit: int | None = None, score_threshold: float = 0.05):
    """Person box AP (pycocotools, iouType bbox) of the detector in ``folder`` (its graph,
    run by the SDK's PersonDetector) on a COCO file, and the speed per image."""
    from locllm_sdk.evaluation import box_ap
    from locllm_sdk.person_detector import PersonDetector

    det = PersonDetector(folder, score_threshold=score_threshold)
    doc = read_coco(val_coco)
    folder_images = guess_image_dir(Path(val_coco), doc)
    images = doc["images"][:limit]
    results, times = [], []
    for im in images:
        rgb = cv2.cvtColor(cv2.imread(str(folder_images / im["file_name"]), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        t0 = time.perf_counter()
        rows = det(rgb)
        times.append(time.perf_counter() - t0)
        for x1, y1, x2, y2, s in rows.tolist():
            results.append({"image_id": im["id"], "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s})
    ap = box_ap(doc | {"images": images}, results)
    return {"images": len(images), **ap, "ms_per_image_median": round(1000 * float(np.median(times)), 2)}
