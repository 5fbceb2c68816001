"""Our prompt ids against the checkpoint's own slow tokenizer (transformers 4.31's way)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from .errors import IM_PATCH, OfficialCheckpointError, PromptIdsMismatchError


def _token_content(value, default: str) -> str:
    if isinstance(value, dict):
        return str(value.get("content", default))
    return str(value) if value else default


def _slow_tokenizer(tokenizer_dir: Path):
    """transformers' slow LlamaTokenizer on the checkpoint's files, settings from its config."""
    import logging

    from transformers import LlamaTokenizer

    cfg_path = tokenizer_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    added_path = tokenizer_dir / "added_tokens.json"
    if not added_path.is_file():
        raise OfficialCheckpointError(f"{tokenizer_dir}: added_tokens.json is missing (it defines {IM_PATCH})")
    added = json.loads(added_path.read_text())
    if IM_PATCH not in added:
        raise OfficialCheckpointError(f"{added_path}: no {IM_PATCH} entry")
    tf_logger = logging.getLogger("transformers.models.llama.tokenization_llama")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)  # the "legacy behaviour" notice when legacy is unset
    try:
        slow = LlamaTokenizer(
            vocab_file=str(tokenizer_dir / "tokenizer.model"),
            legacy=cfg.get("legacy"),  # None -> legacy, as in 4.31
            add_bos_token=cfg.get("add_bos_token", True),
            add_eos_token=cfg.get("add_eos_token", False),
            unk_token=_token_content(cfg.get("unk_token"), "<unk>"),
            bos_token=_token_content(cfg.get("bos_token"), "<s>"),
            eos_token=_token_content(cfg.get("eos_token"), "</s>"),
            pad_token=None,
        )
    finally:
        tf_logger.setLevel(level)
    return slow, int(added[IM_PATCH])


def slow_tokenizer_ids(slow, im_patch_id: int, text: str) -> list[int]:
    """Ids of ``text`` as transformers 4.31's slow LlamaTokenizer gives them.

    4.31 splits the text on the added ``<im_patch>`` token and strips the whitespace on both
    sides of it (a token added as a plain string); the chunk opening the text goes through
    ``tokenize`` (which adds the ``▁`` prefix in non-legacy mode), later chunks through
    ``_tokenize`` (non-legacy: no dummy prefix; legacy: SentencePiece's own prefix).
    """
    for special in ("<s>", "</s>", "<unk>"):
        if special in text:
            raise OfficialCheckpointError(f"prompt text contains {special!r}; not emulated")
    pieces = text.split(IM_PATCH)
    chunks: list[str | None] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            chunks.append(None)  # the added token
            piece = piece.lstrip()
        if i < len(pieces) - 1:
            piece = piece.rstrip()
        chunks.append(piece)
    ids = [slow.bos_token_id] if slow.add_bos_token else []
    for i, chunk in enumerate(chunks):
        if chunk is None:
            ids.append(im_patch_id)
        elif chunk:
            tokens = slow.tokenize(chunk) if i == 0 else slow._tokenize(chunk)
            ids.extend(slow.convert_tokens_to_ids(tokens))
    return ids


def _official_prompt_text(name: str, description: str, num_patches: int) -> str:
    # utils/valid2d.py with conv_keypoint (roles Keypoint/Question/Answer, sep "\n"). A second
    # spelling of protocol.prompt_text on purpose: the independent side of this check.
    q = f"Where is the {name} of this person in this image? Please provide its coordinates."
    return "Image: " + IM_PATCH * num_patches + "\n" + f"Keypoint: {description}\nQuestion: {q}\nAnswer:"


def _mismatch(what: str, ours: list[int], ref: list[int], piece: Callable[[int], str]) -> str:
    pos = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), min(len(ours), len(ref)))
    lo, hi = max(0, pos - 3), pos + 4

    def show(ids):
        return " ".join(f"{t}:{piece(t)!r}" for t in ids[lo:hi])

    return (
        f"{what}: prompt ids differ from the checkpoint's slow LlamaTokenizer at position {pos} "
        f"(lengths {len(ours)} vs {len(ref)})\n  ours: ... {show(ours)}\n  slow: ... {show(ref)}"
    )


def verify_prompt_ids(tokenizer_dir: str | Path, num_patches: int, tokenizer=None, descriptions=None) -> int:
    """Check our prompt ids for every keypoint of the description library against the ids of
    the checkpoint's own slow tokenizer (``slow_tokenizer_ids``). ``tokenizer`` is the
    runtime's PromptTokenizer (default: built from ``tokenizer_dir``). Both the full prompt
    and the runtime's split (shared prefix + per-keypoint round) are checked. Returns the
    number of prompts checked; raises PromptIdsMismatchError on the first difference."""
    from locllm_sdk.descriptions import DescriptionLibrary
    from locllm_sdk.protocol import PromptTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    ours = tokenizer or PromptTokenizer.from_dir(tokenizer_dir)
    slow, im_patch_id = _slow_tokenizer(tokenizer_dir)
    if ours.spec.im_patch_id != im_patch_id:
        raise PromptIdsMismatchError(
            f"{tokenizer_dir}: <im_patch> id {ours.spec.im_patch_id} (ours) != {im_patch_id} (added_tokens.json)"
        )

    def piece(t: int) -> str:
        return IM_PATCH if t == im_patch_id else slow.convert_ids_to_tokens(int(t))

    library = descriptions if descriptions is not None else DescriptionLibrary.load().descriptions
    prefix = ours.prefix_ids(num_patches)
    checked = 0
    for name, description in library.items():
        ref = slow_tokenizer_ids(slow, im_patch_id, _official_prompt_text(name, description, num_patches))
        full = ours.prompt_ids(name, description, num_patches)
        if full != ref:
            raise PromptIdsMismatchError(_mismatch(f"keypoint {name!r}", full, ref, piece))
        split = prefix + ours.round_ids(name, description)
        if split != ref:
            raise PromptIdsMismatchError(_mismatch(f"keypoint {name!r} (prefix + round)", split, ref, piece))
        checked += 1
    return checked
