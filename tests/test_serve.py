"""`llmctl serve`: a live server (a subprocess on a free localhost port) over a tiny real SFT
checkpoint, driven by the official openai client and raw HTTP. Replies equal `generate`'s
for the same seed, usage counts equal the tokenizer's, n / stop / seed / streaming behave as
OpenAI documents, 16 clients stream at once, a client that leaves frees its slot, a full
queue is a 429, the API key guards /v1, and every malformed request is a 4xx with OpenAI's
error object — never a 500. The CLI's own failures (no extra, port in use) are one line."""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PYTHON

pytest.importorskip("fastapi", reason='the serve extra is not installed (pip install "llmctl[serve]")')
pytest.importorskip("uvicorn", reason='the serve extra is not installed (pip install "llmctl[serve]")')
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install openai)")
from llmctl.cli import app  # noqa: E402
from llmctl.data.chat_template import ChatTemplate, prompt_ids  # noqa: E402
from llmctl.generate import complete  # noqa: E402
from llmctl.loading import load_model  # noqa: E402
from small_runs import build_small_tokenizer, small_run_args  # noqa: E402

KEY = "sk-test-7f3a"
CONTEXT = 512  # room for a reply long enough that a disconnect lands well before its end


def build_checkpoints(root: Path, shakespeare: Path) -> tuple[Path, Path]:
    """(pretrain-only, SFT) run directories: 1 layer, 32 wide, a 320-token BPE, seconds to train."""
    tok = build_small_tokenizer(root / "tok", shakespeare)
    chat = root / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                       {"role": "assistant", "content": f"{i}."}]})
                              for i in range(20)))
    sft = {"sft.datasets": json.dumps([f"jsonl:{chat}"]), "sft.max_steps": 2, "sft.batch_size": 4,
           "sft.micro_batch_size": 4, "sft.warmup_steps": 1, "sft.eval_every": 2, "sft.save_every": 2,
           "sft.samples": 0, "run.device": "cpu", "run.dtype": "float32"}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("LLMCTL_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, small_run_args(
            "base", shakespeare, tok, "--set", f"model.max_seq_len={CONTEXT}", "--set", "pretrain.max_steps=4",
            "--set", "pretrain.eval_every=4", "--set", "pretrain.save_every=4", docs=100))
        assert result.exit_code == 0, result.output
        args = ["sft", "--from", "experiments/runs/base", "--preset", "tiny", "--run-name", "chat"]
        for key, value in sft.items():
            args += ["--set", f"{key}={value}"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    return root / "experiments" / "runs" / "base", root / "experiments" / "runs" / "chat"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shakespeare) -> tuple[Path, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("serve"), shakespeare)


@pytest.fixture(scope="module")
def loaded(runs):
    return load_model(runs[1], device="cpu")


@pytest.fixture(scope="module")
def base_loaded(runs):
    return load_model(runs[0], device="cpu")


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]  # names in lower case
    text: str

    def json(self):
        return json.loads(self.text)


