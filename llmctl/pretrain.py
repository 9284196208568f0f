"""`llmctl pretrain`: config -> tokenizer -> token store -> model -> Trainer.fit -> checkpoints.

Everything that can fail on bad input (tokenizer, data, sizes) runs before anything is
written to the run directory, so a mistake leaves nothing behind. The run lock
(`llmctl.runlock`) is taken first, which may create the folder; a failed start removes it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from llmctl.autobatch import with_micro_batch
from llmctl.config import AUTO, Config
from llmctl.data.batches import training_windows
from llmctl.data.downloads import DownloadCheck, check_pretrain_downloads, pretrain_closing, require
from llmctl.data.sources import check_sources
from llmctl.data.store import open_store, prepare_store, store_path
from llmctl.data.report import PrepareDisplay
from llmctl.data.tokenizer import check_tokenizer_name, planned_vocab_size, resolve_tokenizer
from llmctl.errors import ConfigError, LlmctlError
from llmctl.evaluate import bits_per_byte, evaluate_tokens, stream_bytes
from llmctl.model import Transformer
from llmctl.ngram import counts_for
from llmctl.phases import Phases, approx_count
from llmctl.resume import check_run_dir, check_same_data, find_resume_point
from llmctl.runlock import hold_run_lock
from llmctl.runtime import DistInfo, autocast, barrier, init_distributed, resolve_dtype, seed_everything
from llmctl.trackers import check_trackers
from llmctl.stage import fit_stage, run_dir_of, say_to

STAGE = "pretrain"


@dataclass
class Plan:
    """The derived numbers a user checks before spending hours (`--dry-run` prints them)."""

    parameters: int
    vocab_size: int | None  # None: the tokenizer is not at hand (offline), so neither is the embedding size
    tokens_per_step: int
    accumulation_steps: int | str  # "auto": found when training starts
    total_tokens: int
    checkpoint_steps: list[int]
    eval_steps: int
    max_time: str = ""  # the time budget; training ends at it or at max_steps, whichever comes first
    lr_schedule: str = ""
    per_vocab_entry: int = 0  # parameters each vocabulary entry adds (shown while vocab_size is None)

    def rows(self) -> list[tuple[str, str]]:
        saves = self.checkpoint_steps
        shown = ", ".join(map(str, saves[:6])) + (", …" if len(saves) > 6 else "")
        unknown = self.vocab_size is None
        return [
            ("parameters", f"{self.parameters:,}" if not unknown else
             f"{self.parameters:,} plus {self.per_vocab_entry:,} per vocabulary entry"),
            ("vocab size", f"{self.vocab_size:,}" if not unknown else "unknown (the tokenizer is not at hand)"),
            ("tokens per step", f"{self.tokens_per_step:,}"),
            ("accumulation steps", f"{self.accumulation_steps}" if self.accumulation_steps != AUTO else
             "auto (the largest micro-batch that fits is found when training starts)"),
            ("total tokens", f"{self.total_tokens:,}"),
            ("checkpoints at steps", f"{shown + (', ' if shown else '')}final"),
            ("evaluations", f"{self.eval_steps}" + (" at most, plus one at the end" if self.max_time else "")),
            ("time budget", f"{self.max_time} (or max_steps, whichever comes first; total tokens is then "
                            f"an upper bound)" if self.max_time else "none (max_steps)"),
            ("lr schedule", self.lr_schedule + (" (decay follows the time budget)" if self.max_time
                                                and self.lr_schedule in ("wsd", "cosine") else "")),
        ]


def resolve_vocab(cfg: Config, tokenizer_vocab: int) -> Config:
    """Fill model.vocab_size from the tokenizer; a smaller explicit value cannot hold its ids."""
    if cfg.model.vocab_size == 0:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=tokenizer_vocab))
    if cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({tokenizer_vocab}); set it to 0 to follow the tokenizer")
    return cfg


def count_parameters(cfg: Config) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return Transformer(cfg.model).num_parameters()


def make_plan(cfg: Config) -> Plan:
    params = count_parameters(cfg)
    t = cfg.pretrain
    tokens_per_step = t.batch_size * cfg.train_seq_len(STAGE)
    return Plan(
        parameters=params, vocab_size=cfg.model.vocab_size, tokens_per_step=tokens_per_step,
        accumulation_steps=cfg.accumulation_steps, total_tokens=tokens_per_step * t.max_steps,
        checkpoint_steps=list(range(t.save_every, t.max_steps, t.save_every)),
        eval_steps=len(set(range(t.eval_every, t.max_steps + 1, t.eval_every)) | {t.max_steps}),
        max_time=t.max_time, lr_schedule=t.lr_schedule,
    )


def dry_run(cfg: Config) -> tuple[Config, Plan, DownloadCheck]:
    """The resolved config, its derived numbers and what it needs from the Hub. Offline with
    the tokenizer missing, the vocabulary (unless model.vocab_size is set) is unknown: the plan
    then counts parameters without the embedding."""
    check_sources(cfg.data.datasets)
    downloads = check_pretrain_downloads(cfg.data)
    tokenizer_missing = any(p.what.startswith("tokenizer ") for p in downloads.missing)
    if not tokenizer_missing:
        vocab = downloads.tokenizer.vocab_size if downloads.tokenizer else planned_vocab_size(cfg.data)
        cfg = resolve_vocab(cfg, vocab)
        return cfg, make_plan(cfg), downloads
    if cfg.model.vocab_size:
        return cfg, make_plan(cfg), downloads
    one, two = (make_plan(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=v)))
                for v in (1, 1 + cfg.model.pad_vocab_multiple))
    per_entry = (two.parameters - one.parameters) // cfg.model.pad_vocab_multiple
    return cfg, dataclasses.replace(one, parameters=one.parameters - per_entry * cfg.model.pad_vocab_multiple,
                                    vocab_size=None, per_vocab_entry=per_entry), downloads


def resume_command(preset: str, overrides: list[str] | None, run_name: str) -> str:
    """The command line that continues this run: same preset and --set values, plus --resume."""
    import shlex

    sets = [a for o in overrides or [] for a in ("--set", o)]
    return shlex.join(["llmctl", "pretrain", "--preset", preset, "--run-name", run_name, *sets, "--resume"])


def run_pretrain(cfg: Config, console: Console, overwrite: bool = False, resume: bool | str = False,
                 resume_command: str | None = None, prepare_command: str | None = None) -> dict[str, Any]:
    """Train from scratch, or with `resume` continue from the run's newest checkpoint (with
    `resume="auto"`, only if it has one); returns a summary with the final checkpoint's path.
    `resume_command` is the command line to show when a signal stops the run, `prepare_command`
    the one that fetches its downloads (named when the Hub cannot give them).

    The run directory's lock is held throughout, taken before anything is read or written
    there, so a second writer is refused before it changes anything; a failure before
    training leaves no folder that only the lock made."""
    run_dir = run_dir_of(cfg)
    with hold_run_lock(run_dir, STAGE, say_to(console)) as lock:
        resume = check_run_dir(run_dir, resume=resume, overwrite=overwrite, stage=STAGE, existed=lock.existed)
        return _pretrain(cfg, console, run_dir, overwrite, resume, resume_command, prepare_command)


def _pretrain(cfg: Config, console: Console, run_dir: Path, overwrite: bool, resume: bool,
              resume_command: str | None, prepare_command: str | None) -> dict[str, Any]:
    check_trackers(cfg.run.report_to)  # a missing tensorboard/wandb is named before the slow data work
    dist_info, device = init_distributed(cfg.run.device, cfg.run.distributed)  # alone: rank 0 of 1
    if not dist_info.is_main:
        console = Console(quiet=True)  # one voice: rank 0 prints, logs and saves
    with Phases(console) as phases:  # the spinner (or plain lines) until the first step
        return _prepare_and_fit(cfg, console, phases, run_dir, dist_info, device, overwrite, resume,
                                resume_command, prepare_command)


def _prepare_and_fit(cfg: Config, console: Console, phases: Phases, run_dir: Path, dist_info: DistInfo,
                     device: torch.device, overwrite: bool, resume: bool, resume_command: str | None,
                     prepare_command: str | None) -> dict[str, Any]:
    dtype = resolve_dtype(cfg.run.dtype, device)
    specs = check_sources(cfg.data.datasets)
    check_tokenizer_name(cfg.data)  # a wrong path is one error line, with no phase line before it
    # Every download, before the slow work: one error names all that the Hub cannot give.
    require(check_pretrain_downloads(cfg.data), pretrain_closing(prepare_command))
    if not dist_info.is_main:
        barrier(dist_info)  # rank 0 trains the tokenizer / builds the store; the others then reuse it
    phases(f"loading the tokenizer {cfg.data.tokenizer} …")
    tokenizer = resolve_tokenizer(cfg.data, lambda line: phases(f"{line} …"))  # training one (train:V) is a phase
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    if resume:
        phases("reading the newest checkpoint to resume from …")
    point = find_resume_point(run_dir, STAGE, cfg, tokenizer) if resume else None  # before slow data work
    console.print(f"data: {', '.join(cfg.data.datasets)} with tokenizer {cfg.data.tokenizer}",
                  markup=False, highlight=False)
    names = ", ".join(spec.raw for spec in specs)
    if open_store(store_path(cfg.data, specs, tokenizer)) is not None:
        phases(f"opening the token store of {names} …")
        store = prepare_store(cfg.data, tokenizer)
    else:
        phases(f"tokenizing {names} …")
        with phases.aside(), PrepareDisplay(console) as show:  # builds (or resumes) the store, with its own bars
            store = prepare_store(cfg.data, tokenizer, show)
    if dist_info.is_main:
        barrier(dist_info)
    train_tokens, val_tokens = store.tokens("train"), store.tokens("validation")
    seq_len = cfg.train_seq_len(STAGE)
    if len(train_tokens) < seq_len + 1:
        raise LlmctlError(f"only {len(train_tokens)} training tokens, fewer than one training sequence of "
                          f"{seq_len} + 1 tokens; add data or lower pretrain.seq_len (or model.max_seq_len)")
    data_meta = {**store.meta, "fingerprint": store.train_fingerprint()}  # saved in every checkpoint
    if point is not None:
        check_same_data(point, data_meta)

    seed_everything(cfg.run.seed)
    phases(f"building the model ({approx_count(count_parameters(cfg))} parameters) …")
    model = Transformer(cfg.model).to(device)
    counts = counts_for(cfg.model)  # n-grams mixed in at inference, never in training
    if counts is not None:
        phases(f"counting the n-grams of {approx_count(len(train_tokens))} training tokens …")
    counted = counts.to(device).fit(train_tokens) if counts is not None else 0
    auto_micro = cfg.pretrain.micro_batch_size == AUTO
    if auto_micro:
        phases("choosing the micro-batch (the largest that fits) …")
    cfg = with_micro_batch(cfg, STAGE, model, device, dtype, dist_info, point.state["config"] if point else None)
    batches = training_windows(store, cfg.data.weights, seq_len, cfg.pretrain.micro_batch_size,
                               cfg.run.seed)
    eval_batch = cfg.eval_batch_size(STAGE)

    scored_bytes: list[int] = []  # UTF-8 bytes of the scored validation text, counted once

    def evaluate() -> dict[str, float]:
        result = evaluate_tokens(model, val_tokens, cfg.model.max_seq_len, eval_batch, device,
                                 autocast(device, dtype), cfg.eval.max_tokens, dist=dist_info, counts=counts)
        if not scored_bytes:
            scored_bytes.append(stream_bytes(val_tokens[: result["tokens"] + 1], tokenizer))
        for scores in (result, result.get("mixture")):
            if scores is not None:
                scores["bits_per_byte"] = bits_per_byte(scores["loss_sum"], scored_bytes[0])
        return result

    # Nothing was written before this point: every input has been checked.
    plan = make_plan(cfg)
    intro = [f"run {cfg.run.name}: {plan.parameters:,} parameters on {device.type} "
             f"({str(dtype).removeprefix('torch.')}), {plan.tokens_per_step:,} tokens/step "
             f"({cfg.pretrain.batch_size} x {seq_len}, micro-batch {cfg.pretrain.micro_batch_size}"
             f"{' (auto)' if auto_micro else ''}, accumulation {plan.accumulation_steps}), "
             f"{cfg.pretrain.max_steps} steps" + (f" or {cfg.pretrain.max_time}, whichever comes first"
                                                  if cfg.pretrain.max_time else ""),
             f"data: {len(train_tokens):,} train tokens, {len(val_tokens):,} validation tokens (cache {store.path})"]
    if counted:
        intro.append(f"counts: order-{cfg.model.ngram_order} n-grams of {counted:,} training tokens, mixed in at "
                     f"evaluation (model.ngram_weight {cfg.model.ngram_weight}, model.cache_weight "
                     f"{cfg.model.cache_weight}); validation scores the network alone and with them")
    return fit_stage(cfg, STAGE, console, model=model, batches=batches, evaluate=evaluate, tokenizer=tokenizer,
                     data_meta=data_meta, device=device, dtype=dtype, point=point, intro=intro,
                     overwrite=overwrite, resume_command=resume_command, dist_info=dist_info, phases=phases,
                     checkpoint_extra={"counts": counts.state_dict()} if counts is not None else None)


def next_commands(run_dir: str) -> list[tuple[str, str]]:
    """(command, what it does) to print when a pretraining run finishes."""
    import shlex

    run = shlex.quote(run_dir)
    return [(f"llmctl generate --checkpoint {run} --prompt 'To be'", "sample text from the model"),
            (f"llmctl eval --checkpoint {run}", "loss, perplexity and bits per byte on held-out text"),
            (f"llmctl sft --from {run}", "teach it to answer (writes the run " + shlex.quote(Path(run_dir).name + "-sft") + ")"),
            ("llmctl runs", "every run: state, steps, perplexity")]
