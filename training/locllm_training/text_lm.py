"""A small causal LM that knows some English, for measuring what keypoint tuning makes it forget.

No pretrained causal LM ships inside any registry package we can install offline, so the
LM is pretrained here on real English text that ships with Python itself: the pydoc topic
pages (``pydoc_data.topics``, the Language Reference sections ``help()`` shows) and the
docstrings of the standard library's modules, classes and functions. Both are the Python
documentation, under the PSF License 2.0. The corpus is a pure function of the Python
version: documents in a fixed order, every ``holdout_every``-th one held out.
"""

from __future__ import annotations

import ast
import hashlib
import math
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

# stdlib folders without user-facing documentation (tests, GUI demos, vendored tools)
_SKIPPED_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
MIN_DOCSTRING_CHARS = 200  # shorter docstrings are mostly signatures and one-liners


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass
class Corpus:
    train: list[Document]
    heldout: list[Document]
    python: str
    sha256: str  # of all documents' names and texts, in order

    @property
    def facts(self) -> dict:
        chars = lambda docs: sum(len(d.text) for d in docs)  # noqa: E731
        return {
            "source": "Python documentation shipped with CPython: pydoc_data.topics + stdlib docstrings",
            "licence": "PSF License 2.0",
            "python": self.python,
            "sha256": self.sha256,
            "documents": {"train": len(self.train), "heldout": len(self.heldout)},
            "characters": {"train": chars(self.train), "heldout": chars(self.heldout)},
        }


def python_documentation() -> list[Document]:
    """The pydoc topics and the stdlib docstrings (>= MIN_DOCSTRING_CHARS), in a fixed order;
    a text met again (a docstring copied between modules) is kept once."""
    import pydoc_data.topics

    docs = [Document(f"topic:{k}", v.strip()) for k, v in sorted(pydoc_data.topics.topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if _SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately not parseable
        docs += _docstrings(tree, path.relative_to(root).as_posix())
    seen: set[str] = set()
    unique = []
    for d in docs:
        if d.text not in seen:
            seen.add(d.text)
            unique.append(d)
    return unique


def _docstrings(node: ast.AST, qualname: str) -> list[Document]:
    """Docstrings of ``node`` and of the classes/functions inside it (also those nested in
    ``if``/``try`` blocks), named ``file:Class.method``."""
    out = []
    text = ast.get_docstring(node) if isinstance(node, _DOCUMENTED) else None
    if text and len(text) >= MIN_DOCSTRING_CHARS:
        out.append(Document(qualname, text))
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DOCUMENTED):
            out += _docstrings(child, qualname + ("." if ":" in qualname else ":") + child.name)
        elif isinstance(child, ast.stmt):
            out += _docstrings(child, qualname)
    return out


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def load_corpus(holdout_every: int = 10) -> Corpus:
    docs = python_documentation()
    digest = hashlib.sha256()
    for d in docs:
        digest.update(d.name.encode() + b"\0" + d.text.encode() + b"\0")
    heldout = [d for i, d in enumerate(docs) if i % holdout_every == holdout_every - 1]
    train = [d for i, d in enumerate(docs) if i % holdout_every != holdout_every - 1]
    return Corpus(train, heldout, sys.version.split()[0], digest.hexdigest())


def token_blocks(tokenizer, docs: list[Document], length: int) -> torch.Tensor:
    """Documents as BOS text EOS, concatenated and cut into [N, length] blocks (the tail dropped)."""
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.text) + [tokenizer.spec.eos_id]
    n = len(ids) // length
    return torch.tensor(ids[: n * length]).view(n, length)


def llama_config(llm_fields: dict):
    from transformers import LlamaConfig

    from .presets import LLM_DEFAULTS

    return LlamaConfig(**{**LLM_DEFAULTS, **llm_fields})


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def pretrain(
    llm_fields: dict,
    blocks: torch.Tensor,
    output: Path,
    epochs: float,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    start: dict[str, torch.Tensor] | None = None,
):
    """A Llama (``llm_fields``: HF LlamaConfig fields), randomly initialised or from the
    ``start`` state dict, trained with the HF Trainer on ``blocks`` (next-token loss);
    returns (model, seconds)."""
    from transformers import LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    set_seed(seed)
    model = LlamaForCausalLM(llama_config(llm_fields))
    if start is not None:
        missing, unexpected = model.load_state_dict(start, strict=False)
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise ValueError(f"start weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    steps = math.ceil(len(blocks) * epochs / batch_size)
    args = TrainingArguments(
        output_dir=str(output / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        weight_decay=0.1,
        warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine",
        logging_steps=20,
        save_strategy="no",
        bf16=True,
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        seed=seed,
        dataloader_num_workers=0,
    )
    start = time.perf_counter()
    Trainer(model=model, args=args, train_dataset=_Blocks(blocks)).train()
    return model.eval(), time.perf_counter() - start


@torch.no_grad()
def perplexity(causal_lm, blocks: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over all predicted tokens of ``blocks`` (fp32)."""
    was_training = causal_lm.training
    causal_lm.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        logits = causal_lm(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(nll)
        count += ids[:, 1:].numel()
    causal_lm.train(was_training)
    return math.exp(total / count)
