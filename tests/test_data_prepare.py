"""`llmctl data prepare` / `data info`: local text, jsonl, json and parquet sources with caps and
mixes, sharded stores that equal a direct tokenization, resume after SIGKILL, train:V
tokenizers, weighted windows, and one-line errors that cache nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PYTHON, shared_file
from llmctl.config import DataConfig
from llmctl.data.batches import RandomWindows, training_windows
from llmctl.data.holdout import tail_cut
from llmctl.data.sources import check_sources, iter_documents, parse_spec
from llmctl.data.store import TokenView, prepare_store, verify_store
from llmctl.data.tokenizer import load_tokenizer, resolve_tokenizer
from llmctl.errors import ConfigError, LlmctlError


def llmctl(*args: str, cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def gpt2(gpt2_dir):
    return load_tokenizer(str(gpt2_dir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare, wikitext_valid) -> dict[str, Path]:
    """Small local files of every kind, made from the shared real text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("corpus")
    (d / "play.txt").write_text(shakespeare.read_text()[:60_000])
    paragraphs = [p.strip() for p in wikitext_valid.read_text().split("\n \n") if p.strip()][:230]
    with open(d / "notes.jsonl", "w") as f:
        for i, p in enumerate(paragraphs[:150]):
            f.write(json.dumps({"id": i, "content": p}) + "\n")
            if i % 40 == 0:
                f.write("\n")  # blank lines are skipped
    (d / "parts").mkdir()
    for k in range(2):
        pq.write_table(pa.table({"text": paragraphs[150 + 40 * k: 190 + 40 * k]}), d / "parts" / f"p{k}.parquet")
    (d / "array.json").write_text(json.dumps([{"text": p} for p in paragraphs[:30]]))
    return {"dir": d, "text": d / "play.txt", "jsonl": d / "notes.jsonl", "parquet": d / "parts", "json": d / "array.json",
            "paragraphs": paragraphs}


def mix_specs(corpus: dict[str, Path]) -> list[str]:
    return [f"text:{corpus['text']}:300", f"jsonl:{corpus['jsonl']}#content:120",
            f"parquet:{corpus['parquet']}/*.parquet", f"json:{corpus['json']}"]


def direct_tokens(spec: str, tokenizer) -> list[int]:
    """The packed stream of one source by plain tokenization: each document, then EOS."""
    out: list[int] = []
    for ids in tokenizer.encode_batch(list(iter_documents(parse_spec(spec)))):
        out += ids + [tokenizer.eos_id]
    return out


# --------------------------------------------------------------------------- specs and readers

def test_specs_name_kind_field_and_cap():
    s = parse_spec("jsonl:data/*.jsonl#content:500")
    assert (s.kind, s.target, s.field, s.cap, s.text_field) == ("jsonl", "data/*.jsonl", "content", 500, "content")
    assert parse_spec("parquet:x/*.parquet").text_field == "text"
    assert parse_spec("hf:org/name/cfg#body:9").field == "body"
    assert parse_spec("json:notes#v2.json").target == "notes#v2.json"  # not a field name: part of the path
    for bad, msg in [("text:a.txt#body", "text: files have no fields"), ("openwebtext#body", "fixed text field"),
                     ("wikitext-2", "did you mean 'wikitext-2-raw-v1'"), ("jsonl:a.jsonl:-3", "must be a positive"),
                     ("jsonl:", "names no files"), ("csv:a.csv", "unknown data source")]:
        with pytest.raises(ConfigError, match=msg):
            parse_spec(bad)


def test_readers_yield_documents_and_respect_caps(corpus):
    notes = [json.loads(line)["content"] for line in corpus["jsonl"].read_text().splitlines() if line.strip()]
    assert list(iter_documents(parse_spec(f"jsonl:{corpus['jsonl']}#content"))) == notes
    assert len(list(iter_documents(parse_spec(f"jsonl:{corpus['jsonl']}#content:7")))) == 7
    parquet = list(iter_documents(parse_spec(f"parquet:{corpus['parquet']}/*.parquet")))
    assert parquet == corpus["paragraphs"][150:230]
    assert list(iter_documents(parse_spec(f"json:{corpus['json']}"))) == notes[:30]
    assert list(iter_documents(parse_spec(f"jsonl:{corpus['jsonl']}#content"), "validation")) == []


