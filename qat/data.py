"""Training text: load documents, split them into train / held-out by document, pack token blocks.

Sources are plain text files (documents separated by blank lines), JSONL files with a ``text`` field, directories
written by ``datasets.Dataset.save_to_disk``, directories of such files, a packaged corpus name
("wikipedia", "shakespeare": see :mod:`qat.corpora`), or ``teacher`` / ``teacher:N`` (N tokens such as 5M; default
1M): training blocks sampled from the float model itself (LLM-QAT's data-free recipe, :mod:`qat.teacher_data`),
alone or mixed with text sources (``["teacher:5M", "wikipedia"]``: the blocks of both, shuffled together).

The held-out split is made on documents, before tokenization, so no held-out text is ever trained on (a split on
token blocks would put the two halves of a document on both sides). Held-out perplexity is always measured on real
text: with teacher data alone, on the held-out documents of ``DataConfig.heldout_source`` (default "wikipedia",
the same documents a ``wikipedia`` run holds out), none of which is trained on.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qat.corpora import resolve_data_source
from qat.teacher_data import DEFAULT_TOKENS, SamplingConfig, parse_token_count, teacher_blocks

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
    sources: list[str] = field(default_factory=lambda: ["wikipedia"])  # text sources and/or "teacher[:N]"
    block_size: int = 512
    heldout_fraction: float = 0.05
    seed: int = 0  # the held-out split and the teacher sample
    # teacher data (sources "teacher" / "teacher:N"; qat.teacher_data): each sample is one block_size block
    heldout_source: str = "wikipedia"  # real text for held-out perplexity when every source is the teacher
    teacher_temperature: float = 1.0  # LLM-QAT samples at 1 (0: greedy)
    teacher_greedy_tokens: int = 3  # tokens after the random first one picked greedily (LLM-QAT: 3-5)
    teacher_top_k: int = 0  # 0: off
    teacher_top_p: float = 1.0  # 1: off
    teacher_batch_size: int | None = None  # sequences sampled at once; None: 1024 on CUDA, 16 on CPU


def teacher_tokens(source: str | Path) -> int | None:
    """Tokens asked of the teacher by a source ("teacher": the default, "teacher:5M"), None for a text source.
    An existing file or directory of that name is a text source, as for the corpus names."""
    text = str(source)
    if not re.fullmatch(r"teacher(:.*)?", text, re.IGNORECASE) or Path(text).expanduser().exists():
        return None
    return parse_token_count(text.split(":", 1)[1]) if ":" in text else DEFAULT_TOKENS


def split_sources(sources: list[str | Path]) -> tuple[list[str | Path], int]:
    """(text sources, teacher tokens summed over the teacher sources)."""
    text, tokens = [], 0
    for source in sources:
        asked = teacher_tokens(source)
        if asked is None:
            text.append(source)
        else:
            tokens += asked
    return text, tokens


def build_heldout(tokenizer, config: DataConfig) -> torch.Tensor:
    """Only the held-out blocks of build_data (the same ones), without sampling any teacher data."""
    text_sources, _ = split_sources(config.sources)
    _, heldout_docs = split_documents(load_documents(text_sources or [config.heldout_source]),
                                      config.heldout_fraction, config.seed)
    if not heldout_docs:
        return torch.empty(0, config.block_size, dtype=torch.long)
    return _blocks(tokenize_documents(tokenizer, heldout_docs, "tokenizing held-out"), config.block_size, "held-out")


def build_data(tokenizer, config: DataConfig, model=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) blocks: load_documents + pack_blocks of the text sources, plus the teacher's blocks
    (sampled from ``model``, the float model, or loaded from the cache) when a source is "teacher[:N]"."""
    text_sources, asked = split_sources(config.sources)
    if not text_sources and not asked:
        raise ValueError(f"no data sources given: {_FIX}, or teacher[:N]")
    if text_sources:
        train, heldout = pack_blocks(tokenizer, load_documents(text_sources), config.block_size,
                                     config.heldout_fraction, config.seed)
    else:
        if config.block_size < 2:
            raise ValueError(f"block_size must be >= 2, got {config.block_size}")
        train, heldout = torch.empty(0, config.block_size, dtype=torch.long), build_heldout(tokenizer, config)
    if asked:
        if model is None:
            raise ValueError("teacher data is sampled from the float model: call build_data(tokenizer, config, "
                             "model=float_model) before the model is prepared for QAT")
        sampling = SamplingConfig(length=config.block_size, count=math.ceil(asked / config.block_size),
                                  seed=config.seed, temperature=config.teacher_temperature,
                                  greedy_tokens=config.teacher_greedy_tokens, top_k=config.teacher_top_k,
                                  top_p=config.teacher_top_p)
        sampled = teacher_blocks(model, tokenizer, sampling, batch_size=config.teacher_batch_size)
        if int(os.environ.get("RANK", "0")) == 0:
            where = " + ".join(map(str, text_sources)) if text_sources else f"{config.heldout_source} (held-out only)"
            print(f"training data: {len(sampled)} teacher blocks + {len(train)} text blocks of {config.block_size} "
                  f"tokens; held-out: {len(heldout)} blocks of {where}, never trained on", flush=True)
        train = torch.cat([train, sampled])
    return train, heldout
