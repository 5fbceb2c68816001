"""Scene composition: backgrounds, several people, camera framing, visibility, noise.

``generate_sample(seed, index, ...)`` is a pure function of its arguments (its RNG is seeded
from ``(seed, split, index)``), so images can be generated in any order or in parallel and
the same arguments always give the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .pose import POSE_KINDS, forward_kinematics, sample_pose, sample_shape
from .render import (
    JOINT_OWNERS,
    PART_BITS,
    Appearance,
    Camera,
    P,
    Painter,
    look_at,
    render_person,
)
from .skeleton import JOINT_NAMES, NUM_COCO, NUM_JOINTS, J

ROOT = J["pelvis"]  # Human3.6M convention: depth is relative to the pelvis
SPLITS = {"train": 0, "val": 1, "test": 2}

# (name, RGB) palettes; names feed the captions.
CLOTH_COLORS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (200, 35, 40)), ("dark red", (120, 20, 30)), ("blue", (40, 80, 200)),
    ("navy", (25, 35, 90)), ("light blue", (130, 180, 230)), ("green", (40, 150, 60)),
    ("dark green", (30, 80, 40)), ("yellow", (230, 200, 40)), ("orange", (235, 120, 30)),
    ("purple", (110, 50, 150)), ("pink", (235, 130, 170)), ("white", (235, 235, 230)),
    ("grey", (130, 130, 135)), ("black", (30, 30, 32)), ("brown", (110, 70, 40)),
    ("beige", (210, 190, 150)), ("teal", (30, 140, 140)),
]  # fmt: skip
SKIN_TONES: list[tuple[int, int, int]] = [
    (255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 140, 100),
    (160, 105, 70), (120, 78, 50), (90, 58, 38), (232, 190, 172),
]  # fmt: skip
HAIR_COLORS: list[tuple[str, tuple[int, int, int]]] = [
    ("black", (25, 20, 18)), ("dark brown", (60, 38, 25)), ("brown", (105, 70, 40)),
    ("blonde", (215, 180, 110)), ("red", (150, 60, 30)), ("grey", (160, 160, 160)),
]  # fmt: skip
BG_KINDS = ["striped", "checkered", "cluttered", "textured", "room"]
NUMBER_WORDS = ["No", "One", "Two", "Three", "Four", "Five", "Six"]

_NOISE_BANK: np.ndarray | None = None


def _noise_bank() -> np.ndarray:
    """Fixed N(0, 16^2) int8 noise (seeded by a constant, so output stays deterministic)."""
    global _NOISE_BANK
    if _NOISE_BANK is None:
        g = np.random.default_rng(20240607).standard_normal((1024, 1024, 3)) * 16
        _NOISE_BANK = np.clip(g, -127, 127).astype(np.int8)
    return _NOISE_BANK


def _bgr(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    return (int(rgb[2]), int(rgb[1]), int(rgb[0]))


def _rand_color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, items: list):  # noqa: ANN202 - generic helper
    return items[int(rng.integers(len(items)))]


@dataclass
class PersonAnn:
    """Everything known about one rendered person."""

    slot: int
    kind: str
    facing: str
    joints_cam: np.ndarray  # [K, 3] mm, camera frame
    joints_2d: np.ndarray  # [K, 2] projected pixels (not clipped)
    vis: np.ndarray  # [K] 0 outside / 1 occluded / 2 visible
    bbox: list[float]  # COCO [x, y, w, h] tight around rendered pixels
    area: int
    appearance: Appearance
    on_chair: bool = False


@dataclass
class Sample:
    image: np.ndarray  # BGR uint8
    label: np.ndarray  # uint16: slot * 32 + part
    camera: Camera
    persons: list[PersonAnn]
    background: str
    extras: dict = field(default_factory=dict)


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    if s not in _GRIDS:
        g = np.mgrid[0:s, 0:s].astype(np.float32)
        _GRIDS[s] = (g[0], g[1])
    return _GRIDS[s]


def make_background(rng: np.random.Generator, size: int, cam: Camera) -> tuple[np.ndarray, str]:
    """A textured / cluttered background and its caption phrase."""
    kind = _pick(rng, BG_KINDS)
    s = size
    c1n, c1 = _pick(rng, CLOTH_COLORS)
    c2n, c2 = _pick(rng, CLOTH_COLORS)
    while c2n == c1n:
        c2n, c2 = _pick(rng, CLOTH_COLORS)
    # Background colours are muted so people stand out a little, as in most photos.
    c1 = tuple(int(0.7 * v + 40) for v in c1)
    c2 = tuple(int(0.7 * v + 40) for v in c2)
    if kind in ("striped", "checkered"):
        # Draw the pattern on a small cell grid and warp it (nearest) to the image: much
        # faster than evaluating it per pixel.
        p = rng.uniform(6, 40) if kind == "striped" else rng.uniform(10, 50)
        ang = rng.uniform(0, np.pi)
        n = int(np.ceil(1.5 * s / p)) + 2
        n += n % 2  # even cell count: the checker parity survives BORDER_WRAP
        ii = np.arange(n)
        if kind == "striped":
            duty = rng.uniform(0.3, 0.7)
            sub = 8  # sub-cells per period give the duty cycle
            cells = ((np.arange(n * sub) % sub) < duty * sub)[None, :].repeat(2, 0)
            scale = p / sub
            desc = f"a striped {c1n} and {c2n} background"
        else:
            cells = (ii[:, None] + ii[None, :]) % 2 == 0
            scale = p
            desc = f"a {c1n} and {c2n} checkered background"
        tex = np.where(cells[..., None], np.array(_bgr(c1), np.uint8), np.array(_bgr(c2), np.uint8))
        c, sn = np.cos(ang), np.sin(ang)
        # dst (x, y) -> src cell coords: rotate about the image centre, divide by cell size
        A = np.array([[c, sn], [-sn, c]]) / scale
        off = np.array([tex.shape[1], tex.shape[0]]) / 2 - A @ np.array([s / 2, s / 2])
        if kind == "striped":
            off[1] = 0.5 - (A @ np.array([s / 2, s / 2]))[1]
            A[1] = 0  # rows are identical: sample row 0
        M = np.hstack([A, off[:, None]]).astype(np.float64)
        img = cv2.warpAffine(
            np.ascontiguousarray(tex),
            M,
            (s, s),
            flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_WRAP,
        )
    elif kind == "textured":
        lo = int(rng.integers(3, 16))
        small = rng.integers(0, 256, (lo, lo, 3)).astype(np.uint8)
        img = cv2.resize(small, (s, s), interpolation=cv2.INTER_CUBIC)
        img = cv2.addWeighted(img, 0.6, np.full_like(img, 80), 0.4, 0)
        desc = "a blurry, colourful textured background"
    else:
        t = np.linspace(0, 1, s, dtype=np.float32)[:, None]
        col = np.array(_bgr(c1), np.float32) * (1 - t) + np.array(_bgr(c2), np.float32) * t
        img = cv2.resize(col.astype(np.uint8)[:, None, :], (s, s), interpolation=cv2.INTER_NEAREST)
        if kind == "room":
            desc = f"a room with a {c2n} tiled floor"
            _draw_floor(img, cam, _bgr(c2), rng)
        else:
            desc = "a cluttered background"
        n = int(rng.integers(8, 30)) if kind == "cluttered" else int(rng.integers(0, 6))
        for _ in range(n):  # clutter: boxes, blobs and lines
            col = _rand_color(rng)
            x, y = (int(v) for v in rng.integers(0, s, 2))
            w, h = (int(v) for v in rng.integers(4, s // 3, 2))
            k = rng.integers(3)
            if k == 0:
                cv2.rectangle(img, (x, y), (x + w, y + h), col, -1)
            elif k == 1:
                cv2.circle(img, (x, y), w // 2, col, -1, cv2.LINE_AA)
            else:
                cv2.line(img, (x, y), (x + w - s // 6, y + h - s // 6), col, int(rng.integers(1, 6)), cv2.LINE_AA)
    return np.ascontiguousarray(img), desc


def _draw_floor(img: np.ndarray, cam: Camera, color: tuple[int, int, int], rng: np.random.Generator) -> None:
    """Perspective ground plane (y = 0) with tile lines, clipped to points ahead of the camera."""
    c = -cam.R.T @ cam.t
    fwd = cam.R[2].copy()
    fwd[1] = 0
    fwd /= np.linalg.norm(fwd) + 1e-9
    side = np.cross([0.0, 1.0, 0.0], fwd)
    near, far, half = 400.0, 40000.0, 40000.0
    quad = np.array(
        [
            c + fwd * near - side * half,
            c + fwd * near + side * half,
            c + fwd * far + side * half,
            c + fwd * far - side * half,
        ]
    )
    quad[:, 1] = 0
    qc = cam.to_cam(quad)
    if np.any(qc[:, 2] < 50):
        return
    uv = cam.project(qc)
    cv2.fillConvexPoly(img, np.round(uv * 4).astype(np.int32), color, cv2.LINE_AA, 2)
    tile = rng.uniform(400, 1200)
    dark = tuple(int(v * 0.7) for v in color)
    base = np.floor(c / tile) * tile
    for i in range(-12, 13):  # lines of constant world x and constant world z
        for a, b in (
            ([base[0] + i * tile, 0, base[2] + 300], [base[0] + i * tile, 0, base[2] + 15000]),
            ([base[0] - 15000, 0, base[2] + i * tile], [base[0] + 15000, 0, base[2] + i * tile]),
        ):
            pa, pb = cam.to_cam(np.array([a, b], float))
            if pa[2] < 50 and pb[2] < 50:
                continue
            if pa[2] < 50 or pb[2] < 50:  # clip the segment at z = 50 mm
                t = (50 - pa[2]) / (pb[2] - pa[2])
                q = pa + (pb - pa) * t
                pa, pb = (q, pb) if pa[2] < 50 else (pa, q)
            u = cam.project(np.stack([pa, pb]))
            if np.all(np.isfinite(u)) and np.abs(u).max() < 1e5:
                cv2.line(
                    img,
                    tuple(int(v) for v in np.round(u[0] * 4)),
                    tuple(int(v) for v in np.round(u[1] * 4)),
                    dark,
                    1,
                    cv2.LINE_AA,
                    2,
                )


def sample_appearance(rng: np.random.Generator) -> Appearance:
    un, uc = _pick(rng, CLOTH_COLORS)
    ln, lc = _pick(rng, CLOTH_COLORS)
    hn, hc = _pick(rng, HAIR_COLORS)
    skin = _pick(rng, SKIN_TONES)
    jitter = rng.integers(-12, 13, 3)
    skin = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(skin, jitter, strict=True))
    shoes = _pick(rng, [(30, 30, 30), (90, 60, 40), (230, 230, 230), (40, 40, 120)])
    long_sleeves = bool(rng.random() < 0.5)
    shorts = bool(rng.random() < 0.3)
    return Appearance(
        skin=_bgr(skin),
        hair=_bgr(hc),
        upper=_bgr(uc),
        lower=_bgr(lc),
        shoes=_bgr(shoes),
        long_sleeves=long_sleeves,
        shorts=shorts,
        long_hair=bool(rng.random() < 0.35),
        names={
            "upper": un,
            "lower": ln,
            "hair": hn,
            "top": "long-sleeved top" if long_sleeves else "t-shirt",
            "bottom": "shorts" if shorts else "trousers",
        },
    )


def _facing(R_root_w: np.ndarray, pelvis_w: np.ndarray, cam: Camera) -> str:
    fwd = cam.R @ R_root_w[:, 2]
    to_cam = -cam.to_cam(pelvis_w[None])[0]
    to_cam /= np.linalg.norm(to_cam)
    d = float(fwd @ to_cam)
    if d > 0.5:
        return "facing the camera"
    if d < -0.5:
        return "facing away"
    left = cam.R @ R_root_w[:, 0]  # the person's left side towards the camera?
    return "seen from the left side" if float(left @ to_cam) > 0 else "seen from the right side"


def generate_sample(
    seed: int,
    index: int,
    size: int = 256,
    persons: tuple[int, int] = (1, 3),
    split: str = "train",
    photometric: bool = True,
) -> Sample:
    """Render one image with its people, camera and per-pixel label map."""
    rng = np.random.default_rng([int(seed), SPLITS.get(split, 9), int(index)])
    n = int(rng.integers(persons[0], persons[1] + 1))
    people = []
    placed: list[np.ndarray] = []
    for i in range(n):
        shape = sample_shape(rng)
        pose = sample_pose(rng)
        yaw = float(rng.uniform(0, 360))
        sep = 1600.0 if pose.kind == "lying" else 650.0
        pos = np.zeros(3)
        for _ in range(30):  # rejection-sample a spot that does not intersect others
            if i == 0:
                break
            pos = np.array([rng.uniform(-1800, 1800), 0.0, rng.uniform(-2000, 2000)])
            if all(np.hypot(*(pos - q)[[0, 2]]) > max(sep, r) for q, r in placed):
                break
        placed.append((pos, sep))
        skel = forward_kinematics(shape, pose, yaw, pos)
        people.append((shape, pose, skel, sample_appearance(rng)))
    # Camera orbiting the group at random distance / height, looking at its centre.
    allj = np.concatenate([p[2].joints for p in people])
    centre = 0.5 * (allj.min(0) + allj.max(0))
    dist = rng.uniform(2500, 9000) + np.ptp(allj[:, [0, 2]], axis=0).max()
    az = rng.uniform(0, 2 * np.pi)
    cam_pos = centre + np.array([np.sin(az) * dist, 0.0, np.cos(az) * dist])
    cam_pos[1] = rng.uniform(300, 2600)
    R, t = look_at(cam_pos, centre, roll_deg=float(rng.normal(0, 3)))
    xc = allj @ R.T + t
    ext = float(np.max(np.abs(xc[:, :2] / xc[:, 2:3])))
    margin = 1.0 + 0.12  # heads / hands stick out of the joints
    fill = rng.uniform(0.65, 0.98) if rng.random() > 0.15 else rng.uniform(1.0, 1.5)
    f = float(np.clip(size * 0.5 * fill / (ext * margin), 0.35 * size, 8 * size))
    shift = rng.uniform(-0.1, 0.1, 2) * size * (1.5 if fill > 1 else 1.0)
    cam = Camera(fx=f, fy=f, cx=(size - 1) / 2 + shift[0], cy=(size - 1) / 2 + shift[1], R=R, t=t)
    light = np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.9, -0.2), -rng.uniform(0.3, 1.0)])
    light /= np.linalg.norm(light)

    img, bg_desc = make_background(rng, size, cam)
    label = np.zeros((size, size), np.uint16)
    painter = Painter(img, label, cam, light)
    # Whole people far-to-near (painter's algorithm between people, per part within one).
    depth_order = sorted(range(n), key=lambda i: -float(cam.to_cam(people[i][2].joints[ROOT][None])[0, 2]))
    slots = {}
    for rank, i in enumerate(depth_order):
        shape, pose, skel, app = people[i]
        slots[i] = rank + 1
        if bg_desc.startswith("a room"):
            _shadow(img, cam, skel, shape)
        render_person(painter, skel, shape, app, rank + 1, chair=pose.on_chair)

    anns: list[PersonAnn] = []
    slot_map = label // PART_BITS
    for i in range(n):
        shape, pose, skel, app = people[i]
        slot = slots[i]
        jc = cam.to_cam(skel.joints)
        uv = cam.project(jc)
        vis = _visibility(uv, jc, label, slot, skel, cam)
        ys, xs = np.nonzero(slot_map == slot)
        if len(xs) == 0:
            continue  # fully hidden or outside the frame: no annotation
        bbox = [
            float(xs.min()) - 0.5,
            float(ys.min()) - 0.5,
            float(xs.max() - xs.min() + 1),
            float(ys.max() - ys.min() + 1),
        ]
        facing = _facing(skel.aux["R_root"], skel.joints[ROOT], cam)
        anns.append(
            PersonAnn(
                slot=slot,
                kind=pose.kind,
                facing=facing,
                joints_cam=jc,
                joints_2d=uv,
                vis=vis,
                bbox=bbox,
                area=int(len(xs)),
                appearance=app,
                on_chair=pose.on_chair,
            )
        )
    if photometric:
        img = _photometric(img, rng)
    return Sample(image=img, label=label, camera=cam, persons=anns, background=bg_desc)


def _shadow(img: np.ndarray, cam: Camera, skel, shape) -> None:  # noqa: ANN001 - internal
    """Soft dark ellipse under the person's feet (grounds them in 'room' scenes)."""
    j = skel.joints
    c = j[J["pelvis"]].copy()
    c[1] = 0
    r = shape.height * 0.22
    pts = np.array([c + [np.cos(a) * r, 0, np.sin(a) * r] for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)])
    pc = cam.to_cam(pts)
    if np.any(pc[:, 2] < 50):
        return
    uv = cam.project(pc)
    x0, y0 = np.floor(uv.min(0)).astype(int)
    x1, y1 = np.ceil(uv.max(0)).astype(int) + 1
    h, w = img.shape[:2]
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    roi = img[y0:y1, x0:x1]
    dark = roi.copy()
    cv2.fillConvexPoly(dark, np.round((uv - [x0, y0]) * 4).astype(np.int32), (0, 0, 0), cv2.LINE_AA, 2)
    cv2.addWeighted(roi, 0.65, dark, 0.35, 0, dst=roi)


