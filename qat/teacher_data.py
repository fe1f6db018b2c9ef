"""Training data without a dataset: token sequences sampled from the float model itself (LLM-QAT's data-free QAT).

Each sequence starts from a random vocabulary token (one of the tokenizer's ordinary tokens, never a special one),
takes its first ``greedy_tokens`` continuations greedily and samples the rest at ``temperature`` (top-k / top-p
optional), ``length`` tokens in all: one training block. Diversity comes from the random first token; the greedy
prefix keeps a rare first token from derailing the sample into noise (LLM-QAT, section 3.1).

Speed. ``model.generate`` is launch-bound at the batch sizes where sampling is cheap (SmolLM2-135M on an H200:
3.0k tokens/s at batch 256, 19k at 2048). Here one decode step is one call of the model on one token per sequence
against a static KV cache allocated once (transformers' StaticCache, reset between batches), and on CUDA that call
is compiled with ``torch.compile(mode="reduce-overhead")``: CUDA graphs replay the whole step, so its ~400 kernel
launches cost one. The teacher runs in bf16 on CUDA (a copy: the caller's float model is left as it is), fp32 and
eager on CPU. Sampling uses an exponential race (argmax of p / Exp(1), the Gumbel-max trick) with a seeded device
generator, so a seed gives the same tokens on the same device and batch size. One GPU: the current device.

Caching. ``teacher_blocks`` stores the result under the cache dir (``$PARETOQ_CACHE`` or
``~/.cache/paretoq-export``)/teacher, keyed by a hash of the model's weights fingerprint, the tokenizer, the seed,
temperature, top-k/top-p, length, count and greedy prefix: a rerun with the same settings loads the file, any
change writes a new one. Files are written atomically. Under torchrun only rank 0 samples; the other ranks wait
for its file (a shared file system is assumed; otherwise generate it first in one process).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from paretoq_export.canonical.atomic import atomic_file, write_text_atomic
from qat.corpora import cache_dir

FORMAT_VERSION = 1  # bump when the sampling changes so that stale files are not reused
DEFAULT_TOKENS = 1_000_000  # "teacher" without a count
_WAIT_SECONDS = 6 * 3600  # how long a non-zero rank waits for rank 0's file


@dataclass(frozen=True)
class SamplingConfig:
    """What decides the sampled tokens (all of it goes into the cache key)."""
    length: int  # tokens per sequence, the random first token included: one training block
    count: int  # sequences
    seed: int = 0
    temperature: float = 1.0  # 0: greedy throughout
    greedy_tokens: int = 3  # tokens after the random first one taken by argmax
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self) -> None:
        if self.length < 2 or self.count < 1:
            raise ValueError(f"teacher data needs length >= 2 and count >= 1, got {self.length} and {self.count}")
        if self.temperature < 0 or self.greedy_tokens < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("teacher sampling needs temperature >= 0, greedy_tokens >= 0, top_k >= 0 and "
                             f"0 < top_p <= 1, got {self}")


def parse_token_count(text: str) -> int:
    """'5M' -> 5_000_000; '250k', '1.5M', '2G' and plain integers too."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGbB]?)\s*", text)
    if not match:
        raise ValueError(f"token count {text!r} is not a number like 500000, 250k or 5M")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "b": 10**9}[match.group(2).lower()]
    tokens = int(float(match.group(1)) * scale)
    if tokens < 1:
        raise ValueError(f"token count {text!r} must be at least 1")
    return tokens


# -------------------------------------------------------------------------------------------- fingerprints

@torch.no_grad()
def model_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the weights: per tensor its name, shape, dtype, float64 sum and abs-sum and up to 4096
    evenly strided values. Reading every byte of a 1B model would take seconds; this takes milliseconds per
    tensor and changes with any real change of the weights (a fine-tune, another checkpoint, a dtype)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if flat.numel() == 0:
            continue
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        sums = torch.stack([flat.sum(dtype=torch.float64), flat.abs().sum(dtype=torch.float64)]).cpu()
        h.update(sample.numpy().tobytes())
        h.update(sums.numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, sorted(tokenizer.all_special_ids)]).encode()).hexdigest()


