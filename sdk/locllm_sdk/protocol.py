"""The LocLLM prompt protocol: one module for training, export and runtime.

Everything that turns a keypoint request into token ids, and generated tokens back into
coordinates and scores, lives here, so the ids a model was trained on are the ids it is
served with. It reproduces the public LocLLM checkpoints (kennethwdk/LocLLM): the prompt

    "Image: " + "<im_patch>" * P + "\\n" + "Keypoint: {description}\\nQuestion: {question}\\nAnswer:"

tokenised like transformers 4.31's slow ``LlamaTokenizer``: BOS first, whitespace touching
``<im_patch>`` stripped, and (``legacy: false``) no ``▁`` prefix on text that follows an
added token. Answers are ``" [0.xxx,0.yyy]"`` (2D) or ``" [0.xxx,0.yyy,0.zzzzzz]"`` (3D).

A second version, ``locllm-grouped-v1`` (``GROUPED_PROTOCOL_VERSION``), is for models trained
with it: one round asks for a body part (``JOINT_GROUPS``: its joints' descriptions in order,
then "Where are the joints of the left arm of this person in this image: left shoulder, left
elbow, left wrist? ...") and the answer lists the joints' coordinates in that order, each
written as the single-keypoint answer and separated by a space: ``" [0.xxx,0.yyy] [0.xxx,0.yyy]
[0.xxx,0.yyy]"`` (each part is the same tokens as the one-keypoint answer). The image prefix,
tokenisation and decimals are the first version's; the public checkpoints' ids are unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import KeypointError, ProtocolError, read_json

PROTOCOL_VERSION = "locllm-v1"
GROUPED_PROTOCOL_VERSION = "locllm-grouped-v1"
IMAGE_PATCH_TOKEN = "<im_patch>"
EOS_TEXT = "</s>"
IMAGE_PREFIX = "Image: "
QUESTION_TEMPLATE = "Where is the {name} of this person in this image? Please provide its coordinates."
ROUND_TEMPLATE = "Keypoint: {description}\nQuestion: {question}\nAnswer:"
# Official decode budgets (utils/valid2d.py, valid3d.py): 13 tokens for 2D, 22 for 3D.
MAX_NEW_TOKENS = {2: 13, 3: 22}
# Decimals per coordinate: x, y with 3; the 3D depth with 6.
DECIMALS = {2: (3, 3), 3: (3, 3, 6)}
# Official parse: every "0.<digits>" in the answer text.
NUMBER_PATTERN = re.compile(r"0\.\d+")
# Depth convention (Human3.6M): z = root-relative depth in mm / DEPTH_RANGE_MM + 0.5.
DEPTH_RANGE_MM = 2000.0
SPIECE_UNDERLINE = "\u2581"
# Text that the protocol's tokenisation turns into control or image tokens (the official slow
# tokenizer splits on its special and added tokens): never accepted in a caller's text.
CONTROL_TEXTS = (IMAGE_PATCH_TOKEN, EOS_TEXT, "<s>", "<unk>")


def check_user_text(text: str, what: str) -> str:
    """A keypoint name or description as a caller gives it: refused (ProtocolError naming
    ``what``) when it holds text the protocol would turn into a control or image token.

    Refused rather than escaped: the official procedure would tokenise such text into those
    tokens (an image token in the middle of a sentence, an end of sequence), so there is no
    faithful plain-text encoding of it, and a model trained with the protocol never saw one."""
    if not isinstance(text, str):
        raise ProtocolError(f"{what} must be a string, got {type(text).__name__}")
    found = [t for t in CONTROL_TEXTS if t in text]
    if found:
        raise ProtocolError(
            f"{what} contains {', '.join(found)}: control/image tokens of the prompt protocol "
            f"({', '.join(CONTROL_TEXTS)}) cannot appear in keypoint names or descriptions"
        )
    return text


def question(name: str) -> str:
    return QUESTION_TEMPLATE.format(name=name)


def round_text(name: str, description: str, answer: str | None = None) -> str:
    """One conversation round; with an answer it is a training round closed by ``</s>``."""
    text = ROUND_TEMPLATE.format(description=description, question=question(name))
    if answer is not None:
        text += " " + answer + EOS_TEXT
    return text


def image_text(num_patches: int) -> str:
    return IMAGE_PREFIX + IMAGE_PATCH_TOKEN * num_patches + "\n"


def prompt_text(name: str, description: str, num_patches: int) -> str:
    """The full single-keypoint inference prompt, exactly as the official eval builds it."""
    return image_text(num_patches) + round_text(name, description)


def format_answer(values: Sequence[float]) -> str:
    """``[0.123,0.456]`` / ``[0.123,0.456,0.654321]``: normalised values, truncated by format."""
    decimals = DECIMALS[len(values)]
    return "[" + ",".join(f"{v:.{d}f}" for v, d in zip(values, decimals)) + "]"


def is_well_formed(text: str, dims: int) -> bool:
    """Whether ``text`` (trailing whitespace aside) is an answer as ``format_answer`` writes one:
    ``[0.123,0.456]`` for 2D, ``[0.123,0.456,0.654321]`` for 3D."""
    if dims not in DECIMALS:
        raise ProtocolError(f"coordinate dims must be 2 or 3, got {dims}")
    pattern = r"\[" + ",".join(rf"0\.\d{{{d}}}" for d in DECIMALS[dims]) + r"\]"
    return re.fullmatch(pattern, text.rstrip()) is not None


def depth_to_unit(depth_mm: float) -> float:
    return depth_mm / DEPTH_RANGE_MM + 0.5


def unit_to_depth(z: float) -> float:
    return (z - 0.5) * DEPTH_RANGE_MM


# --------------------------------------------------------------------------------------
# Body-part groups (protocol locllm-grouped-v1)


@dataclass(frozen=True)
class JointGroup:
    """A body part asked in one round of the grouped protocol: its joints in answer order
    (names as the description library spells them)."""

    name: str
    joints: tuple[str, ...]


# The groups of locllm-grouped-v1: the 22 SynthPose joints (COCO-17 + neck, pelvis, head_top,
# thorax, torso), each in exactly one group, in answer order (top to bottom, then outwards).
# Six groups of three cover COCO-17, so its 17 joints take 6 rows of one answer length.
JOINT_GROUPS: tuple[JointGroup, ...] = (
    JointGroup("face", ("nose", "left eye", "right eye")),
    JointGroup("head", ("head_top", "left ear", "right ear")),
    JointGroup("left arm", ("left shoulder", "left elbow", "left wrist")),
    JointGroup("right arm", ("right shoulder", "right elbow", "right wrist")),
    JointGroup("left leg", ("left hip", "left knee", "left ankle")),
    JointGroup("right leg", ("right hip", "right knee", "right ankle")),
    JointGroup("trunk", ("neck", "thorax", "torso", "pelvis")),
)
GROUP_QUESTION_TEMPLATE = (
    "Where are the joints of the {group} of this person in this image: {joints}? "
    "Please provide their coordinates in this order."
)
# Answer parts (one per joint, each a single-keypoint answer) are separated by this text.
GROUP_ANSWER_SEPARATOR = " "
# protocol version -> its body-part groups (none: one keypoint per round)
PROTOCOL_GROUPS: dict[str, tuple[JointGroup, ...]] = {PROTOCOL_VERSION: (), GROUPED_PROTOCOL_VERSION: JOINT_GROUPS}
PROTOCOL_VERSIONS = tuple(PROTOCOL_GROUPS)
# short names (train.py --protocol) of the versions
PROTOCOL_NAMES = {"per-keypoint": PROTOCOL_VERSION, "grouped": GROUPED_PROTOCOL_VERSION}


def protocol_groups(version: str, source: str = "protocol_version") -> tuple[JointGroup, ...]:
    """The body-part groups of protocol ``version`` (empty for the per-keypoint protocol);
    ProtocolError naming ``source`` for a version this runtime does not know."""
    if version not in PROTOCOL_GROUPS:
        raise ProtocolError(
            f"{source} {version!r} is not a protocol this runtime knows ({', '.join(PROTOCOL_VERSIONS)})"
        )
    return PROTOCOL_GROUPS[version]


def group_question(group: JointGroup) -> str:
    return GROUP_QUESTION_TEMPLATE.format(group=group.name, joints=", ".join(group.joints))


def group_round_text(group: JointGroup, descriptions: Sequence[str], answer: str | None = None) -> str:
    """One grouped round: the joints' descriptions in order, the group's question; with an
    answer (``format_group_answer``) it is a training round closed by ``</s>``."""
    if len(descriptions) != len(group.joints):
        raise ProtocolError(
            f"group {group.name!r} has {len(group.joints)} joints, got {len(descriptions)} descriptions"
        )
    text = ROUND_TEMPLATE.format(description=" ".join(descriptions), question=group_question(group))
    if answer is not None:
        text += " " + answer + EOS_TEXT
    return text


def format_group_answer(values: Sequence[Sequence[float]]) -> str:
    """``[0.123,0.456] [0.789,0.012] ...``: one single-keypoint answer per joint, in order."""
    return GROUP_ANSWER_SEPARATOR.join(format_answer(v) for v in values)


def plan_groups(names: Sequence[str], groups: Sequence[JointGroup]) -> list[tuple[JointGroup, list[tuple[int, int]]]]:
    """The groups to ask for keypoints ``names``, in ``groups`` order, each with its asked
    members as (index in ``names``, position in the group's answer). A name that no group
    holds is a KeypointError naming it and the groups."""
    where = {joint: (g, p) for g, group in enumerate(groups) for p, joint in enumerate(group.joints)}
    members: dict[int, list[tuple[int, int]]] = {}
    for i, name in enumerate(names):
        if name not in where:
            held = "; ".join(f"{g.name}: {', '.join(g.joints)}" for g in groups)
            raise KeypointError(
                f"keypoint {name!r} is in none of this grouped model's body-part groups, and a grouped model "
                f"answers only its groups' joints ({held})"
            )
        g, p = where[name]
        members.setdefault(g, []).append((i, p))
    return [(groups[g], members[g]) for g in sorted(members)]


# --------------------------------------------------------------------------------------
# Tokenisation


@dataclass(frozen=True)
class TokenizerSpec:
    """What decides the ids: the SentencePiece model plus the checkpoint's tokenizer_config."""

    model_path: Path
    legacy: bool
    bos_id: int
    eos_id: int
    pad_id: int
    im_patch_id: int
    add_bos: bool = True


# the files read_tokenizer_spec opens (when present) in a tokenizer directory
TOKENIZER_READS = ("tokenizer.model", "tokenizer_config.json", "added_tokens.json")


def read_tokenizer_spec(tokenizer_dir: str | Path) -> TokenizerSpec:
    """Read ``tokenizer.model`` + ``tokenizer_config.json`` (+ ``added_tokens.json``).

    The ``legacy`` flag decides how text after ``<im_patch>`` starts; transformers treats a
    missing flag as legacy, so do we.
    """
    tokenizer_dir = Path(tokenizer_dir)
    model_path = tokenizer_dir / "tokenizer.model"
    if not model_path.is_file():
        raise FileNotFoundError(f"tokenizer model not found: {model_path}")
    config = _json_object(tokenizer_dir / "tokenizer_config.json")
    added = _json_object(tokenizer_dir / "added_tokens.json")
    try:
        for idx, tok in (config.get("added_tokens_decoder") or {}).items():
            added.setdefault(tok["content"] if isinstance(tok, dict) else str(tok), int(idx))
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in added.items()):
            raise TypeError("token ids must be integers")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ProtocolError(f"{tokenizer_dir}: malformed added tokens ({e})") from e
    if IMAGE_PATCH_TOKEN not in added:
        raise ProtocolError(
            f"{tokenizer_dir}: the tokenizer has no {IMAGE_PATCH_TOKEN!r} token "
            "(expected in added_tokens.json or tokenizer_config.json added_tokens_decoder)"
        )
    sp = _sentencepiece(model_path)
    pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()
    return TokenizerSpec(
        model_path=model_path,
        # transformers treats a missing or null flag as legacy
        legacy=True if config.get("legacy") is None else bool(config["legacy"]),
        bos_id=sp.bos_id(),
        eos_id=sp.eos_id(),
        pad_id=pad_id,
        im_patch_id=int(added[IMAGE_PATCH_TOKEN]),
        add_bos=bool(config.get("add_bos_token", True)),
    )


