"""`llmctl eval --tasks`: EleutherAI's lm-evaluation-harness run on any model llmctl loads.

The harness (the optional `eval` extra, `pip install "llmctl[eval]"`) asks a model three
things; `LlmctlLM` answers them with the model, tokenizer and device of a `LoadedModel`, so
every llmctl checkpoint is scored — also those `llmctl export --format hf` refuses (copy
pointer, block-local attention) — and transformers folders too:

- loglikelihood(context, continuation): the harness encodes the pair (the whole text, then the
  context, the continuation being the difference; an empty context is the end-of-text id) and
  the two are scored as one window of the model's context: the last context_length + 1 tokens
  of context + continuation, the continuation's tokens as the targets, exactly as the
  harness's own `--model hf` cuts them. Requests are batched longest first, padded on the
  right (causal attention: padding after a token never changes it).
- loglikelihood_rolling(text): end-of-text, then the text, cut into the disjoint windows
  `llmctl eval` scores with its default stride (`llmctl.evaluate.scored_windows`), so the
  summed log-likelihood is minus `llmctl eval`'s loss_sum on that token stream. The harness's
  own models differ only past the context: their last window is a full one that scores just
  the remaining tokens (more context for those, a different number).
- generate_until(context, kwargs): `llmctl.generate.complete_ids`, greedy unless the task asks
  for sampling (do_sample with a temperature), stopping at the task's `until` strings, at
  end-of-text or after max_gen_toks new tokens.

A copy pointer (`model.copy_pointer`) is part of the network and is mixed in, as in its loss;
counted n-grams mixed in at inference (`model.ngram_order`, `model.cache_weight`) are left
out: the network alone is scored, the first row `llmctl eval` reports for such a checkpoint.

Results are saved in the checkpoint's run directory as `eval_tasks.json` (each task's latest
scores, written atomically) so `llmctl runs` can show them next to perplexity.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl.errors import ConfigError, LlmctlError

if TYPE_CHECKING:
    from llmctl.loading import LoadedModel

EXTRA_HINT = 'pip install "llmctl[eval]"'
SAMPLING_SEED = 1234  # generate_until with do_sample: the same text on every run


def require_harness() -> None:
    """One line naming the extra when lm-evaluation-harness is not installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(f"--tasks needs EleutherAI's lm-evaluation-harness (lm-eval), which is not "
                          f"installed; {EXTRA_HINT}") from None