def test_bad_records_fail_with_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(LlmctlError, match=r"bad.jsonl:2 has no 'text' field \(fields: body\); name the text field"):
        list(iter_documents(parse_spec(f"jsonl:{bad}")))
    first = tmp_path / "first.jsonl"
    first.write_text('{"body": "x"}\n')
    with pytest.raises(LlmctlError, match="first.jsonl:1 has no 'text' field"):
        check_sources([f"jsonl:{first}"])  # checked up front, before any tokenizing
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(LlmctlError, match="broken.jsonl line 2 is not valid JSON"):
        list(iter_documents(parse_spec(f"jsonl:{broken}")))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(LlmctlError, match="is not UTF-8"):
        list(iter_documents(parse_spec(f"text:{latin}")))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    with pytest.raises(LlmctlError, match=r"has no 'text' column \(columns: body\)"):
        check_sources([f"parquet:{tmp_path}/*.parquet"])
    with pytest.raises(ConfigError, match="matches no files"):
        check_sources([f"parquet:{tmp_path}/*.parq"])
    with pytest.raises(ConfigError, match="is a folder"):
        check_sources([f"text:{tmp_path}"])


# --------------------------------------------------------------------------- fast encoding

def test_fast_encoder_gives_the_tokenizers_ids(gpt2, corpus, shakespeare):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    from llmctl.data.fastbpe import FastEncoder, plan

    planned = plan(gpt2.to_json(), gpt2.backend)
    assert planned is not None
    fast = FastEncoder(gpt2.backend, planned)
    docs = corpus["paragraphs"] + shakespeare.read_text()[:30_000].split("\n\n") + [shared_file("tinystories/tinystories_sample.txt").read_text()]
    docs += ["naïve café — “quoted” 🎉  spaces\t\ttabs\r\n", "<|endoftext|><|endoftext|>x<|endoftext|>", " ",
             "mixed 日本語 text takes the tokenizer's own path", "\u0558 an unvetted letter"]
    assert fast.encode_batch(docs) == [e.ids for e in gpt2.backend.encode_batch(docs, add_special_tokens=False)]
    assert fast.encode("日本語") is None  # outside the vetted characters: not guessed
    assert fast.encode_batch(docs) == fast.encode_batch(docs)  # the warm cache changes nothing
    lowercasing = Tokenizer(models.BPE())
    lowercasing.normalizer = normalizers.Lowercase()
    lowercasing.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert plan(lowercasing.to_str(), lowercasing) is None  # a normalizer: the tokenizer's own path


# --------------------------------------------------------------------------- the store

def test_store_equals_direct_tokenization_across_shards(tmp_path, monkeypatch, gpt2, corpus):
    monkeypatch.setenv("LLMCTL_SHARD_CHARS", "5000")  # many shards, still in this process
    specs = mix_specs(corpus)
    cfg = DataConfig(datasets=specs, cache_dir=str(tmp_path / "cache"), num_workers=1)
    store = prepare_store(cfg, gpt2)
    assert len(store.meta["shards"]) > 10 and verify_store(store) == []
    train, val = store.tokens("train"), store.tokens("validation")
    assert isinstance(train, TokenView) and train.dtype == np.uint16
    for i, spec in enumerate(specs):
        direct = direct_tokens(spec, gpt2)
        source = store.meta["sources"][i]
        assert source["train"]["tokens"] + source["validation"]["tokens"] == len(direct)
        lo, hi = store.source_ranges("train")[i]
        vlo, vhi = store.source_ranges("validation")[i]
        assert train[lo:hi].tolist() + val[vlo:vhi].tolist() == direct  # exact ids, split at the tail
        docs = [np.array(ids + [gpt2.eos_id]) for ids in gpt2.encode_batch(list(iter_documents(parse_spec(spec))))]
        lengths = np.array([d.size for d in docs])
        cut, _ = tail_cut(iter([lengths[::-1]]), int(lengths.sum()), len(docs), cfg.validation_fraction)
        assert val[vlo:vhi].tolist() == np.concatenate(docs)[cut:].tolist()  # the same rule as in memory
        assert source["train"]["documents"] + source["validation"]["documents"] == len(docs)
        text_bytes = sum(len(d.encode()) for d in iter_documents(parse_spec(spec)))
        assert source["train"]["bytes"] + source["validation"]["bytes"] == text_bytes
    assert store.meta["tokens"] == {"train": len(train), "validation": len(val)}


