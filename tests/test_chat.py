"""`llmctl chat`: piped turns answer like `generate`, the conversation is rendered through the
SFT template, /reset /system /save behave, the oldest turns leave a full window with a notice,
a pretrain checkpoint continues plain text, and on a real pseudo-terminal Ctrl-C stops a reply
and the conversation goes on."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from conftest import REPO
from llmctl.cli import app
from llmctl.data.chat_template import ChatTemplate, prompt_ids


def write_checkpoint(path, gpt2, *, template: bool, context: int = 64, seed: int = 0):
    """A real llmctl checkpoint file of an untrained 1-layer model on the GPT-2 vocabulary: with
    `template`, shaped as `llmctl sft` writes one (its chat template inside). Untrained, its
    greedy text still depends on the prompt, and end-of-text (one token in 50,257) practically
    never comes, so replies run to max_new_tokens (or a stop string)."""
    from llmctl.checkpoint import save_checkpoint
    from llmctl.config import load_config
    from llmctl.model import Transformer
    from llmctl.pretrain import resolve_vocab

    cfg = resolve_vocab(load_config("tiny", ["model.d_model=32", "model.n_layers=1", "model.init_std=0.3",
                                      f"model.max_seq_len={context}"],
                                    path.stem), gpt2.vocab_size)
    torch.manual_seed(seed)
    payload = {"stage": "sft" if template else "pretrain", "config": cfg.to_dict(), "tokenizer": gpt2.to_state(),
               "model": Transformer(cfg.model).state_dict(), "step": 0}
    if template:
        payload["template"] = ChatTemplate().to_state()
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    from llmctl.data.tokenizer import load_tokenizer

    return load_tokenizer(str(gpt2_dir))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, gpt2):
    """An SFT-shaped checkpoint with a 64-token window."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tuned-sft_final.pt", gpt2, template=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, gpt2):
    """A pretrain checkpoint: no chat template."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "base-pretrain_final.pt", gpt2, template=False)


@pytest.fixture(scope="module")
def endless(tmp_path_factory, gpt2):
    """An SFT-shaped checkpoint whose replies practically never end: Ctrl-C lands in the middle of one."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "endless-sft_final.pt", gpt2, template=True,
                            context=32)


@pytest.fixture(scope="module")
def loaded(tuned):
    from llmctl.loading import load_model

    return load_model(tuned, device="cpu")


GREEDY = ["-t", "0", "-m", "8", "--stop", "\\n"]  # --stop \n: every reply is one line


