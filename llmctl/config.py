"""One config tree for every command: dataclass defaults <- preset TOML <- `--set`.

Each section is a dataclass whose fields carry their defaults and a one-line
docstring-style comment. Loading is strict: an unknown section or key, a value
of the wrong type, or a value out of range raises `ConfigError` naming the key,
before any work starts. Components receive only their own section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import keyword
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError

AUTO = "auto"  # the one string a `bool | str` or `int | str` key accepts


@dataclass
class RunConfig:
    name: str = ""  # run directory name; "" = "<preset>-<date>-<time>"
    output_dir: str = "experiments/runs"  # runs live in <output_dir>/<name>/
    seed: int = 1337  # seeds weights, data order and sampling
    device: str = "auto"  # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bf16 where the device supports it) | float32 | bfloat16 | float16
    compile: bool | str = "auto"  # torch.compile the model: true | false | auto (on CUDA only); eager if it fails
    distributed: str = "ddp"  # under torchrun: ddp (replicated weights) | fsdp (sharded, FSDP2)
    log_every: int = 10  # steps between logged training lines
    report_to: list[str] = field(default_factory=list)  # also send metrics to: tensorboard, wandb


@dataclass
class DataConfig:
    datasets: list[str] = field(default_factory=lambda: ["wikitext-2-raw-v1"])  # data specs, concatenated
    tokenizer: str = "gpt2"  # Hub name or local folder with tokenizer.json
    cache_dir: str = ""  # token cache; "" = $LLMCTL_CACHE or ~/.cache/llmctl
    validation_fraction: float = 0.05  # held out when a source has no validation split
    weights: list[float] = field(default_factory=list)  # per-source sampling weights; [] = by size
    num_workers: int = 0  # tokenizer processes for data preparation; 0 = one per CPU core


@dataclass
class ModelConfig:
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary size
    d_model: int = 384  # residual stream width
    n_layers: int = 6
    n_heads: int = 6  # query heads; head_dim = d_model / n_heads
    n_kv_heads: int = 0  # key/value heads for grouped-query attention; 0 = n_heads
    ffn_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 * d_model rounded up to 64
    max_seq_len: int = 256  # context length in tokens
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    pad_vocab_multiple: int = 64  # embedding rows padded for faster matmuls
    use_attention_sinks: bool = False  # learned per-head sink logit (explicit attention path)
    copy_pointer: bool = False  # also predict by pointing at earlier tokens of the context (llmctl/pointer.py)
    attention_block: int = 0  # attention reads only its own block of N positions; 0 = the whole context
    # Counted n-grams mixed into the network's predictions at inference, outside the network
    # (llmctl/ngram.py, llmctl/inference.py): the training text's, of this order (0 = off), with
    # this weight, and the window's own (0 = off). Scores are reported with and without them.
    ngram_order: int = 0
    ngram_weight: float = 0.0
    cache_weight: float = 0.0
    dropout: float = 0.0  # embedding, attention and residual dropout in training; 0.1-0.2 for small data
    gradient_checkpointing: bool = False  # recompute each block in backward to save memory


@dataclass
class TrainConfig:
    lr: float = 3e-4  # peak learning rate
    batch_size: int = 64  # sequences per optimizer step
    micro_batch_size: int | str = 8  # sequences per forward pass; accumulation = batch / micro; "auto" = largest that fits
    # Tokens per training sequence; 0 = model.max_seq_len. Shorter than the model's window, it
    # gives more steps, while the parts that read the whole window at inference (copy pointer,
    # n-gram cache, block-local attention) read further than they trained on.
    seq_len: int = 0
    warmup_steps: int = 500  # linear warmup from 0
    max_steps: int = 5000
    weight_decay: float = 0.1  # applied to matrices only
    optimizer: str = "adamw"  # adamw | muon (Muon on the blocks' matrices, AdamW on embeddings and norms)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    lr_schedule: str = "constant"  # constant | cosine | wsd (warmup, stable, then linear decay)
    min_lr_ratio: float = 0.1  # cosine/wsd floor as a fraction of lr
    decay_fraction: float = 0.2  # wsd: the last part of the run (in time with max_time) spent decaying
    max_time: str = ""  # time budget, e.g. "90s", "10m", "2h", "1h30m"; "" = none; ends at max_time or max_steps
    eval_every: int = 500  # steps between validation passes
    save_every: int = 2000  # steps between checkpoints
    keep_last: int = 0  # step checkpoints kept; 0 = all


SFT_FORMATS = ("auto", "alpaca", "prompt", "chat", "text")


@dataclass
class SFTConfig(TrainConfig):
    """Instruction tuning: the training keys of [pretrain] with fine-tuning defaults, plus its data."""

    from_: str = ""  # TOML key `from`: the checkpoint file or run directory to start from
    datasets: list[str] = field(default_factory=lambda: ["databricks/databricks-dolly-15k"])  # SFT data specs
    format: str = "auto"  # record shape: auto (from the fields) | alpaca | prompt | chat | text
    validation_fraction: float = 0.05  # records held out when a source has no validation split
    samples: int = 3  # held-out prompts answered (greedy) in the log at each eval; 0 = none
    sample_tokens: int = 64  # new tokens per logged sample
    lr: float = 1e-4  # lower than pretraining: adapt the weights, do not overwrite them
    batch_size: int = 32
    warmup_steps: int = 50
    max_steps: int = 1000
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    eval_every: int = 200
    save_every: int = 500


@dataclass
class EvalConfig:
    max_tokens: int = 0  # validation token budget per eval; 0 = the whole split
    batch_size: int = 0  # sequences per eval forward; 0 = the micro batch size


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def accumulation_steps(self) -> int | str:
        """batch_size / micro_batch_size, or "auto" while the micro-batch is still to be found."""
        micro = self.pretrain.micro_batch_size
        return AUTO if micro == AUTO else self.pretrain.batch_size // micro

    def train_seq_len(self, stage: str = "pretrain") -> int:
        """Tokens per training sequence of a stage: its seq_len, else the model's window."""
        return getattr(self, stage).seq_len or self.model.max_seq_len

    def eval_batch_size(self, stage: str = "pretrain") -> int:
        """Sequences per evaluation forward: eval.batch_size, else the stage's micro-batch
        (8 where that is an unresolved "auto", in a config saved by another stage)."""
        micro = getattr(self, stage).micro_batch_size
        return self.eval.batch_size or (micro if isinstance(micro, int) else 8)

    def to_dict(self) -> dict[str, Any]:
        # Keys that are Python keywords (sft.from) are stored as `from_` attributes.
        return {section: {toml_key(k): v for k, v in values.items()}
                for section, values in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())


