"""The `llmctl` command line: thin Typer commands over library functions.

Each command parses its options, loads the config, calls one function and shows the
result. torch and the data libraries are imported inside the commands, so `llmctl --help`
stays instant. A user error becomes one line on stderr and an exit code (2 for usage and
config, 1 at run time); `LLMCTL_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core

from llmctl import __version__
from llmctl.config import available_presets
from llmctl.errors import ConfigError, LlmctlError

def _bare_flags(params: list) -> list:
    """Typer 0.29's help shows every option's type, `<bool>` after a flag too, as if it took a
    value; a flag's metavar replaces that text, and "" leaves nothing (flags never print it elsewhere)."""
    for param in params:
        if isinstance(param, typer.core.TyperOption) and (param.is_flag or param.count):
            param.metavar = ""
    return params


class LlmctlCommand(typer.core.TyperCommand):
    def get_params(self, ctx) -> list:
        return _bare_flags(super().get_params(ctx))


class LlmctlGroup(typer.core.TyperGroup):
    def get_params(self, ctx) -> list:
        return _bare_flags(super().get_params(ctx))


class LlmctlTyper(typer.Typer):
    """A Typer whose commands are LlmctlCommands unless one names its own class, so a command
    added later gets bare flags without remembering to ask."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or LlmctlCommand, **kwargs)


app = LlmctlTyper(
    cls=LlmctlGroup,
    name="llmctl",
    help="Train small language models from scratch on your own hardware: data -> pretrain -> eval -> sft "
         "-> generate -> export.\n\n"
         "Example: llmctl pretrain --preset tiny --run-name demo, then llmctl runs and llmctl plot demo. "
         "Tab completion: llmctl --install-completion (bash, zsh, fish, PowerShell).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _debug() -> bool:
    return os.environ.get("LLMCTL_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> typer.Exit:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


OUT_OF_MEMORY = ("out of {where}; lower pretrain.micro_batch_size (or sft.micro_batch_size; batch_size stays, "
                 "accumulation grows), set model.gradient_checkpointing=true, or lower model.max_seq_len; "
                 "then continue with --resume")


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn known failures into one line and an exit code."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except LlmctlError as e:
        if _debug():
            traceback.print_exc()
        raise _fail(str(e), e.exit_code) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None
    except MemoryError:
        raise _fail(OUT_OF_MEMORY.format(where="host memory"), 1) from None
    except Exception as e:
        if _debug():
            raise
        if type(e).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch here
            raise _fail(OUT_OF_MEMORY.format(where="device memory"), 1) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _fail(f"{type(e).__name__}: {first} (set LLMCTL_DEBUG=1 to see the traceback)", 1) from None


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Train small language models from scratch: data -> pretrain -> eval -> sft -> generate."""


class ResumeCommand(LlmctlCommand):
    """A command whose `--resume` takes an optional value: `--resume` alone, or `--resume auto`.

    Click has such options (is_flag=False, flag_value=...), but Typer deprecated those two
    parameters and its bundled parser (Typer 0.29) has no optional values. So a bare
    `--resume` (last, or followed by another option) is rewritten to `--resume=` before
    parsing: the empty value means "continue from the newest checkpoint". pretrain and sft
    take no positional arguments, so a word after `--resume` can only be its value."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        rewritten = list(args)
        for i, arg in enumerate(args):
            if arg == "--":
                break
            if arg == "--resume" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                rewritten[i] = "--resume="
        return super().parse_args(ctx, rewritten)


def resume_mode(value: str | None) -> bool | str:
    """`--resume`'s value -> False (not given), True (continue) or "auto" (continue if possible)."""
    if value is None:
        return False
    if value.strip() == "":
        return True
    if value.strip().lower() == "auto":
        return "auto"
    raise ConfigError(f"--resume {value}: --resume takes no value (continue from the newest checkpoint) or "
                      f"'auto' (continue if the run has a checkpoint, else start it); pass one of those")


RESUME_HELP = ("--resume auto: continue if the run has a checkpoint of this stage, else start it "
               "(one command line for every restart of torchrun --max-restarts).")

# Listed from the presets folder, so a preset file added there shows up without editing this.
PresetOption = Annotated[str, typer.Option(
    "--preset", "-p", help=f"Preset name ({', '.join(available_presets())}) or path to a TOML file.")]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="SECTION.KEY=VALUE",
    help="Override one config key; VALUE is read as TOML, else as a string. Repeatable.")]
