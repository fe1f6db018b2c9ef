"""Run an exported decoder folder (model.onnx + genai_config.json) in onnxruntime: full-sequence logits, greedy
generation with or without the KV cache, prefill/decode tokens/s and peak RSS on N threads."""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Sequence

import numpy as np


class OnnxRuntimeError(RuntimeError):
    pass


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB. Linux: VmHWM of /proc/self/status, because
    getrusage's ru_maxrss survives exec and would report a parent's peak in a freshly started child."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


class OnnxRuntimeRunner:
    """One decoder folder loaded in onnxruntime (CPU). Names and shapes come from its genai_config.json."""

    def __init__(self, model_dir: str | os.PathLike, n_threads: int = 2, optimize: bool = True):
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        config_path = self.model_dir / "genai_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: not an exported ONNX decoder folder")
        decoder = json.loads(config_path.read_text())["model"]["decoder"]
        self.n_layers = int(decoder["num_hidden_layers"])
        self.n_kv_heads = int(decoder["num_key_value_heads"])
        self.head_size = int(decoder["head_size"])
        self.inputs, self.outputs = decoder["inputs"], decoder["outputs"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = n_threads
        so.inter_op_num_threads = 1
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(self.model_dir / decoder["filename"]), so,
                                            providers=["CPUExecutionProvider"])
        self.n_threads = n_threads
        self._past_names = [self.inputs[kind] % i for i in range(self.n_layers)
                            for kind in ("past_key_names", "past_value_names")]
        self._present_names = [self.outputs[kind] % i for i in range(self.n_layers)
                               for kind in ("present_key_names", "present_value_names")]
        self._output_names = [self.outputs["logits"], *self._present_names]
        self.n_vocab = int(self.session.get_outputs()[0].shape[-1])

    def empty_past(self, batch: int = 1) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_size)
        return [np.zeros(shape, dtype=np.float32) for _ in self._past_names]

    def forward(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
                attention_mask: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: ``input_ids`` [B, S] after ``past`` (present tensors of the previous step, or None).
        Returns logits [B, S, V] and the new present tensors. Positions continue from the past length."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_past(batch)
        past_len = past[0].shape[2]
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        position_ids = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq))
        feeds = {self.inputs["input_ids"]: input_ids, self.inputs["attention_mask"]: attention_mask,
                 self.inputs["position_ids"]: np.ascontiguousarray(position_ids)}
        feeds.update(zip(self._past_names, past))
        logits, *present = self.session.run(self._output_names, feeds)
        return logits, present

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """[T, V] float32 logits of one sequence from an empty cache (no BOS added)."""
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        return self.forward(ids)[0][0]

    def generate(self, prompt_ids: Sequence[int], n: int, use_cache: bool = True) -> list[int]:
        """Greedy continuation by ``n`` tokens; ``use_cache=False`` re-runs the whole sequence every step."""
        ids = [int(t) for t in prompt_ids]
        out: list[int] = []
        past = None
        step_ids = ids
        for _ in range(n):
            if use_cache:
                logits, past = self.forward(np.array([step_ids]), past)
            else:
                logits, _ = self.forward(np.array([ids + out]))
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            step_ids = [tok]
        return out

    def bench(self, pp: int = 128, tg: int = 64, repeats: int = 3, warmup: bool = True) -> dict:
        """Prefill (one ``pp``-token pass) and decode (``tg`` single-token steps with the KV cache after it) in
        tokens/s, median of ``repeats``; peak RSS is this process's (run one model per process to isolate it)."""
        prompt = np.random.default_rng(0).integers(0, self.n_vocab, (1, pp))
        if warmup:  # one short prefill and one cached step: kernels and allocations ready (any pp >= 1)
            head = max(1, min(16, pp - 1)) if pp > 1 else 1
            _, past = self.forward(prompt[:, :head])
            self.forward(prompt[:, -1:], past)
        pp_tps, tg_tps = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            logits, past = self.forward(prompt)
            pp_tps.append(pp / (time.perf_counter() - t0))
            tok = np.array([[int(np.argmax(logits[0, -1]))]])
            t0 = time.perf_counter()
            for _ in range(tg):
                logits, past = self.forward(tok, past)
            tg_tps.append(tg / (time.perf_counter() - t0))
        return {"pp": pp, "tg": tg, "threads": self.n_threads, "repeats": repeats,
                "pp_tps": statistics.median(pp_tps), "tg_tps": statistics.median(tg_tps),
                "peak_rss_mib": peak_rss_mib()}
