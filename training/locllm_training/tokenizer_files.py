"""Tokenizer files for our checkpoints: the LLaMA-layout SentencePiece model that ships in
``mistral-common`` (no hub download) plus the added ``<im_patch>`` token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from locllm_sdk.protocol import IMAGE_PATCH_TOKEN

MISTRAL_COMMON_VERSION = "1.13.1"
# sha256 of mistral-common 1.13.1's tokenizer.model.v1, which the bundled demo model ships too
SP_MODEL_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"


def mistral_common_sp_model() -> Path:
    """mistral-common's tokenizer.model.v1; where mistral-common is not installed (e.g. a GPU
    machine with only torch and transformers), the identical copy the bundled demo model ships."""
    try:
        import mistral_common
    except ImportError:
        from locllm_sdk.demo import bundled_model
        from locllm_sdk.manifest import sha256_file

        path = bundled_model("demo") / "tokenizer.model"
        if sha256_file(path) != SP_MODEL_SHA256:
            raise FileNotFoundError(f"{path} is not mistral-common's tokenizer.model.v1 (sha256 differs)") from None
        return path
    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: install mistral-common=={MISTRAL_COMMON_VERSION} (it ships the tokenizer)"
        )
    return path


def _added(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
    }


def write_tokenizer(output: str | Path, legacy: bool = False, sp_model: str | Path | None = None) -> Path:
    """Write tokenizer.model, tokenizer_config.json (Vicuna v1.5 style), added_tokens.json."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model or mistral_common_sp_model(), output / "tokenizer.model")
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": _added("<s>"),
        "eos_token": _added("</s>"),
        "unk_token": _added("<unk>"),
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": legacy,
        "model_max_length": 2048,
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(output / "tokenizer.model")).vocab_size()
    (output / "added_tokens.json").write_text(json.dumps({IMAGE_PATCH_TOKEN: vocab}) + "\n")
    (output / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}) + "\n"
    )
    return output
