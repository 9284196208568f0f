"""Offline runs: every download a run needs is checked first, and one error names all that are missing.

Real offline conditions, no mocks: HF_ENDPOINT points at a closed local port (the Hub cannot
be reached, and that is known within milliseconds), or HF_HUB_OFFLINE=1; HF_HOME is a fresh
temporary folder, empty or filled in the layout huggingface_hub and datasets write. Commands
run as subprocesses, since those libraries read their environment once, when imported.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens there
TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=32",
        "pretrain.batch_size=4", "pretrain.micro_batch_size=2", "pretrain.max_steps=2", "pretrain.eval_every=2",
        "pretrain.save_every=2", "pretrain.warmup_steps=1", "run.device=cpu", "run.dtype=float32",
        "eval.max_tokens=64"]


def llmctl(*args: str, cwd: Path, hf_home: Path, cache: Path, offline: bool = False,
           timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMCTL_DEBUG", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                        "HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), LLMCTL_CACHE=str(cache), OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = CLOSED
    return subprocess.run([PYTHON, "-m", "llmctl", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def error_block(stderr: str) -> list[str]:
    """The error's lines: one `error:` line, last, then only its indented continuation lines."""
    assert stderr.count("error: ") == 1, stderr
    lines = stderr[stderr.index("error: "):].rstrip().splitlines()
    assert all(line.startswith("  ") for line in lines[1:]), stderr
    return lines


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    folders = {name: tmp_path / name for name in ("user", "hf", "cache")}
    for folder in folders.values():
        folder.mkdir()
    return folders


def assert_names_both_pieces(lines: list[str]) -> None:
    assert lines[1] == ("  tokenizer 'gpt2': train one on the data with --set data.tokenizer=train:8192, or use a "
                        "folder holding tokenizer.json with --set data.tokenizer=FOLDER")
    assert lines[2] == "  dataset 'wikitext-2-raw-v1': use local text with --set 'data.datasets=[\"text:PATH\"]'"
    assert lines[3] == ("  or fetch them once while online with `llmctl data prepare --preset local`; "
                        "or run `llmctl pretrain --preset quickstart`, which needs no network")
    assert len(lines) == 4


def test_unreachable_hub_names_every_missing_piece_at_once(places):
    start = time.monotonic()
    r = llmctl("pretrain", "--preset", "local", cwd=places["user"], hf_home=places["hf"], cache=places["cache"])
    assert r.returncode == 2, r.stderr
    lines = error_block(r.stderr)
    assert lines[0] == (f"error: this run needs 2 downloads from the Hugging Face Hub, which cannot be reached "
                        f"({CLOSED}), and they are not in the cache at {places['hf']}:")
    assert_names_both_pieces(lines)
    assert "Traceback" not in r.stderr + r.stdout
    assert not any(places["user"].iterdir()), "a failed start leaves no run folder"
    assert time.monotonic() - start < 60


def test_hf_hub_offline_with_an_empty_cache_gets_the_same_error(places):
    r = llmctl("pretrain", "--preset", "local", cwd=places["user"], hf_home=places["hf"], cache=places["cache"],
               offline=True)
    assert r.returncode == 2, r.stderr
    lines = error_block(r.stderr)
    assert lines[0] == (f"error: this run needs 2 downloads from the Hugging Face Hub, but HF_HUB_OFFLINE=1 and "
                        f"they are not in the cache at {places['hf']}:")
    assert_names_both_pieces(lines)
    assert "Traceback" not in r.stderr + r.stdout


def test_dry_run_offline_prints_the_plan_and_the_check_then_cannot_start(places):
    r = llmctl("pretrain", "--preset", "local", "--dry-run", cwd=places["user"], hf_home=places["hf"],
               cache=places["cache"])
    assert r.returncode == 2, r.stderr
    out = r.stdout.splitlines()
    assert 'tokenizer = "gpt2"' in out  # the resolved config
    assert "# vocab size            unknown (the tokenizer is not at hand)" in out
    assert any(line.startswith("# parameters") and "plus 384 per vocabulary entry" in line for line in out)
    downloads = out.index("# downloads (the Hugging Face Hub cannot be reached)")
    assert out[downloads + 1:] == ["# tokenizer 'gpt2'             missing", "# dataset 'wikitext-2-raw-v1'  missing"]
    lines = error_block(r.stderr)
    assert lines[0].startswith("error: cannot start: this run needs 2 downloads from the Hugging Face Hub")
    assert_names_both_pieces(lines)
    assert "Traceback" not in r.stderr + r.stdout


def test_a_config_with_only_local_pieces_passes_the_check(places, gpt2_dir, shakespeare):
    local = sets(f"data.tokenizer={gpt2_dir}", f'data.datasets=["text:{shakespeare}"]')
    r = llmctl("pretrain", "--preset", "local", "--dry-run", *local, cwd=places["user"], hf_home=places["hf"],
               cache=places["cache"])
    assert r.returncode == 0, r.stderr
    assert "# downloads: none (the tokenizer and the data are local)" in r.stdout.splitlines()
    assert "# vocab size            50,257" in r.stdout.splitlines()
    assert r.stderr == ""