def _json_object(path: Path) -> dict:
    """A tokenizer JSON file as a dict ({} when absent); ProtocolError naming it when malformed."""
    return read_json(path, ProtocolError, "a tokenizer file") if path.is_file() else {}


def _sentencepiece(model_path: Path):
    import sentencepiece as spm

    try:
        return spm.SentencePieceProcessor(model_file=str(model_path))
    except (OSError, RuntimeError) as e:
        raise ProtocolError(f"{model_path}: not a SentencePiece model ({e})") from e


class PromptTokenizer:
    """Token ids of the LocLLM protocol, identical to transformers 4.31's slow LlamaTokenizer.

    4.31 splits the text on added tokens, strips whitespace on both sides of an added token
    that is not an ``AddedToken`` with explicit strip flags (``<im_patch>`` is added that
    way), keeps ``</s>`` (an ``AddedToken`` with strip flags False) untouched, and encodes
    each remaining chunk with SentencePiece. With ``legacy: false`` only the chunk that
    opens the text gets the ``▁`` prefix; later chunks are encoded as a continuation.
    """

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec
        self._sp = _sentencepiece(spec.model_path)
        self.vocab_size = self._sp.vocab_size()
        # ids of "<unk>" text encoded alone: transformers' trick for a prefix-free encoding.
        self._unk_prefix = self._sp.encode("<unk>")

    @classmethod
    def from_dir(cls, tokenizer_dir: str | Path) -> PromptTokenizer:
        return cls(read_tokenizer_spec(tokenizer_dir))

    # -- core -------------------------------------------------------------------------
    def _encode_chunk(self, chunk: str, opens_text: bool) -> list[int]:
        if not chunk:
            return []
        if self.spec.legacy or opens_text:
            return self._sp.encode(chunk)
        # Continuation: encode "<unk>" + chunk and drop the ids of "<unk>" (no "▁" prefix).
        ids = self._sp.encode("<unk>" + chunk)
        n = len(self._unk_prefix)
        if ids[:n] != self._unk_prefix:  # pragma: no cover - a tokenizer that merges across it
            raise ProtocolError("tokenizer merges '<unk>' with the following text")
        return ids[n:]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids of ``text`` (may contain ``<im_patch>`` and ``</s>``), BOS first by default."""
        pieces = re.split(f"({re.escape(IMAGE_PATCH_TOKEN)}|{re.escape(EOS_TEXT)})", text)
        # Strip whitespace next to <im_patch> (4.31 default for added tokens).
        for i, piece in enumerate(pieces):
            if piece == IMAGE_PATCH_TOKEN:
                if i > 0:
                    pieces[i - 1] = pieces[i - 1].rstrip()
                if i + 1 < len(pieces):
                    pieces[i + 1] = pieces[i + 1].lstrip()
        ids: list[int] = []
        if self.spec.add_bos if add_bos is None else add_bos:
            ids.append(self.spec.bos_id)
        for i, piece in enumerate(pieces):
            if piece == IMAGE_PATCH_TOKEN:
                ids.append(self.spec.im_patch_id)
            elif piece == EOS_TEXT:
                ids.append(self.spec.eos_id)
            else:
                # In non-legacy mode 4.31 prefixes the whole text with "▁": only the first
                # chunk (index 0) carries it, even when it is empty after stripping.
                ids.extend(self._encode_chunk(piece, opens_text=(i == 0)))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of generated ids, as ``tokenizer.batch_decode(..., skip_special_tokens=True)``."""
        special = {self.spec.bos_id, self.spec.eos_id, self.spec.pad_id, self._sp.unk_id()}
        keep = [
            int(i) for i in ids if 0 <= int(i) < self.vocab_size and not (skip_special_tokens and int(i) in special)
        ]
        return self._sp.decode(keep)

    def piece(self, token_id: int) -> str:
        if token_id == self.spec.im_patch_id:
            return IMAGE_PATCH_TOKEN
        return self._sp.id_to_piece(int(token_id))

    # -- the protocol's pieces -------------------------------------------------------
    def prefix_ids(self, num_patches: int) -> list[int]:
        """``<s> Image : <im_patch>*P``: shared by every keypoint of a crop."""
        return self.encode(IMAGE_PREFIX + IMAGE_PATCH_TOKEN * num_patches)

    def round_ids(self, name: str, description: str, answer: str | None = None) -> list[int]:
        """Ids of one round as it follows an added token (prefix or a previous ``</s>``).
        ``name`` and ``description`` are plain text (``check_user_text``)."""
        check_user_text(name, f"keypoint name {name!r}")
        check_user_text(description, f"the description of {name!r}")
        text = round_text(name, description, answer)
        # Encode as the continuation it is in the full text: a leading added token makes the
        # chunk a non-opening one; whitespace after <im_patch> ("\n") is stripped by encode().
        ids = self.encode(IMAGE_PATCH_TOKEN + "\n" + text, add_bos=False)
        return ids[1:]

    def group_round_ids(self, group: JointGroup, descriptions: Sequence[str], answer: str | None = None) -> list[int]:
        """Ids of one grouped round (``group_round_text``) as it follows an added token, like
        ``round_ids``; the descriptions are plain text (``check_user_text``)."""
        for joint, description in zip(group.joints, descriptions):
            check_user_text(description, f"the description of {joint!r}")
        ids = self.encode(IMAGE_PATCH_TOKEN + "\n" + group_round_text(group, descriptions, answer), add_bos=False)
        return ids[1:]

    def prompt_ids(self, name: str, description: str, num_patches: int) -> list[int]:
        return self.encode(prompt_text(name, description, num_patches))

    def char_confidence(self, ids: Sequence[int], step_confidence: Sequence[float]) -> np.ndarray:
        """Per character of ``decode(ids)``, the confidence of the token that wrote it
        (``step_confidence[t]`` for token t; tokens past its end get NaN): a multi-character
        token (``▁[`` inside a grouped answer) spreads its confidence over its characters."""
        out: list[float] = []
        for t in range(len(ids)):
            value = float(step_confidence[t]) if t < len(step_confidence) else math.nan
            out += [value] * (len(self.decode(ids[: t + 1])) - len(out))
        return np.asarray(out, np.float64)

    def digit_ids(self) -> list[int]:
        ids = []
        for d in "0123456789":
            tid = self._sp.piece_to_id(d)
            if tid == self._sp.unk_id() or self._sp.encode(d) not in ([tid], [self._space_id(), tid]):
                raise ProtocolError(f"digit {d!r} is not a single token in this tokenizer")
            ids.append(tid)
        return ids

    def _space_id(self) -> int:
        return self._sp.piece_to_id(SPIECE_UNDERLINE)


