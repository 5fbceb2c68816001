"""SynthPose skeleton: joint names, bones, flip pairs and joint-angle limits.

Names are spelled exactly as in ``descriptions/keypoints.yaml`` (spaces, not underscores,
except ``head_top`` which the original LocLLM code spells with an underscore), because the
name goes verbatim into the LocLLM question.
"""

from __future__ import annotations

from locllm_sdk.descriptions import coco17

# The 17 COCO joints in COCO order and their limbs (0-based): the ``coco17`` skeleton of
# descriptions/keypoints.yaml, the one definition.
COCO17: list[str] = list(coco17().keypoints)

# Extra joints appended after COCO, so ``keypoints_ext[:17] == keypoints``.
EXTRA: list[str] = ["neck", "pelvis", "head_top", "thorax", "torso"]

JOINT_NAMES: list[str] = COCO17 + EXTRA
NUM_COCO = len(COCO17)
NUM_JOINTS = len(JOINT_NAMES)
J: dict[str, int] = {n: i for i, n in enumerate(JOINT_NAMES)}

COCO_LIMBS: list[tuple[int, int]] = [tuple(limb) for limb in coco17().limbs]

# Extended skeleton: the COCO limbs plus a spine chain through the extra joints.
EXT_LIMBS: list[tuple[int, int]] = COCO_LIMBS + [
    (J["pelvis"], J["left hip"]), (J["pelvis"], J["right hip"]),
    (J["pelvis"], J["torso"]), (J["torso"], J["thorax"]), (J["thorax"], J["neck"]),
    (J["neck"], J["left shoulder"]), (J["neck"], J["right shoulder"]),
    (J["neck"], J["nose"]), (J["nose"], J["head_top"]),
]  # fmt: skip


def flip_pairs(names: list[str]) -> list[tuple[int, int]]:
    """Index pairs (left, right) for horizontal-flip augmentation."""
    idx = {n: i for i, n in enumerate(names)}
    return [
        (i, idx["right " + n[5:]]) for i, n in enumerate(names) if n.startswith("left ") and "right " + n[5:] in idx
    ]


FLIP_PAIRS = flip_pairs(JOINT_NAMES)

# Joint-angle limits in degrees (sampled angles are clipped to these). Conventions, in the
# parent segment's frame (x = the person's left, y = up, z = forward):
#   shoulder_flex: arm raised forward (+) / backward (-); shoulder_abd: arm raised sideways;
#   shoulder_rot: internal (+) rotation about the upper-arm axis; elbow: flexion;
#   hip_flex: thigh forward (+); hip_abd: thigh sideways outwards (+); knee: flexion;
#   spine_*: whole-spine bend (split over two segments); head_*: relative to the chest.
# Ranges follow the usual clinical range-of-motion tables (AAOS), slightly narrowed.
JOINT_LIMITS: dict[str, tuple[float, float]] = {
    "shoulder_flex": (-50.0, 180.0),
    "shoulder_abd": (-10.0, 180.0),
    "shoulder_rot": (-70.0, 80.0),
    "elbow": (0.0, 150.0),
    "hip_flex": (-25.0, 125.0),
    "hip_abd": (-15.0, 45.0),
    "hip_rot": (-35.0, 40.0),
    "knee": (0.0, 150.0),
    "spine_flex": (-25.0, 90.0),
    "spine_lat": (-30.0, 30.0),
    "spine_twist": (-40.0, 40.0),
    "head_yaw": (-70.0, 70.0),
    "head_pitch": (-40.0, 45.0),
    "head_roll": (-25.0, 25.0),
}

# Average segment lengths as a fraction of body height (anthropometric tables, Drillis &
# Contini / Winter), jittered per person in pose.sample_shape.
PROPORTIONS: dict[str, float] = {
    "ankle_h": 0.039, "shin": 0.246, "thigh": 0.245, "hip_half": 0.058,
    "spine_low": 0.145, "spine_up": 0.145, "shoulder_half": 0.118, "shoulder_drop": 0.025,
    "neck_len": 0.07, "head_r": 0.066, "upper_arm": 0.178, "forearm": 0.146,
    "hand": 0.085, "foot": 0.125,
}  # fmt: skip
