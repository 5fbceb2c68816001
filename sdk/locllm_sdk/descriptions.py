"""The keypoint description library (``descriptions/keypoints.yaml``) and request resolution."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

_SIDE = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_OTHER_SIDE = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def mirror_text(text: str) -> str:
    """Swap the words left and right: what a text means in a horizontally mirrored image."""
    return _SIDE.sub(lambda m: _OTHER_SIDE[m.group(1)], text)


def default_library_path() -> Path:
    """The bundled library: packaged as ``locllm_sdk._library`` (the repo's descriptions/)."""
    try:
        from importlib.resources import files

        path = Path(str(files("locllm_sdk._library") / "keypoints.yaml"))
        if path.is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "descriptions" / "keypoints.yaml"  # plain clone


class UnknownKeypointError(KeyError):
    """A keypoint name that the library does not describe and the caller gave no text for."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0])


@dataclass(frozen=True)
class KeypointRequest:
    name: str
    description: str


@dataclass(frozen=True)
class Skeleton:
    name: str
    keypoints: tuple[str, ...]
    limbs: tuple[tuple[int, int], ...]


class DescriptionLibrary:
    def __init__(self, descriptions: Mapping[str, str], skeletons: Mapping[str, Skeleton]):
        self.descriptions = dict(descriptions)
        self.skeletons = dict(skeletons)

    @classmethod
    def load(cls, path: str | Path | None = None) -> DescriptionLibrary:
        path = Path(path) if path is not None else default_library_path()
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        descriptions = {name: entry["description"] for name, entry in data["keypoints"].items()}
        skeletons = {
            name: Skeleton(name, tuple(s["keypoints"]), tuple(tuple(limb) for limb in s.get("limbs", [])))
            for name, s in (data.get("skeletons") or {}).items()
        }
        return cls(descriptions, skeletons)

    def __contains__(self, name: str) -> bool:
        return name in self.descriptions

    def resolve(self, keypoints: str | Iterable[str] | Mapping[str, str | None]) -> list[KeypointRequest]:
        """Turn what a user passes to ``locate`` into (name, description) requests.

        Accepts a skeleton name (``"coco17"``), one keypoint name, a list of names, or a
        ``{name: description}`` mapping (``None`` as description means "from the library").
        """
        if isinstance(keypoints, str):
            keypoints = list(self.skeletons[keypoints].keypoints) if keypoints in self.skeletons else [keypoints]
        if isinstance(keypoints, Mapping):
            items = list(keypoints.items())
        else:
            items = [(k, None) for k in keypoints]
        if not items:
            raise ValueError("no keypoints requested: pass at least one keypoint name")
        requests, seen = [], set()
        for name, description in items:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"keypoint names must be non-empty strings, got {name!r}")
            if name in seen:
                raise ValueError(f"keypoint {name!r} requested twice")
            seen.add(name)
            if description is None:
                if name not in self.descriptions:
                    known = ", ".join(sorted(self.descriptions))
                    raise UnknownKeypointError(
                        f"unknown keypoint {name!r}: it is not in the description library and no "
                        f"description was given. Pass {{{name!r}: 'The {name} is ...'}} or one of: {known}"
                    )
                description = self.descriptions[name]
            elif not isinstance(description, str) or not description.strip():
                raise ValueError(f"the description of {name!r} must be a non-empty string")
            requests.append(KeypointRequest(name, description))
        return requests

    def mirror(self, request: KeypointRequest) -> KeypointRequest:
        """The request that asks, in a horizontally flipped crop, for the same body point:
        the other side's library entry when the request is a library entry (so the model
        reads the sentences it was trained with), else name and text with left/right swapped."""
        name = mirror_text(request.name)
        if self.descriptions.get(request.name) == request.description and name in self.descriptions:
            return KeypointRequest(name, self.descriptions[name])
        return KeypointRequest(name, mirror_text(request.description))
