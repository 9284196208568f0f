"""The bad-input matrix: every row is a mistake a user makes, and what llmctl must do about it.

Each row runs the real CLI (in-process with `typer.testing.CliRunner`; a few rows as real
subprocesses) in a fresh folder holding the user's files, and asserts:
- the exit code (2 for usage and config, 1 at run time),
- exactly one `error: ...` line on stderr, the last one, containing the row's fragment,
- no traceback and no unhandled exception,
- not one of the user's files created, changed or deleted (a snapshot of the folder's
  tree — paths, bytes, mtimes — before and after; the token cache lives elsewhere).

To add a case, append a `Bad(...)` row to `ROWS`: `args` is the command line after
`llmctl`, with `{placeholders}` for the fixture files listed in `Files`; `setup` names the
extra user files a row needs (see `SETUPS`). `pretrain(...)` builds a complete, valid
pretrain command line (a tiny model on a small text file) for a row to spoil with one
more `--set`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import PYTHON
from llmctl.cli import app
from small_runs import build_small_tokenizer

CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Bad:
    id: str
    args: tuple[str, ...]  # after `llmctl`; {placeholders} are filled from Files
    code: int  # expected exit code
    says: str  # the one error line must contain this
    setup: tuple[str, ...] = ()  # names in SETUPS: extra user files to create first
    env: tuple[tuple[str, str], ...] = ()
    subprocess: bool = False  # run as `python -m llmctl ...` instead of in-process
    skip: str = ""  # a reason to skip on this machine


def pretrain(*extra: str, run: str = "bad") -> tuple[str, ...]:
    """A valid pretrain command for a 1-layer, 32-wide model on {text} with the small tokenizer."""
    sets = ["data.datasets=[\"text:book.txt\"]", "data.tokenizer={tok}", "model.d_model=32", "model.n_layers=1",
            "model.max_seq_len=32", "pretrain.batch_size=4", "pretrain.micro_batch_size=2",
            "pretrain.max_steps=5", "pretrain.eval_every=4", "pretrain.save_every=4", "run.device=cpu",
            "eval.max_tokens=128"]
    return ("pretrain", "--preset", "tiny", "--run-name", run, *[a for s in sets for a in ("--set", s)], *extra)


def s(*items: str) -> tuple[str, ...]:
    """--set for each item."""
    return tuple(a for item in items for a in ("--set", item))


def resume(*extra: str) -> tuple[str, ...]:
    """Resume the trained run "good" (5 steps: a step-4 and a final checkpoint) that `run` copies in."""
    return pretrain("--resume", *extra, run="good")


ROWS: list[Bad] = [
    # ---- config keys and --set syntax
    Bad("set-unknown-section", pretrain(*s("foo.bar=1")), 2, "unknown config section 'foo'"),
    Bad("set-unknown-key", pretrain(*s("model.d_modle=32")), 2, "did you mean 'model.d_model'?", subprocess=True),
    Bad("set-no-equals", pretrain("--set", "pretrain.lr"), 2, "is not of the form section.key=value"),
    Bad("set-no-section", pretrain(*s("lr=0.1")), 2, "must be section.key"),
    Bad("set-too-deep", pretrain(*s("pretrain.lr.max=1")), 2, "must be section.key"),
    # ---- types
    Bad("type-number-as-text", pretrain(*s("pretrain.lr=fast")), 2, "pretrain.lr expects a number, got 'fast'"),
    Bad("type-float-for-int", pretrain(*s("pretrain.max_steps=1.5")), 2, "pretrain.max_steps expects an integer"),
    Bad("type-text-for-bool", pretrain(*s("run.compile=yes")), 2, "run.compile expects a boolean"),
    Bad("type-bool-for-int", pretrain(*s("model.n_layers=true")), 2, "model.n_layers expects an integer"),
    Bad("type-text-for-list", pretrain(*s("data.datasets=text:a.txt")), 2, "data.datasets expects a list of strings"),
    Bad("type-list-item", pretrain(*s('pretrain.betas=[0.9, "x"]')), 2, "pretrain.betas[1] expects a number"),
    # ---- ranges and consistency
    Bad("range-lr-zero", pretrain(*s("pretrain.lr=0")), 2, "pretrain.lr must be > 0"),
    Bad("range-lr-negative", pretrain(*s("pretrain.lr=-1e-3")), 2, "pretrain.lr must be > 0"),
    Bad("range-batch-zero", pretrain(*s("pretrain.batch_size=0")), 2, "pretrain.batch_size must be >= 1"),
    Bad("range-batch-not-divisible", pretrain(*s("pretrain.batch_size=10", "pretrain.micro_batch_size=4")), 2,
        "pretrain.batch_size (10) must be divisible by pretrain.micro_batch_size (4)"),
    Bad("range-max-steps-zero", pretrain(*s("pretrain.max_steps=0")), 2, "pretrain.max_steps must be >= 1"),
    Bad("range-heads-not-dividing", pretrain(*s("model.d_model=30")), 2, "model.d_model (30) must be divisible by model.n_heads"),
    Bad("range-odd-head-size", pretrain(*s("model.d_model=12")), 2, "must be even for RoPE"),
    Bad("range-kv-heads", pretrain(*s("model.n_kv_heads=3")), 2, "divisible by model.n_kv_heads (3)"),
    Bad("range-validation-fraction", pretrain(*s("data.validation_fraction=0.7")), 2, "data.validation_fraction must be in (0, 0.5)"),
    Bad("range-dtype", pretrain(*s("run.dtype=float8")), 2, "run.dtype must be one of"),
    Bad("range-device", pretrain(*s("run.device=tpu")), 2, "run.device must be auto, cpu"),
    Bad("range-log-every", pretrain(*s("run.log_every=0")), 2, "run.log_every must be >= 1"),
    Bad("range-keep-last", pretrain(*s("pretrain.keep_last=-1")), 2, "pretrain.keep_last must be >= 0"),
    Bad("range-max-time-no-unit", pretrain(*s("pretrain.max_time=10")), 2, "pretrain.max_time expects a string"),
    Bad("range-max-time-words", pretrain(*s("pretrain.max_time=ten")), 2,
        "pretrain.max_time must be a duration like \"90s\", \"10m\""),
    Bad("range-max-time-zero", pretrain(*s('pretrain.max_time="0m"')), 2, "got '0m'"),
    Bad("range-max-time-unit", pretrain(*s('pretrain.max_time="3d"')), 2, "pretrain.max_time must be a duration"),
    Bad("range-lr-schedule", pretrain(*s("pretrain.lr_schedule=linear")), 2, "one of constant, cosine, wsd"),
    Bad("range-decay-fraction", pretrain(*s("pretrain.decay_fraction=0")), 2, "pretrain.decay_fraction must be in (0, 1]"),
    Bad("range-min-lr-ratio", pretrain(*s("pretrain.min_lr_ratio=2")), 2, "pretrain.min_lr_ratio must be in [0, 1]"),
    Bad("range-betas-length", pretrain(*s("pretrain.betas=[0.9]")), 2, "pretrain.betas must be two numbers"),
    Bad("range-eval-max-tokens", pretrain(*s("eval.max_tokens=-5")), 2, "eval.max_tokens must be >= 0"),
    Bad("run-name-with-slash", pretrain("--run-name", "a/b"), 2, "run.name must be a plain directory name"),
    Bad("vocab-smaller-than-tokenizer", pretrain(*s("model.vocab_size=100")), 2, "smaller than the tokenizer's vocabulary"),
    Bad("device-cuda-without-gpu", pretrain(*s("run.device=cuda")), 2, "no CUDA GPU is available",
        skip="a CUDA GPU is present" if CUDA else ""),
    Bad("fp16-on-cpu", pretrain(*s("run.dtype=float16")), 2, "float16 needs a CUDA GPU",
        skip="a CUDA GPU is present" if CUDA else ""),
    # ---- presets
    Bad("preset-unknown", ("pretrain", "--preset", "nosuch"), 2, "unknown preset 'nosuch'"),
    Bad("preset-typo", ("pretrain", "--preset", "tiyn"), 2, "did you mean 'tiny'?"),
    Bad("preset-missing-file", ("pretrain", "--preset", "/no/such/preset.toml"), 2, "preset file not found",
        subprocess=True),
    Bad("preset-invalid-toml", pretrain("--preset", "{user}/broken.toml"), 2, "is not valid TOML", setup=("broken_preset",)),
    Bad("preset-unknown-key", pretrain("--preset", "{user}/typo.toml"), 2, "unknown config key 'model.widht'",
        setup=("typo_preset",)),
    Bad("preset-section-not-table", pretrain("--preset", "{user}/flat.toml"), 2, "'model' in", setup=("flat_preset",)),
    Bad("preset-wrong-type", pretrain("--preset", "{user}/typed.toml"), 2, "pretrain.lr expects a number",
        setup=("typed_preset",)),
    # ---- data specs and files
    Bad("data-empty-list", pretrain(*s("data.datasets=[]")), 2, "data.datasets is empty"),
    Bad("data-missing-file", pretrain(*s('data.datasets=["text:/no/such/file.txt"]')), 2, "/no/such/file.txt is not a file"),
    Bad("data-glob-matches-nothing", pretrain(*s('data.datasets=["text:{user}/none*.txt"]')), 2, "matches no files"),
    Bad("data-empty-spec", pretrain(*s('data.datasets=[""]')), 2, "empty data spec"),
    Bad("data-unknown-source", pretrain(*s('data.datasets=["wikitext-3"]')), 2, "unknown data source 'wikitext-3'"),
    Bad("data-hf-without-name", pretrain(*s('data.datasets=["hf:"]')), 2, "names no dataset"),
    Bad("data-text-without-path", pretrain(*s('data.datasets=["text:"]')), 2, "names no files"),
    Bad("data-cap-zero", pretrain(*s('data.datasets=["text:{text}:0"]')), 2, "must be a positive number"),
    Bad("data-folder-not-file", pretrain(*s('data.datasets=["text:{user}"]')), 2, "is a folder; write text:"),
    Bad("data-empty-file", pretrain(*s('data.datasets=["text:{user}/empty.txt"]')), 1, "empty.txt",
        setup=("empty_text",)),
    Bad("data-not-utf8", pretrain(*s('data.datasets=["text:{user}/latin1.txt"]')), 1, "is not UTF-8",
        setup=("latin1_text",)),
    Bad("data-too-little-text", pretrain(*s('data.datasets=["text:{user}/short.txt"]', "model.max_seq_len=512")), 1,
        "fewer than one training sequence", setup=("short_text",)),
    # ---- tokenizers
    Bad("tokenizer-missing-folder", pretrain(*s("data.tokenizer=/no/such/tokenizer")), 2, "data.tokenizer: /no/such/tokenizer"),
    Bad("tokenizer-no-json", pretrain(*s("data.tokenizer={user}/notok")), 2, "has no tokenizer.json", setup=("empty_tokenizer",)),
    Bad("tokenizer-corrupt-json", pretrain(*s("data.tokenizer={user}/badtok")), 1, "cannot load tokenizer",
        setup=("corrupt_tokenizer",)),
    Bad("tokenizer-empty-name", pretrain(*s('data.tokenizer=""')), 2, "data.tokenizer is empty"),
    Bad("tokenizer-file-not-folder", pretrain(*s("data.tokenizer={text}")), 2, "is not a folder"),
    # (huggingface_hub reads HF_HUB_OFFLINE when imported: this row needs a fresh process)
    Bad("tokenizer-hub-offline-uncached", pretrain(*s("data.tokenizer=nosuch-org-x/nosuch-tokenizer-y")), 2,
        "HF_HUB_OFFLINE=1 and it is not in the cache at", env=(("HF_HUB_OFFLINE", "1"),), subprocess=True),
    Bad("tokenizer-hub-unreachable", pretrain(*s("data.tokenizer=gpt2")), 2,
        "1 download from the Hugging Face Hub, which cannot be reached (http://127.0.0.1:9)",
        env=(("HF_ENDPOINT", "http://127.0.0.1:9"),)),
    # ---- existing runs, checkpoints and --resume
    Bad("run-exists-no-flag", pretrain(run="good"), 1, "pass --resume to continue that run, --overwrite", setup=("run",)),
    Bad("resume-and-overwrite", pretrain("--resume", "--overwrite", run="good"), 2, "--resume and --overwrite contradict",
        setup=("run",)),
    Bad("resume-nothing", pretrain("--resume", run="never"), 2, "nothing to resume"),
    Bad("resume-other-config", resume(*s("model.d_model=64", "pretrain.max_steps=9")), 2,
        "the config differs from the checkpoint's in model.d_model 32 -> 64", setup=("run",)),
    Bad("resume-other-tokenizer", resume(*s("data.tokenizer={gpt2}", "pretrain.max_steps=9")), 2,
        "differs from the checkpoint's in data.tokenizer", setup=("run",)),
    Bad("resume-finished", resume(), 2, "is at step 5 and pretrain.max_steps is 5; raise it", setup=("run",)),
    Bad("resume-all-corrupt", resume(*s("pretrain.max_steps=9")), 1, "no loadable pretrain checkpoint",
        setup=("run", "corrupt_checkpoints")),
    Bad("resume-malicious", resume(*s("pretrain.max_steps=9")), 1, "would import posix.system",
        setup=("run", "malicious_checkpoints"), subprocess=True),
    Bad("resume-future-format", resume(*s("pretrain.max_steps=9")), 1, "has checkpoint format 99",
        setup=("run", "future_checkpoints")),
    Bad("resume-weights-only", resume(*s("pretrain.max_steps=9")), 1, "lacks optimizer",
        setup=("run", "weights_only_checkpoints")),
]

# Rows for the commands other helpers add; each is kept only while its command exists in cli.py.
EVAL_ROWS = [
    Bad("eval-missing-checkpoint", ("eval", "--checkpoint", "{user}/missing.pt"), 2, "checkpoint not found"),
    Bad("eval-truncated-checkpoint", ("eval", "--checkpoint", "{user}/truncated.pt"), 1, "not a readable checkpoint",
        setup=("checkpoint_files",)),
    Bad("eval-malicious-checkpoint", ("eval", "--checkpoint", "{user}/evil.pt"), 1, "would import posix.system",
        setup=("checkpoint_files",)),
    Bad("eval-text-file-as-checkpoint", ("eval", "--checkpoint", "{text}"), 1, "not a readable checkpoint"),
    Bad("eval-empty-run-dir", ("eval", "--checkpoint", "{user}/emptyrun"), 2, "holds no llmctl checkpoint",
        setup=("empty_run_dir",)),
    Bad("eval-missing-data", ("eval", "--checkpoint", "{ckpt}", "--data", "text:/no/such.txt"), 2, "/no/such.txt is not a file",
        setup=("run",)),
    Bad("eval-bad-dtype", ("eval", "--checkpoint", "{ckpt}", "--dtype", "float8"), 2, "float8", setup=("run",)),
    Bad("eval-negative-stride", ("eval", "--checkpoint", "{ckpt}", "--stride", "-1"), 2, "stride", setup=("run",)),
]
GENERATE_ROWS = [
    Bad("generate-top-p-zero", ("generate", "--checkpoint", "{ckpt}", "--prompt", "ROMEO:", "--top-p", "0"), 2,
        "top_p must be in (0, 1]", setup=("run",)),
    Bad("generate-negative-temperature", ("generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--temperature", "-1"),
        2, "temperature must be >= 0", setup=("run",)),
    Bad("generate-negative-top-k", ("generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--top-k", "-1"), 2,
        "top_k must be >= 0", setup=("run",)),
    Bad("generate-zero-new-tokens", ("generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--max-new-tokens", "0"),
        2, "max_new_tokens must be", setup=("run",)),
    Bad("generate-zero-repetition-penalty", ("generate", "--checkpoint", "{ckpt}", "--prompt", "x",
                                             "--repetition-penalty", "0"), 2, "repetition_penalty must be > 0", setup=("run",)),
    Bad("generate-zero-samples", ("generate", "--checkpoint", "{ckpt}", "--prompt", "x", "--num-samples", "0"), 2,
        "num_samples must be >= 1", setup=("run",)),
    Bad("generate-no-prompt", ("generate", "--checkpoint", "{ckpt}"), 2, "no prompt", setup=("run",)),
    Bad("generate-empty-prompt", ("generate", "--checkpoint", "{ckpt}", "--prompt", ""), 2, "the prompt is empty",
        setup=("run",)),
    Bad("generate-missing-prompt-file", ("generate", "--checkpoint", "{ckpt}", "--prompt-file", "{user}/none.txt"), 2,
        "does not exist", setup=("run",)),
    Bad("generate-binary-prompt-file", ("generate", "--checkpoint", "{ckpt}", "--prompt-file", "{user}/latin1.txt"), 2,
        "is not UTF-8", setup=("run", "latin1_text")),
    Bad("generate-missing-checkpoint", ("generate", "--checkpoint", "{user}/missing.pt", "--prompt", "x"), 2,
        "checkpoint not found"),
    Bad("generate-empty-run-dir", ("generate", "--checkpoint", "{user}/emptyrun", "--prompt", "x"), 2,
        "holds no llmctl checkpoint", setup=("empty_run_dir",)),
    Bad("generate-truncated-checkpoint", ("generate", "--checkpoint", "{user}/truncated.pt", "--prompt", "x"), 1,
        "not a readable checkpoint", setup=("checkpoint_files",)),
]
DATA_ROWS = [
    Bad("data-prepare-empty-datasets", ("data", "prepare", "--preset", "tiny", *s("data.datasets=[]")), 2,
        "data.datasets is empty"),
    Bad("data-prepare-missing-file", ("data", "prepare", "--preset", "tiny", *s('data.datasets=["text:/no/such.txt"]',
                                                                                "data.tokenizer={tok}")), 2, "is not a file"),
    Bad("data-info-bad-tokenizer", ("data", "info", "--preset", "tiny", *s('data.datasets=["text:{text}"]',
                                                                          "data.tokenizer=/no/such/tok")), 2, "data.tokenizer"),
]



def sft(*extra: str, run: str | None = None) -> tuple[str, ...]:
    """An sft command from the copied run "good" (setup "run") on {user}/good.jsonl (setup "sft_files")."""
    named = ("--run-name", run) if run else ()
    return ("sft", "--from", "{ckpt}", "--preset", "tiny", *named, *s('sft.datasets=["jsonl:{user}/good.jsonl"]',
                                                                      "sft.max_steps=2", "run.device=cpu"), *extra)


SFT_ROWS = [
    Bad("sft-no-from", ("sft", "--preset", "tiny"), 2, "no checkpoint to start from; pass --from CKPT"),
    Bad("sft-missing-from", ("sft", "--from", "{user}/missing.pt", "--preset", "tiny"), 2, "checkpoint not found"),
    Bad("sft-from-text-file", ("sft", "--from", "{text}", "--preset", "tiny"), 1, "not a readable checkpoint"),
    Bad("sft-from-empty-run-dir", ("sft", "--from", "{user}/emptyrun", "--preset", "tiny"), 2,
        "holds no llmctl checkpoint", setup=("empty_run_dir",)),
    Bad("sft-text-spec", sft(*s('sft.datasets=["text:{text}"]')), 2, "text: files have no instruction/response",
        setup=("run", "sft_files")),
    Bad("sft-pretrain-corpus", sft(*s('sft.datasets=["wikitext-2-raw-v1"]')), 2, "is a pretraining corpus",
        setup=("run", "sft_files")),
    Bad("sft-unknown-source", sft(*s('sft.datasets=["tatsu-lab/alpacaa"]')), 2, "unknown SFT data source",
        setup=("run", "sft_files")),
    Bad("sft-field-in-spec", sft(*s('sft.datasets=["jsonl:{user}/good.jsonl#text"]')), 2, "drop '#text'",
        setup=("run", "sft_files")),
    Bad("sft-missing-file", sft(*s('sft.datasets=["jsonl:/no/such.jsonl"]')), 2, "/no/such.jsonl is not a file",
        setup=("run", "sft_files")),
    Bad("sft-empty-datasets", sft(*s("sft.datasets=[]")), 2, "sft.datasets is empty", setup=("run", "sft_files")),
    Bad("sft-bad-format", sft(*s("sft.format=sharegpt")), 2, "sft.format must be one of auto, alpaca",
        setup=("run", "sft_files")),
    Bad("sft-lr-zero", sft(*s("sft.lr=0")), 2, "sft.lr must be > 0", setup=("run", "sft_files")),
    Bad("sft-batch-not-divisible", sft(*s("sft.batch_size=6", "sft.micro_batch_size=4")), 2,
        "sft.batch_size (6) must be divisible by sft.micro_batch_size (4)", setup=("run", "sft_files")),
    Bad("sft-malformed-record", sft(*s('sft.datasets=["jsonl:{user}/bad.jsonl"]')), 1,
        "bad.jsonl:2: message 1 has role 'wizard'", setup=("run", "sft_files")),
    Bad("sft-broken-json-line", sft(*s('sft.datasets=["jsonl:{user}/broken.jsonl"]')), 1,
        "broken.jsonl line 3 is not valid JSON", setup=("run", "sft_files")),
    Bad("sft-json-not-array", sft(*s('sft.datasets=["json:{user}/object.json"]')), 1, "not an array of records",
        setup=("run", "sft_files")),
    Bad("sft-wrong-explicit-format", sft(*s("sft.format=alpaca")), 1, "good.jsonl:1: no 'instruction' field",
        setup=("run", "sft_files")),
    Bad("sft-only-empty-replies", sft(*s('sft.datasets=["jsonl:{user}/empty.jsonl"]')), 1,
        "SFT needs at least 2 usable records", setup=("run", "sft_files")),
    Bad("sft-model-from-checkpoint", sft(*s("model.d_model=64")), 2,
        "sft takes [model] and [data] from the --from checkpoint, where model.d_model = 32", setup=("run", "sft_files")),
    Bad("sft-into-base-run-dir", sft(run="good"), 2, "is the run directory of the --from checkpoint",
        setup=("run", "sft_files")),
    Bad("sft-resume-nothing", sft("--resume", run="never"), 2, "nothing to resume", setup=("run", "sft_files")),
    Bad("sft-hub-unreachable", sft(*s('sft.datasets=["databricks/databricks-dolly-15k:100"]')), 2,
        "dataset 'databricks/databricks-dolly-15k:100': use a local file", setup=("run", "sft_files"),
        env=(("HF_ENDPOINT", "http://127.0.0.1:9"),)),
    Bad("sft-bad-record-subprocess", sft(*s('sft.datasets=["jsonl:{user}/bad.jsonl"]')), 1, "bad.jsonl:2",
        setup=("run", "sft_files"), subprocess=True),
    Bad("inspect-index-too-large", ("data", "inspect", "--sft", "jsonl:{user}/good.jsonl", "-i", "99", "-c", "{ckpt}"),
        2, "has fewer than 100 records", setup=("run", "sft_files")),
    Bad("inspect-negative-index", ("data", "inspect", "--sft", "jsonl:{user}/good.jsonl", "-i", "-1", "-c", "{ckpt}"),
        2, "--index -1 must be >= 0", setup=("run", "sft_files")),
    Bad("inspect-malformed-record", ("data", "inspect", "--sft", "jsonl:{user}/bad.jsonl", "-i", "1", "-c", "{ckpt}"),
        1, "bad.jsonl:2: message 1 has role 'wizard'", setup=("run", "sft_files")),
    Bad("inspect-empty-reply", ("data", "inspect", "--sft", "jsonl:{user}/empty.jsonl", "-c", "{ckpt}"), 1,
        "training skips this record", setup=("run", "sft_files")),
]
EXPORT_ROWS = [
    Bad("export-missing-checkpoint", ("export", "--checkpoint", "{user}/missing.pt", "{user}/out"), 2,
        "checkpoint not found"),
    Bad("export-empty-run-dir", ("export", "--checkpoint", "{user}/emptyrun", "{user}/out"), 2,
        "holds no llmctl checkpoint", setup=("empty_run_dir",)),
    Bad("export-truncated-checkpoint", ("export", "--checkpoint", "{user}/truncated.pt", "{user}/out"), 1,
        "not a readable checkpoint", setup=("checkpoint_files",)),
]
PIPELINE_ROWS = [
    Bad("pipeline-unknown-key", ("pipeline", "--preset", "tiny", *s("sft.lrr=1")), 2, "did you mean 'sft.lr'?"),
    Bad("pipeline-sft-text-spec", ("pipeline", "--preset", "tiny", *s('sft.datasets=["text:{text}"]')), 2,
        "text: files have no instruction/response"),
    Bad("pipeline-missing-data", ("pipeline", "--preset", "tiny", *s('data.datasets=["text:/no/such.txt"]')), 2,
        "/no/such.txt is not a file"),
    Bad("pipeline-missing-sft-file", ("pipeline", "--preset", "tiny", *s('data.datasets=["text:{text}"]',
                                                                         'sft.datasets=["jsonl:/no/such.jsonl"]')), 2,
        "/no/such.jsonl is not a file"),
]


def _registered(command: str) -> bool:
    import typer.main

    group = typer.main.get_group(app)
    return command in group.commands


ROWS += [r for rows, command in ((EVAL_ROWS, "eval"), (GENERATE_ROWS, "generate"), (DATA_ROWS, "data"),
                                  (SFT_ROWS, "sft"), (EXPORT_ROWS, "export"), (PIPELINE_ROWS, "pipeline"))
         if _registered(command) for r in rows]


# ----------------------------------------------------------------------------- the user's files

@dataclass
class Files:
    """Placeholders a row may use: {user} its folder, {text} a small UTF-8 text file there,
    {tok} the small tokenizer, {gpt2} the GPT-2 tokenizer, {ckpt} the copied run's final checkpoint."""

    user: Path
    text: Path
    tok: Path
    gpt2: Path
    template: Path  # a finished 5-step run "good" to copy in
    values: dict[str, str] = field(default_factory=dict)

    def fill(self, arg: str) -> str:
        return arg.format(user=self.user, text=self.text, tok=self.tok, gpt2=self.gpt2,
                          ckpt=self.user / "experiments" / "runs" / "good" / "good-pretrain_final.pt")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _run_checkpoints(f: Files) -> list[Path]:
    return sorted((f.user / "experiments" / "runs" / "good").glob("*.pt"))