# --------------------------------------------------------------------------------------
# Answer grammar


@dataclass(frozen=True)
class AnswerGrammar:
    """The answer as a fixed token skeleton with free digit slots.

    ``slots[i]`` is the forced token id at answer position i, or -1 where a digit is free.
    ``number_spans`` are [start, end) answer positions of each "0.ddd" number.
    """

    dims: int
    slots: tuple[int, ...]
    number_spans: tuple[tuple[int, int], ...]
    digit_ids: tuple[int, ...]
    eos_id: int
    joints: int = 1  # grouped protocol: answers for this many joints, dims numbers each

    FREE = -1

    @property
    def free_positions(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s == self.FREE]

    def to_dict(self) -> dict:
        d = {
            "dims": self.dims,
            "slots": list(self.slots),
            "number_spans": [list(s) for s in self.number_spans],
            "digit_ids": list(self.digit_ids),
            "eos_id": self.eos_id,
        }
        if self.joints != 1:  # one-keypoint grammars keep the dict they always had
            d["joints"] = self.joints
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AnswerGrammar:
        return cls(
            dims=int(d["dims"]),
            slots=tuple(int(s) for s in d["slots"]),
            number_spans=tuple((int(a), int(b)) for a, b in d["number_spans"]),
            digit_ids=tuple(int(i) for i in d["digit_ids"]),
            eos_id=int(d["eos_id"]),
            joints=int(d.get("joints", 1)),
        )

    def digits_of(self, tokens: Sequence[int]) -> list[int] | None:
        """The free digits (0-9) of ``tokens`` if they are an answer of this grammar (its
        skeleton with a digit token in every free slot, EOS optional), else None."""
        tokens = [int(t) for t in tokens]
        if tokens and tokens[-1] == self.eos_id:
            tokens = tokens[:-1]
        if len(tokens) != len(self.slots):
            return None
        digits = []
        for tid, slot in zip(tokens, self.slots):
            if slot == self.FREE:
                if tid not in self.digit_ids:
                    return None
                digits.append(self.digit_ids.index(tid))
            elif tid != slot:
                return None
        return digits

    def fill(self, digits: Sequence[int]) -> list[int]:
        """Answer token ids with the free slots filled by digit values (0-9), EOS last."""
        out, it = [], iter(digits)
        for s in self.slots:
            out.append(self.digit_ids[next(it)] if s == self.FREE else s)
        return out + [self.eos_id]


