"""torchrun on CPU (gloo): 2 processes follow 1 process's loss curve step for step, with DDP and
with FSDP2, and their checkpoints load in one process; evaluation (pretrain and SFT) finishes
and equals 1 process's however its batches split over the ranks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import PYTHON
from small_runs import build_small_tokenizer, small_run_args

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def work(tmp_path_factory, shakespeare) -> Path:
    work = tmp_path_factory.mktemp("dist")
    build_small_tokenizer(work / "tok", shakespeare)
    return work


def run(work: Path, shakespeare: Path, name: str, nproc: int, *extra: str, timeout: int = 300
        ) -> subprocess.CompletedProcess:
    args = small_run_args(name, shakespeare, work / "tok", "--set", "pretrain.batch_size=8",
                          "--set", "pretrain.micro_batch_size=2", *extra)
    return llmctl(work, nproc, args, timeout)


def llmctl(work: Path, nproc: int, args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [PYTHON]
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    # A session of its own: on a timeout the ranks go too, not only the launcher (a rank stuck
    # in a collective ignores SIGTERM, as llmctl only stops at a step boundary).
    with subprocess.Popen([*launcher, "-m", "llmctl", *args], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def curve(work: Path, name: str) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (work / "experiments/runs" / name / "metrics.jsonl").open()]
    return ([r["loss"] for r in records if r["type"] == "train"],
            [r["val_loss"] for r in records if r["type"] == "eval"])


@pytest.fixture(scope="module")
def single(work, shakespeare):
    result = run(work, shakespeare, "single", 1)
    assert result.returncode == 0, result.stderr
    return curve(work, "single")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_and_load_in_one(work, shakespeare, single, strategy):
    result = run(work, shakespeare, strategy, 2, "--set", f"run.distributed={strategy}")
    assert result.returncode == 0, result.stderr[-3000:]
    train, val = curve(work, strategy)
    assert len(train) == len(single[0]) == 12
    torch.testing.assert_close(train, single[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val, single[1], rtol=1e-5, atol=1e-5)
    run_dir = work / "experiments/runs" / strategy
    # only rank 0 wrote: one log, one metrics file, one set of checkpoints
    assert result.stdout.count("pretrain_final.pt") == 1
    ckpt = torch.load(run_dir / f"{strategy}-pretrain_final.pt", weights_only=True)
    reference = torch.load(work / "experiments/runs/single/single-pretrain_final.pt", weights_only=True)
    for key, tensor in reference["model"].items():
        torch.testing.assert_close(ckpt["model"][key], tensor, rtol=1e-4, atol=1e-5)
    from llmctl.loading import load_model

    loaded = load_model(str(run_dir), torch.device("cpu"), "float32")
    assert loaded.model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] > 0


def test_distributed_run_resumes_in_one_process(work, shakespeare, single):
    """A checkpoint written by 2 FSDP ranks continues in a single process (same global batch)."""
    result = run(work, shakespeare, "fsdp-stop", 2, "--set", "run.distributed=fsdp", "--set", "pretrain.max_steps=6")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = run(work, shakespeare, "fsdp-stop", 1, "--set", "run.distributed=fsdp", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train, _ = curve(work, "fsdp-stop")
    torch.testing.assert_close(train, single[0], rtol=1e-5, atol=1e-5)


def test_global_batch_must_split_over_processes(work, shakespeare):
    result = run(work, shakespeare, "odd", 2, "--set", "pretrain.batch_size=6", "--set", "pretrain.micro_batch_size=2")
    assert result.returncode != 0
    assert "must be divisible by micro_batch_size (2) x 2 processes" in result.stderr


def test_auto_micro_batch_agrees_across_processes(work, shakespeare):
    """Each rank resolves "auto" and all take the smallest answer: 8 sequences over 2 ranks is
    4 per rank, one micro-batch each (4 x 32 tokens is within the CPU cap)."""
    result = run(work, shakespeare, "auto", 2, "--set", 'pretrain.micro_batch_size="auto"', "--set", "pretrain.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (work / "experiments/runs/auto/config.toml").read_text()
    assert "micro_batch_size = 4" in saved
    assert "micro-batch 4 (auto)" in (work / "experiments/runs/auto/training.log").read_text()


# Evaluation: 266 targets in 32-token windows are 8 full windows and a 10-target tail, 9 in all,
# batched 2 at a time (the micro-batch) into 5 batches: [0 1] [2 3] [4 5] [6 7] [tail]. Dealt
# window by window, rank 0 had 3 batches and rank 1 had 2, and under FSDP (a forward is a
# collective) rank 0's last forward waited forever; dealt by batch, rank 1 runs a dummy 3rd.
UNEVEN_EVAL = ("--set", "eval.max_tokens=266")


@pytest.fixture(scope="module")
def single_uneven(work, shakespeare):
    result = run(work, shakespeare, "single-uneven", 1, *UNEVEN_EVAL)
    assert result.returncode == 0, result.stderr
    return curve(work, "single-uneven")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_evaluation_split_unevenly_finishes_and_matches_one_process(work, shakespeare, single_uneven, strategy):
    try:
        result = run(work, shakespeare, f"{strategy}-uneven", 2, "--set", f"run.distributed={strategy}",
                     *UNEVEN_EVAL, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{strategy}: 2 ranks did not finish in 240 s (an evaluation hung)")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (work / "experiments/runs" / f"{strategy}-uneven" / "metrics.jsonl").open()]
    assert [r["val_tokens"] for r in records if r["type"] == "eval"] == [266] * 3  # every target scored once
    _, val = curve(work, f"{strategy}-uneven")
    assert len(val) == 3
    torch.testing.assert_close(val, single_uneven[1], rtol=1e-5, atol=0)


def chat_records(n: int) -> str:
    """n short conversations of varied lengths, one JSON object a line."""
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i % 7 + 1}."},
                                              {"role": "assistant", "content": " ".join(str(k) for k in
                                                                                        range(1, i % 7 + 2))}]})
                     for i in range(n))


def test_sft_evaluation_splits_over_fsdp_ranks_and_matches_one_process(work, shakespeare, single):
    """5 held-out conversations in batches of 2 are 3 batches: rank 0 scores two, rank 1 one and
    runs a dummy forward (under FSDP every forward is a collective), rather than each all three."""
    data = work / "chat.jsonl"
    data.write_text(chat_records(50))
    base = work / "experiments/runs/single"

    def sft(name: str, nproc: int, *extra: str) -> subprocess.CompletedProcess:
        sets = {"sft.datasets": json.dumps([f"jsonl:{data}"]), "sft.validation_fraction": "0.1",
                "sft.max_steps": "4", "sft.batch_size": "4", "sft.micro_batch_size": "2", "sft.warmup_steps": "1",
                "sft.eval_every": "2", "sft.save_every": "2", "sft.samples": "0", "run.log_every": "1",
                "run.device": "cpu", "run.dtype": "float32", "run.distributed": "fsdp"}
        args = ["sft", "--from", str(base), "--preset", "tiny", "--run-name", name,
                *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")], *extra]
        try:
            return llmctl(work, nproc, args, timeout=240)
        except subprocess.TimeoutExpired:
            pytest.fail(f"sft {name} on {nproc} ranks did not finish in 240 s (an evaluation hung)")

    one = sft("sft-one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "45 training and 5 held-out conversations" in one.stderr
    two = sft("sft-two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    train_one, val_one = curve(work, "sft-one")
    train_two, val_two = curve(work, "sft-two")
    assert len(val_one) == len(val_two) == 2
    torch.testing.assert_close(train_two, train_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(val_two, val_one, rtol=1e-5, atol=0)


def _fsdp_eval_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of test_fsdp_evaluation_deals_batches_evenly: a 2-block model sharded as the
    trainer shards it, evaluated on uneven splits; writes what it scored and how."""
    import torch.distributed as td
    from torch.distributed.fsdp import fully_shard

    from llmctl.evaluate import evaluate_examples, evaluate_tokens
    from llmctl.runtime import DistInfo

    torch.set_num_threads(1)
    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _eval_model()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        rows: list[int] = []  # targets scored by each forward on this rank
        model.register_forward_pre_hook(lambda _, args: rows.append(int((args[1] != -100).sum())))
        info = DistInfo(rank=rank, world_size=world, strategy="fsdp")
        out = {}
        for name, evaluate in _eval_cases(evaluate_tokens, evaluate_examples).items():
            rows.clear()
            out[name] = {"result": evaluate(model, info), "rows": list(rows)}
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(out))
        td.barrier()  # neither rank tears its gloo pairs down while the other still reads from them
    finally:
        td.destroy_process_group()