@dataclass
class Server:
    """A running `llmctl serve`; raw HTTP through the standard library, so what is on the wire is what is checked."""

    url: str  # http://127.0.0.1:PORT/
    proc: subprocess.Popen
    log: Path  # its stderr

    @property
    def port(self) -> int:
        return int(self.url.rstrip("/").rsplit(":", 1)[1])

    def send(self, method: str, path: str, body=None, headers: dict | None = None,
             timeout: float = 60) -> http.client.HTTPResponse:
        if body is not None and not isinstance(body, (bytes, str)):
            body = json.dumps(body)
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.request(method, "/" + path.lstrip("/"), body=body, headers=headers or {})
        return connection.getresponse()

    def fetch(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60) -> Reply:
        response = self.send(method, path, body, headers, timeout)
        with response:
            text = response.read().decode()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text)

    def get(self, path: str, headers: dict | None = None) -> Reply:
        return self.fetch("GET", path, headers=headers)

    def post(self, path: str, body=None, headers: dict | None = None) -> Reply:
        return self.fetch("POST", path, body, headers)

    @contextmanager
    def stream(self, path: str, body: dict, headers: dict | None = None):
        """A streaming POST; leaving the block closes the connection, as a client that goes away does."""
        response = self.send("POST", path, body, headers)
        try:
            yield response
        finally:
            response.close()

    def client(self, key: str = "unused") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return self.get("health").json()

    def wait_idle(self, seconds: float = 10) -> dict:
        deadline = time.monotonic() + seconds
        while True:
            health = self.health()
            if health["active"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
                return health
            time.sleep(0.02)


@contextmanager
def serving(checkpoint: Path, log: Path, *args: str):
    """`llmctl serve` on a free port (--port 0; the URL is its first stdout line), stopped with Ctrl-C."""
    env = dict(os.environ)
    env.pop("LLMCTL_API_KEY", None)
    with open(log, "w") as err:
        proc = subprocess.Popen([PYTHON, "-m", "llmctl", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                                 "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env, cwd=log.parent)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline().strip() if ready else ""
        assert line.startswith("http://127.0.0.1:"), f"no URL on stdout: {line!r}; stderr: {log.read_text()}"
        yield Server(line, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    with serving(runs[1], tmp_path_factory.mktemp("server") / "serve.log") as s:
        yield s


@pytest.fixture(scope="module")
def guarded(runs, tmp_path_factory):
    """The pretrain-only checkpoint (no chat template) behind an API key, one slot and one queue place."""
    with serving(runs[0], tmp_path_factory.mktemp("guarded") / "serve.log", "--api-key", KEY,
                 "--max-batch", "1", "--max-waiting", "1") as s:
        yield s


def template_of(loaded) -> ChatTemplate:
    return ChatTemplate.from_state(loaded.template)


def finish_of(completion) -> str:
    return "length" if completion.finish_reason == "length" else "stop"


# --------------------------------------------------------------------------- the OpenAI API

def test_models_health_and_the_startup_lines(server):
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["chat"]
    raw = server.get("v1/models").json()["data"][0]
    assert raw["context_length"] == CONTEXT and raw["chat_template"] is True
    assert server.client().models.retrieve("chat").id == "chat"
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "chat" and health["active"] == 0
    log = server.log.read_text()
    assert f"serve: model 'chat': context {CONTEXT} tokens, cpu float32, chat template" in log
    assert f"chat page {server.url}" in log and "warning" not in log


def test_chat_reply_equals_generate_and_usage_counts_the_tokens(server, loaded):
    messages = [{"role": "user", "content": "Say 3."}]
    reply = server.client().chat.completions.create(model="chat", messages=messages, max_tokens=24,
                                                    temperature=1.0, seed=11)
    alone = complete(loaded, "Say 3.", temperature=1.0, max_new_tokens=24, seed=11)  # `llmctl generate`'s reply
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == "chat"
    assert choice.message.role == "assistant" and choice.message.content == alone.text
    assert choice.finish_reason == finish_of(alone)
    expected_prompt = len(prompt_ids([("user", "Say 3.")], template_of(loaded), loaded.tokenizer))
    assert reply.usage.prompt_tokens == expected_prompt == alone.prompt_tokens
    assert reply.usage.completion_tokens == alone.tokens
    assert reply.usage.total_tokens == expected_prompt + alone.tokens


def test_a_whole_conversation_goes_through_the_chat_template(server, loaded):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say 1."},
                {"role": "assistant", "content": "1."}, {"role": "user", "content": [{"type": "text", "text": "Say 2."}]}]
    reply = server.client().chat.completions.create(model="chat", messages=messages, max_tokens=4, temperature=0)
    turns = [("system", "Be brief."), ("user", "Say 1."), ("assistant", "1."), ("user", "Say 2.")]
    assert reply.usage.prompt_tokens == len(prompt_ids(turns, template_of(loaded), loaded.tokenizer))


def test_chat_streams_role_then_content_then_finish_then_usage(server):
    client = server.client()
    args = dict(model="chat", messages=[{"role": "user", "content": "Say 5."}], max_tokens=40, temperature=0.9,
                seed=5)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # On the wire: server-sent events closed by [DONE].
    with server.stream("v1/chat/completions", {**args, "stream": True}) as r:
        assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_feed_the_prompt_as_it_is(server, loaded):
    client = server.client()
    alone = complete(loaded, "ROMEO:", raw=True, temperature=1.0, max_new_tokens=30, seed=3)
    for prompt in ("ROMEO:", ["ROMEO:"]):
        reply = client.completions.create(model="chat", prompt=prompt, max_tokens=30, temperature=1.0, seed=3)
        assert reply.object == "text_completion" and reply.choices[0].text == alone.text
        assert reply.choices[0].finish_reason == finish_of(alone)
        assert reply.usage.prompt_tokens == len(loaded.tokenizer.encode("ROMEO:"))
        assert reply.usage.completion_tokens == alone.tokens
    streamed = list(client.completions.create(model="chat", prompt="ROMEO:", max_tokens=30, temperature=1.0, seed=3,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == alone.text
    assert streamed[-1].choices[0].finish_reason == finish_of(alone)
    # No max_tokens: what fits the window, at most 256 (greedy, this model never ends a reply itself).
    default = client.completions.create(model="chat", prompt="ROMEO:", temperature=0)
    assert default.choices[0].finish_reason == "length" and default.usage.completion_tokens == 256


def test_n_choices_use_seed_plus_index_and_repeat_exactly(server):
    client = server.client()
    args = dict(model="chat", prompt="ROMEO:", max_tokens=16, temperature=1.0)
    three = client.completions.create(**args, n=3, seed=7)
    assert [c.index for c in three.choices] == [0, 1, 2]
    singles = [client.completions.create(**args, seed=7 + i) for i in range(3)]
    assert [c.text for c in three.choices] == [s.choices[0].text for s in singles]
    assert three.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once, as OpenAI does
    assert three.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert [c.text for c in client.completions.create(**args, n=3, seed=7).choices] == [c.text for c in three.choices]
    # Streamed, the choices interleave, each opened with the role and closed with its finish_reason.
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}], n=2, seed=1,
                                          max_tokens=10, stream=True)
    per_choice: dict[int, list] = {0: [], 1: []}
    for chunk in chat:
        per_choice[chunk.choices[0].index].append(chunk.choices[0])
    for choices in per_choice.values():
        assert choices[0].delta.role == "assistant" and choices[-1].finish_reason in ("stop", "length")


def test_same_seed_same_text_another_seed_another(server):
    client = server.client()
    args = dict(model="chat", messages=[{"role": "user", "content": "Say 9."}], max_tokens=40, temperature=1.0)
    first, again = (client.chat.completions.create(**args, seed=123).choices[0].message.content for _ in range(2))
    other = client.chat.completions.create(**args, seed=124).choices[0].message.content
    assert first == again and first != other


def test_stop_strings_cut_before_the_first_one(server):
    client = server.client()
    args = dict(model="chat", prompt="ROMEO:", max_tokens=60, temperature=1.0, seed=21)
    text = client.completions.create(**args).choices[0].text
    # A stop string that first occurs some way into the text, and a later one that must not matter.
    cut = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i: i + 2] and text.find(text[i: i + 2]) == i)
    stop = text[cut: cut + 2]
    later = next(text[i: i + 2] for i in range(cut + 2, len(text) - 2)
                 if "\ufffd" not in text[i: i + 2] and text.find(text[i: i + 2]) > cut)
    for stops in (stop, [later, stop]):
        reply = client.completions.create(**args, stop=stops)
        assert reply.choices[0].text == text[:cut] and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**args, stop=[stop], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]


