"""The text every validation runs on: by default the held-out documents of the packaged Wikipedia text (what
`qat --data wikipedia` never trains on, with its default fraction and seed), else a built-in paragraph.

Used by `validate`, by every exporter's --validate, by `pareto` and the quickstart, so that their numbers compare.
"""

from __future__ import annotations

from pathlib import Path

VALIDATE_MAX_PARAMS = 1_000_000_000  # exporters' --validate defaults on below this size
DEFAULT_TOKENS = 512

_FALLBACK_TEXT = (
    "The history of the region is long and complex. Early settlements grew along the river, where fertile soil "
    "supported farming and trade. Over the centuries, small villages became towns, and towns became cities with "
    "markets, schools and churches. In the nineteenth century the arrival of the railway changed the economy, "
    "bringing new industries and workers from across the country. Today the area is known for its universities, "
    "its museums and its parks, and millions of visitors come every year to see its old buildings and gardens. "
)


class ValidationTextError(ValueError):
    """No usable validation text (missing file, too short, no tokenizer): one line naming the fix."""


def validation_text(path: str | None = None) -> str:
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--text {path} not found: give a UTF-8 text file (or leave it out for held-out "
                                    "Wikipedia)")
        return Path(path).read_text(encoding="utf-8")
    try:
        from qat.data import load_documents, split_documents

        _, heldout = split_documents(load_documents(["wikipedia"]), 0.05, 0)
        return "\n\n".join(heldout)
    except Exception:  # noqa: BLE001 - packaged text optional here; fall back to a fixed paragraph
        return _FALLBACK_TEXT * 8


def validation_token_ids(ckpt, text: str | None = None, tokens: int = DEFAULT_TOKENS) -> list[int]:
    """The first ``tokens`` token ids of the validation text, with the checkpoint's tokenizer."""
    tokenizer = ckpt.load_tokenizer()
    if tokenizer is None:
        raise ValidationTextError("the checkpoint has no tokenizer files: re-create it with its tokenizer")
    ids = [int(t) for t in tokenizer(validation_text(text))["input_ids"][:tokens]]
    if len(ids) < 2:
        raise ValidationTextError(f"the validation text has {len(ids)} tokens: give a longer --text")
    return ids


def validate_by_default(ckpt) -> bool:
    """Exporters validate unless asked not to, below VALIDATE_MAX_PARAMS parameters (larger models take long)."""
    n_params = sum(int(q.codes.numel()) for q in ckpt.quantized.values()) + sum(
        int(t.numel()) for t in ckpt.tensors.values())
    return n_params < VALIDATE_MAX_PARAMS
