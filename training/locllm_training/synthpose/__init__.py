"""SynthPose: a fast procedural renderer of people with 2D/3D keypoint ground truth."""

from .skeleton import COCO17, EXTRA, JOINT_NAMES, NUM_COCO, NUM_JOINTS

__all__ = ["COCO17", "EXTRA", "JOINT_NAMES", "NUM_COCO", "NUM_JOINTS"]
