"""`llmctl sft`: instruction-tune a checkpoint with the same trainer, callbacks and run rules as pretraining.

Flow: config -> the `--from` checkpoint (weights, model config, tokenizer, and its chat
template when it is already an SFT model) -> conversations (`llmctl.data.sft`) -> examples
with response-only labels (`llmctl.data.chat_template`) -> `llmctl.stage.fit_stage` with
`ExampleBatches` and a response-only evaluation (`llmctl.evaluate.evaluate_examples`). Only
the batches (ignored prompt and padding targets) and the starting weights differ from
pretraining.

Config. `[model]` and `[data]` describe the weights and the tokenizer, so they come from the
checkpoint; a preset's own `[model]` (meant for pretraining) is ignored, and an explicit
`--set model.*` or `data.*` that contradicts the checkpoint is an error (except
`model.gradient_checkpointing` and `data.cache_dir`, which change how, not what, is trained).
`[sft]` holds the data and training keys; `[run]` and `[eval]` are the user's.

Run directory. An SFT run is a run like any other: `<output_dir>/<run_name>/` with
config.toml, training.log, metrics.jsonl and `<run_name>-sft_step{N}.pt` /
`<run_name>-sft_final.pt`, the same refusal to start over checkpoints, `--overwrite` and
`--resume` rules, and the same run lock. The default name is the base run's name plus
`-sft`; a name whose directory holds the `--from` checkpoint is refused (overwriting it
would delete the base).

Every checkpoint stores the chat template (`template`, a plain dict) and the tokenizer,
so `llmctl generate` renders a plain prompt exactly as training did. The trainer counts
each sequence as the mean example length (not the padded context), so tokens and tokens/s
are real tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from llmctl.autobatch import with_micro_batch
from llmctl.checkpoint import load_checkpoint, resolve_checkpoint, step_checkpoints
from llmctl.config import (AUTO, Config, config_from_dict, find_preset, load_config, parse_override, read_toml,
                           validate, with_overrides)
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.batches import Example, ExampleBatches
from llmctl.data.downloads import check_sft_downloads, require
from llmctl.data.chat_template import ChatTemplate, Message, encode_example, encode_examples, prompt_ids
from llmctl.data.sft import SFTData, conversation, load_sft_data, record_at
from llmctl.data.tokenizer import TextTokenizer
from llmctl.errors import ConfigError, LlmctlError
from llmctl.evaluate import evaluate_examples
from llmctl.model import Transformer
from llmctl.ngram import counts_for
from llmctl.phases import Phases, approx_count
from llmctl.resume import check_run_dir, check_same_data, find_resume_point
from llmctl.stage import fit_stage, run_dir_of, say_to
from llmctl.runlock import hold_run_lock
from llmctl.runtime import DistInfo, autocast, init_distributed, resolve_dtype, seed_everything
from llmctl.trainer import Callback, Trainer

STAGE = "sft"
# Keys of [model] and [data] a user may set for SFT: they change how the run computes or
# where it caches, not the weights or the tokenizer the checkpoint fixes.
FREE_KEYS = {"model.gradient_checkpointing", "data.cache_dir"}


# --------------------------------------------------------------------------- the base checkpoint

def resolve_base(source: str) -> Path:
    """A checkpoint file, or a run directory: its pretrain final, else newest pretrain step,
    else whatever `resolve_checkpoint` picks (an SFT run's final, to tune further)."""
    if not source:
        raise ConfigError("no checkpoint to start from; pass --from CKPT (a pretrain checkpoint or run "
                          "directory), or set sft.from")
    path = Path(source).expanduser()
    if path.is_dir():
        finals = sorted(path.glob("*-pretrain_final.pt"))
        if finals:
            return finals[-1]
        steps = step_checkpoints(path, "pretrain")
        if steps:
            return steps[-1][1]
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {source}; pass --from a .pt file or a run directory "
                          f"(e.g. experiments/runs/NAME)")
    return resolve_checkpoint(path)