def build_grammar(tokenizer: PromptTokenizer, dims: int) -> AnswerGrammar:
    """Derive the answer skeleton from the tokenizer itself, refusing tokenizers that do not
    split an answer into one token per character (the constrained decoder relies on it)."""
    if dims not in DECIMALS:
        raise ProtocolError(f"coordinate dims must be 2 or 3, got {dims}")
    digit_ids = tokenizer.digit_ids()
    # A probe answer with every digit distinct from "0" where a digit is free.
    probe_values = ["0." + "123456789"[:d] for d in DECIMALS[dims]]
    probe = "[" + ",".join(probe_values) + "]"
    head = tokenizer.round_ids("nose", "x")
    full = tokenizer.round_ids("nose", "x", answer=probe)
    if full[: len(head)] != head or full[-1] != tokenizer.spec.eos_id:
        raise ProtocolError("answer tokens do not extend the prompt tokens; unsupported tokenizer")
    answer = full[len(head) : -1]
    pieces = [tokenizer.piece(t) for t in answer]
    expected_chars = ["[", *list(probe[1:])]
    if len(answer) != len(expected_chars):
        raise ProtocolError(f"answer {probe!r} does not tokenise one character per token: {pieces}")
    slots: list[int] = []
    spans: list[tuple[int, int]] = []
    pos = 1
    for value in probe_values:
        spans.append((pos, pos + len(value)))
        pos += len(value) + 1
    free = {p for a, b in spans for p in range(a + 2, b)}
    for i, (tid, ch) in enumerate(zip(answer, expected_chars)):
        if i in free:
            if tid != digit_ids[int(ch)]:
                raise ProtocolError(f"digit {ch!r} in an answer is not the digit token: {pieces}")
            slots.append(AnswerGrammar.FREE)
        else:
            slots.append(int(tid))
    return AnswerGrammar(
        dims=dims,
        slots=tuple(slots),
        number_spans=tuple(spans),
        digit_ids=tuple(digit_ids),
        eos_id=tokenizer.spec.eos_id,
    )