def test_sixteen_clients_stream_at_once_each_as_if_alone(server):
    client = server.client()

    def ask(i: int) -> dict:
        return dict(model="chat", messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=60,
                    temperature=1.0, seed=100 + i)

    results: dict[int, tuple[str, str | None]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            text, finish = "", None
            for chunk in client.chat.completions.create(**ask(i), stream=True):
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            results[i] = (text, finish)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    peak = 0
    while any(t.is_alive() for t in threads):
        peak = max(peak, server.health()["active"])
        time.sleep(0.005)
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(results) == list(range(16)) and all(finish in ("stop", "length") for _, finish in results.values())
    assert peak > 1  # they shared batches
    for i in (0, 7, 15):  # the same request alone gives the same text
        assert client.chat.completions.create(**ask(i)).choices[0].message.content == results[i][0]
    assert server.wait_idle()["active"] == 0


def first_event(response: http.client.HTTPResponse) -> str:
    while not (line := response.readline().decode()).startswith("data: "):
        assert line, "the stream ended before its first event"
    return line


def long_request(**extra) -> dict:
    """A reply that runs to max_tokens (greedy, this model never ends it): hundreds of ms of work."""
    return {"model": "chat", "prompt": "ROMEO:", "max_tokens": CONTEXT - 32, "temperature": 0, **extra}


def test_a_client_that_leaves_frees_its_slot_at_once(server):
    assert server.post("v1/completions", long_request()).json()["choices"][0]["finish_reason"] == "length"
    before = server.wait_idle()["finished"]
    with server.stream("v1/completions", long_request(stream=True)) as r:
        first_event(r)  # the first token has arrived
        assert server.health()["active"] == 1
    after = server.wait_idle(5)
    assert after["active"] == 0
    assert after["finished"]["cancelled"] == before["cancelled"] + 1  # cut off, not run to its end
    assert after["finished"]["length"] == before["length"]
    # Not streaming: a client that gives up waiting frees its slot too.
    with pytest.raises(TimeoutError):
        server.fetch("POST", "v1/completions", long_request(), timeout=0.05)
    again = server.wait_idle(5)
    assert again["active"] == 0 and again["finished"]["cancelled"] == before["cancelled"] + 2
    assert again["finished"]["length"] == before["length"]


BAD_REQUESTS = [  # (route, body, status, param)
    ("chat/completions", b"{not json", 400, None),
    ("chat/completions", b"", 400, None),
    ("chat/completions", b"[]", 400, None),
    ("chat/completions", {}, 400, "messages"),
    ("chat/completions", {"messages": "hi"}, 400, "messages"),
    ("chat/completions", {"messages": []}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -0.5}, 400, "temperature"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400, "top_p"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.5}, 400, "max_tokens"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 1000}, 400, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": True}, 400, "n"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 1}, 400,
     "frequency_penalty"),
    ("chat/completions", {"messages": [{"role": "user", "content": "hi " * 2000}]}, 400, "messages"),
    ("chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": "hi " * 2000}, 400, "prompt"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
]