def _lm_class() -> type:
    """LlmctlLM, built on the harness's TemplateLM at first use (the harness is optional)."""
    global _LM
    if _LM is not None:
        return _LM
    import torch
    import torch.nn.functional as F
    from lm_eval.api.model import TemplateLM

    from llmctl.evaluate import scored_windows
    from llmctl.runtime import autocast

    class LlmctlLM(TemplateLM):
        """The harness's LM interface on a LoadedModel (see the module docstring)."""

        def __init__(self, loaded: "LoadedModel", batch_size: int = 0):
            super().__init__()
            self.loaded = loaded
            self.batch_size = batch_size or loaded.eval_batch_size
            if self.batch_size < 1:
                raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")
            self._device = loaded.device

        # -- what the harness needs to know
        @property
        def eot_token_id(self) -> int:
            return self.loaded.tokenizer.eos_id

        @property
        def max_length(self) -> int:
            return self.loaded.context_length

        @property
        def tokenizer_name(self) -> str:
            return self.loaded.tokenizer.source.replace("/", "__")

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            return self.loaded.tokenizer.encode(string)  # llmctl's tokenizers add no special tokens

        def tok_decode(self, ids: list[int]) -> str:
            return self.loaded.tokenizer.decode(ids)

        # -- scoring
        def _log_probs(self, x: "torch.Tensor") -> "torch.Tensor":
            """(B, T) inputs -> (B, T, V) fp32 log-probabilities of the next token: the network's
            whole distribution, mixed with its copy pointer where it has one (as its loss is)."""
            model = self.loaded.model
            pointer = getattr(model, "pointer", None)
            if pointer is None:
                return F.log_softmax(model(x).float(), dim=-1)
            from llmctl.pointer import earlier_positions, offered_tokens

            h = model.hidden(x)  # (B, T, C)
            return pointer.mix(h, h, offered_tokens(x), earlier_positions(x.size(1), x.device), model.logits(h))

        @torch.no_grad()
        def _score(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
            """(sum of log-probabilities, every target the argmax) of each row: a window of
            tokens whose last n_scored are the targets (its inputs are all tokens but the last)."""
            device = self.loaded.device
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: little padding
            out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start: start + self.batch_size]
                width = max(len(rows[i][0]) for i in chunk) - 1
                x = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)
                for r, i in enumerate(chunk):
                    window = rows[i][0]
                    x[r, : len(window) - 1] = torch.tensor(window[:-1])
                with autocast(device, self.loaded.dtype):
                    logprobs = self._log_probs(x.to(device)).cpu()
                for r, i in enumerate(chunk):
                    window, n = rows[i]
                    n = min(n, len(window) - 1)
                    targets = torch.tensor(window[len(window) - n:])
                    scored = logprobs[r, len(window) - 1 - n: len(window) - 1]  # (n, V)
                    picked = scored.gather(1, targets[:, None])[:, 0]
                    greedy = bool((scored.argmax(-1) == targets).all())
                    out[i] = (float(picked.double().sum()), greedy)
            return out

        def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                                  disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
            rows = [((context + continuation)[-(self.max_length + 1):], len(continuation))
                    for _, context, continuation in requests]
            results = self._score(rows)
            for (pair, _, _), result in zip(requests, results):
                self.cache_hook.add_partial("loglikelihood", pair, result)
            return results

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            rows: list[tuple[list[int], int]] = []
            owner: list[int] = []
            for k, request in enumerate(requests):
                (text,) = request.args
                stream = np.asarray([self.prefix_token_id, *self.tok_encode(text)], dtype=np.int64)
                for window, n_scored in scored_windows(stream, self.max_length):
                    rows.append((window.tolist(), n_scored))
                    owner.append(k)
            totals = [0.0] * len(requests)
            for k, (logprob, _) in zip(owner, self._score(rows)):
                totals[k] += logprob
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
            return totals

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            from llmctl.generate import Sampling, complete_ids

            answers = []
            for request in requests:
                context, kwargs = request.args
                kwargs = dict(kwargs or {})
                until = kwargs.pop("until", None)
                until = [until] if isinstance(until, str) else list(until or [])
                temperature = float(kwargs.get("temperature", 0.0) or 0.0)
                if not kwargs.get("do_sample", temperature > 0):
                    temperature = 0.0
                params = Sampling(max_new_tokens=int(kwargs.get("max_gen_toks", 256)), temperature=temperature,
                                  top_k=int(kwargs.get("top_k", 0) or 0), top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                                  stop=tuple(s for s in until if s), seed=SAMPLING_SEED)
                ids = self.tok_encode(context) or [self.prefix_token_id]
                text = complete_ids(self.loaded, ids, params).text
                self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
                answers.append(text)
            return answers

    _LM = LlmctlLM
    return _LM


_LM: type | None = None


def harness_model(loaded: "LoadedModel", batch_size: int = 0) -> Any:
    """An lm_eval LM (TemplateLM) that scores with `loaded`; for simple_evaluate(model=...)."""
    require_harness()
    return _lm_class()(loaded, batch_size)


# --------------------------------------------------------------------------- running tasks

def _task_manager(include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).expanduser().is_dir():
        raise ConfigError(f"--include-path {include_path} is not a folder; pass the folder that holds "
                          f"your task YAML files")
    return TaskManager(include_path=str(Path(include_path).expanduser()) if include_path else None)


def check_tasks(tasks: list[str], include_path: str | None) -> tuple[Any, list[str]]:
    """(TaskManager, the names with glob patterns such as arc_* expanded), after every name
    was found (one line naming those that were not)."""
    require_harness()
    if not tasks:
        raise ConfigError("--tasks names no task; pass e.g. --tasks hellaswag,arc_easy")
    manager = _task_manager(include_path)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        where = f" or under --include-path {include_path}" if include_path else ""
        raise ConfigError(f"unknown task(s): {', '.join(unknown)}; no such task in lm-eval{where} — list "
                          f"them with `lm_eval ls tasks`, or define one in a YAML file and pass its "
                          f"folder with --include-path DIR")
    expanded = [name for t in tasks for name in ([t] if t in known else manager.match_tasks([t]))]
    return manager, list(dict.fromkeys(expanded))


