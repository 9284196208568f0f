"""`llmctl eval --tasks`: lm-evaluation-harness on llmctl models, offline, equal to the harness's own
`--model hf` on the exported folder of the same checkpoint.

One tiny `llmctl pretrain` run (1 layer, 32 wide, context 64, a 320-token BPE) and a local
multiple-choice task built here from the shared TinyStories sample: a sentence, then its true
next sentence against three other sentences of the sample. Contexts are two sentences, so
context + continuation often passes 64 tokens and the left cut is exercised. The task's JSONL
goes through the `json` builder of datasets (cache in tmp), so nothing touches the Hub; the
CLI runs as a subprocess with HF_HUB_OFFLINE, HF_DATASETS_OFFLINE and a closed HF_ENDPOINT.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import PYTHON, shared_file  # noqa: E402
from llmctl.evaluate import evaluate_tokens  # noqa: E402
from llmctl.lm_eval_adapter import harness_model  # noqa: E402
from llmctl.loading import load_model  # noqa: E402
from small_runs import small_run_args  # noqa: E402

TASK = "story_next"
CLOSED = "http://127.0.0.1:9"  # the discard port: a Hub request would fail at once
CONTEXT = 64


def offline_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LLMCTL_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_ENDPOINT=CLOSED,
               HF_HOME=str(work / "hf_home"), LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1",
               TQDM_DISABLE="1")
    return env


def llmctl(work: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=work, env=offline_env(work), capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lmeval")


@pytest.fixture(scope="module")
def run_dir(work, shakespeare, small_tok) -> Path:
    result = llmctl(work, *small_run_args("tiny", shakespeare, small_tok, "--set", f"model.max_seq_len={CONTEXT}"))
    assert result.returncode == 0, result.stderr
    return work / "experiments" / "runs" / "tiny"


def sentences() -> list[str]:
    text = shared_file("tinystories/tinystories_sample.txt").read_text(encoding="utf-8")
    text = text.replace("<|endoftext|>", " ")
    return [s.strip() for s in re.split(r"(?<=[.!?”\"])\s+", text) if len(s.strip()) > 10]


@pytest.fixture(scope="module")
def task_dir(work, small_tok) -> Path:
    """story_next: YAML + JSONL; choices are sentences of at most 40 tokens (the harness's hf
    model refuses a continuation longer than the context)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(small_tok / "tokenizer.json"))
    sents = sentences()
    fits = [len(tok.encode(" " + s).ids) <= 40 for s in sents]
    rng = random.Random(0)
    folder = work / "tasks"
    folder.mkdir()
    docs = []
    for i in range(2, len(sents)):
        if not fits[i]:
            continue
        others = [s for j, s in enumerate(sents) if fits[j] and j != i]
        choices = [sents[i], *rng.sample(others, 3)]
        rng.shuffle(choices)
        docs.append({"context": f"{sents[i - 2]} {sents[i - 1]}", "choices": choices, "label": choices.index(sents[i])})
    assert len(docs) >= 30
    (folder / "story.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    (folder / "story.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'story.jsonl'}
  cache_dir: {work / 'datasets_cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def cli_results(work, run_dir, task_dir) -> list[dict]:
    """`llmctl eval --tasks` twice, offline, as a user runs it."""
    out = []
    for _ in range(2):
        result = llmctl(work, "eval", "--checkpoint", str(run_dir), "--tasks", TASK, "--include-path", str(task_dir),
                        "--device", "cpu", "--json")
        assert result.returncode == 0, result.stderr
        out.append(json.loads(result.stdout))
    return out


def test_task_scores_are_probabilities_and_deterministic(cli_results, run_dir):
    first, second = cli_results
    metrics = first["tasks"][TASK]["metrics"]
    assert set(metrics) == {"acc", "acc_norm"}
    for score in metrics.values():
        assert 0.0 <= score["value"] <= 1.0 and score["stderr"] is not None
    assert first["tasks"] == second["tasks"]
    saved = json.loads((run_dir / "eval_tasks.json").read_text())["tasks"][TASK]
    assert saved["metrics"] == metrics and saved["checkpoint"].endswith("_final.pt")


def test_runs_shows_the_task_scores(cli_results, work, run_dir):
    result = llmctl(work, "runs", str(run_dir.parent), "--json")
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["runs"]
    assert row["tasks"] == {TASK: {"metric": "acc_norm", "value": cli_results[0]["tasks"][TASK]["metrics"]["acc_norm"]["value"]}}
    table = llmctl(work, "runs", str(run_dir.parent))
    assert table.returncode == 0 and "tasks" in table.stdout and TASK in table.stdout


@pytest.fixture(scope="module")
def exported(work, run_dir) -> Path:
    out = work / "hf"
    result = llmctl(work, "export", "--checkpoint", str(run_dir), "--format", "hf", str(out))
    assert result.returncode == 0, result.stderr
    return out


PARITY = r'''
import json, sys
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
spec = json.load(open(sys.argv[1]))
if spec["model"] == "hf":
    model = "hf"
    args = {"pretrained": spec["folder"], "dtype": "float32"}
else:
    from llmctl.lm_eval_adapter import harness_model
    from llmctl.loading import load_model
    model, args = harness_model(load_model(spec["checkpoint"], device="cpu"), batch_size=4), None
out = simple_evaluate(model=model, model_args=args, device="cpu", batch_size=4, tasks=[spec["task"]],
                      task_manager=TaskManager(include_path=spec["include"]), log_samples=True, bootstrap_iters=100)
samples = sorted(out["samples"][spec["task"]], key=lambda s: s["doc_id"])
json.dump({"results": out["results"][spec["task"]],
           "loglikelihoods": [[r[0] for r in s["filtered_resps"]] for s in samples]}, open(spec["out"], "w"))
'''


def test_scores_equal_the_harness_hf_model_on_the_exported_folder(work, run_dir, exported, task_dir):
    """Same accuracies and the same log-likelihood of every choice (float32 on the CPU) as
    `lm_eval --model hf --model_args pretrained=<llmctl export --format hf folder>`."""
    script = work / "parity.py"
    script.write_text(PARITY)
    found = {}
    for model in ("hf", "llmctl"):
        spec = work / f"{model}.json"
        spec.write_text(json.dumps({"model": model, "folder": str(exported), "checkpoint": str(run_dir), "task": TASK,
                                    "include": str(task_dir), "out": str(work / f"{model}-out.json")}))
        result = subprocess.run([PYTHON, str(script), str(spec)], cwd=work, env=offline_env(work),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        found[model] = json.loads((work / f"{model}-out.json").read_text())
    hf, ours = found["hf"], found["llmctl"]
    for key in ("acc,none", "acc_norm,none"):
        assert ours["results"][key] == pytest.approx(hf["results"][key], abs=1e-9), key
    assert np.allclose(np.array(ours["loglikelihoods"]), np.array(hf["loglikelihoods"]), atol=1e-4, rtol=1e-5)


class Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_model(run_dir, device="cpu")


def test_rolling_loglikelihood_is_llmctl_evals_loss_on_the_same_tokens(loaded):
    """Disjoint windows, as `llmctl eval` scores (stride = context): the summed log-likelihood
    of a text (after end-of-text) is minus llmctl eval's loss_sum on that token stream."""
    lm = harness_model(loaded, batch_size=3)
    text = shared_file("tinystories/tinystories_sample.txt").read_text(encoding="utf-8").split("<|endoftext|>")[0]
    short = sentences()[0]
    ids = loaded.tokenizer.encode(text)
    assert len(ids) > 4 * CONTEXT  # several windows and a shorter last one
    rolled = lm.loglikelihood_rolling([Request(text), Request(short)])
    for got, doc in zip(rolled, (text, short)):
        stream = np.asarray([loaded.tokenizer.eos_id, *loaded.tokenizer.encode(doc)])
        ref = evaluate_tokens(loaded.model, stream, CONTEXT, 4, torch.device("cpu"))
        assert ref["tokens"] == len(stream) - 1
        assert got == pytest.approx(-ref["loss_sum"], rel=1e-5, abs=1e-4)


def test_loglikelihood_cuts_the_window_to_the_context_and_reports_greedy(loaded):
    lm = harness_model(loaded, batch_size=2)
    context = " ".join(sentences()[:6])
    (logprob, greedy), (short_logprob, _) = lm.loglikelihood([Request(context, " The end."), Request("", "Once")])
    ids = loaded.tokenizer.encode(context + " The end.")
    cont = len(ids) - len(loaded.tokenizer.encode(context))
    window = torch.tensor(ids[-(CONTEXT + 1):])
    with torch.no_grad():
        logprobs = torch.log_softmax(loaded.model(window[None, :-1])[0].float(), -1)
    picked = logprobs[-cont:].gather(1, window[-cont:, None])[:, 0]
    assert logprob == pytest.approx(float(picked.sum()), abs=1e-4)
    assert greedy == bool((logprobs[-cont:].argmax(-1) == window[-cont:]).all())
    assert short_logprob < 0


def test_generate_until_is_greedy_llmctl_generate_cut_at_the_stop_string(loaded):
    from llmctl.generate import complete

    lm = harness_model(loaded)
    prompt = "Once upon a time"
    full = complete(loaded, prompt, max_new_tokens=24, temperature=0).text
    (free,) = lm.generate_until([Request(prompt, {"until": [], "max_gen_toks": 24})])
    assert free == full
    stop = full.strip()[:2] if full.strip() else "e"
    (cut,) = lm.generate_until([Request(prompt, {"until": [stop], "max_gen_toks": 24, "do_sample": False})])
    assert cut == full[: full.find(stop)] if stop in full else cut == full


def test_an_unknown_task_is_one_line_naming_it_and_how_to_list_tasks(work, run_dir, task_dir):
    result = llmctl(work, "eval", "--checkpoint", str(run_dir), "--tasks", f"{TASK},hellaswagg",
                    "--include-path", str(task_dir))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hellaswagg" in lines[0] and "lm_eval ls tasks" in lines[0]
    assert TASK not in lines[0].split("unknown task(s):")[1].split(";")[0]


def test_without_the_harness_one_line_names_the_extra(work, run_dir):
    """lm_eval made unimportable in the child (a None entry in sys.modules raises ImportError)."""
    code = ("import sys; sys.modules['lm_eval'] = None; from llmctl.cli import main; "
            "sys.argv = ['llmctl', 'eval', '--checkpoint', sys.argv[1], '--tasks', 'hellaswag']; main()")
    result = subprocess.run([PYTHON, "-c", code, str(run_dir)], cwd=work, env=offline_env(work), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        'error: --tasks needs EleutherAI\'s lm-evaluation-harness (lm-eval), which is not installed; '
        'pip install "llmctl[eval]"']


def test_task_options_without_tasks_are_refused(work, run_dir):
    result = llmctl(work, "eval", "--checkpoint", str(run_dir), "--limit", "5")
    assert result.returncode == 2 and "--limit goes with --tasks" in result.stderr


def test_a_checkpoint_export_refuses_is_scored_too(work, shakespeare, small_tok, task_dir):
    """A copy-pointer model with counted n-grams: no transformers architecture holds it, so
    `export --format hf` refuses it, but the harness scores it through llmctl (the network
    alone, as llmctl eval's first row reports it)."""
    result = llmctl(work, *small_run_args("pointer", shakespeare, small_tok, "--set", f"model.max_seq_len={CONTEXT}",
                                          "--set", "model.copy_pointer=true", "--set", "model.ngram_order=2",
                                          "--set", "model.ngram_weight=0.1", "--set", "pretrain.max_steps=4"))
    assert result.returncode == 0, result.stderr
    run = work / "experiments" / "runs" / "pointer"
    refused = llmctl(work, "export", "--checkpoint", str(run), "--format", "hf", str(work / "pointer-hf"))
    assert refused.returncode != 0
    scored = llmctl(work, "eval", "--checkpoint", str(run), "--tasks", TASK, "--include-path", str(task_dir),
                    "--limit", "8", "--device", "cpu", "--json")
    assert scored.returncode == 0, scored.stderr
    for score in json.loads(scored.stdout)["tasks"][TASK]["metrics"].values():
        assert 0.0 <= score["value"] <= 1.0
    loaded = load_model(run, device="cpu")
    assert loaded.config.model.copy_pointer and loaded.counts is not None
    text = sentences()[3]
    (rolled,) = harness_model(loaded).loglikelihood_rolling([Request(text)])
    stream = np.asarray([loaded.tokenizer.eos_id, *loaded.tokenizer.encode(text)])
    assert rolled == pytest.approx(-evaluate_tokens(loaded.model, stream, CONTEXT, 4, torch.device("cpu"))["loss_sum"],
                                   rel=1e-5, abs=1e-4)


def test_a_builtin_task_offline_is_one_line_saying_why(work, run_dir):
    """hellaswag's data lives on the Hub: offline (and not cached) it cannot load; one line says so."""
    result = llmctl(work, "eval", "--checkpoint", str(run_dir), "--tasks", "hellaswag", "--limit", "2",
                    "--device", "cpu")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a task's data could not be fetched") and "--include-path" in last
