"""Helpers for tests that train real (very small) runs: a small tokenizer and the CLI arguments.

The GPT-2 vocabulary (50,257) makes the output layer dominate a tiny model's step time, so
tests that only need *a* real tokenizer train a 320-token byte-level BPE on Tiny Shakespeare
with the `tokenizers` library and save it as a folder that `llmctl` loads like any other.
"""

from __future__ import annotations

from pathlib import Path

SMALL_VOCAB = 320


def build_small_tokenizer(folder: Path, text_file: Path, vocab_size: int = SMALL_VOCAB) -> Path:
    """A byte-level BPE with an <|endoftext|> token, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text_file.read_text(encoding="utf-8")[:100_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(folder))
    return folder


def small_run_args(run_name: str, text_file: Path, tokenizer: Path, *extra: str, docs: int = 300) -> list[str]:
    """`llmctl pretrain` arguments for a run of a 1-layer, 32-wide model that takes milliseconds a step."""
    sets = {
        "data.datasets": f'["text:{text_file}:{docs}"]',
        "data.tokenizer": str(tokenizer),
        "model.d_model": "32", "model.n_layers": "1", "model.n_heads": "4", "model.n_kv_heads": "2",
        "model.max_seq_len": "32", "model.pad_vocab_multiple": "64",
        "pretrain.batch_size": "4", "pretrain.micro_batch_size": "2", "pretrain.warmup_steps": "3",
        "pretrain.max_steps": "12", "pretrain.eval_every": "4", "pretrain.save_every": "4",
        "run.log_every": "1", "run.device": "cpu", "run.dtype": "float32", "eval.max_tokens": "256",
    }
    args = ["pretrain", "--preset", "tiny", "--run-name", run_name]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args + list(extra)