def test_one_document_still_gets_a_validation_split(tmp_path, gpt2, shakespeare):
    one = tmp_path / "one.txt"
    one.write_text(" ".join(shakespeare.read_text()[:20_000].split()))  # no blank lines: one document
    store = prepare_store(DataConfig(datasets=[f"text:{one}"], cache_dir=str(tmp_path / "c")), gpt2)
    n = len(direct_tokens(f"text:{one}", gpt2))
    assert len(store.tokens("validation")) == n - round(n * 0.95) > 0
    assert store.meta["sources"][0]["train"]["documents"] == 1


def test_shards_are_uint32_when_the_vocabulary_needs_it(tmp_path, gpt2):
    from llmctl.data.shards import read_index, write_shard
    from llmctl.data.store import token_dtype

    assert (token_dtype(65536), token_dtype(65537)) == ("uint16", "uint32")
    docs = ["Hello world", "ça va?", "x" * 3000]
    record = write_shard(gpt2.backend, gpt2.eos_id, "uint32", docs, tmp_path, "s")
    direct = [t for ids in gpt2.encode_batch(docs) for t in ids + [gpt2.eos_id]]
    assert np.fromfile(tmp_path / "s.bin", dtype=np.uint32).tolist() == direct
    assert record["tokens"] == len(direct) and record["bytes"] == sum(len(d.encode()) for d in docs)
    assert read_index(tmp_path, "s")[:, 1].tolist() == [11, 11 + 7, 11 + 7 + 3000]


def test_token_view_reads_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60000, size=n, dtype=np.uint16) for n in (7, 1, 30, 12)]
    for i, p in enumerate(parts):
        p.tofile(tmp_path / f"s{i}.bin")
    segments = [("s0", 0, 7), ("s1", 0, 1), ("s2", 5, 30), ("s3", 0, 12)]
    view = TokenView(tmp_path, segments, "uint16")
    flat = np.concatenate([parts[0], parts[1], parts[2][5:], parts[3]])
    assert len(view) == len(flat) and view[-1] == flat[-1] and view[8] == flat[8]
    for lo, hi in [(0, 5), (3, 20), (6, 8), (0, len(flat)), (30, 45), (10, 10)]:
        assert view[lo:hi].tolist() == flat[lo:hi].tolist()
    assert np.concatenate(list(view)).tolist() == flat.tolist() == np.asarray(view).tolist()


def test_second_prepare_reuses_and_a_tampered_fingerprint_is_refused(tmp_path, gpt2, corpus):
    cfg = DataConfig(datasets=[f"text:{corpus['text']}"], cache_dir=str(tmp_path))
    store = prepare_store(cfg, gpt2)
    stamp = (store.path / "manifest.json").stat().st_mtime_ns
    assert prepare_store(cfg, gpt2).path == store.path
    assert (store.path / "manifest.json").stat().st_mtime_ns == stamp
    shard = store.path / f"{store.meta['shards'][0]['name']}.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    assert verify_store(store) == [shard.stem]  # the manifest's checksums catch a flipped bit
    meta = json.loads((store.path / "manifest.json").read_text())
    meta["tokenizer_fingerprint"] = "0123456789abcdef"
    (store.path / "manifest.json").write_text(json.dumps(meta))
    with pytest.raises(LlmctlError, match="made with tokenizer fingerprint 0123456789abcdef"):
        prepare_store(cfg, gpt2)


def test_train_tokenizer_is_cached_and_travels_with_the_store(tmp_path, corpus, gpt2):
    cfg = DataConfig(datasets=[f"text:{corpus['text']}", f"jsonl:{corpus['jsonl']}#content"],
                     tokenizer="train:400", cache_dir=str(tmp_path))
    tok = resolve_tokenizer(cfg)
    assert tok.vocab_size == 400 and tok.eos_id == 0 and tok.decode(tok.encode("Thou art, ça va")) == "Thou art, ça va"
    again = resolve_tokenizer(cfg)
    assert again.fingerprint == tok.fingerprint
    folder = next(tmp_path.glob("tokenizer-*"))
    assert load_tokenizer(str(folder)).fingerprint == tok.fingerprint  # usable as data.tokenizer = folder
    store = prepare_store(cfg, tok)
    assert store.meta["tokenizer_fingerprint"] == tok.fingerprint and store.meta["tokenizer"] == "train:400"
    assert (store.path / "tokenizer.json").read_text() == tok.to_json()
    assert sum(store.meta["tokens"].values()) == sum(len(direct_tokens(s, tok)) for s in cfg.datasets)
    with pytest.raises(LlmctlError, match="fingerprint"):
        store.check_tokenizer(gpt2)
    with pytest.raises(ConfigError, match="train:8192"):
        resolve_tokenizer(DataConfig(datasets=cfg.datasets, tokenizer="train:12", cache_dir=str(tmp_path)))