@dataclass
class Base:
    """The checkpoint SFT starts from, loaded once (weights are dropped after use)."""

    path: Path
    config: Config
    tokenizer: TextTokenizer
    template: ChatTemplate
    weights: dict[str, Any] | None


def load_base(source: str) -> Base:
    path = resolve_base(source)
    payload = load_checkpoint(path)
    missing = [k for k in ("config", "tokenizer", "model") if k not in payload]
    if missing:
        raise LlmctlError(f"{path} lacks {', '.join(missing)}; sft starts from a checkpoint written by "
                          f"llmctl pretrain or sft")
    template = ChatTemplate.from_state(payload["template"]) if "template" in payload else ChatTemplate()
    weights = {k: v for k, v in payload["model"].items()
               if not k.startswith("counts.")}  # older checkpoints kept their counts here; sft counts anew
    return Base(path, config_from_dict(payload["config"]), TextTokenizer.from_state(payload["tokenizer"]),
                template, weights)


# --------------------------------------------------------------------------- config

def sft_config(user: Config, base: Config, overrides: list[str] | None = None) -> Config:
    """The run's config: [model] and [data] from the base checkpoint, the rest from the user.
    An override of a model/data key that contradicts the checkpoint raises ConfigError."""
    for item in overrides or []:
        key, _ = parse_override(item)
        section, name = key.split(".", 1)
        if section not in ("model", "data") or key in FREE_KEYS:
            continue
        mine, theirs = getattr(getattr(user, section), name, None), getattr(getattr(base, section), name, None)
        if mine != theirs and not (key == "model.vocab_size" and mine == 0):
            raise ConfigError(f"--set {key}={mine!r}: sft takes [model] and [data] from the --from checkpoint, "
                              f"where {key} = {theirs!r}; drop this --set (SFT data goes in sft.datasets)")
    cfg = copy.deepcopy(user)
    cfg.model = dataclasses.replace(base.model, gradient_checkpointing=user.model.gradient_checkpointing)
    cfg.data = dataclasses.replace(base.data, cache_dir=user.data.cache_dir)
    cfg.pretrain = copy.deepcopy(base.pretrain)  # what trained the base, kept for the record
    validate(cfg)
    return cfg


def names_run(preset: str | None, overrides: list[str] | None, run_name: str | None) -> bool:
    if run_name is not None or any(parse_override(o)[0] == "run.name" for o in overrides or []):
        return True
    return bool(preset) and bool(read_toml(find_preset(preset)).get("run", {}).get("name"))


def load_sft_config(preset: str | None, overrides: list[str] | None, run_name: str | None,
                    from_: str | None, resume: bool | str = False) -> tuple[Config, Base]:
    """`llmctl sft`'s options -> (the run's config, the base checkpoint). Without --from,
    sft.from is used; resuming a named run without either, its config.toml says where it began."""
    user = load_config(preset, overrides, run_name)
    if from_:
        user.sft.from_ = from_
    named = names_run(preset, overrides, run_name)
    if not user.sft.from_ and resume and named:
        saved = run_dir_of(user) / "config.toml"
        if saved.is_file():
            user.sft.from_ = read_toml(saved).get("sft", {}).get("from", "")
    base = load_base(user.sft.from_)
    if not preset:  # the base run's own [sft], [run] and [eval] settings (its preset's), then --set
        named_by = user.run.name if named else None
        user = with_overrides(copy.deepcopy(base.config), overrides, named_by or base.config.run.name)
    user.sft.from_ = str(base.path)  # the file, not the run directory: the config says what it started from
    if not named:
        user.run.name = f"{base.config.run.name}-sft"
    cfg = sft_config(user, base.config, overrides)
    if base.path.resolve().parent == run_dir_of(cfg).resolve():
        raise ConfigError(f"run name '{cfg.run.name}' is the run directory of the --from checkpoint "
                          f"{base.path}; choose another --run-name (the default is '{base.config.run.name}-sft')")
    return cfg, base


