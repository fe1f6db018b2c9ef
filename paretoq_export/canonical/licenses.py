"""Licenses of base models we can name without the hub: the checkpoint's recipe records one, and the model card
and GGUF's general.license fall back to it for checkpoints made before the recipe did."""

from __future__ import annotations

KNOWN_LICENSES = {"huggingfacetb/smollm2": "apache-2.0", "qwen/qwen3": "apache-2.0", "qwen/qwen2.5-0.5b": "apache-2.0",
                  "google/gemma-3": "gemma"}


def known_license(base_model: str | None) -> str | None:
    base = (base_model or "").lower()
    return next((v for k, v in KNOWN_LICENSES.items() if base.startswith(k)), None)