def first_held_out_document(docs: list[str], tok, train_tokens: int) -> int:
    """Index of the first document with a token in the validation tail (which starts at token
    `train_tokens` of the source's packed stream: each document's ids, then EOS)."""
    ends = np.cumsum([len(ids) + 1 for ids in tok.encode_batch(docs)])
    return int(np.searchsorted(ends, train_tokens, side="right"))


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_train_tokenizer_sample_leaves_out_every_held_out_document(tmp_path, corpus, fraction):
    """A train:V tokenizer fit on the validation tail would flatter the validation loss: the
    fitting sample is a prefix of each source that stops before its first held-out document."""
    from llmctl.data.bpe import SAMPLE_CHARS, sample_documents

    cfg = DataConfig(datasets=[f"text:{corpus['text']}", f"jsonl:{corpus['jsonl']}#content",
                               f"parquet:{corpus['parquet']}/*.parquet"],
                     tokenizer="train:400", validation_fraction=fraction, cache_dir=str(tmp_path))
    tok = resolve_tokenizer(cfg)
    store = prepare_store(cfg, tok)
    specs = check_sources(cfg.datasets)
    samples = []
    for si, spec in enumerate(specs):
        docs = list(iter_documents(spec))
        first_held = first_held_out_document(docs, tok, store.meta["sources"][si]["train"]["tokens"])
        assert 0 < first_held < len(docs)
        sample = list(sample_documents([spec], SAMPLE_CHARS, fraction))
        # a prefix of the documents that ends before the first held-out one (by position:
        # WikiText repeats headings, so equal text may well be in both splits)
        assert sample == docs[: len(sample)] and len(sample) <= first_held, (spec.raw, len(sample), first_held)
        assert len(sample) > 0.5 * first_held  # the margin leaves most of the training text in
        samples += sample
    assert list(sample_documents(specs, SAMPLE_CHARS, fraction)) == samples  # what the tokenizer was fit on
    # the old cache (a sample that could reach into validation) is not reused, nor one made
    # for another hold-out
    other = resolve_tokenizer(DataConfig(datasets=cfg.datasets, tokenizer="train:400", cache_dir=str(tmp_path),
                                         validation_fraction=0.1))
    assert len(list(tmp_path.glob("tokenizer-*"))) == 2 and other.vocab_size == 400


def test_train_tokenizer_sample_of_one_document_stops_before_its_held_out_text(tmp_path, shakespeare):
    """One document: the store cuts its token stream, and the sample is a head of the training part."""
    from llmctl.data.bpe import SAMPLE_CHARS, sample_documents

    one = tmp_path / "one.txt"
    one.write_text(" ".join(shakespeare.read_text()[:20_000].split()))  # no blank lines: one document
    cfg = DataConfig(datasets=[f"text:{one}"], tokenizer="train:300", cache_dir=str(tmp_path / "c"))
    tok = resolve_tokenizer(cfg)
    store = prepare_store(cfg, tok)
    train_text = tok.decode(store.tokens("train")[:].tolist())
    [sample] = list(sample_documents(check_sources(cfg.datasets), SAMPLE_CHARS, cfg.validation_fraction))
    assert train_text.startswith(sample) and 0.8 * len(train_text) < len(sample) < len(train_text)


def test_a_run_with_a_train_tokenizer_trains_and_evaluates(tmp_path, shakespeare, monkeypatch):
    from typer.testing import CliRunner

    from llmctl.cli import app
    from small_runs import small_run_args

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, small_run_args("bpe", shakespeare, "train:300", "--set", "pretrain.max_steps=4"))
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "experiments/runs/bpe/metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if r["type"] == "eval"]
    assert val and all(0 < v < np.log(300) + 1 for v in val)
    assert "training a byte-level BPE tokenizer of 300 tokens" in result.stderr