def resume_command(from_: str, preset: str | None, overrides: list[str] | None, run_name: str) -> str:
    sets = [a for o in overrides or [] for a in ("--set", o)]
    preset_args = ["--preset", preset] if preset else []
    return shlex.join(["llmctl", "sft", "--from", from_, *preset_args, "--run-name", run_name, *sets, "--resume"])


# --------------------------------------------------------------------------- samples in the log

def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def greedy_answer(model: torch.nn.Module, ids: list[int], tokenizer: TextTokenizer, max_new_tokens: int,
                  context_length: int, dtype: torch.dtype) -> str:
    """The model's greedy reply to an encoded prompt (stops at end-of-text); no RNG is used."""
    from llmctl.generate import Sampling, token_stream

    was_training = model.training
    model.eval()
    try:
        new = list(token_stream(model, ids, Sampling(max_new_tokens=max_new_tokens, temperature=0.0),
                                torch.Generator(), context_length=context_length, eos_id=tokenizer.eos_id,
                                dtype=dtype))
    finally:
        model.train(was_training)
    return tokenizer.decode(new).strip()


class SampleCallback(Callback):
    """At every evaluation, greedy answers to a few fixed held-out prompts, written to the log."""

    def __init__(self, prompts: list[list[Message]], template: ChatTemplate, tokenizer: TextTokenizer,
                 max_new_tokens: int, context_length: int, dtype: torch.dtype, say: Callable[[str], None]):
        self.prompts = [(p[-1][1], prompt_ids(p, template, tokenizer)) for p in prompts]
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.context_length, self.dtype, self.say = context_length, dtype, say
        self.last: list[dict[str, str]] = []

    def on_eval(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.last = []
        for question, ids in self.prompts:
            answer = greedy_answer(trainer.model, ids, self.tokenizer, self.max_new_tokens, self.context_length,
                                   self.dtype)
            self.last.append({"prompt": question, "answer": answer})
            self.say(f"sample step {record['step']} | {_short(question, 60)} -> {json.dumps(_short(answer, 120))}")


def sample_prompts(validation: list[list[Message]], count: int) -> list[list[Message]]:
    """The conversation up to its last reply, for the first `count` held-out conversations."""
    prompts = []
    for messages in validation[:count]:
        last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
        prompts.append(messages[:last])
    return [p for p in prompts if p]


# --------------------------------------------------------------------------- the command

def examples_fingerprint(examples: list[Example]) -> str:
    """sha256 of the examples' input ids and labels, in order (each array prefixed by its length,
    so no two different lists of examples hash alike by concatenation)."""
    hasher = hashlib.sha256()
    for e in examples:
        for ids in (e.input_ids, e.labels):
            hasher.update(np.int64(len(ids)).tobytes())
            hasher.update(np.asarray(ids, dtype=np.int64).tobytes())
    return hasher.hexdigest()


def _data_line(data: SFTData, train: list[Example], truncated: int, max_len: int) -> str:
    trained = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in train)
    tokens = sum(len(e.input_ids) for e in train)
    held = "; ".join(f"{s['spec']}: {s['train']:,} train, {s['held_out']}" for s in data.sources)
    line = (f"data: {len(data.train):,} training and {len(data.validation):,} held-out conversations ({held}); "
            f"{tokens:,} training tokens, {trained:,} of them response tokens with loss")
    if truncated:
        line += f"; {truncated:,} longer than the context ({max_len}) truncated on the reply side"
    if data.skipped:
        line += f"; {data.skipped:,} records with an empty reply skipped (first: {data.first_skipped})"
    return line


def truncation_warning(truncated: int, total: int, max_len: int, cfg: Config) -> str:
    """More than a fifth of the conversations cut short: the model learns replies without their ends."""
    longer = ("raise sft.seq_len (up to the model's window of "
              f"{cfg.model.max_seq_len})" if max_len < cfg.model.max_seq_len else
              f"pretrain a model with a longer window (model.max_seq_len, now {cfg.model.max_seq_len})")
    return (f"warning: {truncated:,} of {total:,} training conversations ({100 * truncated / total:.0f}%) are "
            f"longer than the {max_len}-token context and lose the end of their reply; {longer}, or "
            f"train on shorter conversations")


