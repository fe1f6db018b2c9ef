"""Run a .pte in the ExecuTorch runtime (executorch.runtime): prefill + greedy decode with the KV cache, logits,
prefill/decode tokens/s, peak RSS, file size.

The program is the one formats/executorch.py writes: ``forward(tokens [1, T], input_pos [T]) -> logits [1, T, V]``
with the KV cache inside, plus the LLM runner's metadata methods. ``paretoq-export bench model.pte`` times it in a
fresh process of its own (paretoq_export.bench_worker), so the peak RSS is the runtime's own.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

METADATA = ("get_max_seq_len", "get_max_context_len", "get_vocab_size", "get_bos_id", "get_eos_ids", "use_kv_cache",
            "enable_dynamic_shape")


class ExecuTorchRunnerError(RuntimeError):
    pass


def set_threads(n_threads: int) -> None:
    """Size of the runtime's threadpool (XNNPACK's workers), process-wide."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(int(n_threads))


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not getrusage's ru_maxrss: a child started by a big parent
    inherits the parent's ru_maxrss across fork+exec, VmHWM starts fresh with the new program."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class ExecuTorchRunner:
    """One .pte loaded in the ExecuTorch runtime; ``threads`` sizes the (process-wide) threadpool."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f".pte file {path} not found")
        # kernels the program may call outside XNNPACK: llama::update_cache / custom_sdpa (KV cache, attention) and
        # quantized_decomposed::embedding_* (quantized embedding tables)
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime

        if threads:
            set_threads(threads)
        try:
            self.program = Runtime.get().load_program(path)
            self.method = self.program.load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise ExecuTorchRunnerError(f"ExecuTorch could not load {path}: {exc}") from exc
        self.path = path
        self.metadata = {name: self._constant(name) for name in METADATA if name in self.program.method_names}
        if not self.metadata.get("use_kv_cache"):
            raise ExecuTorchRunnerError(f"{path} has no KV cache (use_kv_cache is not true)")
        self.max_seq_len = int(self.metadata["get_max_seq_len"])
        self.vocab_size = int(self.metadata["get_vocab_size"])

    def _constant(self, name: str):
        out = self.program.load_method(name).execute([])
        values = [v.item() if isinstance(v, torch.Tensor) else v for v in out]
        return values if name == "get_eos_ids" else values[0]

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def forward(self, tokens: Sequence[int], start: int) -> np.ndarray:
        """Logits [T, V] of ``tokens`` at cache positions start .. start+T-1 (the cache keeps them)."""
        ids = torch.tensor([list(tokens)], dtype=torch.long)
        if start + ids.shape[1] > self.max_seq_len or ids.shape[1] >= self.max_seq_len:
            raise ExecuTorchRunnerError(f"positions up to {start + ids.shape[1]} exceed max_seq_len {self.max_seq_len}"
                                        " (re-export with a larger --max-seq-len)")
        pos = torch.arange(start, start + ids.shape[1], dtype=torch.long)
        return self.method.execute([ids, pos])[0][0].numpy()

    def logits(self, token_ids: Sequence[int], chunk: int | None = None) -> np.ndarray:
        """[T, V] float32 logits of one sequence from position 0, prefilled in chunks of ``chunk`` tokens
        (default: as many as one call takes) -- each chunk reads the KV cache the previous ones wrote."""
        ids = [int(t) for t in token_ids]
        chunk = chunk or self.max_seq_len - 1
        parts = [self.forward(ids[i:i + chunk], i) for i in range(0, len(ids), chunk)]
        return np.concatenate(parts, axis=0)

    def generate(self, prompt_ids: Sequence[int], n: int, stop: Sequence[int] = ()) -> list[int]:
        """Greedy continuation: one prefill of the prompt, then ``n`` single-token decode steps."""
        prompt = [int(t) for t in prompt_ids]
        row = self.logits(prompt)[-1]
        out: list[int] = []
        for pos in range(len(prompt), len(prompt) + n):
            tok = int(np.argmax(row))
            out.append(tok)
            if tok in stop or pos + 1 >= self.max_seq_len:
                break
            row = self.forward([tok], pos)[-1]
        return out

    def bench(self, pp: int = 128, tg: int = 64, repeats: int = 3, warmup: bool = True) -> dict:
        """Prefill (one call of ``pp`` tokens) and decode (``tg`` single-token steps after it) tokens/s, median
        of ``repeats``."""
        if pp + tg > self.max_seq_len:
            raise ExecuTorchRunnerError(f"pp + tg = {pp + tg} exceeds max_seq_len {self.max_seq_len}")
        prompt = np.random.default_rng(0).integers(0, self.vocab_size, pp).tolist()
        if warmup:
            self.forward(prompt[:16], 0)
            self.forward(prompt[:1], 16)
        pp_tps, tg_tps = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.forward(prompt, 0)
            pp_tps.append(pp / (time.perf_counter() - t0))
            tok = prompt[-1]
            t0 = time.perf_counter()
            for pos in range(pp, pp + tg):
                self.forward([tok], pos)
            tg_tps.append(tg / (time.perf_counter() - t0))
        return {"pp": pp, "tg": tg, "repeats": repeats, "pp_tps": statistics.median(pp_tps),
                "tg_tps": statistics.median(tg_tps)}
