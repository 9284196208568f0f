"""`llmctl chat`: a conversation in the terminal, or driven line by line through a pipe.

Two layers:
- `ChatSession`: the model side, no terminal. It keeps the conversation (an optional system
  message, then user and assistant turns) and renders it through an SFT checkpoint's chat
  template — the code that rendered the training data (`llmctl.data.chat_template.prompt_ids`)
  — then samples the reply with `llmctl.generate.complete_ids`, as `generate` samples one.
  The history stays inside the model's window: when the prompt plus the room kept for the
  reply (max_new_tokens, at most half the window) would not fit, the oldest turns leave the
  window, whole, the system message staying. They stay in the conversation that `/save`
  writes. A checkpoint without a template (pretraining only, or a transformers model) has no
  turns to render: each message is continued as plain text on its own, as `generate` would.
  Reply i is sampled with seed + i, so a seeded session can be replayed.
- `run_chat`: the read-reply loop. On a terminal: `you> ` prompts with readline editing,
  `model> ` replies streamed as they are sampled, a stats line per reply on stderr, Ctrl-C
  stopping a reply (the text so far stays in the conversation) and, at the prompt, a hint
  (twice in a row: leave). Piped: each line is one user turn and each reply is printed
  followed by a newline, nothing else on stdout; notices go to stderr. Lines starting with
  `/` are commands (`/help`); `//` sends a line that starts with `/`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from llmctl.errors import ConfigError
from llmctl.generate import Sampling, complete_ids

if TYPE_CHECKING:
    from llmctl.loading import LoadedModel

Message = tuple[str, str]  # (role, content)


@dataclass
class Reply:
    text: str  # what the model wrote (as streamed; without stop strings or the template's lead)
    tokens: int  # new tokens (for a reply cut by Ctrl-C: the kept text's length in tokens)
    prompt_tokens: int
    seconds: float
    finish_reason: str  # "eos", "stop", "length", or "cut" (Ctrl-C)
    seed: int
    dropped: int = 0  # oldest turns that left the window before this reply
    overflow: bool = False  # the prompt alone was longer than the window: the model saw its last tokens

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class ChatSession:
    """A conversation with one loaded model; `reply(text)` adds a user turn and the answer."""

    def __init__(self, loaded: "LoadedModel", sampling: Sampling, system: str | None = None,
                 use_cache: bool = True):
        from llmctl.data.chat_template import ChatTemplate

        self.loaded = loaded
        self.sampling = sampling
        self.use_cache = use_cache
        self.template = ChatTemplate.from_state(loaded.template) if getattr(loaded, "template", None) else None
        self.context = loaded.context_length
        self.system: str | None = None
        self.turns: list[Message] = []  # user, assistant, user, assistant, ... since the last reset
        self.first = 0  # index in turns of the first message still inside the window
        self.base_seed = sampling.seed if sampling.seed is not None else int(torch.seed() % 2**31)
        self.replies = 0
        if system:
            self.set_system(system)

    @property
    def templated(self) -> bool:
        return self.template is not None

    @property
    def reserve(self) -> int:
        """Tokens of the window kept free for the reply."""
        return min(self.sampling.max_new_tokens, self.context // 2)

    def set_system(self, text: str | None) -> None:
        if text and not self.templated:
            raise ConfigError("this checkpoint has no chat template, so there is no system message to set; "
                              "an SFT checkpoint (llmctl sft) has one")
        self.system = text or None

    def reset(self) -> None:
        """Forget the turns; the system message stays."""
        self.turns, self.first = [], 0

    def messages(self) -> list[dict[str, str]]:
        """The whole conversation, turns that left the window included: [{"role", "content"}, ...]."""
        head = [("system", self.system)] if self.system else []
        return [{"role": role, "content": content} for role, content in head + self.turns]

    def window(self, first: int | None = None) -> list[Message]:
        """The messages the model sees before the next user turn (from turn index `first`)."""
        head = [("system", self.system)] if self.system else []
        return head + self.turns[self.first if first is None else first:]

    def prompt(self, text: str) -> tuple[list[int], int]:
        """(prompt ids for `text` as the next user turn, oldest turns dropped to fit the window)."""
        tokenizer = self.loaded.tokenizer
        if self.template is None:
            return tokenizer.encode(text), 0
        from llmctl.data.chat_template import prompt_ids

        budget = self.context - self.reserve
        first = self.first
        while True:
            ids = prompt_ids(self.window(first) + [("user", text)], self.template, tokenizer)
            if len(ids) <= budget or first >= len(self.turns):
                break
            first += 2  # one turn: a user message and its reply
        dropped = (first - self.first) // 2
        self.first = first
        return ids, dropped

    def reply(self, text: str, on_text: Callable[[str], None] | None = None, cut_on_interrupt: bool = False,
              on_prompt: Callable[[int, int], None] | None = None) -> Reply:
        """Answer `text`; `on_text` receives the reply as it streams, `on_prompt(prompt tokens,
        turns dropped)` hears of the prompt before sampling starts. With `cut_on_interrupt`,
        Ctrl-C (KeyboardInterrupt) ends the reply early: the text so far is kept as the reply
        (finish_reason "cut"); when there was none yet, the user turn is withdrawn as well."""
        if not text:
            raise ConfigError("the message is empty")
        seed = self.base_seed + self.replies
        self.replies += 1
        shown: list[str] = []

        def stream(delta: str) -> None:
            shown.append(delta)
            if on_text is not None:
                on_text(delta)

        start = time.perf_counter()
        ids: list[int] = []
        dropped = 0
        try:
            ids, dropped = self.prompt(text)
            if on_prompt is not None:
                on_prompt(len(ids), dropped)
            result = complete_ids(self.loaded, ids, replace(self.sampling, seed=seed), template=self.template,
                                  on_text=stream, use_cache=self.use_cache)
            reply = Reply(result.text, result.tokens, result.prompt_tokens, result.seconds, result.finish_reason,
                          seed, dropped, len(ids) > self.context)
        except KeyboardInterrupt:
            if not cut_on_interrupt:
                raise
            kept = "".join(shown)
            reply = Reply(kept, len(self.loaded.tokenizer.encode(kept)) if kept else 0, len(ids),
                          time.perf_counter() - start, "cut", seed, dropped, len(ids) > self.context)
            if not kept:
                return reply  # nothing was said: the question is withdrawn with it
        self.turns += [("user", text), ("assistant", reply.text)]
        return reply


# --------------------------------------------------------------------------- the loop

HELP = """\
commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (SFT checkpoints); /system shows it, /system clear removes it
  /save FILE      write the conversation as JSON [{"role", "content"}, ...]; /save! FILE replaces a file
                  this chat did not write
  /help           this list
  /quit           leave (so do Ctrl-D and, at the prompt, Ctrl-C twice)
