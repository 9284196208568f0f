"""`llmctl pipeline`: data -> pretrain -> sft -> eval -> samples, the recommended path, as library calls.

Each stage is the same library call its own command makes, and each is skipped when its
output exists and is complete, so running the same command again resumes where it stopped:

    data      the cached pretraining token store (`prepare_data`: reused, resumed or built)
    pretrain  <out>/<run>/<run>-pretrain_final.pt at pretrain.max_steps; step checkpoints
              without one (or a final short of max_steps) -> resumed with `run_pretrain`
    sft       <out>/<run>-sft/<run>-sft-sft_final.pt at sft.max_steps, trained from that
              pretrain final; likewise resumed; redone when the pretrain final has changed
    eval      pretrain: loss, perplexity and bits per byte on its validation split (the first
              eval.max_tokens tokens); sft: response-only loss, perplexity and bits per byte
              on its held-out conversations
    samples   a greedy continuation from the pretrained model, a greedy answer from the SFT
              model (through its chat template)

What the pipeline knows lives in `<out>/<run>/pipeline.json` (written atomically after each
stage): which pretrain checkpoint the SFT stage started from, and the eval and sample
results with the identity (size, mtime) of the checkpoints they describe, so a rerun repeats
them only for new weights. A finished stage whose saved config differs from this run's in
a key that changes what is trained is refused with one line (as `--resume` refuses it).

The pipeline holds its run directory's lock (`llmctl.runlock`) from start to end, since it
writes pipeline.json there between stages; the SFT run directory is locked by its stage.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from llmctl.checkpoint import step_checkpoints
from llmctl.config import Config, config_from_dict
from llmctl.data.sources import check_sources
from llmctl.data.sft import check_sft_sources
from llmctl.errors import ConfigError, LlmctlError
from llmctl.pretrain import run_pretrain
from llmctl.resume import resume_config_changes
from llmctl.stage import run_dir_of, say_to
from llmctl.runlock import hold_run_lock

RECORD = "pipeline.json"
STAGES = ("data", "pretrain", "sft", "eval", "samples")


def pipeline_command(preset: str, overrides: list[str] | None, run_name: str) -> str:
    sets = [a for o in overrides or [] for a in ("--set", o)]
    return shlex.join(["llmctl", "pipeline", "--preset", preset, "--run-name", run_name, *sets])


# --------------------------------------------------------------------------- what is on disk

def identity(path: Path) -> list[Any]:
    """What tells one checkpoint file from another version of it: name, size, mtime."""
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def peek(path: Path) -> dict[str, Any] | None:
    """A checkpoint's plain values without reading its tensors (memory-mapped, weights_only);
    None when the file cannot be read as an llmctl checkpoint."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged or foreign: the stage's own resume logic reports it
        return None
    return payload if isinstance(payload, dict) and payload.get("kind") == "llmctl-checkpoint" else None


def stage_state(run_dir: Path, run_name: str, stage: str, max_steps: int) -> tuple[str, dict[str, Any] | None]:
    """("complete", final payload) when the final checkpoint reached max_steps; ("partial",
    None) when checkpoints exist to resume from; ("none", None) otherwise."""
    final = run_dir / f"{run_name}-{stage}_final.pt"
    payload = peek(final) if final.is_file() else None
    if payload is not None and int(payload.get("step", -1)) >= max_steps:
        return "complete", payload
    if final.is_file() or step_checkpoints(run_dir, stage):
        return "partial", None
    return "none", None


def check_finished_config(payload: dict[str, Any], cfg: Config, stage: str, run_dir: Path) -> None:
    """A finished stage may be reused only if it trained what this config asks for."""
    current = cfg.to_dict()
    saved_vocab = payload["config"].get("model", {}).get("vocab_size")
    if current["model"]["vocab_size"] == 0 and saved_vocab:
        current["model"]["vocab_size"] = saved_vocab  # 0 means "the tokenizer's", which it resolved to
    try:
        resume_config_changes(payload["config"], current, stage)
    except ConfigError as e:
        detail = str(e).removeprefix("cannot resume: ").split("; pass the original", 1)[0]
        raise ConfigError(f"the finished {stage} stage in {run_dir} was trained with another config: {detail}; "
                          f"pass the original preset and --set values, or another --run-name") from None