def seed_token_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    """The ids a sequence may start from: below the model's vocab size, not special, not added (chat markers and
    the like), and decoding to something other than whitespace."""
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [i for i in range(min(vocab_size, len(tokenizer))) if i not in excluded]
    texts = tokenizer.batch_decode([[i] for i in ids])
    ids = [i for i, text in zip(ids, texts) if text.strip()]
    if not ids:
        raise ValueError("the tokenizer has no ordinary tokens to start teacher samples from")
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------- sampling

def _static_cache(model: nn.Module, max_cache_len: int, batch_size: int, device: torch.device, dtype: torch.dtype):
    from transformers import StaticCache

    try:  # transformers >= 5: layers allocate themselves on the first update
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:  # 4.x
        return StaticCache(config=model.config, max_batch_size=batch_size, max_cache_len=max_cache_len,
                           device=device, dtype=dtype)


class TeacherSampler:
    """Batched sampling from a causal LM with a static KV cache and (on CUDA) a CUDA-graph-compiled decode step.

    ``sample(config)`` returns [count, length] int64 token ids on the CPU. The model is copied (bf16 on CUDA), so
    the caller's model keeps its dtype, device and mode. compile=None: on for CUDA, off (eager) elsewhere.
    """

    def __init__(self, model: nn.Module, tokenizer, batch_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                 compile: bool | None = None, compile_backend: str = "inductor") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.batch_size = batch_size or (1024 if cuda else 16)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.vocab_size = self.model.get_output_embeddings().weight.shape[0]
        self.seed_ids = seed_token_ids(tokenizer, self.vocab_size)
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5.2x
        self._pass_cache_position = "cache_position" in params  # transformers < 5.18 positions the cache with it
        self._cache, self._cache_shape = None, None
        self.compile = cuda if compile is None else compile
        self._decode = self._step
        self._graphs = self.compile and cuda
        if self.compile:
            mode = "reduce-overhead" if cuda else None  # reduce-overhead: CUDA graphs
            self._decode = torch.compile(self._step, mode=mode, backend=compile_backend, dynamic=False)

    def _step(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """One token per sequence at `position` ([1] int64 tensor) -> float32 next-token logits [B, V]."""
        kwargs = {self._cache_kwarg: self._cache, "use_cache": True,
                  "position_ids": position.view(1, 1).expand(ids.shape[0], 1)}
        if self._pass_cache_position:
            kwargs["cache_position"] = position
        return self.model(input_ids=ids, **kwargs).logits[:, -1].float()

    def _next_token(self, logits: torch.Tensor, greedy: bool, config: SamplingConfig,
                    generator: torch.Generator) -> torch.Tensor:
        if greedy or config.temperature == 0:
            return logits.argmax(-1)
        logits = logits / config.temperature
        if config.top_k:
            kth = logits.topk(min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if config.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= config.top_p  # keep the token that crosses top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        race = torch.empty_like(probs).exponential_(generator=generator)  # argmax p/E ~ Categorical(p)
        return (probs / race).argmax(-1)

    @torch.no_grad()
    def sample(self, config: SamplingConfig, progress: bool = True) -> torch.Tensor:
        batch, length = min(self.batch_size, config.count), config.length
        if self._cache is None or self._cache_shape != (batch, length):  # a new shape also means a new graph
            self._cache, self._cache_shape = _static_cache(self.model, length, batch, self.device, self.dtype), (
                batch, length)
        n_batches = math.ceil(config.count / batch)
        first_gen = torch.Generator().manual_seed(config.seed)
        out = torch.empty(n_batches * batch, length, dtype=torch.long)
        # fixed-shape inputs at offset 0 (the position filled in place: no host-to-device copy, which would sync)
        position = torch.zeros(1, dtype=torch.long, device=self.device)
        bar = tqdm(total=n_batches * batch * length, desc="sampling teacher data", unit="tok", unit_scale=True,
                   dynamic_ncols=True, disable=not progress)
        for b in range(n_batches):
            generator = torch.Generator(self.device).manual_seed(config.seed * 1_000_003 + b)
            seeds = self.seed_ids[torch.randint(len(self.seed_ids), (batch,), generator=first_gen)]
            tokens = torch.empty(batch, length, dtype=torch.long, device=self.device)
            current = seeds.view(batch, 1).to(self.device)
            tokens[:, 0] = current[:, 0]
            self._cache.reset()
            for pos in range(length - 1):
                position.fill_(pos)
                # the first step fills the (lazily allocated) cache eagerly; compiled steps then mutate it in place
                if pos == 0:
                    logits = self._step(current, position)
                else:
                    if self._graphs:
                        torch.compiler.cudagraph_mark_step_begin()  # the last replay's logits are consumed
                    logits = self._decode(current, position)
                current = self._next_token(logits, pos < config.greedy_tokens, config, generator).view(batch, 1)
                del logits  # a CUDA-graph output: the next replay overwrites it
                tokens[:, pos + 1] = current[:, 0]
                bar.update(batch)
            out[b * batch:(b + 1) * batch] = tokens.cpu()
            bar.update(batch)  # the seed tokens
        bar.close()
        return out[:config.count]


# ------------------------------------------------------------------------------------------ cached blocks

def cache_key(model_fp: str, tokenizer_fp: str, config: SamplingConfig) -> str:
    payload = {"version": FORMAT_VERSION, "model": model_fp, "tokenizer": tokenizer_fp, **asdict(config)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(key: str, config: SamplingConfig, directory: Path | None = None) -> Path:
    name = f"teacher-{config.count}x{config.length}-t{config.temperature:g}-seed{config.seed}-{key[:16]}.pt"
    return (directory or cache_dir() / "teacher") / name


def _wait_for(path: Path) -> None:
    start = time.time()
    print(f"rank {os.environ.get('RANK')}: waiting for rank 0 to write the teacher data {path}", flush=True)
    while not path.is_file():
        if time.time() - start > _WAIT_SECONDS:
            raise TimeoutError(f"{path} did not appear: generate the teacher data in one process first")
        time.sleep(5)


def teacher_blocks(model: nn.Module, tokenizer, config: SamplingConfig, *, batch_size: int | None = None,
                   device: torch.device | str | None = None, directory: Path | None = None,
                   progress: bool = True) -> torch.Tensor:
    """[count, length] int64 blocks sampled from `model`, loaded from the cache when this exact sample exists."""
    key = cache_key(model_fingerprint(model), tokenizer_fingerprint(tokenizer), config)
    path = cache_path(key, config, directory)
    if not path.is_file() and int(os.environ.get("RANK", "0")) != 0:
        _wait_for(path)
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            if progress:
                print(f"teacher data: {config.count} x {config.length} tokens from {path}", flush=True)
            return saved["blocks"].long()
    sampler = TeacherSampler(model, tokenizer, batch_size=batch_size, device=device)
    start = time.perf_counter()
    blocks = sampler.sample(config, progress=progress)
    seconds = time.perf_counter() - start
    meta = {"key": key, **asdict(config), "batch_size": sampler.batch_size, "device": str(sampler.device),
            "dtype": str(sampler.dtype), "seconds": round(seconds, 2),
            "tokens_per_s": round(blocks.numel() / max(seconds, 1e-9)), **diversity_stats(blocks, tokenizer)}
    with atomic_file(path) as tmp:
        torch.save({"key": key, "blocks": blocks.to(torch.int32), "meta": meta}, tmp)
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")
    del sampler
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the teacher copy and its KV cache: training needs the memory now
    return blocks


# -------------------------------------------------------------------------------------------- diversity

def diversity_stats(blocks: torch.Tensor, tokenizer=None, n: int = 4) -> dict:
    """How varied a sample is: distinct tokens / all tokens, distinct n-grams / all n-grams (over the whole
    sample: repeats within and across sequences both count), and with a tokenizer the fraction of sequences
    whose text is mostly not letters (code, numbers, symbols: < 50% of the non-space characters are letters)."""
    ids = blocks.long()
    grams = ids.unfold(1, n, 1).reshape(-1, n) if ids.shape[1] >= n else ids.new_empty(0, n)
    stats = {"distinct_token_ratio": round(ids.unique().numel() / ids.numel(), 6),
             f"distinct_{n}gram_ratio": round(grams.unique(dim=0).shape[0] / max(1, grams.shape[0]), 6)}
    if tokenizer is not None:
        texts = tokenizer.batch_decode(ids.tolist())
        letters = [sum(c.isalpha() for c in t) / max(1, sum(not c.isspace() for c in t)) for t in texts]
        stats["mostly_non_letters_fraction"] = round(sum(f < 0.5 for f in letters) / len(texts), 6)
    return stats