def run_tasks(checkpoint: str, tasks: list[str], num_fewshot: int | None = None, limit: int | None = None,
              include_path: str | None = None, batch_size: int = 0, device: str = "auto",
              dtype: str = "float32", save: bool = True) -> dict[str, Any]:
    """`llmctl eval --tasks`: check the names, load the model, run the harness, save the scores."""
    from llmctl.loading import load_model

    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {num_fewshot} must be >= 0")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be >= 1 (examples per task)")
    if batch_size < 0:
        raise ConfigError(f"--batch-size {batch_size} must be >= 0 (0 = the run's eval batch size)")
    manager, tasks = check_tasks(tasks, include_path)  # a typo fails before the model loads
    loaded = load_model(checkpoint, device=device, dtype=dtype)
    return evaluate_tasks(loaded, tasks, manager, num_fewshot=num_fewshot, limit=limit,
                          batch_size=batch_size, save=save)


def evaluate_tasks(loaded: "LoadedModel", tasks: list[str], manager: Any = None, *, num_fewshot: int | None = None,
                   limit: int | None = None, batch_size: int = 0, save: bool = True) -> dict[str, Any]:
    import logging

    from lm_eval import simple_evaluate

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if manager is None:
        manager, tasks = check_tasks(tasks, None)
    try:
        output = simple_evaluate(model=harness_model(loaded, batch_size), tasks=list(tasks), num_fewshot=num_fewshot,
                                 limit=limit, task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                 random_seed=0, numpy_random_seed=1234, torch_random_seed=1234,
                                 fewshot_random_seed=1234)
    except ConnectionError as e:  # datasets' offline and unreachable-Hub errors derive from it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LlmctlError(f"a task's data could not be fetched ({first}); the harness's own tasks download "
                          f"their datasets from the Hugging Face Hub: connect once (they are cached), or "
                          f"define a task on local files and pass its folder with --include-path DIR") from None
    if output is None:
        raise LlmctlError("lm-eval returned no results")
    result = {"checkpoint": loaded.source, "path": str(loaded.path) if loaded.path else None,
              "step": loaded.step, "context": loaded.context_length,
              "dtype": str(loaded.dtype).removeprefix("torch."), "num_fewshot": num_fewshot, "limit": limit,
              "lm_eval_version": _harness_version(), "finished_at": _now(),
              "tasks": metric_rows(output.get("results", {}), output.get("n-shot", {}))}
    result["saved"] = str(save_results(result)) if save else None
    return result


def metric_rows(results: dict[str, dict[str, Any]], n_shot: dict[str, Any] | None = None
                ) -> dict[str, dict[str, Any]]:
    """{task: {"metrics": {metric: {"value", "stderr"}}, "n_shot"}} from the harness's results
    (keys "metric,filter" and "metric_stderr,filter"; the filter is dropped when it is "none")."""
    rows: dict[str, dict[str, Any]] = {}
    for task, values in results.items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in values.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            stderr = values.get(f"{metric}_stderr,{filt}")
            name = metric if filt == "none" else f"{metric} ({filt})"
            metrics[name] = {"value": float(value),
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr)
                             else None}
        rows[task] = {"metrics": metrics, "n_shot": (n_shot or {}).get(task)}
    return rows


def _harness_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:
        return None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def save_results(result: dict[str, Any]) -> Path | None:
    """Merge each task's latest scores into <run>/eval_tasks.json (atomically); None outside a run."""
    from llmctl.atomic import write_text_atomic
    from llmctl.runs import TASKS_FILE, is_run_dir, read_task_results

    if result.get("path") is None:
        return None

    folder = Path(result["path"]).parent
    if not is_run_dir(folder):
        return None
    path = folder / TASKS_FILE
    stored = read_task_results(folder)
    for task, row in result["tasks"].items():
        stored[task] = {**row, "checkpoint": Path(result["path"]).name, "step": result["step"],
                        "num_fewshot": result["num_fewshot"], "limit": result["limit"],
                        "finished_at": result["finished_at"], "lm_eval_version": result["lm_eval_version"]}
    write_text_atomic(path, json.dumps({"tasks": stored}, indent=1))
    return path
