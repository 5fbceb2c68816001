"""locllm_sdk: fast, faithful serving of LocLLM keypoint localizers.

from locllm_sdk import Pose
pose = Pose("engines/tiny")
result = pose.locate("person.jpg", ["neck", "pelvis"])
"""

from .crop import BoxError, ImageError
from .descriptions import DescriptionLibrary, UnknownKeypointError
from .engine import EngineError
from .pose import Pose
from .protocol import PROTOCOL_VERSION, ProtocolError
from .results import Keypoint, Person, Results

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "BoxError",
    "DescriptionLibrary",
    "EngineError",
    "ImageError",
    "Keypoint",
    "Person",
    "Pose",
    "ProtocolError",
    "Results",
    "UnknownKeypointError",
    "__version__",
]