DTYPES = ("auto", "float32", "bfloat16", "float16")
REPORT_TO = ("tensorboard", "wandb")  # trackers (llmctl.trackers), each an optional extra
LR_SCHEDULES = ("constant", "cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smh])")
_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a budget like "90s", "10m", "2h", "1h30m" or "1.5h"; "" = 0 (no budget).
    Raises ValueError for anything else (validation turns it into a ConfigError)."""
    text = text.strip().lower()
    if not text:
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not parts or _DURATION_PART.sub("", text).strip():
        raise ValueError(text)
    seconds = sum(float(n) * _SECONDS[unit] for n, unit in parts)
    if seconds <= 0:
        raise ValueError(text)
    return seconds


# --------------------------------------------------------------------------- presets

def preset_dirs() -> list[Path]:
    """Where named presets are found: inside the installed package, then the repo checkout."""
    here = Path(__file__).resolve().parent
    return [here / "presets", here.parent / "presets"]


def available_presets() -> list[str]:
    names = set()
    for d in preset_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def find_preset(preset: str) -> Path:
    """A preset name (`tiny`) or a path to a TOML file."""
    as_path = Path(preset).expanduser()
    if preset.endswith(".toml") or "/" in preset or "\\" in preset:
        if as_path.is_file():
            return as_path
        raise ConfigError(f"preset file not found: {preset}; pass a preset name "
                          f"({', '.join(available_presets())}) or an existing .toml path")
    for d in preset_dirs():
        candidate = d / f"{preset}.toml"
        if candidate.is_file():
            return candidate
    hint = difflib.get_close_matches(preset, available_presets(), n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"unknown preset '{preset}'{did_you_mean}; available: "
                      f"{', '.join(available_presets())}, or a path to a .toml file")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None


# --------------------------------------------------------------------------- overrides

def parse_override(item: str) -> tuple[str, Any]:
    """`section.key=value`; the value is read as TOML, else taken as a plain string."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' is not of the form section.key=value "
                          f"(e.g. --set pretrain.lr=1e-3)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"--set key '{key}' must be section.key (e.g. pretrain.max_steps)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def _nest(overrides: list[tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    tree: dict[str, dict[str, Any]] = {}
    for key, value in overrides:
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = value
    return tree


# --------------------------------------------------------------------------- typed merge

def toml_key(attribute: str) -> str:
    """The TOML key of a field: `from_` is written `from` (a Python keyword cannot be a field)."""
    bare = attribute.removesuffix("_")
    return bare if bare != attribute and keyword.iskeyword(bare) else attribute


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        return f"list of {_type_name(inner)}s"
    if isinstance(tp, types.UnionType):  # bool | str, int | str: a value or "auto"
        return " or ".join(_type_name(t) if t is not str else f'"{AUTO}"' for t in typing.get_args(tp))
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType):
        for member in typing.get_args(tp):
            if member is str and value == AUTO:
                return value
            if member is not str:
                with contextlib.suppress(ConfigError):
                    return _coerce(key, value, member)
        name = _type_name(tp)
        article = "an" if name[0] in "aeiou" else "a"
        raise ConfigError(f"{key} expects {article} {name}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a {_type_name(tp)}, got {value!r}; "
                              f"write it as TOML, e.g. --set '{key}=[...]'")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    name = _type_name(tp)
    article = "an" if name[0] in "aeiou" else "a"
    raise ConfigError(f"{key} expects {article} {name}, got {value!r}")


def _merge(cfg: Config, tree: dict[str, Any], origin: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(cfg)}
    for section_name, values in tree.items():
        if section_name not in sections:
            hint = difflib.get_close_matches(section_name, sections, n=1)
            dym = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"unknown config section '{section_name}' in {origin}{dym}; "
                              f"sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"'{section_name}' in {origin} must be a table of keys "
                              f"(e.g. {section_name}.KEY = VALUE)")
        section = getattr(cfg, section_name)
        hints = typing.get_type_hints(type(section))
        attributes = {toml_key(f.name): f.name for f in dataclasses.fields(section)}
        fields = set(attributes)
        for key, value in values.items():
            full = f"{section_name}.{key}"
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                dym = f" (did you mean '{section_name}.{hint[0]}'?)" if hint else ""
                raise ConfigError(f"unknown config key '{full}' in {origin}{dym}; "
                                  f"keys of [{section_name}]: {', '.join(sorted(fields))}")
            setattr(section, attributes[key], _coerce(full, value, hints[attributes[key]]))


