"""`llmctl export`: the folder transformers loads alone gives llmctl's logits, token ids, greedy
text and chat template; a model it cannot reproduce is refused and leaves nothing behind.

One real `llmctl pretrain --preset tiny` run with the GPT-2 tokenizer (a real, widely used
tokenizer, so the tokenizer round trip means something), then two checkpoints derived from it
through the library: an SFT one (with the `template` key sft writes) and one with attention
sinks (random sink logits, so they matter). The exported folders are read in a separate
Python process that imports only transformers and torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import PYTHON
from llmctl.checkpoint import load_checkpoint, save_checkpoint
from llmctl.cli import app
from llmctl.data.chat_template import ChatTemplate, prompt_ids
from llmctl.errors import LlmctlError
from llmctl.export import export_checkpoint, load_safetensors_folder
from llmctl.generate import complete
from llmctl.loading import load_model

GREEDY_TOKENS = 12
CONVERSATION = [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello."), ("user", "Bye?")]

CLEAN_PROCESS = r'''
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.load(open(sys.argv[1]))
result = {}
for name, folder in spec["folders"].items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # no trust_remote_code, default dtype
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor(spec["ids"])).logits, f"{spec['dir']}/{name}-logits.pt")
        prompt = torch.tensor([spec["prompt_ids"]])
        greedy = model.generate(prompt, max_new_tokens=spec["new_tokens"], do_sample=False)[0, prompt.size(1):]
    chat = None
    if tok.chat_template:
        messages = [{"role": r, "content": c} for r, c in spec["conversation"]]
        chat = {"text": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                "ids": tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"]}
    result[name] = {"class": type(model).__name__, "dtype": str(model.dtype), "greedy": greedy.tolist(),
                    "encoded": tok(spec["text"])["input_ids"], "decoded": tok.decode(tok(spec["text"])["input_ids"]),
                    "eos": tok.eos_token_id, "chat": chat}
result["imported_llmctl"] = any(m.startswith("llmctl") for m in sys.modules)
json.dump(result, open(spec["out"], "w"))
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def run_dir(work, shakespeare, gpt2_dir) -> Path:
    """`llmctl pretrain --preset tiny` for 10 steps on Tiny Shakespeare, GPT-2 tokenizer, 32 wide."""
    env = dict(os.environ, LLMCTL_CACHE=str(work / "cache"), OMP_NUM_THREADS="1")
    env.pop("LLMCTL_DEBUG", None)
    sets = [f'data.datasets=["text:{shakespeare}:300"]', f"data.tokenizer={gpt2_dir}", "pretrain.max_steps=10",
            "model.d_model=32", "pretrain.batch_size=4", "pretrain.micro_batch_size=4", "eval.max_tokens=512",
            "run.device=cpu"]
    result = subprocess.run([PYTHON, "-m", "llmctl", "pretrain", "--preset", "tiny", "--run-name", "x",
                             *[a for s in sets for a in ("--set", s)]],
                            cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return work / "experiments" / "runs" / "x"


def derived_checkpoint(source: Path, path: Path, *, template: bool = False, sinks: bool = False) -> Path:
    """A checkpoint as llmctl writes it, changed through the library: the `template` key of an
    SFT checkpoint, or attention sinks with random (so consequential) logits."""
    payload = load_checkpoint(source)
    for key in ("kind", "format_version"):
        payload.pop(key)
    if template:
        payload.update(stage="sft", template=ChatTemplate().to_state())
    if sinks:
        config = {section: dict(values) for section, values in payload["config"].items()}
        config["model"]["use_attention_sinks"] = True
        model = dict(payload["model"])
        generator = torch.Generator().manual_seed(0)
        for i in range(config["model"]["n_layers"]):
            model[f"blocks.{i}.attn.sinks"] = 2 * torch.randn(config["model"]["n_heads"], generator=generator)
        payload.update(config=config, model=model)
    save_checkpoint(path, payload)
    return path


@pytest.fixture(scope="module")
def sources(work, run_dir) -> dict[str, Path]:
    final = next(run_dir.glob("*_final.pt"))
    return {"base": final,
            "sft": derived_checkpoint(final, work / "sft.pt", template=True),
            "sinks": derived_checkpoint(final, work / "sinks.pt", sinks=True)}


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def exported(work, run_dir, sources) -> dict[str, Path]:
    """The three exports, through the CLI: a run directory, an SFT checkpoint, a sinks checkpoint."""
    folders = {}
    for name, source in (("base", run_dir), ("sft", sources["sft"]), ("sinks", sources["sinks"])):
        out = work / "hf" / name
        result = cli("export", "--checkpoint", str(source), "--format", "hf", str(out))
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().endswith(str(out))
        folders[name] = out
    return folders


@pytest.fixture(scope="module")
def clean_process(work, exported, shakespeare, sources) -> dict:
    """Load every exported folder in a process that imports only transformers and torch."""
    base = load_model(sources["base"], device="cpu")
    text = shakespeare.read_text(encoding="utf-8")[:600] + " naïve café — “quotes” \t tabs\n\n"
    probe = base.tokenizer.encode(shakespeare.read_text(encoding="utf-8")[1000:2000])[:64]
    generator = torch.Generator().manual_seed(1)
    ids = [probe, torch.randint(0, base.tokenizer.vocab_size, (64,), generator=generator).tolist()]
    spec = {"folders": {k: str(v) for k, v in exported.items()}, "ids": ids, "text": text, "dir": str(work),
            "prompt_ids": base.tokenizer.encode("ROMEO:"), "new_tokens": GREEDY_TOKENS,
            "conversation": CONVERSATION, "out": str(work / "clean.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMCTL")}
    result = subprocess.run([sys.executable, "-c", CLEAN_PROCESS, str(work / "spec.json")], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return {"spec": spec, "result": json.loads((work / "clean.json").read_text())}


@pytest.mark.parametrize("name, cls", [("base", "LlamaForCausalLM"), ("sft", "LlamaForCausalLM"),
                                       ("sinks", "GraniteSWAForCausalLM")])
def test_transformers_alone_gives_the_checkpoints_logits_tokens_and_greedy_text(name, cls, clean_process,
                                                                                 sources, work):
    got, spec = clean_process["result"][name], clean_process["spec"]
    assert not clean_process["result"]["imported_llmctl"]
    assert got["class"] == cls and got["dtype"] == "torch.float32"
    ours = load_model(sources[name], device="cpu")
    with torch.no_grad():
        expected = ours.model(torch.tensor(spec["ids"]))
    theirs = torch.load(work / f"{name}-logits.pt")
    torch.testing.assert_close(theirs, expected, atol=1e-4, rtol=1e-4)
    assert got["encoded"] == ours.tokenizer.encode(spec["text"])
    assert got["decoded"] == spec["text"]
    assert got["eos"] == ours.tokenizer.eos_id
    greedy = complete(ours, "ROMEO:", temperature=0, top_p=1.0, max_new_tokens=GREEDY_TOKENS, seed=0).token_ids
    hf_greedy = got["greedy"]
    if len(greedy) < GREEDY_TOKENS:  # llmctl stops before EOS; transformers includes it
        assert hf_greedy == greedy + [ours.tokenizer.eos_id]
    else:
        assert hf_greedy == greedy


def test_only_the_sft_export_carries_the_chat_template_and_it_renders_as_sft_trains(clean_process, exported,
                                                                                    sources):
    result = clean_process["result"]
    assert result["base"]["chat"] is None and result["sinks"]["chat"] is None
    assert (exported["sft"] / "chat_template.jinja").is_file()
    assert not (exported["base"] / "chat_template.jinja").exists()
    chat = result["sft"]["chat"]
    assert chat["text"] == ("Be brief.\n\n### Human: Hi there\n### Assistant: Hello.<|endoftext|>\n"
                            "### Human: Bye?\n### Assistant:")
    # The same text; its ids can differ where llmctl's SFT tokenizes segment by segment (GPT-2 merges
    # "\n\n" into one token inside a segment, splits it across "\n\n###" in one string), so only the
    # decoded ids must agree.
    tokenizer = load_model(sources["sft"], device="cpu").tokenizer
    assert tokenizer.decode(chat["ids"]) == tokenizer.decode(prompt_ids(CONVERSATION, ChatTemplate(), tokenizer))


def test_hf_folder_has_the_standard_files(exported):
    base = exported["base"]
    assert sorted(p.name for p in base.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    config = json.loads((base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    assert json.loads((base / "generation_config.json").read_text())["eos_token_id"] == 50256
    assert json.loads((base / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not [p for p in base.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_a_model_that_does_not_match_is_refused_and_nothing_is_written(work, sources):
    """Forcing the sinks model into Llama (which drops the sinks) must fail the self-check."""
    out = work / "refused" / "llama"
    with pytest.raises(LlmctlError, match="disagrees with the checkpoint"):
        export_checkpoint(sources["sinks"], out, "hf", arch="llama")
    assert not out.exists() and not out.parent.exists()  # not even the parent it created


def test_an_existing_folder_is_replaced_only_with_force_and_a_run_directory_never(work, run_dir, sources):
    out = work / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = cli("export", "-c", str(sources["base"]), str(out))
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert (out / "keep.txt").read_text() == "mine"
    replaced = cli("export", "-c", str(sources["base"]), "--format", "safetensors", "--force", str(out))
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    into_run = cli("export", "-c", str(sources["base"]), "--force", str(run_dir))
    assert into_run.exit_code == 2 and "holds llmctl checkpoints" in into_run.stderr
    assert any(run_dir.glob("*.pt"))
    missing = cli("export", "-c", str(work / "nope.pt"), str(work / "never"))
    assert missing.exit_code == 2 and "checkpoint not found" in missing.stderr and not (work / "never").exists()


def test_safetensors_export_round_trips_llmctl_weights_config_and_tokenizer(work, sources):
    out = work / "st" / "sft"
    result = cli("export", "-c", str(sources["sft"]), "--format", "safetensors", "--json", str(out))
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["files"] == ["config.toml", "llmctl.json", "model.safetensors", "tokenizer.json"]
    model, _, tokenizer, cfg, meta = load_safetensors_folder(out)
    original = load_model(sources["sft"], device="cpu")
    for name, tensor in original.model.state_dict().items():  # llmctl's names, bit for bit
        assert torch.equal(model.state_dict()[name], tensor), name
    assert "blocks.0.attn.wqkv.weight" in model.state_dict()
    assert tokenizer.fingerprint == original.tokenizer.fingerprint and tokenizer.eos_id == original.tokenizer.eos_id
    assert cfg.to_dict() == original.config.to_dict()
    assert meta["stage"] == "sft" and ChatTemplate.from_state(meta["template"]) == ChatTemplate()


def test_a_transformers_folder_is_not_an_export_source(exported, work):
    result = cli("export", "-c", str(exported["base"]), str(work / "again"))
    assert result.exit_code == 2 and "transformers folder" in result.stderr
