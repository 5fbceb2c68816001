"""Body shapes, pose sampling within joint limits, and forward kinematics.

Person frame: x = the person's left, y = up, z = the direction the person faces; units mm.
World frame: y up, ground plane y = 0. All rotations are right-handed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .skeleton import JOINT_LIMITS, NUM_JOINTS, PROPORTIONS, J

POSE_KINDS: list[str] = [
    "standing", "walking", "running", "arms_raised", "waving", "pointing",
    "sitting", "squatting", "bending", "lying",
]  # fmt: skip
# Sampling weights: common everyday poses dominate, as in COCO.
POSE_WEIGHTS = np.array([0.18, 0.16, 0.08, 0.1, 0.08, 0.07, 0.11, 0.07, 0.08, 0.07])


def rx(deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def ry(deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def rz(deg: float) -> np.ndarray:
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


UP = np.array([0.0, 1.0, 0.0])
DOWN = -UP


@dataclass
class BodyShape:
    """Segment lengths (mm) and radii (mm) of one person."""

    height: float
    seg: dict[str, float]
    radius: dict[str, float]


@dataclass
class Pose:
    kind: str
    angles: dict[str, float]
    root_rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    on_chair: bool = False


def sample_shape(rng: np.random.Generator, child: bool | None = None) -> BodyShape:
    """Random body: height 1.5-1.95 m (10 % children 1.0-1.45 m), jittered proportions."""
    if child is None:
        child = rng.random() < 0.1
    h = rng.uniform(1000, 1450) if child else rng.uniform(1500, 1950)
    seg = {k: v * h * rng.uniform(0.94, 1.06) for k, v in PROPORTIONS.items()}
    if child:  # children have relatively bigger heads and shorter legs
        seg["head_r"] *= 1.15
        seg["shin"] *= 0.93
        seg["thigh"] *= 0.93
    w = rng.uniform(0.8, 1.35)  # body width factor (slim .. broad)
    r = {
        "upper_arm": 0.026 * h * w, "forearm": 0.021 * h * w, "hand": 0.018 * h,
        "thigh": 0.042 * h * w, "shin": 0.029 * h * w, "foot": 0.018 * h,
        "neck": 0.027 * h * w ** 0.5, "torso_depth": 0.055 * h * w,
        "waist": 0.085 * h * w, "hips": 0.095 * h * w * rng.uniform(0.95, 1.1),
    }  # fmt: skip
    return BodyShape(height=h, seg=seg, radius=r)


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def sample_pose(rng: np.random.Generator, kind: str | None = None) -> Pose:
    """Sample joint angles (degrees) for a pose class, clipped to JOINT_LIMITS."""
    if kind is None:
        kind = POSE_KINDS[int(rng.choice(len(POSE_KINDS), p=POSE_WEIGHTS / POSE_WEIGHTS.sum()))]
    u = lambda lo, hi: _u(rng, lo, hi)  # noqa: E731 - local shorthand
    a: dict[str, float] = {
        "spine_flex": u(-5, 10),
        "spine_lat": u(-6, 6),
        "spine_twist": u(-10, 10),
        "head_yaw": u(-35, 35),
        "head_pitch": u(-15, 20),
        "head_roll": u(-10, 10),
    }
    for s in ("l", "r"):  # relaxed defaults
        a |= {
            f"sh_flex_{s}": u(-15, 25),
            f"sh_abd_{s}": u(3, 25),
            f"sh_rot_{s}": u(-10, 40),
            f"elbow_{s}": u(5, 45),
            f"hip_flex_{s}": u(-5, 10),
            f"hip_abd_{s}": u(0, 10),
            f"hip_rot_{s}": u(-10, 20),
            f"knee_{s}": u(0, 12),
        }
    pose = Pose(kind=kind, angles=a)
    sides = ("l", "r") if rng.random() < 0.5 else ("r", "l")
    if kind in ("walking", "running"):
        amp = u(15, 35) if kind == "walking" else u(35, 60)
        ph = np.sin(u(0, 2 * np.pi))
        a["hip_flex_l"], a["hip_flex_r"] = amp * ph + 5, -amp * ph + 5
        a["knee_l"] = u(5, 30) + (u(20, 60) if ph < 0 else 0) * (2 if kind == "running" else 1)
        a["knee_r"] = u(5, 30) + (u(20, 60) if ph > 0 else 0) * (2 if kind == "running" else 1)
        a["sh_flex_l"], a["sh_flex_r"] = -0.8 * amp * ph, 0.8 * amp * ph
        if kind == "running":
            a["elbow_l"], a["elbow_r"] = u(70, 110), u(70, 110)
            a["spine_flex"] = u(5, 20)
    elif kind == "arms_raised":
        for s in ("l", "r") if rng.random() < 0.6 else sides[:1]:
            if rng.random() < 0.5:
                a[f"sh_abd_{s}"], a[f"sh_flex_{s}"] = u(120, 175), u(-10, 30)
            else:
                a[f"sh_flex_{s}"], a[f"sh_abd_{s}"] = u(130, 180), u(0, 30)
            a[f"elbow_{s}"] = u(0, 50)
    elif kind == "waving":
        s = sides[0]
        a[f"sh_abd_{s}"], a[f"sh_flex_{s}"] = u(70, 110), u(0, 40)
        a[f"sh_rot_{s}"], a[f"elbow_{s}"] = u(-70, -30), u(60, 120)
    elif kind == "pointing":
        s = sides[0]
        a[f"sh_flex_{s}"], a[f"sh_abd_{s}"], a[f"elbow_{s}"] = u(60, 110), u(0, 50), u(0, 20)
        a["head_yaw"] = u(-20, 20)
    elif kind == "sitting":
        pose.on_chair = rng.random() < 0.7
        for s in ("l", "r"):
            a[f"hip_flex_{s}"] = u(75, 100) if pose.on_chair else u(80, 100)
            a[f"knee_{s}"] = u(70, 110) if pose.on_chair else u(0, 40)
            a[f"hip_abd_{s}"] = u(0, 20)
            a[f"sh_flex_{s}"], a[f"elbow_{s}"] = u(0, 45), u(20, 90)
        a["spine_flex"] = u(-5, 15)
    elif kind == "squatting":
        for s in ("l", "r"):
            a[f"hip_flex_{s}"], a[f"knee_{s}"], a[f"hip_abd_{s}"] = u(95, 120), u(110, 145), u(10, 30)
            a[f"sh_flex_{s}"], a[f"elbow_{s}"] = u(20, 80), u(20, 100)
        a["spine_flex"] = u(15, 40)
    elif kind == "bending":
        bend = u(40, 85)
        a["spine_flex"] = bend
        a["head_pitch"] = u(-30, 0)  # looks ahead/down while bent
        for s in ("l", "r"):  # arms hang with gravity: flexion compensates the bend
            a[f"sh_flex_{s}"] = bend + u(-20, 20)
            a[f"elbow_{s}"] = u(0, 30)
            a[f"knee_{s}"] = u(0, 25)
    elif kind == "lying":
        which = rng.choice(3)
        pose.root_rot = [rx(-90), rz(90 if rng.random() < 0.5 else -90), rx(90)][int(which)]
        a["head_pitch"] = u(-20, 10)
        for s in ("l", "r"):
            a[f"sh_abd_{s}"], a[f"elbow_{s}"] = u(0, 100), u(0, 90)
            a[f"hip_flex_{s}"], a[f"knee_{s}"] = u(-5, 60), u(0, 70)
    # Clip every angle to the documented human joint limits.
    for k, v in a.items():
        base = {
            "sh_flex": "shoulder_flex",
            "sh_abd": "shoulder_abd",
            "sh_rot": "shoulder_rot",
            "hip_flex": "hip_flex",
            "hip_abd": "hip_abd",
            "hip_rot": "hip_rot",
            "elbow": "elbow",
            "knee": "knee",
        }.get(k.rsplit("_", 1)[0], k)
        lo, hi = JOINT_LIMITS[base]
        a[k] = float(np.clip(v, lo, hi))
    return pose


@dataclass
class Skeleton3D:
    """Forward-kinematics result, in the world frame (mm)."""

    joints: np.ndarray  # [NUM_JOINTS, 3]
    aux: dict[str, np.ndarray]  # extra surface points / frames used by the renderer


def forward_kinematics(
    shape: BodyShape, pose: Pose, yaw_deg: float = 0.0, position: np.ndarray | None = None
) -> Skeleton3D:
    """Joint positions for a shape + pose, rotated by yaw about +y and standing on y = 0."""
    s, a, rad = shape.seg, pose.angles, shape.radius
    R0 = pose.root_rot
    jt = np.zeros((NUM_JOINTS, 3))
    pelvis = np.zeros(3)
    # Spine: two segments, each gets half of the bend / lateral bend / twist.
    half = rx(a["spine_flex"] / 2) @ rz(a["spine_lat"] / 2) @ ry(a["spine_twist"] / 2)
    R_abd = R0 @ half
    R_chest = R_abd @ half
    torso = pelvis + R_abd @ UP * s["spine_low"]
    neck = torso + R_chest @ UP * s["spine_up"]
    thorax = neck + 0.3 * (torso - neck)  # upper chest, slightly below the neck
    R_head = R_chest @ ry(a["head_yaw"]) @ rx(a["head_pitch"]) @ rz(a["head_roll"])
    R_neck = R_chest @ rx(a["head_pitch"] * 0.5)
    neck_top = neck + R_neck @ UP * s["neck_len"]
    head_r = s["head_r"]
    head_c = neck_top + R_head @ np.array([0.0, 0.35, 0.12]) * head_r
    aux: dict[str, np.ndarray] = {}
    for side, sx in (("l", 1.0), ("r", -1.0)):
        L = "left" if side == "l" else "right"
        sh = neck + R_chest @ np.array([sx * s["shoulder_half"], -s["shoulder_drop"], 0.0])
        R_ua = R_chest @ rz(sx * a[f"sh_abd_{side}"]) @ rx(-a[f"sh_flex_{side}"]) @ ry(sx * a[f"sh_rot_{side}"])
        el = sh + R_ua @ DOWN * s["upper_arm"]
        R_fa = R_ua @ rx(-a[f"elbow_{side}"])
        wr = el + R_fa @ DOWN * s["forearm"]
        hand = wr + R_fa @ rx(-10) @ DOWN * s["hand"]
        hip = pelvis + R0 @ np.array([sx * s["hip_half"], -0.25 * s["hip_half"], 0.0])
        R_th = R0 @ rz(sx * a[f"hip_abd_{side}"]) @ rx(-a[f"hip_flex_{side}"]) @ ry(sx * a[f"hip_rot_{side}"])
        kn = hip + R_th @ DOWN * s["thigh"]
        R_sh = R_th @ rx(a[f"knee_{side}"])
        an = kn + R_sh @ DOWN * s["shin"]
        toe = an + R_sh @ rx(-80) @ DOWN * s["foot"] + R_sh @ DOWN * s["ankle_h"] * 0.6
        heel = an + R_sh @ DOWN * s["ankle_h"] * 0.7 - R_sh @ rx(-80) @ DOWN * s["foot"] * 0.2
        jt[J[f"{L} shoulder"]], jt[J[f"{L} elbow"]], jt[J[f"{L} wrist"]] = sh, el, wr
        jt[J[f"{L} hip"]], jt[J[f"{L} knee"]], jt[J[f"{L} ankle"]] = hip, kn, an
        aux[f"hand_{side}"], aux[f"toe_{side}"], aux[f"heel_{side}"] = hand, toe, heel
        # Face points on the head sphere (head frame: x = left, y = up, z = forward).
        aux[f"eye_{side}"] = head_c + R_head @ (np.array([sx * 0.36, 0.1, 0.93]) * head_r)
        aux[f"ear_{side}"] = head_c + R_head @ (np.array([sx * 1.0, 0.0, -0.05]) * head_r)
    jt[J["left eye"]], jt[J["right eye"]] = aux["eye_l"], aux["eye_r"]
    jt[J["left ear"]], jt[J["right ear"]] = aux["ear_l"], aux["ear_r"]
    jt[J["nose"]] = head_c + R_head @ (np.array([0.0, -0.2, 1.08]) * head_r)
    jt[J["neck"]], jt[J["pelvis"]], jt[J["thorax"]], jt[J["torso"]] = neck, pelvis, thorax, torso
    # head_top sits just inside the crown so it projects onto the rendered head.
    jt[J["head_top"]] = head_c + R_head @ (np.array([0.0, 0.96, -0.08]) * head_r)
    aux |= {"head_c": head_c, "neck_top": neck_top, "R_head": R_head, "R_chest": R_chest, "R_abd": R_abd, "R_root": R0}
    # Put the lowest body surface on the ground (feet, or the back when lying).
    pts = np.stack(
        [*jt, aux["toe_l"], aux["toe_r"], aux["heel_l"], aux["heel_r"], head_c, aux["hand_l"], aux["hand_r"]]
    )
    radii = np.full(len(pts), rad["foot"])
    radii[J["pelvis"]] = radii[J["torso"]] = radii[J["thorax"]] = rad["torso_depth"]
    radii[-4] = head_r
    lowest = float(np.min(pts[:, 1] - radii))
    R_y = ry(yaw_deg)
    offset = np.array([0.0, -lowest, 0.0])
    pos = np.zeros(3) if position is None else np.asarray(position, float)

    def to_world(p: np.ndarray) -> np.ndarray:
        return (p + offset) @ R_y.T + pos

    out_aux: dict[str, np.ndarray] = {}
    for k, v in aux.items():
        out_aux[k] = R_y @ v if k.startswith("R_") else to_world(v)
    out_aux["chair_h"] = np.array([-lowest])  # pelvis height above ground before placement
    return Skeleton3D(joints=to_world(jt), aux=out_aux)