def _rewrite_checkpoints(f: Files, change: Callable[[dict], object]) -> None:
    for path in _run_checkpoints(f):
        payload = torch.load(path, weights_only=True)
        torch.save(change(payload), path)


SETUPS: dict[str, Callable[[Files], None]] = {
    "broken_preset": lambda f: (f.user / "broken.toml").write_text("[model\nd_model = 32\n"),
    "typo_preset": lambda f: (f.user / "typo.toml").write_text("[model]\nwidht = 32\n"),
    "flat_preset": lambda f: (f.user / "flat.toml").write_text("model = 3\n"),
    "typed_preset": lambda f: (f.user / "typed.toml").write_text('[pretrain]\nlr = "fast"\n'),
    "empty_text": lambda f: (f.user / "empty.txt").write_text("\n\n  \n"),
    "latin1_text": lambda f: (f.user / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1")),
    "short_text": lambda f: (f.user / "short.txt").write_text("To be, or not to be, that is the question.\n\n" * 20),
    "empty_tokenizer": lambda f: (f.user / "notok").mkdir(),
    "corrupt_tokenizer": lambda f: ((f.user / "badtok").mkdir(), (f.user / "badtok" / "tokenizer.json").write_text("{not json"),
                                    (f.user / "badtok" / "tokenizer_config.json").write_text("{}")),
    "run": lambda f: shutil.copytree(f.template, f.user / "experiments" / "runs" / "good"),
    "corrupt_checkpoints": lambda f: [p.write_bytes(p.read_bytes()[: p.stat().st_size // 3]) for p in _run_checkpoints(f)],
    "malicious_checkpoints": lambda f: _rewrite_checkpoints(f, lambda d: {**d, "evil": Exploit()}),
    "future_checkpoints": lambda f: _rewrite_checkpoints(f, lambda d: {**d, "format_version": 99}),
    "weights_only_checkpoints": lambda f: _rewrite_checkpoints(f, lambda d: {k: v for k, v in d.items() if k != "optimizer"}),
    "checkpoint_files": lambda f: _checkpoint_files(f),
    "empty_run_dir": lambda f: (f.user / "emptyrun").mkdir(),
    "sft_files": lambda f: _sft_files(f),
}


def _sft_files(f: Files) -> None:
    """good.jsonl (prompt/response), bad.jsonl (a wrong role on line 2), broken.jsonl (line 3 is not
    JSON), object.json (not an array), empty.jsonl (every reply empty)."""
    import json

    good = [{"prompt": f"Say {i}.", "response": f"{i}."} for i in range(3)]
    (f.user / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    bad = [good[0], {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}]
    (f.user / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bad))
    (f.user / "broken.jsonl").write_text(json.dumps(good[0]) + "\n\n{\"prompt\": \"x\",\n")
    (f.user / "object.json").write_text(json.dumps({"data": good}))
    (f.user / "empty.jsonl").write_text("".join(json.dumps({"instruction": "x", "output": ""}) + "\n" for _ in range(3)))


def _checkpoint_files(f: Files) -> None:
    good = f.template / "good-pretrain_final.pt"
    data = good.read_bytes()
    (f.user / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"kind": "llmctl-checkpoint", "format_version": 1, "x": Exploit()}, f.user / "evil.pt")


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under root: (kind, size, mtime_ns, sha256) — a created, changed or deleted file shows.

    A run's `.lock` is compared by its bytes only: every training command writes its holder
    record there before checking anything else, and clears it when it fails."""
    tree = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        mtime = st.st_mtime_ns if p.is_file() and p.name != ".lock" else 0
        tree[str(p.relative_to(root))] = ("dir" if p.is_dir() else "file", st.st_size if p.is_file() else 0,
                                          mtime, digest)
    return tree


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, shakespeare, gpt2_dir, cache) -> Files:
    """The small tokenizer, the text file's content and a trained run, made once."""
    root = tmp_path_factory.mktemp("base")
    tok = build_small_tokenizer(root / "tok", shakespeare)
    text = root / "book.txt"
    text.write_text(shakespeare.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    files = Files(user=root, text=text, tok=tok, gpt2=gpt2_dir, template=root / "experiments" / "runs" / "good")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("LLMCTL_CACHE", str(cache))
        torch.set_num_threads(1)
        try:
            result = CliRunner().invoke(app, [files.fill(a) for a in pretrain(run="good")])
        finally:
            torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return files


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=pytest.mark.skipif(bool(r.skip), reason=r.skip))
                                 for r in ROWS])
def test_bad_input(row: Bad, base: Files, cache: Path, tmp_path: Path, monkeypatch):
    user = tmp_path / "user"
    user.mkdir()
    text = user / "book.txt"
    shutil.copy2(base.text, text)
    files = Files(user=user, text=text, tok=base.tok, gpt2=base.gpt2, template=base.template)
    for name in row.setup:
        SETUPS[name](files)
    args = [files.fill(a) for a in row.args]
    before = snapshot(user)
    env = {"LLMCTL_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf"), **dict(row.env)}

    if row.subprocess:
        full_env = {k: v for k, v in {**os.environ, **env, "OMP_NUM_THREADS": "1"}.items() if k != "LLMCTL_DEBUG"}
        proc = subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=user, env=full_env, capture_output=True,
                              text=True, timeout=300)
        code, stdout, stderr, exception = proc.returncode, proc.stdout, proc.stderr, None
    else:
        monkeypatch.chdir(user)
        monkeypatch.delenv("LLMCTL_DEBUG", raising=False)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = CliRunner().invoke(app, args, env=env)
        finally:
            torch.set_num_threads(threads)
        code, stdout, stderr = result.exit_code, result.stdout, result.stderr
        exception = None if isinstance(result.exception, SystemExit) else result.exception

    assert exception is None, f"unhandled {type(exception).__name__}: {exception}"
    assert code == row.code, f"exit {code}, expected {row.code}\n{stderr}"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    # One error, last: its first line, then only indented lines (a list of several missing pieces)
    block = stderr[stderr.rindex("error: "):].rstrip() if errors else ""
    assert len(errors) == 1 and all(line.startswith("  ") for line in block.splitlines()[1:]), \
        f"not one error at the end:\n{stderr}"
    assert row.says in block, f"{row.says!r} not in {block!r}"
    assert "Traceback" not in stderr + stdout
    assert snapshot(user) == before, "the user's files were created, changed or deleted"


def test_the_matrix_is_big_enough():
    assert len([r for r in ROWS if not r.skip]) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS), "row ids must be unique"
    assert sum(r.subprocess for r in ROWS) >= 3
