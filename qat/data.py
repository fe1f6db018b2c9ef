"""Training text: load documents, split them into train / held-out by document, pack token blocks.

Sources are plain text files (documents separated by blank lines), JSONL files with a ``text`` field, directories
written by ``datasets.Dataset.save_to_disk``, directories of such files, or a packaged corpus name
("wikipedia", "shakespeare": see :mod:`qat.corpora`).

The held-out split is made on documents, before tokenization, so no held-out text is ever trained on (a split on
token blocks would put the two halves of a document on both sides).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qat.corpora import resolve_data_source

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_FIX = "pass a .txt or .jsonl file, a directory of them, a datasets save_to_disk directory, or 'wikipedia'"
_TOKENIZE_CHUNK = 256  # documents per tokenizer call: batches run in parallel in fast tokenizers


def split_text(text: str) -> list[str]:
    """A text file's documents: blocks separated by one or more blank lines."""
    return [doc.strip() for doc in re.split(r"\n[ \t\r\f\v]*\n", text) if doc.strip()]


def _read_jsonl(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):  # a JSON array rather than JSON lines
        rows = json.loads(text)
        lines = [(i + 1, row) for i, row in enumerate(rows)]
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((number, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number} is not valid JSON ({e.msg}): one JSON object per line") from e
    docs = []
    for number, row in lines:
        if isinstance(row, str):
            docs.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            docs.append(row["text"])
        else:
            raise ValueError(f"{path}:{number} has no string 'text' field: each line must look like "
                             '{"text": "..."}')
    return [doc.strip() for doc in docs if doc.strip()]


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _read_saved_dataset(path: Path) -> list[str]:
    try:
        import datasets
    except ImportError as e:
        raise ValueError(f"{path} is a datasets save_to_disk directory, and datasets is not installed: "
                         "pip install datasets") from e
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        # Train on the train split only: the others are someone's held-out data. We hold out our own documents.
        split = "train" if "train" in data else sorted(data)[0]
        data = data[split]
    if "text" not in data.column_names:
        raise ValueError(f"{path} has no 'text' column (columns: {', '.join(data.column_names)})")
    return [doc.strip() for doc in data["text"] if isinstance(doc, str) and doc.strip()]


def _read_source(path: Path) -> list[str]:
    if path.is_dir():
        if _is_saved_dataset(path):
            return _read_saved_dataset(path)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no .txt/.jsonl files and is not a datasets save_to_disk directory: {_FIX}")
        return [doc for f in files for doc in _read_source(f)]
    if path.suffix in JSONL_SUFFIXES:
        return _read_jsonl(path)
    return split_text(path.read_text(encoding="utf-8", errors="replace"))


def load_documents(sources: list[str | Path] | str | Path) -> list[str]:
    """All documents of the sources, in order. Raises ValueError naming the source when one is missing or empty."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    if not sources:
        raise ValueError(f"no data sources given: {_FIX}")
    documents: list[str] = []
    for source in sources:
        path = resolve_data_source(source)
        if not path.exists():
            raise ValueError(f"data source {source} does not exist: {_FIX}")
        docs = _read_source(path)
        if not docs:
            raise ValueError(f"data source {source} holds no text: {_FIX}")
        documents.extend(docs)
    return documents


def split_documents(documents: list[str], heldout_fraction: float = 0.05,
                    seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train / held-out split of whole documents (each side keeps the original order)."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if heldout_fraction == 0:
        return list(documents), []
    if len(documents) < 2:
        raise ValueError(f"{len(documents)} document(s) cannot be split into train and held-out: separate "
                         "documents with blank lines, give more text, or set heldout_fraction=0")
    n_heldout = min(len(documents) - 1, max(1, round(len(documents) * heldout_fraction)))
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    heldout = set(order[:n_heldout])
    train_docs = [d for i, d in enumerate(documents) if i not in heldout]
    heldout_docs = [d for i, d in enumerate(documents) if i in heldout]
    return train_docs, heldout_docs


def tokenize_documents(tokenizer, documents: list[str], desc: str = "tokenizing") -> list[int]:
    """All documents' token ids concatenated, an EOS after each one (when the tokenizer has one).

    No BOS/EOS from the tokenizer call itself: a block cut from the middle of the stream should not start with BOS.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    chunks = range(0, len(documents), _TOKENIZE_CHUNK)
    for start in tqdm(chunks, desc=desc, unit="chunk", disable=len(documents) < 4 * _TOKENIZE_CHUNK):
        batch = tokenizer(documents[start:start + _TOKENIZE_CHUNK], add_special_tokens=False, verbose=False)
        for doc_ids in batch["input_ids"]:
            ids.extend(doc_ids)
            if eos is not None:
                ids.append(eos)
    return ids


def _blocks(ids: list[int], block_size: int, what: str) -> torch.Tensor:
    n = len(ids) // block_size
    if n == 0:
        raise ValueError(f"the {what} text is {len(ids)} tokens, less than one block of {block_size}: "
                         "give more text, a smaller block size, or a different heldout_fraction")
    return torch.tensor(ids[: n * block_size], dtype=torch.long).view(n, block_size)


def pack_blocks(tokenizer, documents: list[str], block_size: int, heldout_fraction: float = 0.05,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [N, block_size], held-out [M, block_size]) LongTensors; each split's remainder is dropped.

    With heldout_fraction=0 the held-out tensor is empty ([0, block_size]).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    train_docs, heldout_docs = split_documents(documents, heldout_fraction, seed)
    train = _blocks(tokenize_documents(tokenizer, train_docs, "tokenizing train"), block_size, "training")
    if not heldout_docs:
        return train, torch.empty(0, block_size, dtype=torch.long)
    heldout = _blocks(tokenize_documents(tokenizer, heldout_docs, "tokenizing held-out"), block_size, "held-out")
    return train, heldout


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["wikipedia"])
    block_size: int = 512
    heldout_fraction: float = 0.05
    seed: int = 0


def build_data(tokenizer, config: DataConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """load_documents + pack_blocks from a DataConfig."""
    documents = load_documents(config.sources)
    return pack_blocks(tokenizer, documents, config.block_size, config.heldout_fraction, config.seed)
