"""`llmctl sft`: a tiny run on real Dolly records lowers held-out response loss, the loss is the
response-only loss recomputed by hand, the checkpoint carries its template and `generate` uses
it, resume is exact, every file shape trains, and bad records and configs fail in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import shared_file
from llmctl.cli import app
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.chat_template import ChatTemplate, encode_examples, prompt_ids
from llmctl.data.sft import held_out_indices, load_sft_data
from llmctl.evaluate import evaluate_examples
from small_runs import build_small_tokenizer, small_run_args



@pytest.fixture(scope="module")
def work(tmp_path_factory, shakespeare):
    """A folder with the small tokenizer and a 12-step pretrain run "base" (64-token context)."""
    root = tmp_path_factory.mktemp("sft")
    tok = build_small_tokenizer(root / "tok", shakespeare)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("LLMCTL_CACHE", str(root / "cache"))
        result = CliRunner().invoke(app, small_run_args("base", shakespeare, tok, "--set", "model.max_seq_len=64"))
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def cli(work, monkeypatch):
    """Run `llmctl ARGS` in-process in the work folder; returns (exit code, stdout, stderr)."""
    monkeypatch.chdir(work)
    monkeypatch.setenv("LLMCTL_CACHE", str(work / "cache"))
    monkeypatch.delenv("LLMCTL_DEBUG", raising=False)

    def run(*args: str):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return result.exit_code, result.stdout, result.stderr
    return run


def dolly(cap: int = 400) -> str:
    return f"jsonl:{shared_file('sft/dolly_open_qa.jsonl')}:{cap}"


def sft_args(run: str, datasets: str, *extra: str, steps: int = 30) -> list[str]:
    sets = {"sft.datasets": json.dumps([datasets]), "sft.max_steps": steps, "sft.batch_size": 8,
            "sft.micro_batch_size": 4, "sft.warmup_steps": 3, "sft.lr": 3e-3, "sft.eval_every": 10,
            "sft.save_every": 10, "sft.samples": 2, "sft.sample_tokens": 8, "run.log_every": 5,
            "run.device": "cpu", "run.dtype": "float32"}
    args = ["sft", "--from", "experiments/runs/base", "--preset", "tiny", "--run-name", run]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


@pytest.fixture(scope="module")
def tuned(work):
    """One SFT run on 400 Dolly records: (its final checkpoint, what the CLI printed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        mp.setenv("LLMCTL_CACHE", str(work / "cache"))
        result = CliRunner().invoke(app, sft_args("tuned", dolly()))
    assert result.exit_code == 0, result.output
    final = work / "experiments" / "runs" / "tuned" / "tuned-sft_final.pt"
    assert result.stdout.strip() == str(final.relative_to(work))
    return final, result.stderr


def by_hand_response_loss(model, tokenizer_json: str, eos: int, records: list[str], context: int) -> float:
    """Mean loss over reply tokens and their end-of-text, with ids, mask and cross-entropy built
    here from the template's strings and the `tokenizers` library alone."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    total, count = 0.0, 0
    for text in records:
        question, answer = text.split(" ### Assistant: ")
        prompt = enc("### Human: " + question.removeprefix("### Human: ").strip() + "\n") + enc("### Assistant:")
        reply = enc(" " + answer.strip()) + [eos]
        # Too long for the context: the documented rule keeps the reply side, and of a long
        # prompt its newest tokens, leaving at least a quarter of the window to the reply.
        kept = min(len(prompt), context + 1 - (context + 1) // 4)
        ids = (prompt + reply)[len(prompt) - kept:][: context + 1]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]  # (T, V)
        losses = F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")  # (T,)
        scored = losses[kept - 1:]  # targets that are reply tokens
        total += float(scored.sum())
        count += len(scored)
    return total / count


def test_sft_lowers_held_out_response_loss_and_the_loss_is_response_only(tuned, work):
    from llmctl.loading import load_model

    final, stderr = tuned
    run = final.parent
    for name in ("config.toml", "training.log", "metrics.jsonl", "tuned-sft_step10.pt", "tuned-sft_final.pt"):
        assert (run / name).is_file(), name
    assert "tuned-pretrain" not in " ".join(p.name for p in run.iterdir())
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert "sample step 10 |" in (run / "training.log").read_text()
    assert "20 held out" in stderr and "response tokens with loss" in stderr

    base = load_model(work / "experiments/runs/base/base-pretrain_final.pt", device="cpu")
    sft = load_model(final, device="cpu")
    data = load_sft_data([dolly()], "auto", 0.05)
    held = encode_examples(data.validation, ChatTemplate(), sft.tokenizer, 64)
    before = evaluate_examples(base.model, held, 4, torch.device("cpu"), pad_id=sft.tokenizer.eos_id)["loss"]
    after = evaluate_examples(sft.model, held, 4, torch.device("cpu"), pad_id=sft.tokenizer.eos_id)
    assert after["loss"] < before - 0.3, (before, after["loss"])  # SFT learned the reply format
    assert math.isclose(evals[-1]["val_loss"], after["loss"], rel_tol=1e-5)  # the trainer's eval is this one

    # The same number from records, the template's strings and plain cross-entropy.
    records = [json.loads(line)["text"] for line in shared_file("sft/dolly_open_qa.jsonl").read_text().splitlines()[:400]]

    held_records = [records[i] for i in sorted(held_out_indices(400, 0.05))]
    manual = by_hand_response_loss(sft.model, sft.tokenizer.to_json(), sft.tokenizer.eos_id, held_records, 64)
    assert math.isclose(manual, after["loss"], rel_tol=1e-5), (manual, after["loss"])


def test_the_checkpoint_carries_template_tokenizer_and_config(tuned, work):
    final, _ = tuned
    ckpt = torch.load(final, weights_only=True)
    base = torch.load(work / "experiments/runs/base/base-pretrain_final.pt", weights_only=True)
    assert ckpt["stage"] == "sft" and ckpt["step"] == 30
    assert ChatTemplate.from_state(ckpt["template"]) == ChatTemplate()
    assert ckpt["tokenizer"]["fingerprint"] == base["tokenizer"]["fingerprint"]
    assert ckpt["config"]["model"] == base["config"]["model"]  # the preset's [model] (64 wide) was not used
    assert ckpt["config"]["sft"]["from"] == "experiments/runs/base/base-pretrain_final.pt"
    assert ckpt["config"]["sft"]["lr"] == 3e-3


def test_eval_scores_an_sft_checkpoint_on_its_pretraining_text(tuned, cli):
    final, _ = tuned
    code, out, err = cli("eval", "-c", final, "--json")
    assert code == 0, err
    assert math.isfinite(json.loads(out)["datasets"]["validation"]["bits_per_byte"])


def test_generate_applies_the_saved_template_and_raw_opts_out(tuned, cli):
    from llmctl.generate import complete, token_stream, Sampling
    from llmctl.loading import load_model

    final, _ = tuned
    loaded = load_model(final, device="cpu")
    question = "What is the capital of France?"
    ids = prompt_ids([("user", question)], ChatTemplate(), loaded.tokenizer)
    result = complete(loaded, question, temperature=0, max_new_tokens=6, seed=0)
    assert result.templated and result.prompt_tokens == len(ids)
    expected = list(token_stream(loaded.model, ids, Sampling(max_new_tokens=6, temperature=0), torch.Generator(),
                                 context_length=64, eos_id=loaded.tokenizer.eos_id))
    assert result.token_ids == expected
    raw = complete(loaded, question, temperature=0, max_new_tokens=6, seed=0, raw=True)
    assert not raw.templated and raw.prompt_tokens == len(loaded.tokenizer.encode(question))

    code, _, err = cli("generate", "-c", final, "-p", question, "-t", "0", "-m", "4")
    assert code == 0 and f"prompt {len(ids)} tokens through the chat template" in err
    code, _, err = cli("generate", "-c", final, "-p", question, "-t", "0", "-m", "4", "--raw")
    assert code == 0 and "chat template" not in err


def test_resume_continues_exactly(cli, work):
    straight = sft_args("straight", dolly(100), steps=6)
    assert cli(*straight)[0] == 0
    assert cli(*sft_args("halves", dolly(100), steps=3))[0] == 0
    resume = sft_args("halves", dolly(100), "--resume", steps=6)
    resume = resume[:1] + resume[3:]  # no --from: the run's config.toml says where it began
    code, _, err = cli(*resume)
    assert code == 0, err
    assert "resumed from halves-sft_final.pt at step 3" in err
    runs = work / "experiments" / "runs"
    a = torch.load(runs / "straight/straight-sft_final.pt", weights_only=True)
    b = torch.load(runs / "halves/halves-sft_final.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # A finished run is not started over by accident.
    code, _, err = cli(*sft_args("halves", dolly(100), steps=6))
    assert code == 1 and "pass --resume" in err


def test_resume_refuses_changed_conversations_of_the_same_token_count(cli, work, tmp_path):
    from llmctl.data.tokenizer import load_tokenizer

    records = shared_file("sft/dolly_open_qa.jsonl").read_text().splitlines()[:100]
    path = tmp_path / "dolly.jsonl"
    tokenizer = load_tokenizer(str(work / "tok"))

    def write_and_encode(lines: list[str]) -> list:
        path.write_text("\n".join(lines) + "\n")
        data = load_sft_data([f"jsonl:{path}"], "auto", 0.05)
        return encode_examples(data.train, ChatTemplate(), tokenizer, 64)  # the base run's context

    before = write_and_encode(records)
    assert cli(*sft_args("same-count", f"jsonl:{path}", steps=3))[0] == 0
    # Two words of a short training record swapped: each is one " word" piece, and a byte-level
    # BPE encodes pieces alone, so every example keeps its length and labels; the ids differ.
    held = held_out_indices(100, 0.05)
    i = next(i for i in range(100) if i not in held and 8 <= len(json.loads(records[i])["text"].split()) <= 20)
    words = json.loads(records[i])["text"].split(" ")
    a, b = [k for k in range(1, len(words)) if words[k].isalpha()][:2]
    assert words[a] != words[b]
    words[a], words[b] = words[b], words[a]
    edited = records.copy()
    edited[i] = json.dumps({"text": " ".join(words)})
    after = write_and_encode(edited)
    assert [len(e.input_ids) for e in after] == [len(e.input_ids) for e in before]
    assert [e.labels.count(IGNORE_INDEX) for e in after] == [e.labels.count(IGNORE_INDEX) for e in before]
    assert [e.input_ids for e in after] != [e.input_ids for e in before]

    resume = sft_args("same-count", f"jsonl:{path}", "--resume", steps=6)
    resume = resume[:1] + resume[3:]  # no --from: the run's config.toml says where it began
    code, _, err = cli(*resume)
    line = err.strip().splitlines()[-1]  # after the "data: reading" line
    assert code == 1 and "Traceback" not in err, err
    assert line.startswith("error: cannot resume from ") and "the training data changed since it was saved " \
        "(the same token count, different content" in line
    assert line.endswith("restore the data, or start a new run with another --run-name")
    write_and_encode(records)  # the original conversations resume
    code, _, err = cli(*resume)
    assert code == 0, err


SHAPES = {
    "alpaca.json": json.dumps([{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"}
                               for i in range(24)] + [{"instruction": "Translate", "input": "Hallo", "output": "Hello"}]),
    "chat.jsonl": "\n".join(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i}."}]})
                            for i in range(25)),
}


@pytest.mark.parametrize("name, kind", [("alpaca.json", "json"), ("chat.jsonl", "jsonl")])
def test_unseen_alpaca_and_chat_files_train(name, kind, cli, work, tmp_path):
    path = tmp_path / name
    path.write_text(SHAPES[name])
    code, out, err = cli(*sft_args(f"shape-{kind}", f"{kind}:{path}", steps=4))
    assert code == 0, err
    assert "24 training and 1 held-out conversations" in err
    ckpt = torch.load(work / out.strip(), weights_only=True)
    assert ckpt["step"] == 4 and math.isfinite(ckpt["history"][-1]["val_loss"])


def test_parquet_and_prompt_response_shapes_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a?", "b?", "c?"], "response": ["A", "B", ""]}), tmp_path / "p.parquet")
    data = load_sft_data([f"parquet:{tmp_path}/p.parquet"], "auto", 0.05)
    assert data.skipped == 1 and data.first_skipped.endswith("row 2")  # an empty reply: skipped and counted
    assert sorted(data.train + data.validation) == [[("user", "a?"), ("assistant", "A")],
                                                    [("user", "b?"), ("assistant", "B")]]


def test_malformed_record_is_one_line_naming_the_line(cli, work, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": 5, "output": "x"}\n')
    code, out, err = cli(*sft_args("broken", f"jsonl:{bad}"))
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1] == (f"error: {bad}:3: field 'instruction' is int, not text; fix or remove "
                                            f"that record (or set sft.format to the shape it is in)")
    assert not (work / "experiments" / "runs" / "broken").exists()


def test_model_and_data_keys_come_from_the_checkpoint(cli):
    code, _, err = cli(*sft_args("x", dolly(), "--set", "model.d_model=64"))
    assert code == 2 and "sft takes [model] and [data] from the --from checkpoint, where model.d_model = 32" in err
    code, _, err = cli(*sft_args("base", dolly()))  # the base's own run directory
    assert code == 2 and "is the run directory of the --from checkpoint" in err


def test_data_inspect_shows_exactly_which_tokens_carry_loss(tuned, cli):
    final, _ = tuned
    code, out, err = cli("data", "inspect", "--sft", dolly(), "--index", "4", "--checkpoint", final, "--json")
    assert code == 0, err
    info = json.loads(out)
    record = json.loads(shared_file("sft/dolly_open_qa.jsonl").read_text().splitlines()[4])["text"]
    answer = record.split(" ### Assistant: ")[1].strip()
    trained = [t["target"] for t in info["tokens"] if t["loss"]]
    assert info["where"].endswith(":5") and info["n_loss"] == len(trained)
    if not info["truncated"]:
        assert info["response_text"] == f" {answer}<|endoftext|>"
    # every target before the reply is ignored; every one from the reply on counts
    first = next(i for i, t in enumerate(info["tokens"]) if t["loss"])
    assert all(t["loss"] for t in info["tokens"][first:])
    assert "".join(t["text"] for t in info["tokens"][: first + 1]).endswith("### Assistant:")
    code, out, _ = cli("data", "inspect", "--sft", dolly(), "-i", "4", "-c", final)
    assert code == 0 and "carry loss" in out and "response tokens" in out
    code, _, err = cli("data", "inspect", "--sft", dolly(), "-i", "5000", "-c", final)
    assert code == 2 and "fewer than 5001 records" in err


def test_eval_over_examples_ignores_prompt_and_padding_exactly():
    """evaluate_examples = the sum of per-target losses over non-ignored targets / their count."""
    from llmctl.config import ModelConfig
    from llmctl.data.batches import Example
    from llmctl.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, max_seq_len=16)).eval()
    examples = [Example([1, 2, 3, 4, 5], [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], False),
                Example([6, 7], [IGNORE_INDEX, 3], False),
                Example([9, 8, 7, 6, 5, 4, 3], [IGNORE_INDEX] * 4 + [1, 2, 3], False)]
    total, count = 0.0, 0
    for e in examples:
        with torch.no_grad():
            losses = F.cross_entropy(model(torch.tensor([e.input_ids]))[0], torch.tensor(e.labels), reduction="none",
                                     ignore_index=IGNORE_INDEX)
        keep = torch.tensor(e.labels) != IGNORE_INDEX
        total, count = total + float(losses[keep].sum()), count + int(keep.sum())
    for batch in (1, 2, 3):
        result = evaluate_examples(model, examples, batch, torch.device("cpu"), pad_id=0)
        assert result["tokens"] == count == 7
        assert math.isclose(result["loss"], total / count, rel_tol=1e-5)
