"""The keypoint description library (``descriptions/keypoints.yaml``) and request resolution."""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import EngineError, KeypointError, UnknownKeypointError
from .protocol import check_user_text

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


@dataclass(frozen=True)
class KeypointRequest:
    name: str
    description: str


@dataclass(frozen=True)
class Skeleton:
    name: str
    keypoints: tuple[str, ...]
    limbs: tuple[tuple[int, int], ...]


@functools.cache
def bundled_library() -> DescriptionLibrary:
    """The description library shipped with the package (read once)."""
    return DescriptionLibrary.load()


def coco17() -> Skeleton:
    """The COCO-17 keypoints (COCO order) and limbs (0-based), as the bundled library lists them."""
    return bundled_library().skeletons["coco17"]


class DescriptionLibrary:
    def __init__(self, descriptions: Mapping[str, str], skeletons: Mapping[str, Skeleton]):
        self.descriptions = dict(descriptions)
        self.skeletons = dict(skeletons)

    @classmethod
    def load(cls, path: str | Path | None = None) -> DescriptionLibrary:
        """Read a library file (default: the bundled one); EngineError naming the file and the
        entry when it is not a library (an engine carries its own as descriptions.yaml)."""
        path = Path(path) if path is not None else default_library_path()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise EngineError(f"{path}: cannot read the keypoint description library: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("keypoints"), dict):
            raise EngineError(f"{path}: not a keypoint description library (no 'keypoints' mapping)")
        descriptions = {}
        for name, entry in data["keypoints"].items():
            text = entry.get("description") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not isinstance(text, str) or not text.strip():
                raise EngineError(f"{path}: keypoints.{name}: needs a 'description' string")
            descriptions[name] = text
        skeletons = {}
        raw = data.get("skeletons") or {}
        if not isinstance(raw, dict):
            raise EngineError(f"{path}: 'skeletons' must be a mapping")
        for name, sk in raw.items():
            try:
                keypoints = tuple(str(k) for k in sk["keypoints"])
                limbs = tuple((int(a), int(b)) for a, b in sk.get("limbs", []))
            except (TypeError, KeyError, ValueError) as e:
                raise EngineError(f"{path}: skeletons.{name}: needs a 'keypoints' list and [a, b] limbs ({e})") from e
            skeletons[name] = Skeleton(name, keypoints, limbs)
        return cls(descriptions, skeletons)

    def __contains__(self, name: str) -> bool:
        return name in self.descriptions

    def canonical_name(self, name: str) -> str | None:
        """The library's spelling of ``name``: itself, or with underscores and spaces swapped
        (COCO writes ``left_wrist``, the library ``left wrist``; it writes ``head_top``)."""
        for cand in (name, name.replace("_", " "), name.replace(" ", "_")):
            if cand in self.descriptions:
                return cand
        return None

    def resolve(self, keypoints: str | Iterable[str] | Mapping[str, str | None]) -> list[KeypointRequest]:
        """Turn what a user passes to ``locate`` into (name, description) requests.

        Accepts a skeleton name (``"coco17"``), one keypoint name, a list of names, or a
        ``{name: description}`` mapping (``None`` as description means "from the library").
        Library names may be spelled with underscores or spaces (``left_wrist``); the request
        then carries the library's spelling, the one the model was trained with.
        """
        if isinstance(keypoints, str):
            keypoints = list(self.skeletons[keypoints].keypoints) if keypoints in self.skeletons else [keypoints]
        if isinstance(keypoints, Mapping):
            items = list(keypoints.items())
        elif isinstance(keypoints, (bytes, bytearray)) or not isinstance(keypoints, Iterable):
            raise KeypointError(
                f"keypoints must be a name, a list of names, a skeleton name (e.g. 'coco17') or a "
                f"{{name: description}} mapping, got {type(keypoints).__name__}"
            )
        else:
            items = [(k, None) for k in keypoints]
        if not items:
            raise KeypointError("no keypoints requested: pass at least one keypoint name")
        requests, seen = [], set()
        for name, description in items:
            if not isinstance(name, str) or not name.strip():
                raise KeypointError(f"keypoint names must be non-empty strings, got {name!r}")
            if description is None:
                canonical = self.canonical_name(name)
                if canonical is None:
                    known = ", ".join(sorted(self.descriptions))
                    raise UnknownKeypointError(
                        f"unknown keypoint {name!r}: it is not in the description library and no "
                        f"description was given. Pass {{{name!r}: 'The {name} is ...'}} or one of: {known}"
                    )
                name, description = canonical, self.descriptions[canonical]
            elif not isinstance(description, str) or not description.strip():
                raise KeypointError(f"the description of {name!r} must be a non-empty string")
            check_user_text(name, f"keypoint name {name!r}")
            check_user_text(description, f"the description of {name!r}")
            if name in seen:
                raise KeypointError(f"keypoint {name!r} requested twice")
            seen.add(name)
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