RunNameOption = Annotated[Optional[str], typer.Option(
    "--run-name", "-n", help="Run directory name under run.output_dir (default: <preset>-<date>-<time>).")]


def say_next(commands: list[tuple[str, str]]) -> None:
    """What to run next, on stderr: stdout of a finished run stays the checkpoint path alone."""
    width = max(len(command) for command, _ in commands)
    typer.echo("next:", err=True)
    for command, what in commands:
        typer.echo(f"  {command.ljust(width)}   # {what}", err=True)


@app.command(cls=ResumeCommand)
def pretrain(
    preset: PresetOption = "quickstart",
    run_name: RunNameOption = None,
    overrides: SetOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the resolved config and derived numbers, then exit.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Delete the run directory (checkpoints and logs) and start again there.")] = False,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="[auto]",
        help="Continue the run from its newest checkpoint; pass the same preset and --set values "
             "(max_steps, eval/save cadence, lr, grad_clip, device and dtype may change). " + RESUME_HELP)] = None,
) -> None:
    """Pretrain a decoder-only transformer from scratch (next-token prediction).

    Example: llmctl pretrain --preset tiny --run-name demo --set pretrain.max_steps=100
    (stopped? add --resume to continue exactly where it left off)
    """
    with user_errors():
        from llmctl.config import load_config

        mode = resume_mode(resume)
        cfg = load_config(preset, overrides, run_name)
        from llmctl.data.downloads import prepare_command, pretrain_closing

        if dry_run:
            from llmctl.pretrain import dry_run as plan_run

            cfg, plan, downloads = plan_run(cfg)
            typer.echo(f"# llmctl pretrain --preset {preset} --dry-run: the resolved config")
            typer.echo(cfg.to_toml())
            for heading, rows in (("derived", plan.rows()), (downloads.heading(), downloads.rows())):
                typer.echo(f"# {heading}")
                width = max((len(k) for k, _ in rows), default=0)
                for key, value in rows:
                    typer.echo(f"# {key.ljust(width)}  {value}")
            error = downloads.error(pretrain_closing(prepare_command(preset, overrides)))
            if error is not None:  # the plan is printed; a script still sees that the run cannot start
                raise type(error)(f"cannot start: {error}")
            return
        from rich.console import Console

        from llmctl.pretrain import resume_command, run_pretrain

        from llmctl.pretrain import next_commands

        summary = run_pretrain(cfg, Console(stderr=True), overwrite=overwrite, resume=mode,
                               resume_command=resume_command(preset, overrides, cfg.run.name),
                               prepare_command=prepare_command(preset, overrides))
        if summary["checkpoint"]:  # None on the other ranks of a torchrun job
            typer.echo(summary["checkpoint"])
            say_next(next_commands(summary["run_dir"]))