def run_sft(cfg: Config, base: Base, console: Console, overwrite: bool = False, resume: bool | str = False,
            resume_command: str | None = None) -> dict[str, Any]:
    """Fine-tune `base` on cfg.sft.datasets, or with `resume` continue the run's newest SFT
    checkpoint (with `resume="auto"`, only if it has one); returns fit_stage's summary plus
    example counts and the last logged samples. The run lock is held throughout, as in
    `llmctl.pretrain.run_pretrain`."""
    run_dir = run_dir_of(cfg)
    with hold_run_lock(run_dir, STAGE, say_to(console)) as lock:
        resume = check_run_dir(run_dir, resume=resume, overwrite=overwrite, stage=STAGE, existed=lock.existed)
        return _sft(cfg, base, console, run_dir, overwrite, resume, resume_command)


def _sft(cfg: Config, base: Base, console: Console, run_dir: Path, overwrite: bool, resume: bool,
         resume_command: str | None) -> dict[str, Any]:
    dist_info, device = init_distributed(cfg.run.device, cfg.run.distributed)  # alone: rank 0 of 1
    if not dist_info.is_main:
        console = Console(quiet=True)  # one voice: rank 0 prints, logs and saves
    with Phases(console) as phases:  # the spinner (or plain lines) until the first step
        return _prepare_and_fit(cfg, base, console, phases, run_dir, dist_info, device, overwrite, resume,
                                resume_command)