def chat(ckpt, *args: str, input: str = ""):
    """`llmctl chat -c CKPT ARGS` in-process with piped stdin: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(app, ["chat", "-c", str(ckpt), "--device", "cpu", *map(str, args)], input=input)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stdout, result.stderr


def greedy(loaded, messages, max_new_tokens=8, stop=("\n",)) -> str:
    """The reply the chat should give after `messages`, rendered and sampled here directly."""
    from llmctl.generate import Sampling, complete_ids

    ids = prompt_ids(messages, ChatTemplate.from_state(loaded.template), loaded.tokenizer)
    params = Sampling(max_new_tokens=max_new_tokens, temperature=0, stop=stop)
    return complete_ids(loaded, ids, params, template=ChatTemplate.from_state(loaded.template)).text


# --------------------------------------------------------------------------- piped

def test_two_piped_turns_give_two_replies_the_first_equal_to_generate(tuned, loaded):
    from llmctl.generate import complete

    code, out, err = chat(tuned, *GREEDY, input="Hi\nWhy?\n")
    assert code == 0, err
    assert err == ""  # piped: no prompts, banner or stats; nothing was dropped
    first, second = out.split("\n")[:2]
    assert out == f"{first}\n{second}\n"
    assert first == complete(loaded, "Hi", temperature=0, max_new_tokens=8, stop=["\n"]).text
    result = CliRunner().invoke(app, ["generate", "-c", str(tuned), "--device", "cpu", "-p", "Hi", *GREEDY])
    assert result.exit_code == 0 and result.stdout == first  # generate writes no newline when piped
    # The second reply saw the first exchange, through the template.
    assert second == greedy(loaded, [("user", "Hi"), ("assistant", first), ("user", "Why?")])
    assert second != greedy(loaded, [("user", "Why?")]) and first != second  # not a constant stream


def test_reset_forgets_the_conversation(tuned):
    code, out, err = chat(tuned, *GREEDY, input="Hi\nWhy?\n/reset\nHi\n")
    assert code == 0 and "conversation cleared" in err
    replies = out.split("\n")
    assert len(replies) == 4 and replies[3] == ""
    assert replies[2] == replies[0]  # the same first turn again, greedy


def test_system_message_is_rendered_shown_and_cleared(tuned, loaded, tmp_path):
    path = tmp_path / "c.json"
    lines = ["/system Answer in one word.", "/system", "Hi", f"/save {path}", "/system clear", "/system", "Hi"]
    code, out, err = chat(tuned, *GREEDY, "--verbose", input="\n".join(lines) + "\n")
    assert code == 0, err
    assert "system: Answer in one word." in err and "system message removed" in err and "no system message" in err
    assert err.count("tokens/s") == 2  # --verbose: a stats line per reply when piped too
    first, second = out.split("\n")[:2]
    system = ("system", "Answer in one word.")
    assert first == greedy(loaded, [system, ("user", "Hi")]) != greedy(loaded, [("user", "Hi")])
    assert second == greedy(loaded, [("user", "Hi"), ("assistant", first), ("user", "Hi")])
    assert [m["role"] for m in json.loads(path.read_text())] == ["system", "user", "assistant"]
    # --system starts with one.
    code, out, _ = chat(tuned, *GREEDY, "--system", "Answer in one word.", input="Hi\n")
    assert code == 0 and out == first + "\n"


def test_save_writes_the_messages_and_replaces_only_its_own_files(tuned, tmp_path):
    path = tmp_path / "talk.json"
    code, out, err = chat(tuned, *GREEDY, input=f"Hi\n/save {path}\nWhy?\n/save {path}\n")
    assert code == 0 and err.count(f"to {path}") == 2, err
    replies = out.split("\n")[:2]
    assert json.loads(path.read_text(encoding="utf-8")) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": replies[0]},
        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": replies[1]}]
    assert [p.name for p in tmp_path.iterdir()] == ["talk.json"]  # no temporary file left behind
    # Another chat does not overwrite a file it did not write, unless told with /save!.
    before = path.read_text()
    code, _, err = chat(tuned, *GREEDY, input=f"Hello\n/save {path}\n")
    assert code == 0 and path.read_text() == before and "/save! " in err
    code, _, err = chat(tuned, *GREEDY, input=f"Hello\n/save! {path}\n")
    assert code == 0 and [m["content"] for m in json.loads(path.read_text())][0] == "Hello"


def test_unknown_commands_hint_and_a_double_slash_sends_text(tuned, loaded):
    code, out, err = chat(tuned, *GREEDY, input="/frobnicate\n\n//etc is a path\n/quit\nnever read\n")
    assert code == 0
    assert err.strip() == "unknown command /frobnicate; /help lists the commands (// sends a line starting with /)"
    assert out == greedy(loaded, [("user", "/etc is a path")]) + "\n"  # /quit: the last line is not answered
    code, _, err = chat(tuned, input="/help\n")
    assert code == 0 and "/save FILE" in err and "/reset" in err


def test_a_full_window_drops_the_oldest_turns_keeping_the_system_message(tuned, loaded):
    from llmctl.chat import ChatSession
    from llmctl.generate import Sampling

    questions = ["Tell me about the king.", "And the queen?", "Where do they live?", "Who is the prince?"]
    session = ChatSession(loaded, Sampling(max_new_tokens=12, temperature=0), system="Be brief.")
    budget = 64 - 12
    dropped = 0
    for question in questions:
        before = session.first
        reply = session.reply(question)
        assert session.first - before == 2 * reply.dropped
        dropped += reply.dropped
        window = session.window()
        assert window[0] == ("system", "Be brief.") and window[-2:] == [("user", question), ("assistant", reply.text)]
        assert reply.prompt_tokens <= budget or window[1:] == window[-2:]  # fits, or only this turn is left
        if reply.dropped:  # dropping one turn fewer would not have fitted
            prompt = window[:1] + session.turns[session.first - 2: -2] + [("user", question)]
            assert len(prompt_ids(prompt, session.template, loaded.tokenizer)) > budget
    assert dropped >= 1
    assert len(session.messages()) == 1 + 2 * len(questions)  # /save still has every turn

    code, out, err = chat(tuned, "-t", "0", "-m", "12", "--system", "Be brief.", input="\n".join(questions) + "\n")
    assert code == 0
    notices = re.findall(r"\(dropped the oldest (\d+) turns? to stay within the 64-token window, "
                         r"keeping room for 12 new tokens\)", err)
    assert notices and sum(map(int, notices)) == dropped
    assert len(err.strip().splitlines()) == len(notices)  # each notice is one line


def test_a_message_longer_than_the_window_is_answered_with_a_notice(endless, gpt2):
    long = " ".join(["word"] * 40)  # 40 tokens; the window is 32
    tokens = len(prompt_ids([("user", long)], ChatTemplate(), gpt2))
    code, out, err = chat(endless, *GREEDY, input=f"Hi\n{long}\n")
    assert code == 0 and len(out.split("\n")) == 3  # answered all the same, from the last 32 tokens
    assert err.splitlines() == ["(dropped the oldest 1 turn to stay within the 32-token window, keeping room for 8 "
                                "new tokens)", f"(the prompt is {tokens} tokens, more than the 32-token window: the "
                                "model sees its last 32)"]


def test_a_pretrain_checkpoint_continues_plain_text_and_says_so_once(base):
    from llmctl.generate import complete
    from llmctl.loading import load_model

    code, out, err = chat(base, "-t", "0", "-m", "8", input="ROMEO:\n/system Be kind.\nJULIET:\n")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"note: {base} has no chat template") and "plain text" in lines[0]
    assert "no chat template" in lines[1]  # /system has nothing to set
    model = load_model(base, device="cpu")
    expected = [complete(model, p, temperature=0, max_new_tokens=8).text for p in ("ROMEO:", "JULIET:")]
    assert out == "".join(text + "\n" for text in expected)


@pytest.mark.parametrize("args,message,which", [
    (["-c", "no/such/run.pt"], "checkpoint not found", None),
    (["--top-p", "0"], "top_p", "tuned"),
    (["--system", "Hi."], "no chat template", "base"),
])
def test_bad_checkpoint_or_options_are_one_line_and_exit_2(args, message, which, tuned, base):
    ckpt = {"tuned": tuned, "base": base, None: None}[which]
    result = CliRunner().invoke(app, ["chat", *(["-c", str(ckpt)] if ckpt else []), *args], input="Hi\n")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_empty_input_ends_at_once(tuned):
    assert chat(tuned, input="") == (0, "", "")


# --------------------------------------------------------------------------- a terminal

class Terminal:
    """`llmctl ARGS` on a pseudo-terminal: what it shows, and keys typed into it."""

    ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|[\x01\x02]")

    def __init__(self, *args: str, cwd):
        env = dict(os.environ, TERM="xterm", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), COLUMNS="200")
        env.pop("NO_COLOR", None)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: its own session, the pty its controlling terminal
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, "-m", "llmctl", *args], env)
        self.raw = b""
        self.seen = ""  # everything shown, escape sequences removed
        self.mark = 0  # where the next wait starts looking

    def read(self, seconds: float) -> None:
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if ready:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the child closed the terminal
                data = b""
            self.raw += data  # a sequence or a character may be split between reads: decode the whole
            self.seen = self.ESCAPES.sub("", self.raw.decode("utf-8", "replace"))

    def wait_for(self, text: str, timeout: float = 60, after: int = 0) -> str:
        """Read until `text` shows (then `after` more characters); returns what came since the last wait."""
        deadline = time.monotonic() + timeout
        while True:
            at = self.seen.find(text, self.mark)
            if at >= 0 and len(self.seen) >= at + len(text) + after:
                shown, self.mark = self.seen[self.mark: at + len(text) + after], at + len(text) + after
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} did not show within {timeout}s; the terminal shows:\n"
                                     f"{self.seen[-2000:]}")
            self.read(0.2)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read(0.1)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout}s; the terminal shows:\n{self.seen[-2000:]}")


def test_on_a_terminal_ctrl_c_stops_a_reply_and_the_conversation_goes_on(endless, tmp_path):
    term = Terminal("chat", "-c", str(endless), "--device", "cpu", "-m", "100000", "-t", "1", "--top-p", "1",
                    "--seed", "0", cwd=tmp_path)
    try:
        banner = term.wait_for("you> ")
        assert "chat template, 32-token window" in banner and "/help" in banner
        term.type("Hello there\n")
        term.wait_for("model> ", after=40)  # the reply streams...
        term.type("\x03")  # ...until Ctrl-C, through the terminal (SIGINT to its foreground process)
        stopped = term.wait_for("you> ")  # the prompt is back: the chat goes on
        assert "[stopped]" in stopped and "finished: cut" in stopped and "tokens/s" in stopped
        term.type("/save talk.json\n")
        term.wait_for("you> ")
        saved = json.loads((tmp_path / "talk.json").read_text())
        assert [m["role"] for m in saved] == ["user", "assistant"] and saved[0]["content"] == "Hello there"
        assert len(saved[1]["content"]) >= 20  # the text shown before Ctrl-C stays in the conversation
        # Ctrl-C at the prompt: a hint, not an exit. Python's readline misses a signal that comes
        # between drawing the prompt and waiting for keys, and sees it at the next key; on a loaded
        # machine that window can be long, so a key (discarded with the line) follows if needed.
        time.sleep(0.5)
        term.type("\x03")
        try:
            hint = term.wait_for("you> ", timeout=5)
        except AssertionError:
            term.type(" ")
            hint = term.wait_for("you> ")
        assert "Ctrl-C again, /quit or Ctrl-D leaves" in hint
        term.type("\x04")  # Ctrl-D
        assert term.exit_code() == 0
    finally:
        try:
            os.kill(term.pid, signal.SIGKILL)
            os.waitpid(term.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