def build_group_grammar(tokenizer: PromptTokenizer, dims: int, joints: int) -> AnswerGrammar:
    """The answer skeleton of a ``joints``-joint group (grouped protocol): ``joints`` copies of
    the one-keypoint skeleton, back to back. Refused (ProtocolError) unless the tokenizer
    writes a group answer as exactly the one-keypoint answers' tokens in a row (the space
    before each ``[`` is the ``▁`` of its ``▁[``), whatever the digits."""
    single = build_grammar(tokenizer, dims)
    if joints == 1:
        return single
    if joints < 1:
        raise ProtocolError(f"a group has at least one joint, got {joints}")
    free = len(single.free_positions)
    # probe digits that differ between joints, so a merge that depends on them would show
    digits = [[(j + 3 * k + 1) % 10 for k in range(free)] for j in range(joints)]
    values = [[float("0." + "".join(map(str, d[a:b]))) for a, b in _free_runs(single)] for d in digits]
    group = JointGroup("probe", tuple(f"j{j}" for j in range(joints)))
    descriptions = ["x"] * joints
    head = tokenizer.group_round_ids(group, descriptions)
    full = tokenizer.group_round_ids(group, descriptions, answer=format_group_answer(values))
    expected = [t for d in digits for t in single.fill(d)[:-1]] + [single.eos_id]
    if full[: len(head)] != head or full[len(head) :] != expected:
        pieces = [tokenizer.piece(t) for t in full[len(head) :]]
        raise ProtocolError(
            f"a {joints}-joint group answer does not tokenise as {joints} one-keypoint answers: {pieces}"
        )
    n = len(single.slots)
    return AnswerGrammar(
        dims=dims,
        slots=single.slots * joints,
        number_spans=tuple((a + j * n, b + j * n) for j in range(joints) for a, b in single.number_spans),
        digit_ids=single.digit_ids,
        eos_id=single.eos_id,
        joints=joints,
    )


