"""Trainer invariants: accumulation equals one big batch, a tiny model overfits, the LR schedule."""

from __future__ import annotations

import pytest
import torch

from llmctl.config import ModelConfig, TrainConfig
from llmctl.model import Transformer
from llmctl.optim import lr_at
from llmctl.stage import stop_message
from llmctl.trainer import Trainer



class FixedBatches:
    """Serves consecutive slices of one fixed batch of sequences, cycling."""

    def __init__(self, x: torch.Tensor, micro: int):
        self.x, self.micro, self.pos = x, micro, 0

    def next_batch(self):
        chunk = self.x[self.pos: self.pos + self.micro]
        self.pos = (self.pos + self.micro) % len(self.x)
        return chunk[:, :-1], chunk[:, 1:]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def make(micro: int, batch: int = 8, **train) -> Trainer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16))
    data = torch.randint(0, 64, (batch, 17), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(**{"lr": 1e-2, "batch_size": batch, "micro_batch_size": micro, "warmup_steps": 0,
                         "max_steps": 3, **train})
    return Trainer(model, cfg, batches=FixedBatches(data, micro), evaluate=None, device=torch.device("cpu"),
                   dtype=torch.float32, seq_len=16)


def test_micro_batches_with_accumulation_equal_one_large_batch():
    big, small = make(micro=8), make(micro=2)
    assert small.accumulation == 4
    # Plain SGD makes the update proportional to the gradient, so weights compare the gradients
    # (Adam's normalisation would amplify float rounding in near-zero gradients).
    for t in (big, small):
        t.optimizers = [torch.optim.SGD(t.model.parameters(), lr=1.0)]
    loss_big, norm_big = big.train_step()
    loss_small, norm_small = small.train_step()
    torch.testing.assert_close(loss_small, loss_big, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(norm_small, norm_big, atol=1e-6, rtol=1e-5)
    for (name, a), b in zip(big.model.named_parameters(), small.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_tiny_model_overfits_one_batch(optimizer):
    trainer = make(micro=8, lr=3e-3, max_steps=150, optimizer=optimizer)
    first, _ = trainer.train_step()
    for _ in range(149):
        last, _ = trainer.train_step()
    assert float(last) < 0.3 * float(first)
    assert float(last) < 1.0


def test_weight_decay_only_on_matrices():
    trainer = make(micro=8)
    [adamw] = trainer.optimizers
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    trainer = make(micro=8, optimizer="muon")
    muon, adamw = trainer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    in_muon = [names[id(p)] for g in muon.param_groups for p in g["params"]]
    in_adamw = [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert sorted(in_muon + in_adamw) == sorted(names.values())  # each parameter in exactly one
    assert in_muon and all(n.startswith("blocks.") and n.endswith("weight") and "norm" not in n for n in in_muon)
    assert "tok_emb.weight" in in_adamw
    decay, no_decay = adamw.param_groups
    assert [names[id(p)] for p in decay["params"]] == ["tok_emb.weight"] and no_decay["weight_decay"] == 0.0
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # all move


def test_lr_schedule_warmup_then_constant_or_cosine():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(50, cfg) == lr_at(109, cfg) == 1.0
    cos = TrainConfig(lr=1.0, warmup_steps=10, max_steps=110, lr_schedule="cosine", min_lr_ratio=0.1)
    assert lr_at(10, cos) == pytest.approx(1.0)
    assert lr_at(60, cos) == pytest.approx(0.55)
    assert lr_at(110, cos) == pytest.approx(0.1)
    values = [lr_at(s, cos) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_fit_logs_evaluates_and_saves_on_schedule():
    events = []

    class Recorder:
        def on_fit_start(self, t): events.append("start")
        def on_log(self, t, r): events.append(("log", r["step"]))
        def on_eval(self, t, r): events.append(("eval", r["step"]))
        def on_save(self, t, final): events.append(("save", t.step, final))
        def on_fit_end(self, t, s): events.append("end")

    trainer = make(micro=8, max_steps=6, eval_every=3, save_every=2)
    trainer.evaluate_fn = lambda: {"loss": 1.0, "perplexity": 2.7, "tokens": 10, "seconds": 0.0}
    trainer.callbacks = [Recorder()]
    trainer.log_every = 3
    trainer.fit()
    # every save_every steps, plus before each evaluation (3, and 6 before the final save)
    assert [e for e in events if e[0] == "save"] == [
        ("save", 2, False), ("save", 3, False), ("save", 4, False), ("save", 6, False), ("save", 6, True)]
    assert [e for e in events if e[0] == "eval"] == [("eval", 3), ("eval", 6)]
    assert [e for e in events if e[0] == "log"] == [("log", 1), ("log", 3), ("log", 6)]
    # the state is on disk before each eval runs; the final checkpoint includes the last eval
    assert events.index(("save", 3, False)) < events.index(("eval", 3))
    assert events.index(("save", 6, False)) < events.index(("eval", 6)) < events.index(("save", 6, True))


def test_nan_guard_names_the_first_bad_step_and_never_saves_after_it():
    from llmctl.trainer import NonFiniteLoss

    saves = []

    class Saver:
        def on_fit_start(self, t): ...
        def on_log(self, t, r): ...
        def on_eval(self, t, r): ...
        def on_save(self, t, final): saves.append(t.step)
        def on_fit_end(self, t, s): ...

    # A sane first step, then an absurd learning rate: weights overflow and the loss goes NaN.
    # The guard is read only at log steps (every 100) and before saves (every 5).
    trainer = make(micro=8, max_steps=50, save_every=5, eval_every=1000, warmup_steps=0, lr=1e30)
    trainer.callbacks, trainer.log_every = [Saver()], 100
    with pytest.raises(NonFiniteLoss) as info:
        trainer.fit()
    assert info.value.step == 2  # step 1 used the initial weights; step 2 the overflowed ones
    assert saves == []  # the save at step 5 found the flag and refused
    message = stop_message(info.value, None, None, "pretrain")
    assert "training diverged at step 2" in message and "no checkpoint had been saved yet" in message


def test_nan_guard_reads_the_device_only_at_log_and_save_steps():
    """The per-step check is device-side: no host read unless something is logged or saved."""
    trainer = make(micro=8, max_steps=3)
    reads = []
    real = trainer.check_finite

    def counting():
        reads.append(trainer.step)
        real()

    trainer.check_finite = counting
    trainer.log_every, trainer.cfg.save_every = 1000, 1000
    trainer.fit()
    # step 1 is logged (first step), step 3 is the last (logged, final save): never step 2
    assert 2 not in reads and {1, 3} <= set(reads)


def test_a_checkpoint_guards_every_eval_and_the_best_one_survives_retention(tmp_path, gpt2_dir):
    """Evals every 3 steps, saves every 4, keep_last=1: each eval finds its step on disk; the
    guard checkpoints go once scored, except the best-validation one."""
    from llmctl.retention import CheckpointCallback
    from llmctl.config import Config
    from llmctl.data.tokenizer import load_tokenizer

    cfg = Config()
    cfg.run.name = "g"
    on_disk_at_eval = []

    class Probe:
        def on_fit_start(self, t): ...
        def on_log(self, t, r): ...
        def on_save(self, t, final): ...
        def on_fit_end(self, t, s): ...
        def on_eval(self, t, r): on_disk_at_eval.append((tmp_path / f"g-pretrain_step{t.step}.pt").is_file())

    trainer = make(micro=8, max_steps=10, eval_every=3, save_every=4)
    val = {3: 2.0, 6: 1.0, 9: 1.5, 10: 1.8}  # the best is at step 6, which no schedule saves
    trainer.evaluate_fn = lambda: {"loss": val[trainer.step], "perplexity": 1.0, "tokens": 1, "seconds": 0.0}
    trainer.callbacks = [Probe(), CheckpointCallback(tmp_path, cfg, "pretrain", load_tokenizer(str(gpt2_dir)),
                                                     {"sources": [], "tokens": {"train": 1}}, keep_last=1)]
    trainer.fit()
    assert on_disk_at_eval == [True, True, True, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "g-pretrain_final.pt", "g-pretrain_step6.pt", "g-pretrain_step8.pt"]
    assert [h["step"] for h in trainer.history if h["best"]] == [3, 6]