# --------------------------------------------------------------------------- validation

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Range and consistency checks; every message names the key and the fix."""
    r, d, m, t, e = cfg.run, cfg.data, cfg.model, cfg.pretrain, cfg.eval
    _check(r.dtype in DTYPES, f"run.dtype must be one of {', '.join(DTYPES)}, got '{r.dtype}'")
    _check(r.device == "auto" or r.device.split(":")[0] in ("cpu", "cuda", "mps"),
           f"run.device must be auto, cpu, cuda, cuda:N or mps, got '{r.device}'")
    _check(r.distributed in ("ddp", "fsdp"), f"run.distributed must be ddp or fsdp, got '{r.distributed}'")
    _check(r.log_every >= 1, f"run.log_every must be >= 1, got {r.log_every}")
    _check(all(t in REPORT_TO for t in r.report_to) and len(set(r.report_to)) == len(r.report_to),
           f"run.report_to takes each of {', '.join(REPORT_TO)} at most once, got {r.report_to}")
    _check("/" not in r.name and "\\" not in r.name and r.name not in (".", ".."),
           f"run.name must be a plain directory name, got '{r.name}'")
    _check(len(d.datasets) > 0, "data.datasets is empty; name at least one source, "
           "e.g. --set 'data.datasets=[\"text:corpus.txt\"]'")
    _check(bool(d.tokenizer), "data.tokenizer is empty; name a Hub tokenizer (gpt2) or a local folder")
    _check(0.0 < d.validation_fraction < 0.5,
           f"data.validation_fraction must be in (0, 0.5), got {d.validation_fraction}")
    _check(not d.weights or (len(d.weights) == len(d.datasets) and min(d.weights) >= 0 and sum(d.weights) > 0),
           f"data.weights must be empty or one number >= 0 per data.datasets entry "
           f"({len(d.datasets)}), not all 0; got {d.weights}")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0 (0 = one per core), got {d.num_workers}")
    for key in ("d_model", "n_layers", "n_heads", "max_seq_len", "pad_vocab_multiple"):
        _check(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    for key in ("vocab_size", "n_kv_heads", "ffn_hidden"):
        _check(getattr(m, key) >= 0, f"model.{key} must be >= 0 (0 = automatic), got {getattr(m, key)}")
    _check(m.d_model % m.n_heads == 0,
           f"model.d_model ({m.d_model}) must be divisible by model.n_heads ({m.n_heads})")
    _check((m.d_model // m.n_heads) % 2 == 0,
           f"model head size d_model/n_heads = {m.d_model // m.n_heads} must be even for RoPE")
    kv = m.n_kv_heads or m.n_heads
    _check(m.n_heads % kv == 0,
           f"model.n_heads ({m.n_heads}) must be divisible by model.n_kv_heads ({kv})")
    _check(m.attention_block == 0 or (m.attention_block >= 1 and m.max_seq_len % m.attention_block == 0),
           f"model.attention_block must be 0 (attend to the whole context) or divide model.max_seq_len "
           f"({m.max_seq_len}), got {m.attention_block}")
    _check(0 <= m.dropout < 1, f"model.dropout must be in [0, 1), got {m.dropout}")
    _check(0 <= m.ngram_order <= 4, f"model.ngram_order must be 0 (off) or 1..4, got {m.ngram_order}")
    _check(0 <= m.ngram_weight < 1 and 0 <= m.cache_weight < 1 and m.ngram_weight + m.cache_weight < 1,
           f"model.ngram_weight ({m.ngram_weight}) and model.cache_weight ({m.cache_weight}) must be in [0, 1) "
           f"with a sum below 1: the network keeps the rest of the probability")
    _check(bool(m.ngram_order) == bool(m.ngram_weight),
           f"model.ngram_order ({m.ngram_order}) and model.ngram_weight ({m.ngram_weight}) go together: "
           f"set both (e.g. 3 and 0.25) or neither")
    _check(m.rope_theta > 0, f"model.rope_theta must be > 0, got {m.rope_theta}")
    _check(m.norm_eps > 0, f"model.norm_eps must be > 0, got {m.norm_eps}")
    _check(m.init_std > 0, f"model.init_std must be > 0, got {m.init_std}")
    validate_training(t, "pretrain")
    validate_sft(cfg.sft)
    for section in ("pretrain", "sft"):
        seq_len = getattr(cfg, section).seq_len
        _check(0 <= seq_len <= m.max_seq_len,
               f"{section}.seq_len must be 0 (= model.max_seq_len) or 1..{m.max_seq_len}, got {seq_len}")
        _check(not seq_len or not m.attention_block or seq_len % m.attention_block == 0,
               f"{section}.seq_len ({seq_len}) must be a multiple of model.attention_block ({m.attention_block})")
    for section in ("pretrain", "sft"):
        _check(getattr(cfg, section).optimizer != "muon" or r.distributed != "fsdp",
               f'{section}.optimizer = "muon" needs whole weight matrices, which run.distributed = "fsdp" '
               f'shards; use run.distributed = "ddp" or {section}.optimizer = "adamw"')
    _check(e.max_tokens >= 0, f"eval.max_tokens must be >= 0 (0 = all), got {e.max_tokens}")
    _check(e.batch_size >= 0, f"eval.batch_size must be >= 0 (0 = micro batch), got {e.batch_size}")


def validate_sft(t: SFTConfig) -> None:
    validate_training(t, "sft")
    _check(len(t.datasets) > 0, "sft.datasets is empty; name at least one source, "
           "e.g. --set 'sft.datasets=[\"jsonl:instructions.jsonl\"]'")
    _check(t.format in SFT_FORMATS, f"sft.format must be one of {', '.join(SFT_FORMATS)}, got '{t.format}'")
    _check(0.0 < t.validation_fraction < 0.5,
           f"sft.validation_fraction must be in (0, 0.5), got {t.validation_fraction}")
    _check(t.samples >= 0, f"sft.samples must be >= 0 (0 = none), got {t.samples}")
    _check(t.sample_tokens >= 1, f"sft.sample_tokens must be >= 1, got {t.sample_tokens}")


def validate_training(t: TrainConfig, section: str) -> None:
    _check(t.lr > 0, f"{section}.lr must be > 0, got {t.lr}")
    _check(t.batch_size >= 1, f"{section}.batch_size must be >= 1, got {t.batch_size}")
    if t.micro_batch_size != AUTO:  # "auto" is resolved, and checked, when the model is on its device
        _check(t.micro_batch_size >= 1, f"{section}.micro_batch_size must be >= 1 or \"auto\", "
                                        f"got {t.micro_batch_size}")
        _check(t.batch_size % t.micro_batch_size == 0,
               f"{section}.batch_size ({t.batch_size}) must be divisible by {section}.micro_batch_size "
               f"({t.micro_batch_size}); gradient accumulation = batch_size / micro_batch_size")
    _check(t.warmup_steps >= 0, f"{section}.warmup_steps must be >= 0, got {t.warmup_steps}")
    _check(t.max_steps >= 1, f"{section}.max_steps must be >= 1, got {t.max_steps}")
    _check(t.weight_decay >= 0, f"{section}.weight_decay must be >= 0, got {t.weight_decay}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
           f"{section}.betas must be two numbers in [0, 1), got {t.betas}")
    _check(t.grad_clip >= 0, f"{section}.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _check(t.optimizer in OPTIMIZERS,
           f"{section}.optimizer must be one of {', '.join(OPTIMIZERS)}, got '{t.optimizer}'")
    _check(t.lr_schedule in LR_SCHEDULES,
           f"{section}.lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got '{t.lr_schedule}'")
    _check(0 <= t.min_lr_ratio <= 1, f"{section}.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    _check(0 < t.decay_fraction <= 1, f"{section}.decay_fraction must be in (0, 1], got {t.decay_fraction}")
    try:
        parse_duration(t.max_time)
    except ValueError:
        raise ConfigError(f"{section}.max_time must be a duration like \"90s\", \"10m\", \"2h\" or \"1h30m\" "
                          f"(\"\" = no time limit), got '{t.max_time}'") from None
    _check(t.eval_every >= 1, f"{section}.eval_every must be >= 1, got {t.eval_every}")
    _check(t.save_every >= 1, f"{section}.save_every must be >= 1, got {t.save_every}")
    _check(t.keep_last >= 0, f"{section}.keep_last must be >= 0 (0 = keep all), got {t.keep_last}")


# --------------------------------------------------------------------------- entry point

def load_config(preset: str | None = None, overrides: list[str] | None = None,
                run_name: str | None = None) -> Config:
    """Defaults <- preset <- `--set` overrides <- `--run-name`, validated."""
    cfg = Config()
    preset_label = "defaults"
    if preset:
        path = find_preset(preset)
        _merge(cfg, read_toml(path), origin=str(path))
        preset_label = path.stem
    return with_overrides(cfg, overrides, run_name, preset_label)


def with_overrides(cfg: Config, overrides: list[str] | None, run_name: str | None = None,
                   label: str = "defaults") -> Config:
    """`cfg` <- `--set` overrides <- `--run-name` (default: LABEL-DATE-TIME), validated; in place."""
    _merge(cfg, _nest([parse_override(o) for o in overrides or []]), origin="--set")
    if run_name is not None:
        cfg.run.name = run_name
    if not cfg.run.name:
        import datetime

        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run.name = f"{label}-{stamp}"
    validate(cfg)
    return cfg


# Keys that earlier versions saved in every checkpoint and config.toml and this one no longer
# has. A saved config drops them, so those runs still load; a preset or --set naming one gets
# the unknown-key error like any other.
RETIRED_KEYS = {"data": ("tokenizer_min_count",)}


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved in a checkpoint or config.toml (same strict checks, less the
    retired keys)."""
    cfg = Config()
    current = {section: ({k: v for k, v in values.items() if k not in RETIRED_KEYS.get(section, ())}
                         if isinstance(values, dict) else values)
               for section, values in tree.items()}
    _merge(cfg, current, origin="saved config")
    validate(cfg)
    return cfg