def _free_runs(grammar: AnswerGrammar) -> list[tuple[int, int]]:
    """Per number, the [start, end) indices of its free digits among all free digits."""
    runs, k = [], 0
    for a, b in grammar.number_spans:
        count = sum(grammar.slots[p] == AnswerGrammar.FREE for p in range(a, b))
        runs.append((k, k + count))
        k += count
    return runs


# --------------------------------------------------------------------------------------
# Parsing and scores (official definition)


def max_softmax(logits: np.ndarray) -> np.ndarray:
    """Max over the full vocabulary of softmax(logits), along the last axis (float64)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return 1.0 / np.exp(x - m).sum(axis=-1)


@dataclass(frozen=True)
class ParsedAnswer:
    values: tuple[float, ...]  # normalised values; missing ones 0 (official behaviour)
    scores: tuple[float, ...]  # per value; missing ones 0
    numbers_found: int
    text: str

    @property
    def complete(self) -> bool:
        return self.numbers_found >= len(self.values)

    @property
    def score(self) -> float:
        """Keypoint score: mean of the per-number scores (official: (x_s + y_s) / 2)."""
        return float(np.mean(self.scores))

    def part(self, position: int, dims: int) -> ParsedAnswer:
        """Joint ``position`` of a group answer: its ``dims`` values and scores, the numbers
        found for it, and the whole group answer's text."""
        a, b = position * dims, (position + 1) * dims
        found = min(max(self.numbers_found - a, 0), dims)
        return ParsedAnswer(self.values[a:b], self.scores[a:b], found, self.text)


