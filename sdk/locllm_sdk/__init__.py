"""locllm_sdk: fast, faithful serving of LocLLM keypoint localizers.

from locllm_sdk import Pose
pose = Pose("engines/tiny")
result = pose.locate("person.jpg", ["neck", "pelvis"])
"""

from .descriptions import DescriptionLibrary
from .errors import (
    ArgumentError,
    BackendUnavailable,
    BoxError,
    CheckpointError,
    DataError,
    EngineError,
    ImageError,
    KeypointError,
    LocLLMError,
    ProtocolError,
    UnknownKeypointError,
)
from .manifest import EngineManifest
from .pose import Pose
from .protocol import PROTOCOL_VERSION
from .results import Keypoint, Person, Results

__version__ = "0.1.0"

__all__ = [
    "PROTOCOL_VERSION",
    "ArgumentError",
    "BackendUnavailable",
    "BoxError",
    "CheckpointError",
    "DataError",
    "DescriptionLibrary",
    "EngineError",
    "EngineManifest",
    "KeypointError",
    "LocLLMError",
    "ImageError",
    "Keypoint",
    "Person",
    "Pose",
    "ProtocolError",
    "Results",
    "UnknownKeypointError",
    "__version__",
]