# ----------------------------------------------------------------------------- populated caches

GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # the Hub's gpt2 main at the time of writing


def fill_hf_cache(hf_home: Path, gpt2_dir: Path, wikitext: Path) -> None:
    """What an online `llmctl pretrain --preset local` leaves in HF_HOME: the gpt2 tokenizer's
    files in the hub cache, and WikiText-2 prepared by datasets (Arrow files, dataset_info.json)."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    repo = hf_home / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / GPT2_REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(GPT2_REVISION)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(gpt2_dir / name, snapshot / name)
    (snapshot / "config.json").write_text('{"model_type": "gpt2", "vocab_size": 50257}')

    folder = hf_home / "datasets" / "Salesforce___wikitext" / "wikitext-2-raw-v1" / "0.0.0" / "b08601e04326c79d"
    folder.mkdir(parents=True)
    lines = wikitext.read_text(encoding="utf-8").splitlines(keepends=True)[:900]
    features = datasets.Features({"text": datasets.Value("string")})
    splits = datasets.SplitDict(dataset_name="wikitext")
    for split, rows in (("train", lines[:600]), ("validation", lines[600:800]), ("test", lines[800:])):
        with ArrowWriter(features=features, path=str(folder / f"wikitext-{split}.arrow")) as writer:
            writer.write_batch({"text": rows})
            count, size = writer.finalize()
        splits.add(datasets.SplitInfo(name=split, num_examples=count, num_bytes=size, dataset_name="wikitext"))
    datasets.DatasetInfo(features=features, splits=splits, config_name="wikitext-2-raw-v1",
                         dataset_name="wikitext").write_to_directory(str(folder))


@pytest.fixture(scope="module")
def filled_hf(tmp_path_factory, gpt2_dir, wikitext_valid) -> Path:
    home = tmp_path_factory.mktemp("hf")
    fill_hf_cache(home, gpt2_dir, wikitext_valid)
    return home


@pytest.mark.parametrize("offline", [True, False], ids=["hf-hub-offline", "hub-unreachable"])
def test_preset_local_trains_from_the_hugging_face_cache(offline, filled_hf, places):
    """Both pieces cached: the check passes and the run reads them from the cache. Unreachable
    (no HF_HUB_OFFLINE), llmctl puts the libraries offline; otherwise each cached file would be
    retried against the Hub for minutes."""
    start = time.monotonic()
    r = llmctl("pretrain", "--preset", "local", "--run-name", "cached", *sets(*TINY), cwd=places["user"],
               hf_home=filled_hf, cache=places["cache"], offline=offline)
    assert r.returncode == 0, r.stderr
    assert (places["user"] / "experiments" / "runs" / "cached" / "cached-pretrain_final.pt").is_file()
    assert time.monotonic() - start < 120


def test_llmctl_token_store_stands_in_for_both_downloads(filled_hf, places, tmp_path):
    """A finished token store holds the tokens and a copy of the tokenizer: with an empty
    Hugging Face cache and no Hub, the same config needs nothing more."""
    first = llmctl("data", "prepare", "--preset", "local", cwd=places["user"], hf_home=filled_hf,
                   cache=places["cache"], offline=True)
    assert first.returncode == 0, first.stderr
    empty = tmp_path / "empty-hf"
    empty.mkdir()
    r = llmctl("pretrain", "--preset", "local", "--dry-run", *sets(*TINY), cwd=places["user"], hf_home=empty,
               cache=places["cache"])
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    downloads = out.index("# downloads (the Hugging Face Hub cannot be reached)")
    assert out[downloads + 1].startswith(f"# tokenizer 'gpt2'             in llmctl's cache ({places['cache']})")
    assert out[downloads + 2].startswith(f"# dataset 'wikitext-2-raw-v1'  in llmctl's token cache "
                                         f"({places['cache']}/tokens-")
    assert "# vocab size            50,257" in out
    r = llmctl("pretrain", "--preset", "local", "--run-name", "stored", *sets(*TINY), cwd=places["user"],
               hf_home=empty, cache=places["cache"], offline=True)
    assert r.returncode == 0, r.stderr


def test_pipeline_names_the_sft_dataset_with_the_pretraining_pieces_before_any_training(places):
    r = llmctl("pipeline", "--preset", "local", cwd=places["user"], hf_home=places["hf"], cache=places["cache"])
    assert r.returncode == 2, r.stderr
    lines = error_block(r.stderr)
    assert lines[0].startswith("error: this run needs 3 downloads from the Hugging Face Hub, which cannot be reached")
    assert [line.split(":")[0] for line in lines[1:4]] == [
        "  tokenizer 'gpt2'", "  dataset 'wikitext-2-raw-v1'", "  dataset 'databricks/databricks-dolly-15k'"]
    assert lines[3].endswith("use a local file with --set 'sft.datasets=[\"jsonl:PATH\"]', or fetch it once while "
                             "online with `llmctl data inspect --sft databricks/databricks-dolly-15k --preset local`")
    assert lines[4] == "  or fetch the pretraining downloads once while online with `llmctl data prepare --preset local`"
    assert not any(places["user"].iterdir())
