"""The LocLLM prompt protocol: one module for training, export and runtime.

Everything that turns a keypoint request into token ids, and generated tokens back into
coordinates and scores, lives here, so the ids a model was trained on are the ids it is
served with. It reproduces the public LocLLM checkpoints (kennethwdk/LocLLM): the prompt

    "Image: " + "<im_patch>" * P + "\\n" + "Keypoint: {description}\\nQuestion: {question}\\nAnswer:"

tokenised like transformers 4.31's slow ``LlamaTokenizer``: BOS first, whitespace touching
``<im_patch>`` stripped, and (``legacy: false``) no ``▁`` prefix on text that follows an
added token. Answers are ``" [0.xxx,0.yyy]"`` (2D) or ``" [0.xxx,0.yyy,0.zzzzzz]"`` (3D).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ProtocolError, read_json

PROTOCOL_VERSION = "locllm-v1"
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


def depth_to_unit(depth_mm: float) -> float:
    return depth_mm / DEPTH_RANGE_MM + 0.5


def unit_to_depth(z: float) -> float:
    return (z - 0.5) * DEPTH_RANGE_MM


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

    def prompt_ids(self, name: str, description: str, num_patches: int) -> list[int]:
        return self.encode(prompt_text(name, description, num_patches))

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

    FREE = -1

    @property
    def free_positions(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s == self.FREE]

    def to_dict(self) -> dict:
        return {
            "dims": self.dims,
            "slots": list(self.slots),
            "number_spans": [list(s) for s in self.number_spans],
            "digit_ids": list(self.digit_ids),
            "eos_id": self.eos_id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> AnswerGrammar:
        return cls(
            dims=int(d["dims"]),
            slots=tuple(int(s) for s in d["slots"]),
            number_spans=tuple((int(a), int(b)) for a, b in d["number_spans"]),
            digit_ids=tuple(int(i) for i in d["digit_ids"]),
            eos_id=int(d["eos_id"]),
        )

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
