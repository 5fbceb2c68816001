"""Training data: person records from COCO-keypoints JSON (2D) or the 3D companion,
turned into LocLLM instruction conversations with the shared protocol module.

A sample is one person crop (the official affine crop, with scale / rotation / flip
augmentation) and up to 5 rounds "Keypoint: ... Question: ... Answer: [0.xxx,0.yyy]</s>",
loss on the answers (and their </s>) only, exactly as the original code trains. With the
grouped protocol (``ConversationConfig.protocol``, ``protocol.JOINT_GROUPS``) a round asks for
a body part and answers its joints in order ("... Answer: [0.xxx,0.yyy] [0.xxx,0.yyy] ...</s>").
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from locllm_sdk.coco_files import guess_image_dir
from locllm_sdk.crop import affine_transform, box_to_center_scale, load_image, normalize, sanitize_box, warp_affine
from locllm_sdk.descriptions import DescriptionLibrary, coco17, mirror_text
from locllm_sdk.protocol import (
    EOS_TEXT,
    IMAGE_PATCH_TOKEN,
    PROTOCOL_VERSION,
    JointGroup,
    PromptTokenizer,
    format_answer,
    format_group_answer,
    protocol_groups,
)

from .synthpose.dataset_io import load_companion

IGNORE = -100


@dataclass
class PersonRecord:
    image: Path
    box: tuple[float, float, float, float]  # x, y, w, h
    names: tuple[str, ...]
    joints: np.ndarray  # [K,2] image pixels
    visible: np.ndarray  # [K] bool (COCO v >= 1)
    z: np.ndarray | None = None  # [K] normalised depth (3D), H36M convention
    image_size: tuple[int, int] = (0, 0)  # (height, width)
    meta: dict = field(default_factory=dict)


def load_coco(json_path: str | Path, image_dir: str | Path | None = None, extended: bool = True) -> list[PersonRecord]:
    """Persons of a COCO-keypoints file. With ``extended`` and a SynthPose file, all joints
    (``keypoints_ext``); otherwise the category's ``keypoints`` (COCO-17 names)."""
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    image_dir = Path(image_dir) if image_dir else guess_image_dir(json_path, doc)
    cat = doc["categories"][0]
    use_ext = extended and "keypoint_names_ext" in cat
    names = tuple(cat["keypoint_names_ext"] if use_ext else [n.replace("_", " ") for n in cat["keypoints"]])
    if not use_ext and len(names) == 17:
        names = coco17().keypoints
    images = {im["id"]: im for im in doc["images"]}
    out = []
    for ann in doc["annotations"]:
        kps = np.asarray(ann["keypoints_ext" if use_ext else "keypoints"], np.float64).reshape(-1, 3)
        if ann.get("iscrowd") or not (kps[:, 2] > 0).any():
            continue
        im = images[ann["image_id"]]
        out.append(
            PersonRecord(
                image=image_dir / im["file_name"],
                box=tuple(ann["bbox"]),
                names=names,
                joints=kps[:, :2].copy(),
                visible=kps[:, 2] > 0,
                image_size=(im["height"], im["width"]),
                meta={"image_id": ann["image_id"], "ann_id": ann["id"]},
            )
        )
    return out


def load_companion_records(
    json_path: str | Path, coco_json: str | Path, image_dir: str | Path | None = None
) -> list[PersonRecord]:
    """Persons of a COCO file with their depth from its 3D companion (z_norm: the protocol's
    depth unit, ``protocol.depth_to_unit``), for 3D training."""
    comp = load_companion(json_path)
    z_by_ann = {a["id"]: np.asarray(a["z_norm"], np.float64) for a in comp["annotations"]}
    records = load_coco(coco_json, image_dir, extended=True)
    for r in records:
        r.z = z_by_ann[r.meta["ann_id"]]
    return records


# Relational (novel-keypoint) targets: midpoints of joint pairs, described as the paper
# describes neck and pelvis ("typically situated between ..."), so the model learns to read
# a description instead of memorising fixed sentences.
MIDPOINT_TEMPLATES = (
    "The {name} is the point halfway between the {a} and the {b}.",
    "The {name} is typically located between the {a} and the {b}, at the middle of the two.",
    "The {name} lies in the middle of the {a} and the {b}.",
    "The {name} is typically situated between the {a} and the {b}.",
)