def test_bad_inputs_cache_nothing(tmp_path, gpt2):
    late = tmp_path / "late.jsonl"
    late.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)) + '{"other": 1}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cache = tmp_path / "cache"
    for specs, msg in [([f"jsonl:{late}"], "late.jsonl:51 has no 'text' field"),
                       ([f"text:{late}", f"text:{empty}"], "yielded no text")]:
        with pytest.raises(LlmctlError, match=msg):
            prepare_store(DataConfig(datasets=specs, cache_dir=str(cache)), gpt2)
        assert not any(cache.iterdir())


# --------------------------------------------------------------------------- batches

def test_weighted_windows_follow_the_weights_and_resume():
    tokens = np.arange(3000, dtype=np.uint16)
    ranges = [(0, 1000), (1000, 1100), (1100, 3000)]
    a = RandomWindows(tokens, seq_len=8, batch_size=64, seed=3, ranges=ranges, weights=[1.0, 1.0, 0.0])
    starts = torch.cat([a.next_batch()[0][:, 0] for _ in range(20)])
    small = ((starts >= 1000) & (starts < 1100)).float().mean().item()
    assert starts.max() < 1100 - 8 and 0.4 < small < 0.6  # the 100-token source drawn as often as the 1000
    x, y = a.next_batch()
    assert torch.equal(y[:, :-1], x[:, 1:])
    b = RandomWindows(tokens, seq_len=8, batch_size=64, seed=3, ranges=ranges, weights=[1.0, 1.0, 0.0])
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(ValueError, match="fewer than one window"):
        RandomWindows(tokens, seq_len=200, batch_size=2, seed=0, ranges=ranges, weights=[1, 1, 1])


def test_training_windows_cross_shards(tmp_path, monkeypatch, gpt2, corpus):
    monkeypatch.setenv("LLMCTL_SHARD_CHARS", "3000")
    specs = [f"text:{corpus['text']}:200", f"json:{corpus['json']}"]
    store = prepare_store(DataConfig(datasets=specs, cache_dir=str(tmp_path), num_workers=1), gpt2)
    assert len(store.meta["shards"]) > 5
    flat = np.asarray(store.tokens("train"))
    batches = training_windows(store, [0.0, 1.0], seq_len=16, batch_size=32, seed=1)
    replay = training_windows(store, [0.0, 1.0], seq_len=16, batch_size=32, seed=1)
    lo, hi = store.source_ranges("train")[1]
    for _ in range(5):
        starts = replay._starts().tolist()  # the starts next_batch draws, from the same generator state
        x, y = batches.next_batch()
        assert all(lo <= s and s + 17 <= hi for s in starts)  # only the source with weight
        expected = np.stack([flat[s: s + 17] for s in starts]).astype(np.int64)  # windows cross shard ends
        assert torch.equal(x, torch.from_numpy(expected[:, :-1])) and torch.equal(y, torch.from_numpy(expected[:, 1:]))


# --------------------------------------------------------------------------- the commands

def test_cli_prepare_and_info_with_a_mix(tmp_path, gpt2_dir, gpt2, corpus, cli_env):
    sets = ["--set", f"data.datasets={json.dumps(mix_specs(corpus))}", "--set", f"data.tokenizer={gpt2_dir}"]
    info = llmctl("data", "info", "--preset", "tiny", *sets, "--json", cwd=tmp_path, env=cli_env)
    assert info.returncode == 0, info.stderr
    before = json.loads(info.stdout)
    assert before["prepared"] is False and before["sources"][0]["tokens"] is None

    first = llmctl("data", "prepare", "--preset", "tiny", *sets, "--json", cwd=tmp_path, env=cli_env)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["prepared"] and not out["reused"] and Path(out["path"]).is_dir()
    rows = {(r["spec"], r["split"]): r for r in out["sources"]}
    assert len(rows) == 8 and {"documents", "tokens", "bytes", "bytes_per_token"} <= set(out["sources"][0])
    for spec in mix_specs(corpus):
        assert rows[(spec, "train")]["tokens"] + rows[(spec, "validation")]["tokens"] == len(direct_tokens(spec, gpt2))
    assert rows[(mix_specs(corpus)[0], "train")]["documents"] + rows[(mix_specs(corpus)[0], "validation")]["documents"] == 300
    assert "tokens/s" in first.stderr

    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(out["path"]).iterdir()}
    second = llmctl("data", "prepare", "--preset", "tiny", *sets, cwd=tmp_path, env=cli_env)
    assert second.returncode == 0 and "reusing the cached token store" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in Path(out["path"]).iterdir()} == mtimes
    assert "bytes/token" in second.stdout and "validation" in second.stdout

    table = llmctl("data", "info", "--preset", "tiny", *sets, cwd=tmp_path, env=cli_env)
    assert table.returncode == 0 and "prepared" in table.stdout and out["path"] in table.stdout
    after = json.loads(llmctl("data", "info", "--preset", "tiny", *sets, "--json", cwd=tmp_path, env=cli_env).stdout)
    assert after["sources"] == out["sources"] and after["path"] == out["path"]


