"""An optimizer step means the same whatever the split: SFT's ragged targets give the same
losses and weights for any micro-batch size and process count; ranks draw their own dropout
masks and still resume exactly; a compiler that fails in backward falls back to eager."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from conftest import PYTHON, shared_file
from small_runs import build_small_tokenizer, small_run_args

from llmctl.config import ModelConfig, TrainConfig
from llmctl.cross_entropy import IGNORE_INDEX
from llmctl.data.batches import ExampleBatches
from llmctl.data.chat_template import ChatTemplate, encode_examples
from llmctl.data.sft import load_sft_data
from llmctl.data.tokenizer import load_tokenizer
from llmctl.model import Transformer
from llmctl.trainer import Trainer

needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def work(tmp_path_factory, shakespeare) -> Path:
    work = tmp_path_factory.mktemp("exact")
    build_small_tokenizer(work / "tok", shakespeare)
    return work


def dolly_examples(tokenizer_dir: Path, count: int = 64, max_len: int = 128):
    """Real Dolly conversations: replies of very different lengths, prompts ignored."""
    data = load_sft_data([f"jsonl:{shared_file('sft/dolly_open_qa.jsonl')}:{count}"], "auto", 0.1)
    return encode_examples(data.train, ChatTemplate(), load_tokenizer(str(tokenizer_dir)), max_len)


def sft_steps(examples, micro: int, steps: int = 3) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=128, pad_vocab_multiple=64))
    trainer = Trainer(model, TrainConfig(lr=3e-3, batch_size=8, micro_batch_size=micro, warmup_steps=0,
                                         max_steps=steps),
                      batches=ExampleBatches(examples, micro, pad_id=0, seed=1), evaluate=None,
                      device=torch.device("cpu"), dtype=torch.float32, seq_len=128)
    losses = [float(trainer.train_step()[0]) for _ in range(steps)]
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def test_sft_step_is_the_same_for_every_micro_batch_split(work):
    examples = dolly_examples(work / "tok")
    counts = [sum(label != IGNORE_INDEX for label in e.labels) for e in examples[:8]]
    assert max(counts) > 2 * min(counts)  # ragged: the case where per-micro-batch means disagree
    reference_losses, reference = sft_steps(examples, 8)
    for micro in (2, 1):
        losses, weights = sft_steps(examples, micro)
        torch.testing.assert_close(losses, reference_losses, rtol=1e-5, atol=1e-6)
        # AdamW divides by the gradient's running RMS, so fp32 rounding in near-zero gradient
        # entries shows up in the weights at ~1e-6; weighting tokens per micro-batch moves them ~1e-3.
        for key, tensor in reference.items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-5, atol=2e-5, msg=f"{key}, micro {micro}")


def launch(work: Path, nproc: int, args: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    launcher = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [PYTHON]
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1", **env_extra)
    env.pop("LLMCTL_DEBUG", None)
    return subprocess.run([*launcher, "-m", "llmctl", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)


def train_losses(work: Path, name: str) -> list[float]:
    records = [json.loads(line) for line in (work / "experiments/runs" / name / "metrics.jsonl").open()]
    return [r["loss"] for r in records if r["type"] == "train"]


def final_weights(work: Path, name: str, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(work / "experiments/runs" / name / f"{name}-{stage}_final.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def base(work, shakespeare) -> Path:
    result = launch(work, 1, small_run_args("base", shakespeare, work / "tok", "--set", "model.max_seq_len=48",
                                            "--set", "pretrain.max_steps=4"))
    assert result.returncode == 0, result.stderr[-3000:]
    return work / "experiments/runs/base"


def sft_args(name: str, micro: int, *extra: str) -> list[str]:
    sets = {"sft.datasets": json.dumps([f"jsonl:{shared_file('sft/dolly_open_qa.jsonl')}:200"]),
            "sft.max_steps": 4, "sft.batch_size": 8, "sft.micro_batch_size": micro, "sft.warmup_steps": 0,
            "sft.lr": 3e-3, "sft.eval_every": 4, "sft.save_every": 4, "sft.samples": 0, "run.log_every": 1,
            "run.device": "cpu", "run.dtype": "float32", "eval.max_tokens": 256}
    args = ["sft", "--from", "experiments/runs/base", "--preset", "tiny", "--run-name", name]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)


@pytest.fixture(scope="module")
def sft_one(work, base) -> str:
    one = launch(work, 1, sft_args("sft-one", 4))
    assert one.returncode == 0, one.stderr[-3000:]
    return "sft-one"


@needs_dist
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sft_on_two_processes_equals_one(work, sft_one, strategy):
    two = launch(work, 2, sft_args(f"sft-two-{strategy}", 2, "--set", f"run.distributed={strategy}"))
    assert two.returncode == 0, two.stderr[-3000:]
    torch.testing.assert_close(train_losses(work, f"sft-two-{strategy}"), train_losses(work, "sft-one"),
                               rtol=1e-5, atol=1e-6)
    reference = final_weights(work, "sft-one", "sft")
    for key, tensor in final_weights(work, f"sft-two-{strategy}", "sft").items():
        torch.testing.assert_close(tensor, reference[key], rtol=1e-5, atol=2e-5, msg=key)


def dropout_args(shakespeare: Path, work: Path, name: str, *extra: str) -> list[str]:
    return small_run_args(name, shakespeare, work / "tok", "--set", "model.dropout=0.2",
                          "--set", "pretrain.batch_size=8", "--set", "pretrain.micro_batch_size=2", *extra)


@needs_dist
def test_ranks_draw_their_own_dropout_masks_and_resume_exactly(work, shakespeare):
    whole = launch(work, 2, dropout_args(shakespeare, work, "drop-whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = launch(work, 2, dropout_args(shakespeare, work, "drop-split", "--set", "pretrain.max_steps=6"))
    assert first.returncode == 0, first.stderr[-3000:]
    rest = launch(work, 2, dropout_args(shakespeare, work, "drop-split", "--resume"))
    assert rest.returncode == 0, rest.stderr[-3000:]

    saved = torch.load(work / "experiments/runs/drop-whole/drop-whole-pretrain_final.pt", weights_only=True)
    assert len(saved["rank_rng"]) == 2
    masks = []
    for state in saved["rank_rng"]:  # each rank's stream, as it would continue
        torch.set_rng_state(state["torch"])
        masks.append(torch.nn.functional.dropout(torch.ones(4096), 0.5) > 0)
    assert not torch.equal(masks[0], masks[1])

    assert train_losses(work, "drop-split") == train_losses(work, "drop-whole")
    resumed, reference = final_weights(work, "drop-split", "pretrain"), final_weights(work, "drop-whole", "pretrain")
    for key, tensor in reference.items():
        assert torch.equal(resumed[key], tensor), key


@needs_dist
def test_time_budget_ends_every_rank_at_the_same_step(work, shakespeare):
    result = launch(work, 2, small_run_args("budget", shakespeare, work / "tok", "--set", "pretrain.max_steps=100000",
                                            "--set", "pretrain.batch_size=8", "--set", 'pretrain.max_time="3s"',
                                            "--set", "pretrain.save_every=100000", "--set", "pretrain.eval_every=100000"))
    assert result.returncode == 0, result.stderr[-3000:]  # ranks that disagreed would hang in an all-reduce
    final = torch.load(work / "experiments/runs/budget/budget-pretrain_final.pt", weights_only=True)
    assert 0 < final["step"] < 100000 and final["train_seconds"] >= 3.0


# --------------------------------------------------------------------------- compile fallback

def broken_backward(gm, example_inputs):
    """A compiler whose forward works and whose backward fails to compile."""
    from torch._dynamo.backends.common import aot_autograd

    def fails(gm, example_inputs):
        raise RuntimeError("backward codegen failed")

    return aot_autograd(fw_compiler=lambda gm, _: gm.forward, bw_compiler=fails)(gm, example_inputs)


def out_of_memory_at_run(gm, example_inputs):
    """A compiled forward that runs out of memory when it runs."""
    def run(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return run


def compiled_trainer(monkeypatch, backend) -> tuple[Trainer, Transformer]:
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend=backend))
    torch._dynamo.reset()
    from llmctl.bench import SyntheticBatches

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16))
    trainer = Trainer(model, TrainConfig(lr=1e-3, batch_size=4, micro_batch_size=2, warmup_steps=0, max_steps=3),
                      batches=SyntheticBatches(64, 2, 16, 0), evaluate=None, device=torch.device("cpu"),
                      dtype=torch.float32, seq_len=16, compile=True)
    return trainer, model


def test_a_compiler_failing_in_backward_falls_back_to_the_same_eager_step(monkeypatch):
    trainer, model = compiled_trainer(monkeypatch, broken_backward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [float(trainer.train_step()[0]) for _ in range(3)]
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    assert trainer.forward_model is model
    monkeypatch.undo()
    eager, eager_model = compiled_trainer(monkeypatch, broken_backward)
    eager._compile_pending = False
    assert [float(eager.train_step()[0]) for _ in range(3)] == losses  # the failed try left no trace
    for key, tensor in eager_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key


def test_out_of_memory_in_a_compiled_step_is_not_called_a_compile_failure(monkeypatch):
    trainer, _ = compiled_trainer(monkeypatch, out_of_memory_at_run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(torch.OutOfMemoryError):
            trainer.train_step()
    assert not any("torch.compile failed" in str(w.message) for w in caught)
