"""Pinhole camera and a fast painter's-algorithm rasteriser for capsule/ellipsoid people.

Every body part is drawn with a handful of cv2 calls (filled polygons/circles/thick lines),
far parts first, into the colour image and, with the same geometry, into a uint16 label map
(``label = person_slot * 32 + part_id``) that is used for visibility flags and boxes.
Shading is faked cheaply: capsules get a dark base, a mid-tone core and a highlight offset
towards the light; the torso is a faceted elliptic cylinder with Lambert shading per facet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .pose import BodyShape, Skeleton3D
from .skeleton import J

SHIFT = 2  # cv2 sub-pixel bits: coordinates are drawn at 1/4-pixel precision
SCALE = float(1 << SHIFT)
PART_BITS = 32  # label = slot * PART_BITS + part
SCENE_LABEL = PART_BITS - 1  # slot 0: scene objects (chairs) that can occlude people

PARTS: list[str] = [
    "none", "head", "neck", "chest", "abdomen", "hips",
    "upper_arm_l", "upper_arm_r", "forearm_l", "forearm_r", "hand_l", "hand_r",
    "thigh_l", "thigh_r", "shin_l", "shin_r", "foot_l", "foot_r",
]  # fmt: skip
P: dict[str, int] = {n: i for i, n in enumerate(PARTS)}

# Which rendered parts a joint lies in (a joint is visible when one of them is on top).
JOINT_OWNERS: dict[str, tuple[int, ...]] = {
    "nose": (P["head"],), "left eye": (P["head"],), "right eye": (P["head"],),
    "left ear": (P["head"],), "right ear": (P["head"],), "head_top": (P["head"],),
    "neck": (P["neck"], P["chest"]), "thorax": (P["chest"],),
    "torso": (P["chest"], P["abdomen"]),
    "pelvis": (P["hips"], P["abdomen"], P["thigh_l"], P["thigh_r"]),
}  # fmt: skip
for _s, _L in (("l", "left"), ("r", "right")):
    JOINT_OWNERS |= {
        f"{_L} shoulder": (P["chest"], P[f"upper_arm_{_s}"]),
        f"{_L} elbow": (P[f"upper_arm_{_s}"], P[f"forearm_{_s}"]),
        f"{_L} wrist": (P[f"forearm_{_s}"], P[f"hand_{_s}"]),
        f"{_L} hip": (P["hips"], P["abdomen"], P[f"thigh_{_s}"]),
        f"{_L} knee": (P[f"thigh_{_s}"], P[f"shin_{_s}"]),
        f"{_L} ankle": (P[f"shin_{_s}"], P[f"foot_{_s}"]),
    }


@dataclass
class Camera:
    """Pinhole camera, OpenCV convention (x right, y down, z forward); X_cam = R X_w + t."""

    fx: float
    fy: float
    cx: float
    cy: float
    R: np.ndarray
    t: np.ndarray

    @property
    def K(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1.0]])

    def to_cam(self, xw: np.ndarray) -> np.ndarray:
        return xw @ self.R.T + self.t

    def project(self, xc: np.ndarray) -> np.ndarray:
        """Camera-space points [..., 3] -> pixels [..., 2] (pixel centres at integers)."""
        return project_points(xc, self.fx, self.fy, self.cx, self.cy)


def project_points(xc: np.ndarray, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    z = xc[..., 2:3]
    return xc[..., :2] / z * np.array([fx, fy]) + np.array([cx, cy])


def look_at(cam_pos: np.ndarray, target: np.ndarray, roll_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """World->camera rotation and translation for a camera at cam_pos looking at target."""
    f = target - cam_pos
    f = f / np.linalg.norm(f)
    right = np.cross(f, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(f, right)
    R = np.stack([right, down, f])
    if roll_deg:
        a = np.radians(roll_deg)
        c, s = np.cos(a), np.sin(a)
        R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ R
    return R, -R @ cam_pos


@dataclass
class Appearance:
    skin: tuple[int, int, int]  # BGR
    hair: tuple[int, int, int]
    upper: tuple[int, int, int]
    lower: tuple[int, int, int]
    shoes: tuple[int, int, int]
    long_sleeves: bool
    shorts: bool
    long_hair: bool
    names: dict[str, str]  # colour / style names for captions


def _shade(c: tuple[int, int, int], k: float, add: float = 0.0) -> tuple[int, int, int]:
    return (min(255, int(c[0] * k + add)), min(255, int(c[1] * k + add)), min(255, int(c[2] * k + add)))


def _fib_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    th = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(th) * np.sin(phi), np.cos(phi), np.sin(th) * np.sin(phi)], 1)


_SPHERE = _fib_sphere(80)  # head-frame directions (x left, y up, z forward)
# Hair covers the back and the top of the head; the hairline sits above the eyes.
_HAIR = _SPHERE[((_SPHERE[:, 2] < -0.1) & (_SPHERE[:, 1] > -0.5)) | (_SPHERE[:, 1] > 0.45)]
_RING_N = 12
_RING = np.stack(
    [
        np.cos(np.linspace(0, 2 * np.pi, _RING_N, endpoint=False)),
        np.sin(np.linspace(0, 2 * np.pi, _RING_N, endpoint=False)),
    ],
    1,
)


class Painter:
    """Draws primitives into a BGR image and a uint16 label map with identical geometry."""

    def __init__(self, img: np.ndarray, label: np.ndarray, cam: Camera, light: np.ndarray):
        self.img, self.label, self.cam, self.light = img, label, cam, light
        l2 = light[:2]
        self.light2d = tuple(float(v) for v in l2 / (np.linalg.norm(l2) + 1e-9))

    def _px(self, p: np.ndarray) -> np.ndarray:
        return np.round(p * SCALE).astype(np.int32)

    # Hot paths below use plain Python floats: numpy call overhead dominates for 2-vectors.
    def disc(self, c, r: float, color: tuple[int, int, int], lab: int | None) -> None:  # noqa: ANN001
        ci = (int(round(c[0] * SCALE)), int(round(c[1] * SCALE)))
        ri = max(1, int(round(r * SCALE)))
        cv2.circle(self.img, ci, ri, color, -1, cv2.LINE_AA, SHIFT)
        if lab is not None:
            cv2.circle(self.label, ci, ri, lab, -1, cv2.LINE_8, SHIFT)

    def capsule(
        self,
        c0,
        c1,
        r0: float,
        r1: float,  # noqa: ANN001 - 2-sequences
        color: tuple[int, int, int],
        lab: int | None,
        shade: bool = True,
    ) -> None:
        """Projected capsule: two end discs joined by a quad, then shading layers."""
        x0, y0, x1, y1 = float(c0[0]), float(c0[1]), float(c1[0]), float(c1[1])
        dx, dy = x1 - x0, y1 - y0
        n = math.hypot(dx, dy)
        px, py = (-dy / n, dx / n) if n > 1e-6 else (1.0, 0.0)
        S = SCALE
        q = (
            np.array(
                [
                    [(x0 + px * r0) * S, (y0 + py * r0) * S],
                    [(x1 + px * r1) * S, (y1 + py * r1) * S],
                    [(x1 - px * r1) * S, (y1 - py * r1) * S],
                    [(x0 - px * r0) * S, (y0 - py * r0) * S],
                ]
            )
            .round()
            .astype(np.int32)
        )
        a = (int(round(x0 * S)), int(round(y0 * S)))
        b = (int(round(x1 * S)), int(round(y1 * S)))
        ra, rb = max(1, int(round(r0 * S))), max(1, int(round(r1 * S)))
        base = _shade(color, 0.55) if shade else color
        cv2.fillConvexPoly(self.img, q, base, cv2.LINE_AA, SHIFT)
        cv2.circle(self.img, a, ra, base, -1, cv2.LINE_AA, SHIFT)
        cv2.circle(self.img, b, rb, base, -1, cv2.LINE_AA, SHIFT)
        if lab is not None:
            cv2.fillConvexPoly(self.label, q, lab, cv2.LINE_8, SHIFT)
            cv2.circle(self.label, a, ra, lab, -1, cv2.LINE_8, SHIFT)
            cv2.circle(self.label, b, rb, lab, -1, cv2.LINE_8, SHIFT)
        if not shade:
            return
        lx, ly = self.light2d
        if px * lx + py * ly < 0:
            px, py = -px, -py
        rm = 0.5 * (r0 + r1)
        for k, off, col in ((0.75, 0.18, _shade(color, 0.85)), (0.32, 0.42, _shade(color, 1.08, 18))):
            if rm * k < 0.6:
                continue
            ox, oy = px * rm * off, py * rm * off
            cv2.line(
                self.img,
                (int(round((x0 + ox) * S)), int(round((y0 + oy) * S))),
                (int(round((x1 + ox) * S)), int(round((y1 + oy) * S))),
                col,
                max(1, int(round(2 * rm * k))),
                cv2.LINE_AA,
                SHIFT,
            )

    def poly(self, pts: np.ndarray, color: tuple[int, int, int] | None, lab: int | None) -> None:
        q = self._px(pts)
        if color is not None:
            cv2.fillConvexPoly(self.img, q, color, cv2.LINE_AA, SHIFT)
        if lab is not None:
            cv2.fillConvexPoly(self.label, q, lab, cv2.LINE_8, SHIFT)


def _lambert(color: tuple[int, int, int], n: np.ndarray, light: np.ndarray) -> tuple[int, int, int]:
    return _shade(color, 0.45 + 0.7 * max(0.0, float(n @ light)))


def ring_section(
    pt: Painter,
    c0: np.ndarray,
    R0: np.ndarray,
    w0: float,
    d0: float,
    c1: np.ndarray,
    R1: np.ndarray,
    w1: float,
    d1: float,
    color: tuple[int, int, int],
    lab: int,
) -> None:
    """Faceted elliptic frustum between two cross-sections (camera-space centres/frames)."""
    loc0 = np.stack([_RING[:, 0] * w0, np.zeros(_RING_N), _RING[:, 1] * d0], 1)
    loc1 = np.stack([_RING[:, 0] * w1, np.zeros(_RING_N), _RING[:, 1] * d1], 1)
    p0 = c0 + loc0 @ R0.T
    p1 = c1 + loc1 @ R1.T
    nrm = np.stack([_RING[:, 0] / max(w0, 1), np.zeros(_RING_N), _RING[:, 1] / max(d0, 1)], 1) @ R0.T
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    cam = pt.cam
    uv0, uv1 = cam.project(p0), cam.project(p1)
    allp = np.concatenate([uv0, uv1])
    hull = cv2.convexHull(allp.astype(np.float32))[:, 0]
    pt.poly(hull, _shade(color, 0.5), lab)
    nxt = np.roll(np.arange(_RING_N), -1)
    facet_n = nrm + nrm[nxt]
    mid = 0.5 * (p0 + p1[nxt])
    facing = np.einsum("ij,ij->i", facet_n, -mid) > 0
    for i in np.nonzero(facing)[0]:
        j = nxt[i]
        quad = np.stack([uv0[i], uv0[j], uv1[j], uv1[i]])
        fn = facet_n[i] / np.linalg.norm(facet_n[i])
        # a facet of a convex ring projects to a convex quad: no hull needed
        pt.poly(quad, _lambert(color, fn, pt.light), None)


def render_person(
    pt: Painter, skel: Skeleton3D, shape: BodyShape, app: Appearance, slot: int, chair: bool = False
) -> dict[int, float]:
    """Draw one person (far parts first). Returns part id -> camera depth (mm)."""
    cam = pt.cam
    R_cw = cam.R
    jc = cam.to_cam(skel.joints)
    aux = {k: (cam.to_cam(v) if not k.startswith("R_") and v.shape == (3,) else v) for k, v in skel.aux.items()}
    uv = cam.project(jc)
    f, cx, cy = cam.fx, cam.cx, cam.cy
    rad, seg = shape.radius, shape.seg
    base = slot * 32
    parts: list[tuple[float, int, object]] = []

    def cap(
        part: str, a: np.ndarray, b: np.ndarray, ra: float, rb: float, segs: list[tuple[float, tuple[int, int, int]]]
    ) -> None:
        """segs: (fraction_end, colour) pieces along a->b (for sleeves / shorts)."""
        parts.append((0.5 * (a[2] + b[2]), P[part], ("cap", a, b, ra, rb, segs)))

    def draw_cap(
        part_id: int, a: np.ndarray, b: np.ndarray, ra: float, rb: float, segs: list[tuple[float, tuple[int, int, int]]]
    ) -> None:
        ax, ay, az = a.tolist()
        bx, by, bz = b.tolist()
        az, bz = max(az, 1.0), max(bz, 1.0)
        ua, va = f * ax / az + cx, f * ay / az + cy
        ub, vb = f * bx / bz + cx, f * by / bz + cy
        t0 = 0.0
        for t1, col in segs:  # 2D interpolation: exact enough for sleeve / shorts seams
            z0, z1 = az + (bz - az) * t0, az + (bz - az) * t1
            pt.capsule(
                (ua + (ub - ua) * t0, va + (vb - va) * t0),
                (ua + (ub - ua) * t1, va + (vb - va) * t1),
                f * (ra + (rb - ra) * t0) / z0,
                f * (rb * t1 + ra * (1 - t1)) / z1,
                col,
                base + part_id,
            )
            t0 = t1

    skin, up_c, lo_c = app.skin, app.upper, app.lower
    for s, L in (("l", "left"), ("r", "right")):
        sh, el, wr = jc[J[f"{L} shoulder"]], jc[J[f"{L} elbow"]], jc[J[f"{L} wrist"]]
        hp, kn, an = jc[J[f"{L} hip"]], jc[J[f"{L} knee"]], jc[J[f"{L} ankle"]]
        cap(
            f"upper_arm_{s}",
            sh,
            el,
            rad["upper_arm"] * 1.15,
            rad["forearm"] * 1.05,
            [(1.0, up_c)] if app.long_sleeves else [(0.5, up_c), (1.0, skin)],
        )
        cap(f"forearm_{s}", el, wr, rad["forearm"], rad["forearm"] * 0.8, [(1.0, up_c if app.long_sleeves else skin)])
        cap(f"hand_{s}", wr, aux[f"hand_{s}"], rad["hand"], rad["hand"] * 0.9, [(1.0, skin)])
        cap(
            f"thigh_{s}",
            hp,
            kn,
            rad["thigh"],
            rad["shin"] * 1.1,
            [(0.55, lo_c), (1.0, skin)] if app.shorts else [(1.0, lo_c)],
        )
        cap(f"shin_{s}", kn, an, rad["shin"], rad["shin"] * 0.75, [(1.0, skin if app.shorts else lo_c)])
        cap(f"foot_{s}", aux[f"heel_{s}"], aux[f"toe_{s}"], rad["foot"], rad["foot"] * 0.85, [(1.0, app.shoes)])
    neck, torso, pelvis = jc[J["neck"]], jc[J["torso"]], jc[J["pelvis"]]
    cap("neck", neck, aux["neck_top"], rad["neck"], rad["neck"] * 0.95, [(1.0, skin)])
    R_chest = R_cw @ skel.aux["R_chest"]
    R_abd = R_cw @ skel.aux["R_abd"]
    R_root = R_cw @ skel.aux["R_root"]
    sh_c = 0.5 * (jc[J["left shoulder"]] + jc[J["right shoulder"]])
    hip_c = 0.5 * (jc[J["left hip"]] + jc[J["right hip"]])
    sw = 0.5 * np.linalg.norm(jc[J["left shoulder"]] - jc[J["right shoulder"]])
    td = rad["torso_depth"]
    parts.append(
        (
            float(np.mean([sh_c[2], torso[2]])) + 0.1 * td,
            P["chest"],
            ("ring", sh_c, R_chest, sw * 0.9, td * 0.8, torso, R_abd, rad["waist"], td, up_c, "shoulders"),
        )
    )
    parts.append(
        (
            float(np.mean([torso[2], pelvis[2]])) + 0.1 * td,
            P["abdomen"],
            ("ring", torso, R_abd, rad["waist"], td, pelvis, R_root, rad["hips"] * 0.97, td * 1.05, up_c, None),
        )
    )
    crotch = hip_c - R_root[:, 1] * seg["hip_half"] * 0.9
    parts.append(
        (
            float(pelvis[2]) + 0.15 * td,
            P["hips"],
            ("ring", pelvis, R_root, rad["hips"], td * 1.05, crotch, R_root, rad["hips"] * 0.85, td * 0.95, lo_c, None),
        )
    )
    head_c = aux["head_c"]
    parts.append((float(head_c[2]), P["head"], ("head",)))
    if chair:
        parts.append((float(pelvis[2]) + 4 * td, 0, ("chair",)))

    depths: dict[int, float] = {}
    for depth, pid, spec in sorted(parts, key=lambda x: -x[0]):
        depths[pid] = depth
        kind = spec[0]
        if kind == "cap":
            draw_cap(pid, *spec[1:])
        elif kind == "ring":
            _, c0, R0, w0, d0, c1, R1, w1, d1, col, extra = spec
            ring_section(pt, c0, R0, w0, d0, c1, R1, w1, d1, col, base + pid)
            if extra == "shoulders":  # rounded shoulder line over the top of the chest
                ra = f * rad["upper_arm"] * 1.1 / max(sh_c[2], 1.0)
                pt.capsule(uv[J["left shoulder"]], uv[J["right shoulder"]], ra, ra, col, base + pid)
        elif kind == "head":
            _draw_head(pt, aux, skel.aux["R_head"], seg["head_r"], app, base + P["head"], uv)
        elif kind == "chair":
            _draw_chair(pt, skel, shape)
    return depths


def _draw_head(
    pt: Painter, aux: dict[str, np.ndarray], R_head_w: np.ndarray, r: float, app: Appearance, lab: int, uv: np.ndarray
) -> None:
    cam = pt.cam
    f = cam.fx
    Rh = cam.R @ R_head_w  # head frame -> camera
    hc = aux["head_c"]
    z = max(hc[2], 1.0)
    rp = f * r / z
    c2 = cam.project(hc)
    to_cam = -hc / np.linalg.norm(hc)
    fwd, left = Rh[:, 2], Rh[:, 0]
    facing = float(fwd @ to_cam)  # > 0: face towards the camera
    skin = app.skin
    # Ears: behind the skull when seen from the front, on top of it in profile.
    ear_after = []
    for sx, name in ((1.0, "ear_l"), (-1.0, "ear_r")):
        side = float(sx * left @ to_cam)
        e2 = cam.project(aux[name] + Rh @ np.array([sx * 0.08 * r, 0, 0]))
        if side > 0.35:
            ear_after.append(e2)
        else:
            pt.disc(e2, 0.24 * rp, _shade(skin, 0.75), lab)
    jaw = cam.project(hc + Rh @ (np.array([0.0, -0.42, 0.28]) * r))
    pt.disc(c2, rp, _shade(skin, 0.6), lab)
    pt.disc(jaw, 0.68 * rp, _shade(skin, 0.6), lab)
    l2 = np.array(pt.light2d)
    pt.disc(c2 + l2 * 0.12 * rp, 0.84 * rp, _shade(skin, 0.88), None)
    pt.disc(jaw + l2 * 0.1 * rp, 0.55 * rp, _shade(skin, 0.88), None)
    pt.disc(c2 + l2 * 0.4 * rp, 0.3 * rp, _shade(skin, 1.05, 12), None)
    for e2 in ear_after:
        pt.disc(e2, 0.24 * rp, _shade(skin, 0.8), lab)
    # Nose (protrudes in profile) before the hair so a fringe can cover nothing important.
    nose = hc + Rh @ (np.array([0.0, -0.2, 1.02]) * r)
    if float((Rh @ np.array([0.0, -0.2, 1.0])) @ to_cam) > -0.25:
        pt.disc(cam.project(nose), 0.17 * rp, _shade(skin, 0.78), lab)
    # Hair: splats on the camera-facing part of the hair region (back + top of the head).
    hair_dirs = _HAIR @ Rh.T
    vis = hair_dirs @ to_cam > 0.05
    if app.long_hair and facing < 0.3:
        bot = hc + Rh @ (np.array([0.0, -1.6, -0.55]) * r)
        pt.capsule(c2, cam.project(bot), 0.95 * rp, 0.8 * rp, app.hair, lab)
    hp = cam.project(hc + hair_dirs[vis] * r * 1.02)
    hair_dark = _shade(app.hair, 0.8)
    for p in hp:
        pt.disc(p, 0.3 * rp, hair_dark, lab)
    for p in hp[::2]:
        pt.disc(p + l2 * 0.08 * rp, 0.18 * rp, app.hair, None)
    # Face: eyes, brows and mouth only where that part of the face looks at the camera.
    for sx in (1.0, -1.0):
        d = np.array([sx * 0.36, 0.1, 0.93])
        if float((Rh @ d) @ to_cam) > 0.15:
            e = cam.project(hc + Rh @ (d * r))
            pt.disc(e, max(0.7, 0.14 * rp), (245, 245, 245), None)
            pt.disc(e, max(0.5, 0.09 * rp), (40, 30, 25), None)
            b = cam.project(hc + Rh @ (np.array([sx * 0.36, 0.33, 0.88]) * r))
            pt.disc(b, max(0.5, 0.08 * rp), _shade(app.hair, 0.7), None)
    m = np.array([0.0, -0.55, 0.86])
    if float((Rh @ m) @ to_cam) > 0.2:
        a = cam.project(hc + Rh @ (np.array([0.2, -0.55, 0.84]) * r))
        b = cam.project(hc + Rh @ (np.array([-0.2, -0.55, 0.84]) * r))
        pt.capsule(a, b, max(0.5, 0.06 * rp), max(0.5, 0.06 * rp), (60, 50, 150), None, False)
    if facing > -0.25:
        pt.disc(cam.project(nose), 0.13 * rp, _shade(skin, 0.95), None)


def _draw_chair(pt: Painter, skel: Skeleton3D, shape: BodyShape) -> None:
    """A simple stool under a sitting person, drawn as a shaded box (scene label)."""
    j = skel.joints
    seat_h = float(j[J["pelvis"], 1] - shape.radius["torso_depth"] * 0.6)
    mid = 0.5 * (j[J["pelvis"]] + 0.5 * (j[J["left knee"]] + j[J["right knee"]]))
    fwd = 0.5 * (j[J["left knee"]] + j[J["right knee"]]) - j[J["pelvis"]]
    fwd[1] = 0
    fwd /= np.linalg.norm(fwd) + 1e-9
    side = np.cross([0.0, 1.0, 0.0], fwd)
    hw = shape.radius["hips"] * 1.3
    corners = []
    for y in (seat_h, 0.0):
        for a, b in ((1, 1), (1, -1), (-1, -1), (-1, 1)):
            corners.append(mid * [1, 0, 1] + [0, y, 0] + fwd * a * hw + side * b * hw)
    cw = pt.cam.to_cam(np.array(corners))
    uv = pt.cam.project(cw)
    wood = (40, 70, 110)
    faces = [(0, 1, 2, 3), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6), (3, 0, 4, 7)]
    centre = cw.mean(0)
    order = sorted(faces, key=lambda fc: -float(cw[list(fc)].mean(0)[2]))
    for fc in order:
        fcp = cw[list(fc)]
        n = fcp.mean(0) - centre
        n /= np.linalg.norm(n) + 1e-9
        if n @ (-fcp.mean(0)) <= 0:
            continue
        pt.poly(cv2.convexHull(uv[list(fc)].astype(np.float32))[:, 0], _lambert(wood, n, pt.light), SCENE_LABEL)