def _prepare_and_fit(cfg: Config, base: Base, console: Console, phases: Phases, run_dir: Path, dist_info: DistInfo,
                     device: torch.device, overwrite: bool, resume: bool, resume_command: str | None) -> dict[str, Any]:
    dtype = resolve_dtype(cfg.run.dtype, device)
    tokenizer, template = base.tokenizer, base.template
    if resume:
        phases("reading the newest checkpoint to resume from …")
    point = find_resume_point(run_dir, STAGE, cfg, tokenizer) if resume else None
    if point is not None and "template" in point.state:
        template = ChatTemplate.from_state(point.state["template"])  # what this run has trained with
    # Every Hub dataset, before reading any: one error names all that the Hub cannot give.
    require(check_sft_downloads(cfg.sft.datasets, ["--checkpoint", str(base.path)]))
    phases(f"data: reading {', '.join(cfg.sft.datasets)} (format {cfg.sft.format}) …")
    data = load_sft_data(cfg.sft.datasets, cfg.sft.format, cfg.sft.validation_fraction)
    if not data.train or not data.validation:
        raise LlmctlError(f"sft.datasets gave {len(data.train)} training and {len(data.validation)} held-out "
                          f"conversations; SFT needs at least 2 usable records (check the files and caps)")
    max_len = cfg.train_seq_len(STAGE)
    phases(f"tokenizing {len(data.train) + len(data.validation):,} conversations …")
    train = encode_examples(data.train, template, tokenizer, max_len)
    validation = encode_examples(data.validation, template, tokenizer, max_len)
    truncated = sum(e.truncated for e in train)
    if truncated * 5 > len(train):
        console.print(truncation_warning(truncated, len(train), max_len, cfg), markup=False, highlight=False,
                      soft_wrap=True)
    meta = {"sources": data.sources,
            "tokens": {"train": sum(len(e.input_ids) for e in train),
                       "validation": sum(len(e.input_ids) for e in validation)},
            "fingerprint": examples_fingerprint(train)}  # changed conversations of equal length too
    if point is not None:
        check_same_data(point, meta)

    seed_everything(cfg.run.seed)
    with torch.device("meta"):  # shapes only, for the phase line
        parameters = Transformer(cfg.model).num_parameters()
    phases(f"building the model ({approx_count(parameters)} parameters) from {base.path.name} …")
    model = Transformer(cfg.model)
    if point is None:
        try:
            model.load_state_dict(base.weights)
        except RuntimeError as e:
            raise LlmctlError(f"{base.path}: its weights do not fit its own config "
                              f"({str(e).splitlines()[0]})") from None
    base.weights = None  # the model holds them now
    model.to(device)
    counts = counts_for(cfg.model)  # n-grams of the text it is tuned on now, conversations end to end
    if counts is not None:
        phases(f"counting the n-grams of {approx_count(meta['tokens']['train'])} training tokens …")
        counts.to(device).fit(np.concatenate([np.asarray(e.input_ids, dtype=np.int64) for e in train]))
    if cfg.sft.micro_batch_size == AUTO:
        phases("choosing the micro-batch (the largest that fits) …")
    cfg = with_micro_batch(cfg, STAGE, model, device, dtype, dist_info, point.state["config"] if point else None)
    batches = ExampleBatches(train, cfg.sft.micro_batch_size, tokenizer.eos_id, cfg.run.seed)
    eval_batch = cfg.eval_batch_size(STAGE)

    def evaluate() -> dict[str, float]:
        return evaluate_examples(model, validation, eval_batch, device, autocast(device, dtype),
                                 tokenizer.eos_id, cfg.eval.max_tokens, dist=dist_info, counts=counts)

    samples: list[SampleCallback] = []

    def callbacks(say_line: Callable[[str], None]) -> list[Callback]:
        prompts = sample_prompts(data.validation, cfg.sft.samples)
        if not prompts or dist_info.enabled:  # FSDP's sharded weights allow no forward on one rank alone
            return []
        samples.append(SampleCallback(prompts, template, tokenizer, cfg.sft.sample_tokens, max_len, dtype, say_line))
        return samples

    t = cfg.sft
    mean_len = max(1, round(meta["tokens"]["train"] / len(train)))
    intro = [f"run {cfg.run.name}: sft of {base.path} ({sum(p.numel() for p in model.parameters()):,} parameters) "
             f"on {device.type} ({str(dtype).removeprefix('torch.')}), {t.batch_size} conversations/step "
             f"(micro {t.micro_batch_size}, accumulation {t.batch_size // t.micro_batch_size}), "
             f"{t.max_steps} steps, lr {t.lr:g}",
             _data_line(data, train, truncated, max_len),
             f"template: user {template.user!r}, reply {template.assistant_prefix + template.assistant!r} "
             f"then end-of-text; loss on replies only"]
    if counts is not None and cfg.model.ngram_order:
        intro.append(f"counts: order-{cfg.model.ngram_order} n-grams re-counted on the training conversations, "
                     f"mixed in at evaluation and generation")
    summary = fit_stage(cfg, STAGE, console, model=model, batches=batches, evaluate=evaluate, tokenizer=tokenizer,
                        data_meta=meta, device=device, dtype=dtype, point=point, intro=intro, overwrite=overwrite,
                        resume_command=resume_command, seq_len=mean_len,
                        checkpoint_extra={"template": template.to_state(),
                                          **({"counts": counts.state_dict()} if counts is not None else {})},
                        callbacks=callbacks, dist_info=dist_info, phases=phases)
    summary.update(examples=len(train), held_out=len(validation), truncated=truncated, skipped=data.skipped,
                   samples=samples[0].last if samples else [], base=str(base.path))
    return summary


# --------------------------------------------------------------------------- data inspect --sft