@pytest.mark.parametrize("sets, code, message", [
    (['data.datasets=["text:{d}/nothing-*.txt"]'], 2, "matches no files"),
    (['data.datasets=["text:{d}/play.txt:0"]'], 2, "the cap :0 must be a positive number"),
    (['data.datasets=["jsonl:{d}/notes.jsonl"]'], 1, "notes.jsonl:1 has no 'text' field"),
    (['data.datasets=["openwebtxt"]'], 2, "unknown data source 'openwebtxt' (did you mean 'openwebtext'?)"),
    (['data.weights=[1, 2]'], 2, "data.weights must be empty or one number"),
])
def test_cli_bad_inputs_are_one_line_and_cache_nothing(tmp_path, corpus, gpt2_dir, cli_env, sets, code, message):
    args = [a for s in sets for a in ("--set", s.format(d=corpus["dir"]))]
    result = llmctl("data", "prepare", "--preset", "tiny", "--set", f"data.tokenizer={gpt2_dir}", *args,
                    cwd=tmp_path, env=cli_env)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    cache = Path(cli_env["LLMCTL_CACHE"])
    assert not cache.exists() or not any(cache.iterdir())


def test_killed_prepare_resumes_to_the_same_shards(tmp_path, gpt2_dir, gpt2, shakespeare, wikitext_valid, cli_env):
    big = tmp_path / "big.txt"
    big.write_text(wikitext_valid.read_text() + "\n\n" + shakespeare.read_text())
    env = dict(cli_env, LLMCTL_SHARD_CHARS="100000")  # ~22 shards, two worker processes
    args = ["data", "prepare", "--preset", "tiny", "--set", f'data.datasets=["text:{big}"]',
            "--set", f"data.tokenizer={gpt2_dir}", "--set", "data.num_workers=2"]
    cache = Path(env["LLMCTL_CACHE"])
    proc = subprocess.Popen([PYTHON, "-m", "llmctl", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(list(cache.glob("*.partial/*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = next(cache.glob("*.partial"))
    done_before = {p.stem: (partial / f"{p.stem}.bin").stat().st_ino for p in partial.glob("*.json")}
    assert 3 <= len(done_before) < 20, "the kill landed mid-way"
    info = llmctl("data", "info", *args[2:], "--json", cwd=tmp_path, env=env)
    assert json.loads(info.stdout)["prepared"] is False and json.loads(info.stdout)["resumable_shards"] >= 3

    resumed = llmctl(*args, "--json", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    store = Path(json.loads(resumed.stdout)["path"])
    assert "shards resumed" in resumed.stderr and not partial.exists()
    assert not list(store.glob(".*")) and sorted(p.name for p in store.glob("*.json")) == ["manifest.json",
                                                                                          "tokenizer.json"]
    for name, inode in done_before.items():
        assert (store / f"{name}.bin").stat().st_ino == inode  # finished shards were kept, not redone

    fresh = llmctl(*args, "--json", cwd=tmp_path, env=dict(env, LLMCTL_CACHE=str(tmp_path / "fresh")))
    fresh_store = Path(json.loads(fresh.stdout)["path"])
    a, b = (json.loads((s / "manifest.json").read_text()) for s in (store, fresh_store))
    assert a["shards"] == b["shards"] and a["splits"] == b["splits"] and len(a["shards"]) > 10
    for shard in a["shards"]:
        assert (store / f"{shard['name']}.bin").read_bytes() == (fresh_store / f"{shard['name']}.bin").read_bytes()
    assert sum(a["tokens"].values()) == len(direct_tokens(f"text:{big}", gpt2))