@dataclass
class ConversationConfig:
    image_size: int = 224
    dims: int = 2
    max_rounds: int = 5
    augment: bool = True
    scale_factor: float = 0.3
    rotation: float = 40.0
    flip: bool = True
    exclude: tuple[str, ...] = ()  # keypoints never trained on (novel-keypoint experiments)
    midpoint_prob: float = 0.0  # chance that a round asks for a relational midpoint
    # midpoint pairs that would leak a held-out keypoint (e.g. shoulders -> neck)
    banned_pairs: tuple[tuple[str, str], ...] = ()
    patch_size: int = 14
    aux_joints: tuple[str, ...] = ()  # joints whose patch index is a training target (aux loss)
    norm_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073)
    norm_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711)
    # the prompt protocol the rounds follow: PROTOCOL_VERSION (one keypoint per round) or
    # GROUPED_PROTOCOL_VERSION (one body-part group per round; a midpoint round, with
    # midpoint_prob, stays a one-keypoint round)
    protocol: str = PROTOCOL_VERSION


class ConversationDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        records: list[PersonRecord],
        tokenizer: PromptTokenizer,
        num_patches: int,
        config: ConversationConfig,
        library: DescriptionLibrary | None = None,
        seed: int = 0,
    ):
        self.records = records
        self.tok = tokenizer
        self.cfg = config
        self.library = library or DescriptionLibrary.load()
        self.prefix = tokenizer.prefix_ids(num_patches)
        self.seed = seed
        self.epoch = 0
        self.groups = protocol_groups(config.protocol, "ConversationConfig.protocol")
        missing = {n for r in records for n in r.names if n not in self.library and n not in config.exclude}
        missing |= {j for g in self.groups for j in g.joints if j not in self.library and j not in config.exclude}
        if missing:
            raise ValueError(f"keypoints without a description in the library: {sorted(missing)}")

    def __len__(self) -> int:
        return len(self.records)

    def crop(self, rec: PersonRecord, rng: random.Random):
        img = load_image(rec.image, exif_orientation=False)  # COCO boxes are in the stored pixel grid
        h, w = img.shape[:2]
        center, scale = box_to_center_scale(sanitize_box(rec.box, w, h))
        joints, names = rec.joints.copy(), list(rec.names)
        rot = 0.0
        cfg = self.cfg
        if cfg.augment:
            sf = cfg.scale_factor
            scale = scale * float(np.clip(rng.gauss(0, 1) * sf + 1, 1 - sf, 1 + sf))
            rot = rng.uniform(-cfg.rotation, cfg.rotation) if rng.random() <= 0.5 else 0.0
            if cfg.flip and rng.random() <= 0.5:
                img = img[:, ::-1, :]
                joints[:, 0] = w - joints[:, 0] - 1
                names = [mirror_text(n) for n in names]  # the runtime's flip test uses the same rule
                center = center.copy()
                center[0] = w - center[0] - 1
        s = cfg.image_size
        trans = affine_transform(center, scale, rot, s)
        crop = warp_affine(np.ascontiguousarray(img), trans, (s, s))  # the serving crop's interpolation
        pts = joints @ trans[:, :2].T + trans[:, 2]
        return crop, pts, names

    def rounds_for(self, rec: PersonRecord, pts: np.ndarray, names: list[str], rng: random.Random):
        """Up to ``max_rounds`` rounds: (name, description, values) for a keypoint, or, in the
        grouped protocol, (JointGroup, descriptions, values per joint) for a body part."""
        s = self.cfg.image_size
        inside = rec.visible & (pts[:, 0] >= 0) & (pts[:, 0] < s) & (pts[:, 1] >= 0) & (pts[:, 1] < s)
        index = {n: i for i, n in enumerate(names)}
        if self.groups:
            # a group is asked whole: every joint annotated, inside the crop, none held out
            choices = [
                g
                for g in self.groups
                if all(j in index and inside[index[j]] and j not in self.cfg.exclude for j in g.joints)
            ]
        else:
            choices = [names[i] for i in range(len(names)) if inside[i] and names[i] not in self.cfg.exclude]
        rng.shuffle(choices)
        out = []
        for choice in choices[: self.cfg.max_rounds]:
            if self.cfg.midpoint_prob and rng.random() < self.cfg.midpoint_prob:
                mid = self._midpoint(index, inside, pts, rec, rng)
                if mid is not None:
                    out.append(mid)
                    continue
            if isinstance(choice, JointGroup):
                descriptions = [self.library.descriptions[j] for j in choice.joints]
                out.append((choice, descriptions, [self._values(index[j], pts, rec) for j in choice.joints]))
            else:
                out.append((choice, self.library.descriptions[choice], self._values(index[choice], pts, rec)))
        return out

    def _values(self, i: int, pts: np.ndarray, rec: PersonRecord) -> list[float]:
        s = self.cfg.image_size
        values = [pts[i, 0] / s, pts[i, 1] / s]
        if self.cfg.dims == 3:
            values.append(float(rec.z[i]))  # a flip mirrors x only: joint i keeps its depth
        return values

    def _midpoint(self, index, inside, pts, rec, rng):
        cands = [n for n, i in index.items() if inside[i] and n not in self.cfg.exclude]
        if len(cands) < 2:
            return None
        for _ in range(5):
            a, b = rng.sample(cands, 2)
            if (a, b) in self.cfg.banned_pairs or (b, a) in self.cfg.banned_pairs:
                continue
            p = (pts[index[a]] + pts[index[b]]) / 2
            name = f"midpoint of the {a} and the {b}"
            desc = rng.choice(MIDPOINT_TEMPLATES).format(name=name, a=a, b=b)
            desc = desc[0].upper() + desc[1:]
            values = [p[0] / self.cfg.image_size, p[1] / self.cfg.image_size]
            if self.cfg.dims == 3:
                values.append(float((rec.z[index[a]] + rec.z[index[b]]) / 2))
            return name, desc, values
        return None

    def __getitem__(self, idx: int) -> dict:
        rng = random.Random(hash((self.seed, self.epoch, idx)))
        rec = self.records[idx]
        crop, pts, names = self.crop(rec, rng)
        rounds = self.rounds_for(rec, pts, names, rng)
        ids, labels = list(self.prefix), [IGNORE] * len(self.prefix)
        for asked, desc, values in rounds:
            if isinstance(asked, JointGroup):
                values = [[_unit(v) for v in joint] for joint in values]
                head = self.tok.group_round_ids(asked, desc)
                full = self.tok.group_round_ids(asked, desc, answer=format_group_answer(values))
            else:
                values = [_unit(v) for v in values]
                head = self.tok.round_ids(asked, desc)
                full = self.tok.round_ids(asked, desc, answer=format_answer(values))
            ids += full
            labels += [IGNORE] * len(head) + full[len(head) :]
        pixels = normalize(crop[None], self.cfg.norm_mean, self.cfg.norm_std)[0]
        item = {"input_ids": ids, "labels": labels, "pixel_values": pixels, "rounds": len(rounds)}
        if self.cfg.aux_joints:
            item["aux_targets"] = self.patch_targets(rec, pts, names)
        return item

    def patch_targets(self, rec: PersonRecord, pts: np.ndarray, names: list[str]) -> list[int]:
        """Index of the patch holding each ``aux_joints`` joint (after augmentation), or -100."""
        s, ps = self.cfg.image_size, self.cfg.patch_size
        grid = s // ps
        where = {n: i for i, n in enumerate(names)}
        out = []
        for joint in self.cfg.aux_joints:
            i = where.get(joint)
            if i is None or not rec.visible[i] or not (0 <= pts[i, 0] < s and 0 <= pts[i, 1] < s):
                out.append(IGNORE)
            else:
                out.append(int(pts[i, 1] // ps) * grid + int(pts[i, 0] // ps))
        return out


def _unit(v: float) -> float:
    """An answer value as the protocol writes it: in [0, 1), 3 decimals (0.999 at most)."""
    return min(max(v, 0.0), 0.999)


class CaptionDataset(torch.utils.data.Dataset):
    """Stage 1 (projector alignment): LLaVA-format captions, loss on the caption only."""

    def __init__(
        self,
        llava_json: str | Path,
        image_dir: str | Path,
        tokenizer: PromptTokenizer,
        num_patches: int,
        config: ConversationConfig,
    ):
        self.items = json.loads(Path(llava_json).read_text())
        self.image_dir = Path(image_dir)
        self.tok, self.cfg = tokenizer, config
        self.prefix = tokenizer.prefix_ids(num_patches)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict:
        item = self.items[idx]
        img = cv2.cvtColor(cv2.imread(str(self.image_dir / item["image"])), cv2.COLOR_BGR2RGB)
        s = self.cfg.image_size
        crop = cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA)
        caption = next(t["value"] for t in item["conversations"] if t["from"] == "gpt")
        cont = self.tok.encode(IMAGE_PATCH_TOKEN + "\n" + caption.strip() + EOS_TEXT, add_bos=False)[1:]
        ids = list(self.prefix) + cont
        labels = [IGNORE] * len(self.prefix) + cont
        pixels = normalize(crop[None], self.cfg.norm_mean, self.cfg.norm_std)[0]
        return {"input_ids": ids, "labels": labels, "pixel_values": pixels, "rounds": 1}


def collate(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    pixels = torch.from_numpy(np.stack([b["pixel_values"] for b in batch]))
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}
    if "aux_targets" in batch[0]:
        out["aux_targets"] = torch.tensor([b["aux_targets"] for b in batch], dtype=torch.long)
    return out