@pytest.mark.parametrize("route, body, status, param", BAD_REQUESTS,
                         ids=[f"{r}-{i}" for i, (r, *_) in enumerate(BAD_REQUESTS)])
def test_a_bad_request_is_a_4xx_with_an_openai_error_body(server, route, body, status, param):
    response = server.post("v1/" + route, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert "Traceback" not in response.text


def test_too_long_a_prompt_says_so_and_the_client_raises(server):
    response = server.post("v1/completions", {"prompt": "hi " * 2000})
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert f"context window is {CONTEXT} tokens" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}],
                                                temperature=-1)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_body_size_is_capped_and_unknown_routes_are_openai_errors(server):
    huge = json.dumps({"prompt": "x" * (2 << 20)})
    response = server.post("v1/completions", huge, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    for response in (server.get("v1/nothing"), server.get("v1/chat/completions")):
        assert response.status_code in (404, 405) and response.json()["error"]["message"]


def test_the_page_is_one_self_contained_file(server):
    response = server.get("")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    page = response.text
    assert "/v1/chat/completions" in page and "getReader" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


# --------------------------------------------------------------------------- key, queue, no template

def test_the_api_key_guards_v1_and_only_v1(guarded):
    def models(headers: dict) -> Reply:
        return guarded.get("v1/models", headers=headers)

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer"}):
        response = models(headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert models({"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert guarded.post("v1/completions", {"prompt": "hi"}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").completions.create(model="base", prompt="hi", max_tokens=2)
    assert guarded.client(KEY).completions.create(model="base", prompt="hi", max_tokens=2).choices[0].finish_reason
    assert guarded.get("health").status_code == 200 and guarded.get("").status_code == 200  # the page asks for it


def test_without_a_chat_template_chat_continues_the_text(guarded, base_loaded):
    client = guarded.client(KEY)
    assert guarded.get("v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["chat_template"] \
        is False
    reply = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "ROMEO:"}],
                                           max_tokens=20, temperature=1.0, seed=4)
    alone = complete(base_loaded, "ROMEO:", temperature=1.0, max_new_tokens=20, seed=4)
    assert reply.choices[0].message.content == alone.text
    assert reply.usage.prompt_tokens == len(base_loaded.tokenizer.encode("ROMEO:"))
    two = client.chat.completions.create(model="base", max_tokens=2, messages=[
        {"role": "system", "content": "KING:"}, {"role": "user", "content": "ROMEO:"}])
    assert two.usage.prompt_tokens == len(base_loaded.tokenizer.encode("KING:\nROMEO:"))


def test_a_full_queue_is_a_429_with_retry_after(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {**long_request(), "model": "base"}
    assert guarded.post("v1/completions", body, headers=auth).json()["choices"][0]["finish_reason"] == "length"
    with guarded.stream("v1/completions", {**body, "stream": True}, auth) as running:
        first_event(running)  # it holds the one slot
        with guarded.stream("v1/completions", {**body, "stream": True}, auth) as queued:
            assert queued.status == 200 and guarded.health()["waiting"] == 1
            refused = guarded.post("v1/completions", body, headers=auth)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                guarded.client(KEY).completions.create(**{**body, "max_tokens": 2})
    assert guarded.wait_idle(5) | {"finished": None} == {"status": "ok", "model": "base", "active": 0, "waiting": 0,
                                                         "finished": None}


# --------------------------------------------------------------------------- the command itself

def test_ctrl_c_stops_both_servers_cleanly_and_no_request_left_a_traceback(server, guarded):
    for s in (server, guarded):
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(30) == 0
        log = s.log.read_text()
        assert log.rstrip().endswith("serve: stopped") and "Traceback" not in log and "Exception" not in log


def invoke(*args: str, env: dict | None = None):
    result = CliRunner().invoke(app, ["serve", *args], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def test_without_the_extra_one_line_names_it(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now fails as if absent
    result = invoke("--checkpoint", str(runs[1]))
    assert result.exit_code == 2
    assert result.stderr == 'error: llmctl serve needs the serve extra: pip install "llmctl[serve]"\n'


def test_a_port_in_use_is_one_line_with_the_fix(runs):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke("--checkpoint", str(runs[1]), "--port", str(port))
    assert result.exit_code == 2
    assert result.stderr == (f"error: port {port} is already in use on 127.0.0.1 (another llmctl serve?); pick "
                             f"another with --port N (--port 0 takes any free one), or stop the process holding it\n")


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--port", "70000"], "--port 70000 is not a port; use 1-65535 (0 = any free port)"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid: no such address or host name"),
])
def test_bad_options_are_one_line(runs, args, message):
    result = invoke("--checkpoint", str(runs[1]), *args)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1


def test_every_interface_without_a_key_warns_and_with_one_does_not(runs, monkeypatch):
    """The startup lines alone: the server is replaced by a stand-in that only reports it is ready."""
    import llmctl.serve

    monkeypatch.setattr(llmctl.serve, "_serve", lambda app, sock, ready: ready())
    monkeypatch.delenv("LLMCTL_API_KEY", raising=False)
    result = invoke("--checkpoint", str(runs[1]), "--host", "0.0.0.0", "--port", "0", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("http://127.0.0.1:")
    assert ("warning: listening on every interface without an API key: anyone who can reach this machine can use "
            "the model; pass --api-key KEY (or set LLMCTL_API_KEY)") in result.stderr
    result = invoke("--checkpoint", str(runs[1]), "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
                    env={"LLMCTL_API_KEY": KEY})
    assert result.exit_code == 0 and "warning" not in result.stderr and result.stderr.endswith("serve: stopped\n")
