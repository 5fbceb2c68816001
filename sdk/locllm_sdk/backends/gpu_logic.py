"""Pure logic of the NVIDIA path: no torch, no tensorrt, no CUDA bindings imported here.

Everything the TensorRT / TensorRT-LLM backend decides without a GPU lives here so it is
unit-tested on any machine:

* the answer regex for TensorRT-LLM's guided decoding (xgrammar), derived from
  :class:`~locllm_sdk.protocol.AnswerGrammar`, and the vocabulary handed to xgrammar;
* the prompt layout of a request: ``<im_patch>`` positions replaced by *fake* token ids
  ``vocab_size + k`` that index the request's prompt-embedding table, plus the
  ``input_token_extra_ids`` that make KV-cache block reuse tell two images apart;
* the build-machine record of an engine and the check that refuses to load it elsewhere;
* the probes ``backend="auto"`` uses (CUDA driver, TensorRT packages, ORT CUDA provider).

TensorRT-LLM facts this module relies on (TensorRT-LLM sources, tensorrt_llm/layers/embedding.py
``PromptTuningEmbedding`` and docs/source/advanced/kv-cache-reuse.md):
  - ids ``>= vocab_size`` are looked up in the request's prompt table at row ``id - vocab_size``;
  - "users should provide an extra id (uint64) for each input id. Extra ids for normal input ids
    (i.e. text token ids) should always be 0, while fake input ids should have extra ids which
    are larger than 0. Requests using same prompt embeddings should use same extra ids".
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable
from ..protocol import SPIECE_UNDERLINE, AnswerGrammar

# Spelling given to every token that must never appear in an answer (see guided_vocabulary).
BLOCKED_TOKEN_TEXT = "\u2400"  # SYMBOL FOR NULL: not a character of any answer
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


# --------------------------------------------------------------------------------------
# Answer regex and the guided-decoding vocabulary


def piece_text(piece: str) -> str:
    """The text a SentencePiece piece stands for: ``▁`` is a space, ``<0xNN>`` the byte NN
    (ASCII bytes only; other bytes keep their piece spelling, which no answer contains)."""
    m = _BYTE_PIECE.match(piece)
    if m:
        value = int(m.group(1), 16)
        return chr(value) if value < 0x80 else piece
    return piece.replace(SPIECE_UNDERLINE, " ")


def answer_regex(grammar: AnswerGrammar, text_of: Callable[[int], str]) -> str:
    """Regex over the *generated text* that accepts exactly the grammar's answers.

    ``text_of(token_id)`` spells a token (see :func:`piece_text`). The generated text of a 2D
    answer is ``" [0.ddd,0.ddd]"``: the leading space is the ``▁`` of the first token ``▁[``
    (generation starts right after ``Answer:``). Free digit slots become ``[0-9]``; forced
    tokens are escaped literally. No quantifiers are used (``[0-9]`` is repeated), so the
    regex needs nothing beyond literals and character classes from the regex engine. The
    end-of-sequence token is not part of the text: xgrammar allows the stop tokens once the
    regex is complete. A group grammar (grouped protocol, ``grammar.joints`` > 1) gives the
    regex of its whole answer, ``" [0.ddd,0.ddd] [0.ddd,0.ddd] ..."``, the same way.
    """
    parts = []
    for slot in grammar.slots:
        if slot == AnswerGrammar.FREE:
            parts.append("[0-9]")
        else:
            text = text_of(slot)
            if not text:
                raise ValueError(f"answer token {slot} has no text; cannot write a regex for it")
            parts.append(regex_literal(text))
    return "".join(parts)


_REGEX_SPECIAL = frozenset("\\^$.|?*+()[]{}")


def regex_literal(text: str) -> str:
    """``text`` as a regex literal escaping only the metacharacters: ``re.escape`` also escapes
    spaces (``\\ ``), an escape xgrammar's regex converter does not know (it warns and reads a
    space, by luck); a plain space means the same to every engine."""
    return "".join("\\" + ch if ch in _REGEX_SPECIAL else ch for ch in text)


def answer_token_ids(grammar: AnswerGrammar) -> set[int]:
    """Every token an answer may contain (forced skeleton tokens and the ten digits)."""
    return {s for s in grammar.slots if s != AnswerGrammar.FREE} | set(grammar.digit_ids)


def guided_vocabulary(vocab_size: int, grammar: AnswerGrammar, text_of: Callable[[int], str]) -> list[str]:
    """The ``encoded_vocab`` given to xgrammar (``GuidedDecodingConfig``), in id order.

    Only the answer's own tokens are spelled; every other token gets a spelling no answer
    contains. A regex over text alone would also accept other tokenisations of the same text
    (``"▁"`` + ``"["``, multi-digit tokens); with this vocabulary the only token sequence that
    spells an answer is the grammar's skeleton, so guided decoding picks exactly what the
    constrained decoder picks: the forced tokens and the argmax over the ten digits. The text
    of these tokens is given decoded (``▁`` -> space), which is xgrammar's RAW vocabulary type
    (no ``tokenizer_str`` is passed, so TensorRT-LLM's C++ guided decoder uses RAW).
    """
    allowed = answer_token_ids(grammar)
    vocab = [BLOCKED_TOKEN_TEXT] * vocab_size
    for tid in allowed:
        if not 0 <= tid < vocab_size:
            raise ValueError(f"answer token {tid} is outside the vocabulary (size {vocab_size})")
        vocab[tid] = text_of(tid)
    return vocab


def answer_from_tokens(grammar: AnswerGrammar, tokens: Sequence[int]) -> list[int] | None:
    """The free digits (0-9) of ``tokens`` if they are a grammar answer (EOS optional), else None."""
    return grammar.digits_of(tokens)


# --------------------------------------------------------------------------------------
# Prompt layout: fake ids, prompt table rows, extra ids


def fake_prompt_ids(prefix_ids: Sequence[int], im_patch_id: int, vocab_size: int) -> list[int]:
    """``prefix_ids`` with the k-th ``<im_patch>`` replaced by ``vocab_size + k``.

    Row k of the request's prompt table (the crop's k-th image token) is what TensorRT-LLM
    embeds there, so the table has exactly as many rows as the prefix has image tokens.
    """
    out, k = [], 0
    for tid in prefix_ids:
        if tid == im_patch_id:
            out.append(vocab_size + k)
            k += 1
        else:
            if tid >= vocab_size:
                raise ValueError(f"text token {tid} is outside the vocabulary (size {vocab_size})")
            out.append(int(tid))
    if k == 0:
        raise ValueError("the prefix has no <im_patch> token")
    return out


def image_key(image_tokens: np.ndarray) -> int:
    """A 63-bit, non-zero key of one crop's image tokens (its prompt table).

    Equal tables give equal keys; the key is the ``input_token_extra_ids`` value of every
    fake id of requests on that crop, so the prefix KV blocks are shared between the
    keypoints of a crop and never between two crops. (Blake2b of the float32 bytes and shape;
    a collision needs two different tables with the same 63-bit digest.)
    """
    arr = np.ascontiguousarray(image_tokens, dtype=np.float32)
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray(arr.shape, np.int64).tobytes())
    h.update(arr.tobytes())
    key = int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
    return key or 1


def extra_ids(input_ids: Sequence[int], vocab_size: int, key: int) -> list[int]:
    """``input_token_extra_ids``: ``key`` at fake ids (>= vocab_size), 0 at text ids."""
    if key <= 0:
        raise ValueError("the extra id of fake tokens must be > 0")
    return [key if int(t) >= vocab_size else 0 for t in input_ids]


@dataclass(frozen=True)
class RequestLayout:
    input_ids: list[int]
    extra_ids: list[int]
    table_rows: int


def request_layout(
    prefix_ids: Sequence[int], im_patch_id: int, vocab_size: int, suffix_ids: Sequence[int], key: int
) -> RequestLayout:
    """Input ids, extra ids and prompt-table rows of one keypoint request (or, with an empty
    suffix, of the request that primes a crop's prefix)."""
    prefix = fake_prompt_ids(prefix_ids, im_patch_id, vocab_size)
    ids = prefix + [int(t) for t in suffix_ids]
    if any(int(t) >= vocab_size for t in suffix_ids):
        raise ValueError("suffix holds an id >= vocab_size: only the prefix carries image tokens")
    return RequestLayout(ids, extra_ids(ids, vocab_size, key), sum(t >= vocab_size for t in prefix))


def shared_prefix_blocks(prefix_len: int, tokens_per_block: int) -> int:
    """KV blocks a keypoint request can reuse from its crop's primed prefix: only full blocks
    are shared (kv-cache-reuse.md: "Only full blocks can be shared by multiple requests")."""
    return prefix_len // tokens_per_block


# --------------------------------------------------------------------------------------
# Build machine record and compatibility


class IncompatibleEngine(BackendUnavailable):
    """A TensorRT / TensorRT-LLM engine built for another GPU or other library versions."""


BUILD_MACHINE_KEYS = ("gpu_name", "compute_capability", "cuda", "tensorrt", "tensorrt_llm")
# Keys whose difference makes the serialized engines unusable (TensorRT plans are specific
# to the GPU model/compute capability and to the exact TensorRT version; TensorRT-LLM engines
# to the TensorRT-LLM version they were built with).
STRICT_KEYS = ("gpu_name", "compute_capability", "tensorrt", "tensorrt_llm")


def compatibility_problems(built: dict, here: dict) -> list[str]:
    """Human-readable differences between the engine's build machine and this machine."""
    problems = []
    labels = {
        "gpu_name": "GPU",
        "compute_capability": "compute capability",
        "tensorrt": "TensorRT",
        "tensorrt_llm": "TensorRT-LLM",
    }
    for key in STRICT_KEYS:
        a, b = built.get(key), here.get(key)
        if a is None:
            problems.append(f"the engine records no {labels[key]} (rebuild it with export/build_engines.py)")
        elif a != b:
            problems.append(f"{labels[key]}: engine built with {a!r}, this machine has {b!r}")
    return problems


def check_compatibility(built: dict, here: dict) -> None:
    problems = compatibility_problems(built, here)
    if problems:
        raise IncompatibleEngine(
            "this TensorRT engine cannot run here: "
            + "; ".join(problems)
            + ". TensorRT plans and TensorRT-LLM engines are built for one GPU model and one library "
            "version: rebuild with `python export/build_engines.py --targets tensorrt,trtllm` on this "
            "machine, or use backend='onnxruntime-cuda' / 'onnxruntime'."
        )


# --------------------------------------------------------------------------------------
# Probes (faked in tests)


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    compute_capability: str  # "8.9"


def probe_cuda_devices() -> list[CudaDevice]:
    """CUDA devices seen by the driver (libcuda), without any Python CUDA package.

    Uses the CUDA driver API: cuInit, cuDeviceGetCount, cuDeviceGet, cuDeviceGetName,
    cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR=75 / MINOR=76). No driver, no device or any
    error -> an empty list.
    """
    names = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
    lib = None
    for n in names:
        try:
            lib = ctypes.CDLL(n)
            break
        except OSError:
            continue
    if lib is None:
        return []
    try:
        if lib.cuInit(0) != 0:
            return []
        count = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return []
        out = []
        for i in range(count.value):
            dev = ctypes.c_int(0)
            if lib.cuDeviceGet(ctypes.byref(dev), i) != 0:
                continue
            buf = ctypes.create_string_buffer(256)
            lib.cuDeviceGetName(buf, 256, dev)
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
            lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
            out.append(CudaDevice(i, buf.value.decode(errors="replace"), f"{major.value}.{minor.value}"))
        return out
    except (AttributeError, OSError):
        return []


def has_cuda_gpu() -> bool:
    return bool(probe_cuda_devices())


def has_tensorrt_runtime() -> bool:
    """Both TensorRT and TensorRT-LLM are importable (not imported here)."""
    return all(importlib.util.find_spec(m) is not None for m in ("tensorrt", "tensorrt_llm"))


def ort_cuda_provider_listed() -> bool:
    """onnxruntime lists the CUDA provider (onnxruntime-gpu). Listing is not running: the
    backend still checks ``session.get_providers()`` (see backends/onnxruntime.py)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def installed_version(*dists: str) -> str | None:
    from importlib import metadata

    for d in dists:
        try:
            return metadata.version(d)
        except metadata.PackageNotFoundError:
            continue
    return None


def this_machine(device: int = 0) -> dict:
    """This machine in the build-machine vocabulary, from probes only (no imports); fields it
    cannot tell are None."""
    devices = probe_cuda_devices()
    d = devices[device] if device < len(devices) else None
    return {
        "gpu_name": d.name if d else None,
        "compute_capability": d.compute_capability if d else None,
        "tensorrt": installed_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
        "tensorrt_llm": installed_version("tensorrt_llm", "tensorrt-llm"),
    }