def _eval_model():
    from llmctl.config import ModelConfig
    from llmctl.model import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                                   init_std=0.2)).eval()


def _eval_cases(evaluate_tokens, evaluate_examples) -> dict:
    """Splits that do not divide over 2 ranks: 8 full 16-token windows and a 6-target tail in
    batches of 3 (4 batches: [0 1 2] [3 4 5] [6 7] [tail]), and 5 SFT examples in batches of 2
    (3 batches)."""
    import numpy as np

    from llmctl.cross_entropy import IGNORE_INDEX
    from llmctl.data.batches import Example

    cpu = torch.device("cpu")
    tokens = np.random.default_rng(0).integers(0, 64, 8 * 16 + 7)
    examples = [Example(list(range(1, n + 1)), [IGNORE_INDEX] * (n // 2) + list(range(2, n + 2 - n // 2)), False)
                for n in (5, 9, 3, 12, 7)]
    return {"tokens": lambda model, dist: evaluate_tokens(model, tokens, 16, 3, cpu, dist=dist),
            "examples": lambda model, dist: evaluate_examples(model, examples, 2, cpu, dist=dist)}


def test_fsdp_evaluation_deals_batches_evenly_and_matches_one_process(tmp_path):
    """Every rank runs the same number of forwards (one may score nothing), the ranks share the
    targets rather than each scoring all, and the totals equal one process's."""
    from llmctl.evaluate import evaluate_examples, evaluate_tokens

    context = torch.multiprocessing.start_processes(_fsdp_eval_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                                    nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=5):
            assert time.monotonic() < deadline, "2 FSDP ranks did not finish evaluating in 180 s (a hang)"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    model = _eval_model()
    for name, evaluate in _eval_cases(evaluate_tokens, evaluate_examples).items():
        alone = evaluate(model, None)
        rows = [rank[name]["rows"] for rank in ranks]
        assert len(rows[0]) == len(rows[1]) == 2, (name, rows)  # 4 or 3 batches: 2 forwards each
        assert sum(map(sum, rows)) == alone["tokens"] and all(sum(r) < alone["tokens"] for r in rows)
        for rank in ranks:
            assert rank[name]["result"]["tokens"] == alone["tokens"]
            assert rank[name]["result"]["loss"] == pytest.approx(alone["loss"], rel=1e-5)
    assert ranks[1]["tokens"]["rows"][-1] == 6 and ranks[1]["examples"]["rows"][-1] == 0  # the tail; a dummy