def _visibility(
    uv: np.ndarray,
    jc: np.ndarray,
    label: np.ndarray,
    slot: int,
    skel,  # noqa: ANN001
    cam: Camera,
) -> np.ndarray:
    """COCO flags: 2 visible, 1 occluded (other part / person / self), 0 outside the image."""
    h, w = label.shape
    vis = np.zeros(NUM_JOINTS, np.int64)
    hc = cam.to_cam(skel.aux["head_c"][None])[0]
    to_cam = -hc / np.linalg.norm(hc)
    Rh = cam.R @ skel.aux["R_head"]
    R_chest = cam.R @ skel.aux["R_chest"]
    R_root = cam.R @ skel.aux["R_root"]
    torso_parts = {P["chest"], P["abdomen"], P["hips"]}
    for k, name in enumerate(JOINT_NAMES):
        x, y = int(round(uv[k, 0])), int(round(uv[k, 1]))
        if not (0 <= x < w and 0 <= y < h) or jc[k, 2] <= 0:
            continue
        owners = JOINT_OWNERS[name]
        lab = int(label[y, x])
        ok = lab // PART_BITS == slot and lab % PART_BITS in owners
        if not ok and lab == 0:  # on the silhouette edge: accept an owner pixel next to it
            nb = label[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].ravel()
            ok = any(v // PART_BITS == slot and v % PART_BITS in owners for v in nb.tolist())
        if ok:  # self-occlusion of surface points that face away from the camera
            sx = 1.0 if name.startswith("left") else -1.0
            if name.endswith("eye"):
                ok = float((Rh @ np.array([sx * 0.36, 0.1, 0.93])) @ to_cam) > 0.15
            elif name.endswith("ear"):
                ok = float(sx * Rh[:, 0] @ to_cam) > -0.2
            elif name == "nose":
                ok = float((Rh @ np.array([0.0, -0.2, 1.0])) @ to_cam) > -0.2
            elif name.endswith(("shoulder", "hip")) and lab % PART_BITS in torso_parts:
                Rs = R_chest if name.endswith("shoulder") else R_root
                dirn = -jc[k] / np.linalg.norm(jc[k])
                ok = float(sx * Rs[:, 0] @ dirn) > -0.35
        vis[k] = 2 if ok else 1
    return vis


def _photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exposure / colour cast, occasional blur, sensor noise."""
    alpha, beta = rng.uniform(0.75, 1.25), rng.uniform(-25, 25)
    img = cv2.convertScaleAbs(img, alpha=alpha, beta=beta)
    cast = rng.uniform(0.88, 1.12, 3)
    img = cv2.multiply(img, np.array([*cast, 0.0]), dtype=cv2.CV_8U)
    r = rng.random()
    if r < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.5, 1.4))
    elif r < 0.35:  # motion blur along a random direction
        k = int(rng.integers(3, 8))
        ker = np.zeros((k, k), np.float32)
        a = rng.uniform(0, np.pi)
        c = (k - 1) / 2
        cv2.line(
            ker,
            (int(round(c - np.cos(a) * c)), int(round(c - np.sin(a) * c))),
            (int(round(c + np.cos(a) * c)), int(round(c + np.sin(a) * c))),
            1.0,
            1,
        )
        img = cv2.filter2D(img, -1, ker / ker.sum())
    sigma = rng.uniform(0, 6)
    if sigma > 1.0:
        bank = _noise_bank()
        h, w = img.shape[:2]
        oy, ox = (int(v) for v in rng.integers(0, bank.shape[0] - max(h, w), 2))
        noise = bank[oy : oy + h, ox : ox + w].astype(np.float32) * (sigma / 16.0)
        img = cv2.add(img.astype(np.float32), noise)
        img = np.clip(img, 0, 255).astype(np.uint8)
    return img


def caption(sample: Sample) -> str:
    """Short natural-language description of a sample (for projector pre-training)."""
    ps = sample.persons
    if not ps:
        return f"An empty scene showing {sample.background}."
    n = len(ps)
    head = f"{NUMBER_WORDS[min(n, 6)]} {'person' if n == 1 else 'people'} on {sample.background}."
    if sample.background.startswith("a room"):
        head = f"{NUMBER_WORDS[min(n, 6)]} {'person' if n == 1 else 'people'} in {sample.background}."
    parts = []
    for i, p in enumerate(sorted(ps, key=lambda q: q.bbox[0])):
        what = POSE_PHRASES.get(p.kind, p.kind)
        if p.kind == "sitting":
            what = "sitting on a stool" if p.on_chair else "sitting on the floor"
        a = p.appearance.names
        who = (
            "The person"
            if n == 1
            else (
                "The person on the left"
                if i == 0
                else "The person on the right"
                if i == n - 1
                else "The person in the middle"
            )
        )
        parts.append(
            f"{who} is {what}, {p.facing}, wearing a {a['upper']} {a['top']} and "
            f"{a['lower']} {a['bottom']}, with {a['hair']} hair."
        )
    return " ".join([head, *parts])


POSE_PHRASES = {
    "standing": "standing", "walking": "walking", "running": "running",
    "arms_raised": "standing with arms raised", "waving": "waving",
    "pointing": "pointing with one arm", "squatting": "squatting",
    "bending": "bending forward", "lying": "lying on the ground",
}  # fmt: skip

assert set(POSE_PHRASES) | {"sitting"} == set(POSE_KINDS)
assert NUM_COCO == 17