@app.command()
def bench(
    preset: PresetOption = "quickstart",
    overrides: SetOption = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed optimizer steps.")] = 10,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps first (compilation, allocator).")] = 3,
    reference: Annotated[bool, typer.Option(
        "--reference", help="Also time a plain transformers LlamaForCausalLM loop on the same shape, "
                            "interleaved, and print the ratio.")] = False,
    rounds: Annotated[Optional[int], typer.Option(
        "--rounds", help="Timed rounds of --steps steps; the median counts. Default 1, or 3 with --reference.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Measure training speed of a preset on this machine: tokens/s, MFU, peak memory.

    Runs real optimizer steps on synthetic tokens. Under torchrun it times the distributed
    step (run.distributed = ddp or fsdp; tokens/s for the whole group, MFU per device).
    Example: llmctl bench --preset local --set pretrain.batch_size=8 --steps 5 --json
    """
    with user_errors():
        from llmctl.config import load_config

        cfg = load_config(preset, overrides, run_name="bench")
        from llmctl.bench import run_bench

        result = run_bench(cfg, steps=steps, warmup=warmup, reference=reference,
                           rounds=rounds if rounds is not None else (3 if reference else 1))
        if result["rank"] != 0:  # under torchrun: one voice
            return
        if as_json:
            import json

            typer.echo(json.dumps(result))
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"llmctl bench --preset {preset}", show_header=False)
        peak = result["peak_tflops"] or 0.0
        peak_text = f"{peak:,.1f} TFLOP/s" if peak >= 1 else f"{peak * 1000:,.0f} GFLOP/s"
        mfu = f"{result['mfu']:.1%} of {peak_text} ({result['peak_source']})" \
            if result["mfu"] is not None else f"n/a ({result['peak_source']})"
        for key, value in [
            ("device", f"{result['device']}, {result['dtype']}{', compiled' if result['compiled'] else ''}"
                       + (f", {result['distributed'].upper()} over {result['processes']} process(es)"
                          if result["distributed"] else "")),
            ("parameters", f"{result['params']:,}"),
            ("tokens per step", f"{result['tokens_per_step']:,} (micro batch {result['micro_batch_size']}, "
                                f"accumulation {result['accumulation']})"),
            ("tokens/s", f"{result['tokens_per_sec']:,.0f}"),
            ("achieved", f"{result['achieved_tflops'] * 1000:,.1f} GFLOP/s"),
            ("MFU", mfu),
            ("peak memory", f"{result['peak_memory_mb']:,.0f} MB"),
        ] + ([("reference", f"{result['reference_tokens_per_sec']:,.0f} tokens/s ({result['reference']})"),
              ("speed-up", f"{result['speedup']:.2f}x the reference (median of {len(result['rounds_tokens_per_sec'])} "
                           f"interleaved rounds)")] if reference else []):
            table.add_row(key, value)
        Console().print(table)


CheckpointOption = Annotated[str, typer.Option(
    "--checkpoint", "-c", help="An llmctl checkpoint file or run directory (its final, else latest, "
                               "checkpoint), or a transformers model folder or Hub id.")]
DeviceOption = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]


@app.command("eval")
def eval_command(
    checkpoint: CheckpointOption,
    data: Annotated[Optional[list[str]], typer.Option(
        "--data", "-d", metavar="SPEC",
        help="Data spec to score (text:GLOB, a Hub name, SPEC:N); repeatable, one row each. "
             "Default: the validation split the run trained with.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    stride: Annotated[int, typer.Option(
        "--stride", help="Slide windows by S tokens, scoring only their last S, so every token sees at "
                         "least context - S tokens before it (0 = context: disjoint windows).")] = 0,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", "-b", help="Windows per forward pass (0 = the run's eval batch size).")] = 0,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option(
        "--dtype", help="float32 (exact), bfloat16 (faster where supported) or auto.")] = "float32",
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", metavar="T1,T2",
        help="Run lm-evaluation-harness tasks instead (e.g. hellaswag,arc_easy); scores are saved in the "
             "run directory and shown by llmctl runs.")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(
        "--num-fewshot", help="With --tasks: examples shown before each question (default: the task's).")] = None,
    limit: Annotated[Optional[int], typer.Option(
        "--limit", help="With --tasks: score only the first N examples of each task (a quick look).")] = None,
    include_path: Annotated[Optional[str], typer.Option(
        "--include-path", metavar="DIR", help="With --tasks: a folder of your own task YAML files.")] = None,
) -> None:
    """Score a model on held-out text: mean token loss, perplexity and bits per byte; or, with
    --tasks, on benchmark tasks through EleutherAI's lm-evaluation-harness.

    A checkpoint whose config mixes counted n-grams into its predictions (model.ngram_order,
    model.cache_weight) is scored twice from one pass: the network alone, and with the counts.
    --tasks needs the harness: pip install "llmctl\\[eval]".

    Example: llmctl eval --checkpoint experiments/runs/demo --data text:heldout.txt --stride 32 --json
    Example: llmctl eval --checkpoint experiments/runs/demo --tasks hellaswag,arc_easy --limit 200
    """
    with user_errors():
        if tasks is not None:
            _eval_tasks(checkpoint, tasks, data, stride, num_fewshot, limit, include_path, batch_size, device,
                        dtype, as_json)
            return
        for flag, value in (("--num-fewshot", num_fewshot), ("--limit", limit), ("--include-path", include_path)):
            if value is not None:
                raise ConfigError(f"{flag} goes with --tasks (benchmark tasks); add --tasks T1,T2 or drop {flag}")
        from llmctl.evaluate import run_eval

        result = run_eval(checkpoint, data, stride, batch_size, device, dtype)
        if as_json:
            import json

            typer.echo(json.dumps(result))
            return
        from rich.table import Table
        from rich.text import Text

        from llmctl.data.report import print_whole

        # Text, not markup: a path such as data[1].txt must not lose its brackets.
        table = Table(title=Text(f"{result['path'] or result['checkpoint']}  (context {result['context']}, "
                                 f"stride {result['stride']}, {result['dtype']})"))
        mixed = any("mixture" in row for row in result["datasets"].values())
        for column in ("data", *(("scored by",) if mixed else ()), "loss", "perplexity", "bits/byte",
                       "tokens", "bytes", "seconds"):
            table.add_column(column, justify="left" if column in ("data", "scored by") else "right",
                             overflow="fold" if column == "data" else "ellipsis")  # a path folds, never cut
        for name, row in result["datasets"].items():
            scorers = [("network", row), *([("network + counts", row["mixture"])] if "mixture" in row else [])]
            for i, (scorer, score) in enumerate(scorers):
                table.add_row(Text(name if i == 0 else ""), *((scorer,) if mixed else ()), f"{score['loss']:.4f}",
                              f"{score['perplexity']:.2f}", f"{score['bits_per_byte']:.4f}",
                              f"{row['tokens']:,}", f"{row['bytes']:,}", f"{row['seconds']:.1f}" if i == 0 else "")
        print_whole(table)


def _eval_tasks(checkpoint: str, tasks: str, data: list[str] | None, stride: int, num_fewshot: int | None,
                limit: int | None, include_path: str | None, batch_size: int, device: str, dtype: str,
                as_json: bool) -> None:
    """`llmctl eval --tasks`: the harness's scores as a table (or JSON), saved in the run directory."""
    if data:
        raise ConfigError("--data scores held-out text and --tasks benchmark tasks; run them as two commands")
    if stride:
        raise ConfigError("--stride applies to held-out text (--data), not to --tasks")
    from llmctl.lm_eval_adapter import run_tasks

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    result = run_tasks(checkpoint, names, num_fewshot=num_fewshot, limit=limit, include_path=include_path,
                       batch_size=batch_size, device=device, dtype=dtype)
    if as_json:
        import json

        typer.echo(json.dumps(result))
        return
    from rich.table import Table
    from rich.text import Text

    from llmctl.data.report import print_whole

    shots = "" if num_fewshot is None else f", {num_fewshot}-shot"
    table = Table(title=Text(f"{result['path'] or result['checkpoint']}  (lm-eval {result['lm_eval_version']}"
                             f"{shots}{f', limit {limit}' if limit else ''})"))
    for column in ("task", "metric", "value", "stderr"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, row in result["tasks"].items():
        for i, (metric, score) in enumerate(row["metrics"].items()):
            table.add_row(Text(task if i == 0 else ""), Text(metric), f"{score['value']:.4f}",
                          "-" if score["stderr"] is None else f"{score['stderr']:.4f}")
    print_whole(table)
    if result["saved"]:
        typer.echo(f"saved: {result['saved']}", err=True)


# Sampling options shared by generate and chat (the defaults are Sampling's, repeated in each signature).
MaxNewTokensOption = Annotated[int, typer.Option(
    "--max-new-tokens", "-m", help="Stop after N new tokens. Past the model's context (model.max_seq_len) "
                                   "the window slides: each new token sees the last max_seq_len tokens.")]
TemperatureOption = Annotated[float, typer.Option(
    "--temperature", "-t", help="Sampling temperature; 0 = greedy (always the most likely token).")]
TopKOption = Annotated[int, typer.Option("--top-k", help="Sample from the K most likely tokens; 0 = off.")]
TopPOption = Annotated[float, typer.Option(
    "--top-p", help="Sample from the smallest set of tokens whose probability reaches P, in (0, 1]; 1 = off.")]
RepetitionPenaltyOption = Annotated[float, typer.Option(
    "--repetition-penalty", help="Above 1 discourages tokens already in the text; 1 = off.")]
StopOption = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="Stop before this string (not printed); \\n and \\t are understood; repeatable.")]
SampleDtypeOption = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or auto.")]


@app.command()
def generate(
    checkpoint: CheckpointOption,
    prompt: Annotated[Optional[str], typer.Option("--prompt", "-p", help="Text to continue.")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", "-f", help="Read the prompt from this UTF-8 file instead.")] = None,
    max_new_tokens: MaxNewTokensOption = 256,
    temperature: TemperatureOption = 0.8,
    top_k: TopKOption = 0,
    top_p: TopPOption = 0.95,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    stop: StopOption = None,
    num_samples: Annotated[int, typer.Option(
        "--num-samples", "-n", help="Independent samples, printed one after another, separated by a '---' line.")] = 1,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Seed for sampling (sample i uses SEED + i); default: random, shown in the summary.")] = None,
    device: DeviceOption = "auto",
    dtype: SampleDtypeOption = "float32",
    no_cache: Annotated[bool, typer.Option(
        "--no-cache", help="Re-run the whole context every token instead of using the KV cache (slow).")] = False,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Feed the prompt as it is, without an SFT checkpoint's chat template.")] = False,
    counts: Annotated[str, typer.Option(
        "--counts", help="For a checkpoint with counted n-grams (model.ngram_order): sample from the network "
                         "alone (off), mixed with the training text's n-grams (ngram), or with those and the "
                         "window cache (all, which tends to repeat itself).")] = "off",
) -> None:
    """Write text with a trained model; the text streams to stdout, a summary goes to stderr.

    An SFT checkpoint answers the prompt as a user turn through its saved chat template (--raw to opt out).

    Example: llmctl generate --checkpoint experiments/runs/demo --prompt "ROMEO:" --temperature 0 --stop "\\n\\n"
    """
    with user_errors():
        from llmctl.generate import generate_samples, read_prompt, unescape

        out = sys.stdout
        tty = out.isatty()

        def write(text: str) -> None:
            try:
                out.write(text)
                out.flush()
            except BrokenPipeError:  # the reader left (`| head`): stop quietly, as a SIGPIPE'd tool does
                os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
                raise typer.Exit(141) from None

        def sample_end(i: int, result: object) -> None:
            text = getattr(result, "text")
            if (tty or num_samples > 1) and not text.endswith("\n"):
                write("\n")
            if i + 1 < num_samples:
                write("---\n")

        results = generate_samples(
            checkpoint, read_prompt(prompt, prompt_file), num_samples, on_text=write, on_sample_end=sample_end,
            device=device, dtype=dtype, use_cache=not no_cache, raw=raw, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            stop=tuple(unescape(s) for s in stop or ()), seed=seed, counts=counts)
        tokens = sum(r.tokens for r in results)
        seconds = sum(r.seconds for r in results)
        finished = ", ".join(sorted({r.finish_reason for r in results}))
        samples = f"{len(results)} samples, " if len(results) > 1 else ""
        first = results[0]
        cut = f" (the last {first.prompt_used} fit the context)" if first.prompt_used < first.prompt_tokens else ""
        cut += " through the chat template" if first.templated else ""
        # Allowed (the window slides), but said: text past the window no longer sees the start.
        slid = (f", past the {first.context}-token context the window slid (each token saw the last "
                f"{first.context})" if any(r.slid for r in results) else "")
        sys.stderr.write(f"generate: {samples}{tokens} tokens in {seconds:.2f}s ({tokens / max(seconds, 1e-9):,.1f} "
                         f"tokens/s), prompt {first.prompt_tokens} tokens{cut}{slid}, finished: {finished}, "
                         f"seed {first.seed}\n")


@app.command()
def chat(
    checkpoint: CheckpointOption,
    system: Annotated[Optional[str], typer.Option(
        "--system", help="A system message to start with (SFT checkpoints; /system changes it).")] = None,
    max_new_tokens: MaxNewTokensOption = 256,
    temperature: TemperatureOption = 0.8,
    top_k: TopKOption = 0,
    top_p: TopPOption = 0.95,
    repetition_penalty: RepetitionPenaltyOption = 1.0,
    stop: StopOption = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Seed for sampling (reply i uses SEED + i); default: random.")] = None,
    device: DeviceOption = "auto",
    dtype: SampleDtypeOption = "float32",
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Also when piped: the opening line, and a stats line per reply on stderr.")] = False,
) -> None:
    """Talk with a model: each line you type is a user turn, the reply streams back.

    An SFT checkpoint renders the conversation through its chat template; the oldest turns leave
    when it outgrows the model's window (the system message stays). A checkpoint without a template
    continues each line as plain text. Commands: /reset, /system TEXT, /save FILE, /help, /quit (or Ctrl-D);
    Ctrl-C stops a reply. Piped, each input line is one turn, each reply is printed with a newline after it.

    Example: llmctl chat --checkpoint experiments/runs/demo-sft --temperature 0.7 --system "Answer briefly."
    """
    with user_errors():
        from llmctl.chat import ChatSession, run_chat
        from llmctl.generate import Sampling, unescape
        from llmctl.loading import load_model

        sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, seed=seed,
                            stop=tuple(unescape(s) for s in stop or ()))  # bad values fail before loading
        session = ChatSession(load_model(checkpoint, device=device, dtype=dtype), sampling, system=system)
        try:
            run_chat(session, source=checkpoint, verbose=verbose)
        except BrokenPipeError:  # the reader left: stop quietly, as a SIGPIPE'd tool does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None


class ExportFormat(str, Enum):
    hf = "hf"
    safetensors = "safetensors"
    gguf = "gguf"


@app.command()
def export(
    out_dir: Annotated[Path, typer.Argument(
        metavar="OUT_DIR", help="Folder to create (--format gguf: the .gguf file); replaced only with --force; "
                                "written whole or not at all.")],
    checkpoint: Annotated[str, typer.Option(
        "--checkpoint", "-c", help="An llmctl checkpoint file or run directory (its final, else latest, checkpoint).")],
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", "-f", help="hf: a transformers model folder (LlamaForCausalLM; attention sinks: "
                               "GraniteSWAForCausalLM) with tokenizer and chat template; safetensors: "
                               "llmctl's own weights, config.toml and tokenizer.json; gguf: one file for "
                               "llama.cpp / Ollama (llama architecture, tokenizer, chat template).")] = ExportFormat.hf,
    gguf_dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="--format gguf only: f32, f16 (default), bf16 or q8_0 for the weight matrices.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT_DIR if it exists and is not empty.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Export a checkpoint for transformers and the tools built on it; it is loaded back and checked
    against the checkpoint (same logits, same token ids) before OUT_DIR appears.

    Example: llmctl export --checkpoint experiments/runs/demo --format hf exported/demo
    (then: AutoModelForCausalLM.from_pretrained("exported/demo"));
    llmctl export -c experiments/runs/demo --format gguf --dtype q8_0 demo.gguf (then: llama-cli -m demo.gguf)
    """
    with user_errors():
        from llmctl.export import export_checkpoint

        if fmt is ExportFormat.gguf:
            from llmctl.gguf_export import export_gguf

            result = export_gguf(checkpoint, out_dir, gguf_dtype or "f16", force=force,
                                 on_status=lambda line: sys.stderr.write(line + "\n"))
        else:
            if gguf_dtype is not None:
                raise ConfigError("--dtype applies to --format gguf only; hf and safetensors keep float32")
            result = export_checkpoint(checkpoint, out_dir, fmt.value, force=force,
                                       on_status=lambda line: sys.stderr.write(line + "\n"))
        if as_json:
            import json

            typer.echo(json.dumps(result))
            return
        if fmt is ExportFormat.gguf:
            if result["llama_cpp"] is None:
                sys.stderr.write("export: the llama.cpp check was skipped (llama_cpp is not installed; "
                                 "pip install llama-cpp-python enables it)\n")
            else:
                sys.stderr.write(f"export: verified with llama.cpp {result['llama_cpp']} — next-token KL "
                                 f"{result['max_kl']:.2g} nats at worst over {result['positions']} positions "
                                 f"(tolerance {result['kl_tolerance']:g}), max |log p| difference "
                                 f"{result['max_abs_logprob_diff']:.2g} on likely tokens; greedy tokens "
                                 f"{result['greedy_agree']}/{result['greedy_tokens']} identical; tokenizer ids "
                                 f"identical\n")
            if result["stored_as_f16"]:
                sys.stderr.write(f"export: {len(result['stored_as_f16'])} matrices have rows that are not a "
                                 f"multiple of 32 and were stored as f16\n")
            typer.echo(result["output"])
            return
        sys.stderr.write(f"export: verified — max |logit difference| {result['max_abs_logit_diff']:.2g} over "
                         f"{result['positions']} positions; tokenizer ids identical"
                         f"{'; chat template renders identically' if result['chat_template'] else ''}\n")
        typer.echo(result["output"])


# Help is Rich markup: \\[serve] keeps the extra's name from being read as a tag.
@app.command()
def serve(
    checkpoint: CheckpointOption,
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on: 127.0.0.1 is this machine only; 0.0.0.0 every interface "
                       "(then set an API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port; 0 = any free one (the URL printed says which).")]
        = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="LLMCTL_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every /v1 request.")] = None,
    max_batch: Annotated[int, typer.Option(
        "--max-batch", help="Replies written together in one batch; more wait in the queue.")] = 16,
    max_waiting: Annotated[int, typer.Option(
        "--max-waiting", help="Requests that may wait for a batch slot; past that the server answers 429.")] = 64,
    device: DeviceOption = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or auto.")] = "float32",
) -> None:
    """Serve a model over an OpenAI-compatible API, with a chat page at /; Ctrl-C stops.

    POST /v1/chat/completions (an SFT checkpoint's chat template renders the messages) and
    /v1/completions, streamed with "stream": true; GET /v1/models and /health. Many clients
    at once share batches. Needs fastapi and uvicorn: pip install "llmctl\\[serve]".
    Example: llmctl serve --checkpoint experiments/runs/demo-sft, then open http://127.0.0.1:8000/
    """
    with user_errors():
        from llmctl.serve import run_server

        def ready(urls: list[str], notes: list[str]) -> None:
            typer.echo(urls[0])  # stdout: the address alone, for scripts
            for note in notes + [f"also reachable as {url}" for url in urls[1:]]:
                typer.echo(note if note.startswith("warning:") else f"serve: {note}", err=True)
            sys.stdout.flush()

        run_server(checkpoint, host=host, port=port, api_key=api_key, max_batch=max_batch,
                   max_waiting=max_waiting, device=device, dtype=dtype, on_ready=ready)
        typer.echo("serve: stopped", err=True)


@app.command()
def runs(
    directory: Annotated[Path, typer.Argument(
        metavar="DIR", help="Folder holding run directories (run.output_dir), or one run directory.")]
        = Path("experiments/runs"),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """List training runs: stage, steps, tokens, validation perplexity, wall time, state, newest checkpoint.

    State is running, finished, interrupted (a signal, or a process that vanished) or failed.
    Example: llmctl runs experiments/runs --json
    """
    with user_errors():
        from llmctl.runs import list_runs

        rows = list_runs(directory)
        if as_json:
            import json

            typer.echo(json.dumps({"dir": str(directory), "runs": rows}))
            return
        from llmctl.data.report import wide_console
        from llmctl.runs import runs_table

        if not rows:
            sys.stderr.write(f"no runs in {directory}\n")
            return
        wide_console().print(runs_table(rows, title=str(directory)))


# Help is Rich markup: an escaped bracket (\\[ in the docstring) keeps "[plot]" from being read as a tag and dropped.
@app.command()
def plot(
    run_dirs: Annotated[list[str], typer.Argument(
        metavar="RUN", help="Run directories (or run names under experiments/runs) to draw, overlaid.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The PNG file to write.")] = Path("loss.png"),
) -> None:
    """Draw training and validation loss against steps and tokens into a PNG; several runs are overlaid.

    Needs matplotlib: pip install "llmctl\\[plot]". Example: llmctl plot experiments/runs/a experiments/runs/b -o ab.png
    """
    with user_errors():
        from llmctl.plot import plot_runs

        result = plot_runs(run_dirs, output)
        typer.echo(result["output"])


@app.command(cls=ResumeCommand)
def sft(
    from_: Annotated[Optional[str], typer.Option(
        "--from", metavar="CKPT", help="The checkpoint to fine-tune: an llmctl .pt file, or a run directory "
                                       "(its pretrain final checkpoint). Default: sft.from.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", "-p", help=f"Preset name ({', '.join(available_presets())}) or path to a TOML file. "
                               "Default: the sft, run and eval settings the --from run was trained with.")] = None,
    run_name: Annotated[Optional[str], typer.Option(
        "--run-name", "-n", help="Run directory name under run.output_dir (default: the base run's name + '-sft').")
    ] = None,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Delete this SFT run's directory (checkpoints and logs) and start again there.")] = False,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="[auto]",
        help="Continue the SFT run from its newest checkpoint; pass the same --run-name, preset and --set values "
             "(--from may be left out). " + RESUME_HELP)] = None,
) -> None:
    """Instruction-tune a pretrained checkpoint: loss on the replies only, the pretrain trainer and run files.

    The model shape and tokenizer come from the checkpoint; data, lr and steps from the sft.* keys.
    Example: llmctl sft --from experiments/runs/demo --preset tiny --set 'sft.datasets=["jsonl:chat.jsonl:2000"]'
    """
    with user_errors():
        from rich.console import Console

        from llmctl.sft import load_sft_config, next_commands, resume_command, run_sft

        mode = resume_mode(resume)
        cfg, base = load_sft_config(preset, overrides, run_name, from_, mode)
        summary = run_sft(cfg, base, Console(stderr=True), overwrite=overwrite, resume=mode,
                          resume_command=resume_command(cfg.sft.from_, preset, overrides, cfg.run.name))
        if summary["checkpoint"]:  # None on the other ranks of a torchrun job
            typer.echo(summary["checkpoint"])
            say_next(next_commands(summary["run_dir"]))


@app.command()
def pipeline(
    preset: PresetOption = "quickstart",
    run_name: Annotated[Optional[str], typer.Option(
        "--run-name", "-n", help="Run name (default: pipeline-<preset>); the SFT run is <name>-sft.")] = None,
    overrides: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")] = False,
) -> None:
    """The whole path: data -> pretrain -> sft -> eval -> samples; a rerun skips finished stages and resumes the rest.

    Example: llmctl pipeline --preset tiny --run-name demo --set 'sft.datasets=["jsonl:chat.jsonl"]'
    """
    with user_errors():
        from llmctl.config import load_config
        from llmctl.sft import names_run

        if not names_run(preset, overrides, run_name):
            run_name = f"pipeline-{Path(preset).stem}"  # stable, so running it again resumes
        cfg = load_config(preset, overrides, run_name)
        from rich.console import Console

        from llmctl.pipeline import pipeline_command, render_summary, run_pipeline

        summary = run_pipeline(cfg, Console(stderr=True), overrides,
                               command=pipeline_command(preset, overrides, cfg.run.name), preset=preset)
        if as_json:
            import json

            typer.echo(json.dumps(summary))
            return
        from llmctl.data.report import wide_console

        render_summary(summary, wide_console())


data_app = LlmctlTyper(
    cls=LlmctlGroup, name="data", no_args_is_help=True,
    help="Prepare and inspect token stores: read the sources, tokenize, pack into shards, cache.\n\n"
         "Example: llmctl data prepare --preset tiny, then llmctl data info --preset tiny")
app.add_typer(data_app, name="data")
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout instead of a table.")]


def _show_data(info: dict, as_json: bool) -> None:
    if as_json:
        import json

        typer.echo(json.dumps(info))
        return
    from llmctl.data.report import render, wide_console

    render(info, wide_console())


@data_app.command("prepare")
def data_prepare(preset: PresetOption = "quickstart", overrides: SetOption = None, as_json: JsonOption = False) -> None:
    """Tokenize data.datasets into the cached token store; resumes an interrupted run, reuses a finished one.

    Example: llmctl data prepare --preset tiny --set 'data.datasets=["text:book.txt", "jsonl:chat.jsonl#content:5000"]'
    """
    with user_errors():
        from llmctl.config import load_config
        from llmctl.data.downloads import check_pretrain_downloads, require
        from llmctl.data.report import prepare_data, wide_console

        cfg = load_config(preset, overrides)
        require(check_pretrain_downloads(cfg.data), "or run this command again while online (it caches {them})",
                who="this command")
        _show_data(prepare_data(cfg.data, wide_console(stderr=True)), as_json)


@data_app.command("info")
def data_info(
    preset: PresetOption = "quickstart",
    overrides: SetOption = None,
    as_json: JsonOption = False,
    verify: Annotated[bool, typer.Option(
        "--verify", help="Re-hash every shard against the manifest's sha256; exit 1 if one differs.")] = False,
) -> None:
    """Show the token store of a config: documents, tokens and bytes per source and split, cache path.

    Example: llmctl data info --preset tiny --set 'data.datasets=["text:book.txt"]' --json
    """
    with user_errors():
        from llmctl.config import load_config
        from llmctl.data.report import describe

        cfg = load_config(preset, overrides)
        info = describe(cfg.data, verify=verify)
        _show_data(info, as_json)
        if info.get("corrupt_shards"):
            raise typer.Exit(1)


@data_app.command("inspect")
def data_inspect(
    sft_spec: Annotated[str, typer.Option(
        "--sft", metavar="SPEC", help="SFT data spec to look into: jsonl:FILE, json:FILE, parquet:FILE or a "
                                      "registered Hub set.")],
    index: Annotated[int, typer.Option("--index", "-i", help="Which record, 0-based in file order.")] = 0,
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint", "-c", help="Use this checkpoint's tokenizer, chat template and context "
                                   "(default: the preset's data.tokenizer and model.max_seq_len).")] = None,
    preset: PresetOption = "quickstart",
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show how one SFT record is rendered and which tokens carry loss (the mask training uses).

    Example: llmctl data inspect --sft jsonl:chat.jsonl --index 3 --checkpoint experiments/runs/demo
    """
    with user_errors():
        from llmctl.config import load_config
        from llmctl.sft import inspect_example, render_inspection

        cfg = load_config(preset, overrides, run_name="inspect")
        info = inspect_example(sft_spec, index, cfg, checkpoint)
        if as_json:
            import json

            typer.echo(json.dumps(info))
            return
        from llmctl.data.report import wide_console

        render_inspection(info, wide_console())


def main() -> None:
    from llmctl.data import hub

    hub.OWN_PROCESS = True  # this process is llmctl's: it may put the Hugging Face libraries offline
    app()


if __name__ == "__main__":
    main()
