"""Run a GGUF in llama.cpp through llama-cpp-python: logits on token ids, greedy generation, pp/tg speed."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np

GGML_TYPE_F32 = 0  # KV cache type: F32 keys/values keep llama.cpp closest to the float32 reference


class LlamaCppError(RuntimeError):
    pass


_LOG: list[str] = []  # llama.cpp's recent log lines: the reason of a failed load, for our one-line error
_LOG_CALLBACK = None  # the ctypes callback, kept alive while llama.cpp holds it


def _llama_cpp():
    global _LOG_CALLBACK
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("running GGUF files needs llama-cpp-python: pip install 'paretoq-export[llamacpp]'") from exc
    if _LOG_CALLBACK is None:
        import ctypes

        # llama.cpp writes warnings ("n_ctx_seq > n_ctx_train") and load failures straight to stderr whatever
        # verbose says; keep them for error messages instead
        @llama_cpp.llama_log_callback
        def keep(level: int, text: bytes, user_data) -> None:
            _LOG.append(text.decode("utf-8", "replace").strip())
            del _LOG[:-20]

        _LOG_CALLBACK = keep
        llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    return llama_cpp


def _load_failure() -> str:
    reasons = [line for line in _LOG[-8:] if "error" in line.lower()]
    return reasons[-1] if reasons else ""


def tokenize_with_vocab(path: str | os.PathLike, text: str) -> list[int]:
    """The ids llama.cpp's tokenizer gives ``text`` from the GGUF's embedded vocabulary (no BOS, special tokens as
    text): what llama-cli feeds the model for a prompt."""
    llama_cpp = _llama_cpp()
    try:
        vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError as exc:
        raise LlamaCppError(f"llama.cpp could not load the vocabulary of {path}: {_load_failure() or exc}") from exc
    try:
        return [int(t) for t in vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)]
    finally:
        vocab.close()


class LlamaCppRunner:
    """One GGUF loaded in llama.cpp. ``logits_all`` keeps every position's logits (for validation);
    ``kv_f32`` stores the KV cache in F32 instead of F16."""

    def __init__(self, path: str | os.PathLike, n_threads: int = 2, n_ctx: int = 512, n_batch: int | None = None,
                 logits_all: bool = True, kv_f32: bool = True, seed: int = 0):
        llama_cpp = _llama_cpp()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        kv = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if kv_f32 else {}
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_batch or n_ctx, n_ubatch=n_batch or n_ctx,
                n_threads=n_threads, n_threads_batch=n_threads, logits_all=logits_all, verbose=False, seed=seed,
                **kv,
            )
        except ValueError as exc:
            raise LlamaCppError(f"llama.cpp could not load {path}: {_load_failure() or exc}") from exc
        self.path, self.n_threads, self.n_ctx, self.logits_all = path, n_threads, n_ctx, logits_all

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()

    def __enter__(self) -> "LlamaCppRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[T, vocab] float32 logits of one sequence evaluated from an empty context (no BOS added)."""
        if not self.logits_all:
            raise LlamaCppError("this runner was opened with logits_all=False")
        ids = [int(t) for t in token_ids]
        if len(ids) > self.n_ctx:
            raise LlamaCppError(f"{len(ids)} tokens exceed n_ctx {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32, copy=True)

    def generate(self, prompt_ids: Sequence[int], n: int) -> list[int]:
        """Greedy continuation of ``prompt_ids`` by ``n`` tokens."""
        self.llm.reset()
        self.llm.eval([int(t) for t in prompt_ids])
        out = []
        for _ in range(n):
            row = self.llm.scores[self.llm.n_tokens - 1] if self.logits_all else self.llm.scores[0]
            tok = int(np.argmax(row))
            out.append(tok)
            self.llm.eval([tok])
        return out

    def bench(self, pp: int = 128, tg: int = 64, repeats: int = 3, warmup: bool = True) -> dict:
        """Prompt processing (one batch of ``pp`` tokens) and generation (``tg`` single-token steps after it)
        in tokens/s, median of ``repeats``. Open the runner with logits_all=False for llama-bench-like numbers."""
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, self.n_vocab, pp).tolist()
        if pp + tg > self.n_ctx:
            raise LlamaCppError(f"pp + tg = {pp + tg} exceeds n_ctx {self.n_ctx}")
        if warmup:
            self.llm.reset()
            self.llm.eval(prompt[:16])
        pp_tps, tg_tps = [], []
        for _ in range(repeats):
            self.llm.reset()
            t0 = time.perf_counter()
            self.llm.eval(prompt)
            pp_tps.append(pp / (time.perf_counter() - t0))
            tok = prompt[-1]
            t0 = time.perf_counter()
            for _ in range(tg):
                self.llm.eval([tok])
            tg_tps.append(tg / (time.perf_counter() - t0))
        return {"pp": pp, "tg": tg, "threads": self.n_threads, "repeats": repeats,
                "pp_tps": statistics.median(pp_tps), "tg_tps": statistics.median(tg_tps)}