# Official 3D parse (utils/valid3d.py) matches ".ddd" and prepends "0".
_NUMBER_PATTERN_3D = re.compile(r"\.\d+")


def parse_answer(text: str, step_confidence: np.ndarray, dims: int) -> ParsedAnswer:
    """The official parse of a decoded answer (utils/valid2d.py / valid3d.py), quirks included.

    ``text`` is the decoded generated text; ``step_confidence[t]`` the max-softmax of
    generation step t, with the official drop of the last step already applied by the
    caller. A number's score is the mean confidence over the steps at its *character*
    position in the stripped text (found with ``str.find``, so a repeated number reuses the
    first position). Missing numbers keep value and score 0, as the official 2D code does
    (the official 3D code crashes on a partial answer; we keep 0 there too). The official
    3D code computes no score; ours applies the 2D definition to all three numbers.
    """
    text = text.strip()
    if dims == 2:
        found = NUMBER_PATTERN.findall(text)
        numbers = found
    else:
        found = _NUMBER_PATTERN_3D.findall(text)
        numbers = ["0" + m for m in found]
    values = [0.0] * dims
    scores = [0.0] * dims
    for k, number in enumerate(numbers[:dims]):
        values[k] = float(number)
        raw = found[k]
        pos = text.find(raw)
        if dims == 3 and pos > 0 and text[pos - 1] == "0":
            pos, raw = pos - 1, "0" + raw  # score the leading "0" too, as in 2D
        window = np.asarray(step_confidence[pos : pos + len(raw)], dtype=np.float64)
        scores[k] = float(window.mean()) if window.size else math.nan
    return ParsedAnswer(tuple(values), tuple(scores), len(found), text)


def parse_group_answer(text: str, char_confidence: np.ndarray, dims: int, joints: int) -> ParsedAnswer:
    """A group answer's ``joints * dims`` numbers (every ``0.<digits>`` in the text, in order),
    each scored as the official score is (the mean confidence over its characters), but at
    its own characters: ``char_confidence`` is per character of the stripped text
    (``PromptTokenizer.char_confidence``) and each number is looked for after the previous
    one (the official ``str.find`` of the one-keypoint parse would score a repeated number at
    its first occurrence). Missing numbers keep value and score 0, as the official parse."""
    stripped = text.strip()
    offset = len(text) - len(text.lstrip())
    count = dims * joints
    values, scores = [0.0] * count, [0.0] * count
    found = list(NUMBER_PATTERN.finditer(stripped))
    for k, m in enumerate(found[:count]):
        values[k] = float(m.group())
        window = np.asarray(char_confidence[offset + m.start() : offset + m.end()], dtype=np.float64)
        scores[k] = float(window.mean()) if window.size else math.nan
    return ParsedAnswer(tuple(values), tuple(scores), len(found), stripped)
