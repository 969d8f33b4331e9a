"""Typed run configuration: schema defaults < YAML file < `a.b=c` command-line overrides.

An unknown key or a value of the wrong type is a ConfigError naming the key; the CLI turns it
into exit status 2. The resolved config is a plain dict (see `to_dict`) written to the run
directory and stored in checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration problem the user must fix (exit status 2)."""


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 (PyYAML's and OmegaConf's default) also
    reads on/off/yes/no as booleans, which turns `train.amp: off` into the string 'False'."""


_BOOL = "tag:yaml.org,2002:bool"
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


@dataclass
class RunConfig:
    name: str = ""  # "" = the config file's stem (or "run"); wandb group by default
    dir: str = ""  # run directory; "" means runs/<name>
    overwrite: bool = False  # with train.resume=never, allow a non-empty run.dir


@dataclass
class DataConfig:
    source: str = "corpus"  # corpus (built-in, or data.path as a file) | text | hf
    corpus: str = "jaychou"  # built-in corpus name
    path: str = ""  # a local .zip/.txt file, or (source=hf) a Hub id or local dataset folder
    url: str = ""  # override the built-in corpus' download URL
    newlines: str = "keep"  # keep | space (the chapter replaces \n and \r by spaces)
    max_chars: int = 0  # keep the first N characters of each source text (a text file; each dataset split), before any hold-out (0 = all); the chapter: 10000
    valid_fraction: float = 0.0  # held out for validation when the source has no validation split: a text's tail, a dataset's last documents of train
    name: str = ""  # Hugging Face dataset config name
    text_field: str = "text"  # data.source=hf: the column that holds the text
    train_split: str = "train"  # data.source=hf: the split to train on
    valid_split: str = "auto"  # hf: auto (validation, valid, val or dev if there, else held out by valid_fraction) | a split name | none (held out by valid_fraction, if > 0)
    test_split: str = "auto"  # hf: auto (test if there, else held out by test_fraction) | a split name | none (held out by test_fraction, if > 0)
    test_fraction: float = 0.0  # hf: last documents of train held out for test when the dataset gives no test split (0 = no test)
    separator: str = "\n"  # joins documents of a Hugging Face split
    min_freq: int = 1  # rarer training characters map to <unk>
    max_vocab: int = 0  # keep the most frequent N characters (0 = all)
    num_proc: int = 1  # processes that count and write the prepared ids (data.source=hf)
    streaming: bool = False  # hf: read the source files as a stream (no Arrow copy in the cache)
    cache_dir: str = ""  # prepared-data cache; "" means $PIPELINE_CACHE_DIR or ~/.cache


@dataclass
class ModelConfig:
    kind: str = "rnn_scratch"  # rnn_scratch | rnn | gru | lstm
    hidden_size: int = 256  # hidden state width of every layer
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # on the embedding, between stacked layers, before the output layer
    dropout_kind: str = "standard"  # standard (a mask per element and step) | locked (per stream)
    weight_drop: float = 0.0  # DropConnect on the hidden-to-hidden weights (rnn/gru/lstm)
    embedding_size: int = 0  # input embedding width (rnn/gru/lstm); 0 means hidden_size
    tie_weights: bool = False  # share input embedding and output weights (needs equal widths)
    adaptive_cutoffs: list[int] = field(default_factory=list)  # adaptive input/softmax clusters
    adaptive_div: int = 4  # width divisor from one cluster to the next
    forget_bias: float = 0.0  # lstm: added to the forget gate's bias at initialisation
    init_std: float = 0.01  # rnn_scratch: normal(0, init_std), as the chapter


@dataclass
class TrainConfig:
    epochs: int = 1  # passes over the training split (train.max_steps may stop earlier)
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    batch_size: int = 32  # GLOBAL batch: each of W ranks gets batch_size / W streams
    num_steps: int = 35  # truncated-BPTT length
    sampling: str = "consecutive"  # consecutive | random
    seed: int = 0  # initial parameters, sampling order, dropout masks, generated samples
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 100.0  # peak learning rate (the chapter: SGD at 100)
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd and adam
    weight_decay_params: str = "all"  # all | matrices (biases and other 1-D parameters exempt)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw moment decays
    schedule: str = "constant"  # constant | cosine | linear (warmup, then decay to min_lr)
    warmup_steps: int = 0  # linear LR warm-up from 0 over these steps
    schedule_steps: int = 0  # steps the LR decay spans; 0 = max_steps, else epochs x batches
    time_budget: float = 0.0  # seconds of training; the LR schedule ends with them (0 = off)
    schedule_plans: list[list[int]] = field(default_factory=list)  # [step, horizon]s a budget made
    min_lr_ratio: float = 0.1  # where cosine/linear decay ends, as a fraction of train.lr
    clip: float = 0.01  # clip by global gradient norm (the chapter's theta); 0 disables
    amp: str = "off"  # off | bf16 | fp16 | auto
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 0  # steps between train metrics; 0 = once per epoch
    eval_every: int = 0  # steps between validation/generation; 0 = use eval_every_epochs
    eval_every_epochs: int = 1  # epochs between validation/generation when eval_every = 0
    checkpoint_every: int = 0  # steps between periodic checkpoints; 0 = only at the end
    keep_checkpoints: int = 2  # periodic checkpoints kept besides last.pt and best.pt
    resume: str = "auto"  # auto | never | PATH
    time_limit: float = 0.0  # stop (and save) after this many seconds of training; 0 = none
    signal_check_every: int = 10  # steps between cross-rank checks for SIGTERM/SIGUSR1
    threads: int = 0  # torch threads per rank; 0 = cores / local world size
    nonfinite_patience: int = 10  # consecutive non-finite steps (skipped) before the run stops
    dist_timeout: float = 300.0  # seconds a collective may wait once training runs (not start-up)


@dataclass
class DistConfig:
    backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | nccl | gloo (ranks may share a GPU)
    grad_sync: str = "auto"  # auto (shm for CPU ranks on one node, else ddp) | ddp | shm


@dataclass
class EvalConfig:
    batch_size: int = 16  # global number of validation streams
    num_steps: int = 0  # chunk length while carrying state (0 = train.num_steps)
    max_chars: int = 0  # evaluate the first N characters of the split (0 = all of it)


@dataclass
class GenerateConfig:
    prefixes: list[str] = field(default_factory=lambda: ["分开", "不分开"])  # samples at each eval
    length: int = 50  # characters generated after each prefix
    temperature: float = 0.0  # 0 = greedy (the chapter's predict_rnn)
    top_k: int = 0  # sample among the k likeliest characters (0 = all)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto | online | offline | disabled
    project: str = "lyrics-rnn"  # the wandb project
    entity: str = ""  # the wandb team or user ("" = your default)
    name: str = ""  # the wandb run name ("" = run.name)
    group: str = ""  # "" = run.name
    tags: list[str] = field(default_factory=list)  # [] = kind, sampling, world, precision, device
    notes: str = ""  # the wandb run notes
    log_model: str = "off"  # off | end | all: checkpoints as wandb artifacts (latest, best)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: str = "auto"  # auto (tqdm on a TTY) | bar | lines | off


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    "data.source": ("corpus", "text", "hf"),
    "data.newlines": ("keep", "space"),
    "model.kind": ("rnn_scratch", "rnn", "gru", "lstm"),
    "model.dropout_kind": ("standard", "locked"),
    "train.sampling": ("consecutive", "random"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.weight_decay_params": ("all", "matrices"),
    "train.schedule": ("constant", "cosine", "linear"),
    "train.amp": ("off", "bf16", "fp16", "auto"),
    "train.device": ("auto", "cpu", "cuda"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.grad_sync": ("auto", "ddp", "shm"),
    "logging.wandb.mode": ("auto", "online", "offline", "disabled"),
    "logging.wandb.log_model": ("off", "end", "all"),
    "logging.progress": ("auto", "bar", "lines", "off"),
}
POSITIVE = (
    "model.adaptive_div",
    "train.batch_size",
    "train.num_steps",
    "model.hidden_size",
    "model.num_layers",
    "eval.batch_size",
    "train.epochs",
    "train.eval_every_epochs",
    "train.signal_check_every",
    "train.nonfinite_patience",
    "train.dist_timeout",
)
NON_NEGATIVE = (
    "train.max_steps",
    "train.log_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "data.max_chars",
    "data.max_vocab",
    "train.warmup_steps",
    "train.clip",
    "train.lr",
    "generate.length",
    "generate.top_k",
    "generate.temperature",
    "eval.num_steps",
    "train.time_limit",
    "train.threads",
    "model.embedding_size",
    "train.schedule_steps",
    "train.time_budget",
    "eval.max_chars",
)


def _explain(err: OmegaConfBaseException) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    msg = str(err).splitlines()[0]
    return ConfigError(f"config key '{key}': {msg}")


_NEEDS_A_VALUE = ("train.resume", "data.train_split", "data.text_field")  # strings never none


def _is_empty(value: Any) -> bool:
    """`key=`, `key=''`, `key=none`, `key=null` (and YAML's null): the value "none". A shell
    turns `key=''` into `key=`, so every spelling must mean the same."""
    return value is None or (isinstance(value, str) and value.lower() in ("", "none", "null"))


def _empty_value(schema, key: str) -> Any:
    """What "none" sets an optional key to: "" for a free string, [] for a list, 0 for a number
    whose default 0 means off or all. Other keys need a value (a ConfigError naming the key)."""
    default = OmegaConf.select(schema, key)
    if OmegaConf.is_list(default):
        return []
    if isinstance(default, str) and key not in CHOICES and key not in _NEEDS_A_VALUE:
        return ""
    if type(default) in (int, float) and default == 0:
        return default
    allowed = {bool: "true or false", str: "a string"}.get(type(default), "a number")
    allowed = f"one of {CHOICES[key]}" if key in CHOICES else allowed
    raise ConfigError(f"config key '{key}' needs a value ({allowed}); it cannot be none")


def _fill_empty(tree: Any, schema, prefix: str = "") -> Any:
    """A YAML layer with "none" values of the schema's keys replaced as `_empty_value` says
    (unknown keys are left for the merge to report)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        node = OmegaConf.select(schema, key, default="__missing__")
        if isinstance(v, dict):
            v = _fill_empty(v, schema, key + ".")
        elif _is_empty(v) and node != "__missing__" and not OmegaConf.is_dict(node):
            v = _empty_value(schema, key)
        out[k] = v
    return out


def load(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Defaults < YAML at `path` < dotted `overrides`; validated. Raises ConfigError."""
    schema = OmegaConf.structured(Config)
    layers = [schema]
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            tree = _parse_yaml(p.read_text(encoding="utf-8")) or {}
            layers.append(OmegaConf.create(_fill_empty(tree, schema)))
        except ConfigError:
            raise
        except Exception as err:  # yaml syntax errors
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key = item.split("=", 1)[0]
        if OmegaConf.select(schema, key, default="__missing__") == "__missing__":
            raise ConfigError(f"config key '{key}' does not exist (override '{item}')")
    dotlist = OmegaConf.create()
    for item in overrides or []:
        key, value = item.split("=", 1)
        try:
            parsed = _parse_yaml(value)
            if _is_empty(parsed):
                parsed = _empty_value(schema, key)
            OmegaConf.update(dotlist, key, parsed, force_add=True)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"config key '{key}': value {value!r} is not valid YAML: {str(err).splitlines()[0]}"
            ) from None
    for layer in (*layers[1:], dotlist):
        check_shapes(OmegaConf.to_container(layer))
    try:
        merged = OmegaConf.merge(*layers, dotlist)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _explain(err) from None
    if not cfg.run.name:
        cfg.run.name = Path(path).stem if path else "run"
    if not cfg.run.dir:
        cfg.run.dir = os.path.join("runs", cfg.run.name)
    validate(cfg)
    return cfg


def get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"config key '{key}': '{get(cfg, key)}' is not one of {allowed}")
    for key in POSITIVE:
        if get(cfg, key) <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {get(cfg, key)}")
    for key in NON_NEGATIVE:
        if get(cfg, key) < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {get(cfg, key)}")
    for key in ("data.valid_fraction", "data.test_fraction"):
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {get(cfg, key)}")
    if cfg.data.valid_fraction + cfg.data.test_fraction >= 1.0:
        raise ConfigError("config keys 'data.valid_fraction' + 'data.test_fraction' must be < 1")
    for key in ("model.dropout", "model.weight_drop"):
        if not 0.0 <= get(cfg, key) < 1.0:
            raise ConfigError(f"config key '{key}' must be in [0, 1), got {get(cfg, key)}")
    if cfg.data.source in ("text", "hf") and not cfg.data.path:
        raise ConfigError(f"config key 'data.path' is required with data.source={cfg.data.source}")
    cuts = cfg.model.adaptive_cutoffs
    if cuts and (cuts != sorted(set(cuts)) or cuts[0] < 1):
        raise ConfigError(
            f"config key 'model.adaptive_cutoffs': must be increasing and > 0, got {cuts}"
        )
    if len(cfg.train.betas) != 2:
        raise ConfigError("config key 'train.betas' must have two values")
    check_values(cfg)


# Text keys that mean something only when not empty (an empty path is "none" elsewhere).
REQUIRED_TEXT = ("data.text_field", "data.train_split", "logging.wandb.project", "train.resume")
_KIND = {str: "string", int: "integer", float: "number", bool: "boolean (true or false)"}


def _expected(kind, plural: bool = False) -> str:
    """'a list of strings', 'a section (a mapping of keys)', ... for a schema type."""
    if dataclasses.is_dataclass(kind):
        return "a section (a mapping of keys)"
    if typing.get_origin(kind) is list:
        inner = f"of {_expected(typing.get_args(kind)[0], plural=True)}"
        return f"lists {inner}" if plural else f"a list {inner}"
    name = _KIND.get(kind, getattr(kind, "__name__", str(kind)))
    return f"{name}s" if plural else f"an {name}" if name[0] in "aeiou" else f"a {name}"


def check_shapes(values: Any, cls: type = Config, prefix: str = "") -> None:
    """Every value of one layer (a YAML file, the command line's overrides) has the shape
    its key declares: a section a mapping, a scalar key a scalar (no list, no mapping), a list
    key a list of scalars (schedule_plans: of lists). Else a ConfigError naming the key, before
    OmegaConf's merge, which takes a mapping inside a list of strings (a shell dropped the
    quotes of `generate.prefixes=[ROMEO:]`) or fails with a TypeError. Unknown keys and a
    scalar of the wrong kind are left to the merge (it names them); None to the schema."""
    if not isinstance(values, dict):
        where = f"config key '{prefix.rstrip('.')}'" if prefix else "the configuration"
        raise ConfigError(f"{where} must be {_expected(cls)}, got {values!r}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        key, kind = f"{prefix}{name}", hints.get(name)
        if kind is None or value is None:
            continue
        if dataclasses.is_dataclass(kind):
            check_shapes(value, kind, key + ".")
        else:
            _check_value(key, kind, value)


def _check_value(key: str, kind, value) -> None:
    """ConfigError when `value` does not have the shape of `kind` (scalars of any kind pass)."""
    if typing.get_origin(kind) is list:
        bad = [value] if not isinstance(value, list) else [
            item for item in value if not _fits(typing.get_args(kind)[0], item)
        ]  # fmt: skip
    else:
        bad = [value] if isinstance(value, (list, dict)) else []
    if not bad:
        return
    why = (
        f" ({bad[0]!r} is not {_expected(typing.get_args(kind)[0])})" if bad[0] is not value else ""
    )
    if isinstance(value, list) and isinstance(bad[0], dict) and None in bad[0].values():
        quoted = [f"'{next(iter(v))}:'" if isinstance(v, dict) else repr(v) for v in value]
        why += f"; quote an element that holds ':', e.g. \"{key}=[{','.join(quoted)}]\""
    raise ConfigError(f"config key '{key}' must be {_expected(kind)}, got {value!r}{why}")


def _fits(kind, value) -> bool:
    if value is None:
        return True
    if typing.get_origin(kind) is list:
        inner = typing.get_args(kind)[0]
        return isinstance(value, list) and all(_fits(inner, v) for v in value)
    return not isinstance(value, (list, dict))


def check_values(cfg: Config) -> None:
    """What the types cannot say: text keys that must not be empty, the LR plans' pairs."""
    for key in REQUIRED_TEXT:
        if not str(get(cfg, key)).strip():
            raise ConfigError(f"config key '{key}' must not be empty")
    if cfg.data.source == "corpus" and not cfg.data.path and not cfg.data.corpus.strip():
        raise ConfigError("config key 'data.corpus' must name a built-in corpus, got ''")
    for plan in cfg.train.schedule_plans:
        if len(plan) != 2:
            raise ConfigError(
                f"config key 'train.schedule_plans' must hold [step, horizon] pairs, got {plan}"
            )


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore


def from_dict(d: dict) -> Config:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _explain(err) from None


def dump(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: dotted keys so wandb can filter and group by any."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