def read_record(run_dir: Path) -> dict[str, Any]:
    try:
        record = json.loads((run_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def write_record(run_dir: Path, record: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".{RECORD}.tmp"
    tmp.write_text(json.dumps(record, indent=1), encoding="utf-8")
    os.replace(tmp, run_dir / RECORD)


# --------------------------------------------------------------------------- eval and samples

def score_pretrain(path: Path, cfg: Config) -> dict[str, Any]:
    """Loss, perplexity, bits per byte of a pretrain checkpoint on its run's validation split
    (its first eval.max_tokens targets), scored by llmctl.evaluate."""
    from llmctl.data.store import prepare_store
    from llmctl.evaluate import evaluate_tokens, stream_bytes
    from llmctl.loading import load_model
    from llmctl.runtime import autocast

    loaded = load_model(path, device=cfg.run.device, dtype="float32")
    tokens = prepare_store(loaded.config.data, loaded.tokenizer).tokens("validation")
    if cfg.eval.max_tokens:
        tokens = tokens[: cfg.eval.max_tokens + 1]
    result = evaluate_tokens(loaded.model, tokens, loaded.context_length, loaded.eval_batch_size, loaded.device,
                             autocast(loaded.device, loaded.dtype), counts=loaded.counts)
    return {"what": "validation split", **_scores(result, stream_bytes(np.asarray(tokens), loaded.tokenizer))}


def _scores(result: dict[str, Any], n_bytes: int) -> dict[str, Any]:
    """The network's loss, perplexity and bits per byte, and the mixture's under "mixture"
    where the checkpoint mixes counts in."""
    from llmctl.evaluate import bits_per_byte

    scores = {"loss": result["loss"], "perplexity": result["perplexity"],
              "bits_per_byte": bits_per_byte(result["loss_sum"], n_bytes), "tokens": result["tokens"]}
    if "mixture" in result:
        mixture = result["mixture"]
        scores["mixture"] = {"loss": mixture["loss"], "perplexity": mixture["perplexity"],
                             "bits_per_byte": bits_per_byte(mixture["loss_sum"], n_bytes)}
    return scores


def score_sft(path: Path, cfg: Config) -> dict[str, Any]:
    """Response-only loss, perplexity and bits per byte of an SFT checkpoint on its held-out
    conversations (the same split its training evaluated)."""
    from llmctl.data.chat_template import ChatTemplate, encode_examples
    from llmctl.data.sft import load_sft_data
    from llmctl.evaluate import evaluate_examples, response_bytes
    from llmctl.loading import load_model
    from llmctl.runtime import autocast

    loaded = load_model(path, device=cfg.run.device, dtype="float32")
    s = loaded.config.sft
    data = load_sft_data(s.datasets, s.format, s.validation_fraction)
    template = ChatTemplate.from_state(loaded.template) if loaded.template else ChatTemplate()
    examples = encode_examples(data.validation, template, loaded.tokenizer, loaded.context_length)
    result = evaluate_examples(loaded.model, examples, loaded.config.eval_batch_size("sft"),
                               loaded.device, autocast(loaded.device, loaded.dtype), loaded.tokenizer.eos_id,
                               cfg.eval.max_tokens, counts=loaded.counts)
    return {"what": f"responses of {len(examples)} held-out conversations",
            **_scores(result, response_bytes(examples, loaded.tokenizer, cfg.eval.max_tokens))}


def make_samples(pretrain_path: Path, sft_path: Path, cfg: Config) -> dict[str, dict[str, str]]:
    """A greedy continuation of held-out text by the pretrained model, and a greedy answer to
    the first held-out instruction by the SFT model (its template applied by `complete`)."""
    from llmctl.data.sft import load_sft_data
    from llmctl.data.store import prepare_store
    from llmctl.generate import complete
    from llmctl.loading import load_model

    n = cfg.sft.sample_tokens
    pre = load_model(pretrain_path, device=cfg.run.device, dtype="float32")
    val = prepare_store(pre.config.data, pre.tokenizer).tokens("validation")
    head = [t for t in np.asarray(val[:16]).tolist() if t != pre.tokenizer.eos_id][:8]
    prompt = pre.tokenizer.decode(head) or "The"
    samples = {"pretrain": {"prompt": prompt,
                            "text": complete(pre, prompt, temperature=0.0, max_new_tokens=n, seed=0).text}}
    tuned = load_model(sft_path, device=cfg.run.device, dtype="float32")
    s = tuned.config.sft
    held = load_sft_data(s.datasets, s.format, s.validation_fraction).validation
    question = next((c for role, c in held[0] if role == "user"), "Hello") if held else "Hello"
    samples["sft"] = {"prompt": question, "text": complete(tuned, question, temperature=0.0, max_new_tokens=n,
                                                           seed=0).text}
    return samples


# --------------------------------------------------------------------------- the pipeline

def run_pipeline(cfg: Config, console: Console, overrides: list[str] | None = None,
                 command: str | None = None, preset: str | None = None) -> dict[str, Any]:
    """Run every stage that is not complete; returns the summary (`render_summary` shows it)."""
    check_sources(cfg.data.datasets)  # every spec and file checked before hours of pretraining
    check_sft_sources(cfg.sft.datasets)
    check_pipeline_downloads(cfg, preset, overrides)
    say = say_to(console)
    run_dir = run_dir_of(cfg)
    # The pipeline writes pipeline.json and the eval results here between stages, so it holds
    # the run's lock throughout; run_pretrain takes it again (same process), run_sft its own.
    with hold_run_lock(run_dir, "pipeline", say):
        return _pipeline(cfg, console, say, run_dir, overrides, command)


def check_pipeline_downloads(cfg: Config, preset: str | None, overrides: list[str] | None) -> None:
    """Both stages' downloads, before the first: an SFT dataset the Hub cannot give is named
    now, with the pretraining pieces, not after hours of pretraining."""
    from llmctl.data.downloads import (check_pretrain_downloads, check_sft_downloads, prepare_command,
                                       pretrain_closing, require)

    pretraining = check_pretrain_downloads(cfg.data)
    tuning = check_sft_downloads(cfg.sft.datasets, ["--preset", preset] if preset else [])
    # `data prepare` fetches the pretraining pieces; an SFT dataset's line names its own fetch
    closing = pretrain_closing(prepare_command(preset, overrides), quickstart=False) if pretraining.missing else ""
    require(pretraining + tuning, closing.replace("{them}", "the pretraining downloads"))


def _pipeline(cfg: Config, console: Console, say: Callable[[str], None], run_dir: Path,
              overrides: list[str] | None, command: str | None) -> dict[str, Any]:
    from llmctl.data.report import prepare_data
    from llmctl.sft import load_base, run_sft, sft_config

    name = cfg.run.name
    record = read_record(run_dir)
    status: dict[str, str] = {}

    # ---- data
    say(f"pipeline {name}: stage data")
    data = prepare_data(cfg.data, console)
    status["data"] = "skipped (cached)" if data["reused"] else "ran"

    # ---- pretrain
    state, payload = stage_state(run_dir, name, "pretrain", cfg.pretrain.max_steps)
    if state == "complete":
        check_finished_config(payload, cfg, "pretrain", run_dir)
        status["pretrain"] = "skipped (complete)"
        say(f"pipeline {name}: stage pretrain is complete ({run_dir / f'{name}-pretrain_final.pt'})")
    else:
        say(f"pipeline {name}: stage pretrain ({'resuming' if state == 'partial' else 'from scratch'})")
        run_pretrain(cfg, console, resume=state == "partial", resume_command=command)
        status["pretrain"] = "resumed" if state == "partial" else "ran"
    pre_final = run_dir / f"{name}-pretrain_final.pt"
    pre_payload = peek(pre_final)
    if pre_payload is None:
        raise LlmctlError(f"the pretrain stage left no readable {pre_final}; run the same command again")

    # ---- sft
    user = copy.deepcopy(cfg)
    user.run.name, user.sft.from_ = f"{name}-sft", str(pre_final)
    sft_cfg = sft_config(user, config_from_dict(pre_payload["config"]), overrides)
    sft_dir = run_dir_of(sft_cfg)
    sft_final = sft_dir / f"{sft_cfg.run.name}-sft_final.pt"
    state, payload = stage_state(sft_dir, sft_cfg.run.name, "sft", sft_cfg.sft.max_steps)
    stale = record.get("sft_base") not in (None, identity(pre_final))
    if stale and state != "none":
        say(f"pipeline {name}: the pretrain checkpoint changed since the sft stage ran; training sft again")
    if state == "complete" and not stale:
        check_finished_config(payload, sft_cfg, "sft", sft_dir)
        status["sft"] = "skipped (complete)"
        say(f"pipeline {name}: stage sft is complete ({sft_final})")
    else:
        resume = state == "partial" and not stale
        say(f"pipeline {name}: stage sft ({'resuming' if resume else 'from ' + pre_final.name})")
        run_sft(sft_cfg, load_base(str(pre_final)), console, overwrite=state != "none" and not resume,
                resume=resume, resume_command=command)
        status["sft"] = "resumed" if resume else "ran"
        record["sft_base"] = identity(pre_final)
        write_record(run_dir, record)
    sft_payload = peek(sft_final)
    if sft_payload is None:
        raise LlmctlError(f"the sft stage left no readable {sft_final}; run the same command again")

    # ---- eval and samples: repeated only for new weights
    ids = {"pretrain": identity(pre_final), "sft": identity(sft_final)}
    if record.get("eval", {}).get("checkpoints") == ids:
        status["eval"] = "skipped (done for these checkpoints)"
    else:
        say(f"pipeline {name}: stage eval")
        record["eval"] = {"checkpoints": ids, "pretrain": score_pretrain(pre_final, cfg),
                          "sft": score_sft(sft_final, sft_cfg)}
        write_record(run_dir, record)
        status["eval"] = "ran"
    if record.get("samples", {}).get("checkpoints") == ids:
        status["samples"] = "skipped (done for these checkpoints)"
    else:
        say(f"pipeline {name}: stage samples")
        record["samples"] = {"checkpoints": ids, **make_samples(pre_final, sft_final, sft_cfg)}
        write_record(run_dir, record)
        status["samples"] = "ran"

    stages = {
        "data": {"status": status["data"], "tokens": data["totals"].get("train", {}).get("tokens"),
                 "path": data["path"]},
        **{stage: {"status": status[stage], "steps": int(p["step"]), "tokens": int(p.get("tokens_seen", 0)),
                   "checkpoint": str(path), **{k: record["eval"][stage][k] for k in
                                               ("loss", "perplexity", "bits_per_byte", "what", "mixture")
                                               if k in record["eval"][stage]},
                   "sample": record["samples"][stage]}
           for stage, p, path in (("pretrain", pre_payload, pre_final), ("sft", sft_payload, sft_final))},
        # The eval and samples stages' own rows carry what they produced, for both models.
        "eval": {"status": status["eval"], **{stage: record["eval"][stage] for stage in ("pretrain", "sft")}},
        "samples": {"status": status["samples"], **{stage: record["samples"][stage] for stage in ("pretrain", "sft")}},
    }
    return {"run": name, "run_dir": str(run_dir), "sft_run_dir": str(sft_dir), "record": str(run_dir / RECORD),
            "stages": stages}


SAMPLE_CHARS = 80  # of a prompt or sample shown in the table; pipeline.json has them whole


def excerpt(text: str, chars: int = SAMPLE_CHARS) -> str:
    """repr of the text's start (newlines visible), with … where it was cut."""
    return repr(text[:chars]) + ("…" if len(text) > chars else "")


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """One row per stage with what it produced: the token store, the checkpoints, then each
    model's held-out loss / perplexity / bits per byte and a sample, one line per model."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"pipeline {summary['run']}"))
    numeric = ("steps", "tokens", "val loss", "ppl", "bits/byte")
    for column in ("stage", "status", *numeric, "output"):
        table.add_column(column, justify="right" if column in numeric else "left", overflow="fold")
    stages = summary["stages"]

    def add(stage: str, status: str, *cells: str) -> None:
        table.add_row(stage, status, *cells[:-1], Text(cells[-1]))  # Text: paths and samples are not markup

    def scores(score: dict[str, Any]) -> tuple[str, str, str]:
        return f"{score['loss']:.4f}", f"{score['perplexity']:.2f}", f"{score['bits_per_byte']:.4f}"

    data = stages["data"]
    add("data", data["status"], "", format(data["tokens"], ",") if data.get("tokens") is not None else "",
        "", "", "", data.get("path") or "")
    for stage in ("pretrain", "sft"):
        row = stages[stage]
        add(stage, row["status"], format(row["steps"], ","), format(row["tokens"], ","), "", "", "", row["checkpoint"])
    for i, model in enumerate(("pretrain", "sft")):
        score = stages["eval"][model]
        add("eval" if i == 0 else "", stages["eval"]["status"] if i == 0 else "", "", "", *scores(score),
            f"{model}: {score['what']}")
        if "mixture" in score:  # the same checkpoint scored with its counted n-grams mixed in
            add("", "", "", "", *scores(score["mixture"]), f"{model} + counts")
    for i, model in enumerate(("pretrain", "sft")):
        sample = stages["samples"][model]
        add("samples" if i == 0 else "", stages["samples"]["status"] if i == 0 else "", "", "", "", "", "",
            f"{model}: {excerpt(sample['prompt'])} -> {excerpt(sample['text'])}")
    console.print(table)
    mixed = any("mixture" in summary["stages"]["eval"][model] for model in ("pretrain", "sft"))
    console.print(f"val loss: pretrain on its validation split, sft on held-out responses only"
                  f"{'; each of the network alone, and + counts: with its counted n-grams mixed in' if mixed else ''}; "
                  f"details in {summary['record']}", markup=False, highlight=False)