Ctrl-C during a reply stops it; what was written stays in the conversation.
A line starting with // is sent as text starting with /."""


class _Style:
    """ANSI colours on a terminal (not with NO_COLOR or TERM=dumb); `prompt` marks them for
    readline so it measures the prompt's width right."""

    def __init__(self, enabled: bool, readline: bool):
        self.enabled, self.readline = enabled, readline

    def __call__(self, text: str, code: str, prompt: bool = False) -> str:
        if not self.enabled:
            return text
        on, off = f"\033[{code}m", "\033[0m"
        if prompt and self.readline:
            on, off = f"\001{on}\002", f"\001{off}\002"
        return f"{on}{text}{off}"


def _readline() -> bool:
    """Import readline, which gives input() line editing and history, where Python has it."""
    import importlib

    try:
        importlib.import_module("readline")
    except ImportError:
        return False
    return True


def run_chat(session: ChatSession, *, source: str = "", verbose: bool = False, stdin: TextIO | None = None,
             stdout: TextIO | None = None, stderr: TextIO | None = None, interactive: bool | None = None) -> None:
    """Read user turns until /quit or end of input, answering each. `interactive` (default:
    stdin is a terminal) gives prompts, colours, Ctrl-C handling and stats lines."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if interactive is None:
        interactive = stdin.isatty()
    editing = interactive and stdin is sys.stdin and _readline()
    style = _Style(interactive and stdout.isatty() and "NO_COLOR" not in os.environ
                   and os.environ.get("TERM") != "dumb", editing)
    saved: set[Path] = set()  # files this chat wrote: /save may replace them

    def out(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    def say(text: str) -> None:
        stderr.write(style(text, "2") + "\n")
        stderr.flush()

    context = session.context
    if interactive or verbose:
        kind = "chat template" if session.templated else "no chat template"
        seed = f", seed {session.base_seed} (reply i uses seed + i)" if verbose else ""
        say(f"chat with {source or 'the model'}: {kind}, {context}-token window{seed}. "
            f"/help for commands, /quit or Ctrl-D to leave")
    if not session.templated:
        say(f"note: {source or 'this model'} has no chat template (it is not an SFT checkpoint): each message is "
            f"continued as plain text on its own, without the conversation before it")

    def read() -> str | None:
        if interactive and stdin is sys.stdin:
            try:
                return input(style("you> ", "1;32", prompt=True))
            except EOFError:
                out("\n")
                return None
        if interactive:
            out(style("you> ", "1;32"))
        line = stdin.readline()
        return line.rstrip("\r\n") if line else None

    def save(arg: str, force: bool) -> None:
        if not arg:
            say("usage: /save FILE")
            return
        path = Path(arg).expanduser()
        if path.is_dir():
            say(f"cannot save: {path} is a folder; name a file")
            return
        if path.exists() and not force and path.resolve() not in saved:
            say(f"{path} exists and this chat did not write it; /save! {arg} replaces it")
            return
        from llmctl.atomic import write_text_atomic

        messages = session.messages()
        try:
            write_text_atomic(path, json.dumps(messages, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            say(f"cannot save to {path}: {e.strerror or e}")
            return
        saved.add(path.resolve())
        say(f"saved {len(messages)} message{'s' if len(messages) != 1 else ''} to {path}")

    def command(line: str) -> bool:
        """Run one /command; False to leave."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit"):
            return False
        if name == "help":
            say(HELP)
        elif name == "reset":
            session.reset()
            say("conversation cleared" + (" (the system message stays)" if session.system else ""))
        elif name == "system":
            if not session.templated:
                say("this checkpoint has no chat template, so a system message has no place "
                    "(an SFT checkpoint has one)")
            elif not arg:
                say(f"system: {session.system}" if session.system
                    else "no system message; /system TEXT sets one")
            elif arg == "clear":
                session.set_system(None)
                say("system message removed")
            else:
                session.set_system(arg)
                say("system message set")
        elif name in ("save", "save!"):
            save(arg, force=name == "save!")
        else:
            say(f"unknown command /{name}; /help lists the commands (// sends a line starting with /)")
        return True

    def notices(prompt_tokens: int, dropped: int) -> None:
        if dropped:
            s = "s" if dropped > 1 else ""
            say(f"(dropped the oldest {dropped} turn{s} to stay within the {context}-token window, "
                f"keeping room for {session.reserve} new tokens)")
        if prompt_tokens > context:
            say(f"(the prompt is {prompt_tokens} tokens, more than the {context}-token window: "
                f"the model sees its last {context})")
        if interactive:
            out(style("model> ", "1;36"))

    def answer(text: str) -> None:
        reply = session.reply(text, on_text=out, cut_on_interrupt=interactive, on_prompt=notices)
        if reply.finish_reason == "cut":  # only on a terminal
            out(" " + style("[stopped]", "2") + "\n")
        else:  # piped: always a newline, so each reply ends its own line(s)
            out("" if interactive and reply.text.endswith("\n") else "\n")
        if interactive or verbose:
            if reply.finish_reason == "cut" and not reply.text:
                say("(stopped before any text; the message was withdrawn)")
            else:
                say(f"chat: {reply.tokens} tokens in {reply.seconds:.2f}s ({reply.tokens_per_second:,.1f} tokens/s), "
                    f"prompt {reply.prompt_tokens} tokens, finished: {reply.finish_reason}, seed {reply.seed}")

    if interactive and threading.current_thread() is threading.main_thread():
        # Ctrl-C stops a reply. A shell that starts a command in the background (`cmd &` in a
        # script) hands it SIGINT ignored, and Python then leaves it ignored: take it back.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupts = 0  # Ctrl-C at the prompt, in a row
    while True:
        try:
            line = read()
            if line is None:
                return
            interrupts = 0
            if not line.strip():
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not command(line):
                    return
                continue
            answer(line[1:] if line.startswith("//") else line)
        except KeyboardInterrupt:
            if not interactive:
                raise
            interrupts += 1
            if interrupts >= 2:
                out("\n")
                return
            out("\n")
            say("(Ctrl-C again, /quit or Ctrl-D leaves)")