def inspect_example(spec: str, index: int, cfg: Config, checkpoint: str | None = None) -> dict[str, Any]:
    """How record `index` of `spec` is rendered and which targets carry loss: with the
    tokenizer, template and context of `checkpoint`, else of the config (data.tokenizer,
    model.max_seq_len, the default template). A plain dict (`--json` prints it)."""
    if checkpoint:
        base = load_base(checkpoint)
        tokenizer, template, max_len, source = base.tokenizer, base.template, \
            cfg.sft.seq_len or base.config.model.max_seq_len, \
            str(base.path)
    else:
        from llmctl.data.tokenizer import resolve_tokenizer

        tokenizer, template, max_len = resolve_tokenizer(cfg.data), ChatTemplate(), cfg.train_seq_len("sft")
        source = f"data.tokenizer {cfg.data.tokenizer}"
    where, record = record_at(spec, index)
    try:
        messages = conversation(where, record, cfg.sft.format)
    except ValueError as e:  # EmptyReply: a training run skips it
        raise LlmctlError(f"{where}: {e}; training skips this record (pick another --index)") from None
    example = encode_example(messages, template, tokenizer, max_len)
    ids = example.input_ids
    tokens = []
    for pos, token in enumerate(ids):
        label = example.labels[pos]
        target = label if label != IGNORE_INDEX else (ids[pos + 1] if pos + 1 < len(ids) else None)
        tokens.append({"pos": pos, "id": token, "text": tokenizer.decode([token]), "target": target,
                       "target_text": tokenizer.decode([target]) if target is not None else None,
                       "loss": label != IGNORE_INDEX})
    trained = [t["target"] for t in tokens if t["loss"]]
    return {"where": where, "spec": spec, "index": index, "tokenizer": source, "context": max_len,
            "template": template.to_state(), "messages": [{"role": r, "content": c} for r, c in messages],
            "text": tokenizer.decode(ids + ([example.labels[-1]] if example.labels
                                            and example.labels[-1] != IGNORE_INDEX else [])),
            "response_text": tokenizer.decode(trained), "tokens": tokens, "n_tokens": len(ids),
            "n_loss": len(trained), "n_ignored": len(ids) - len(trained), "truncated": example.truncated}


def render_inspection(info: dict[str, Any], console: Console) -> None:
    """The rendered example with reply tokens highlighted, then one row per position."""
    from rich.table import Table
    from rich.text import Text

    console.print(f"{info['where']}: {info['n_tokens']} positions, {info['n_loss']} targets carry loss, "
                  f"{info['n_ignored']} ignored (prompt){', truncated to the context' if info['truncated'] else ''}; "
                  f"tokenizer from {info['tokenizer']}, context {info['context']}", markup=False, highlight=False)
    rendered = Text()
    tokens = info["tokens"]
    if tokens:
        rendered.append(tokens[0]["text"], style="dim")
    for t in tokens:  # token k+1 is position k's target: styled by whether it carries loss
        if t["target_text"] is not None:
            rendered.append(t["target_text"], style="bold green" if t["loss"] else "dim")
    console.print(Text("rendered (bold green = carries loss):", style="bold"))
    console.print(rendered)
    console.print(Text("response tokens (the only targets with loss):", style="bold"))
    console.print(info["response_text"], markup=False, highlight=False)
    table = Table(show_header=True, header_style="bold", box=None)
    for column in ("pos", "input", "id", "target", "loss"):
        table.add_column(column, justify="right" if column in ("pos", "id") else "left")
    for t in tokens:
        table.add_row(str(t["pos"]), repr(t["text"]), str(t["id"]),
                      repr(t["target_text"]) if t["target_text"] is not None else "",
                      "yes" if t["loss"] else "-", style=None if t["loss"] else "dim")
    console.print(table)


def next_commands(run_dir: str) -> list[tuple[str, str]]:
    """(command, what it does) to print when an SFT run finishes."""
    run = shlex.quote(run_dir)
    return [(f"llmctl generate --checkpoint {run} --prompt 'Good morrow, my lord.' --temperature 0",
             "its answer (the prompt is formatted with the chat template)"),
            (f"llmctl eval --checkpoint {run}", "loss on held-out replies"),
            (f"llmctl export --checkpoint {run} --format hf exported/{shlex.quote(Path(run_dir).name)}",
             "a folder that transformers loads")]
