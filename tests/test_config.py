"""Configuration: defaults < YAML < command line, errors naming the key (exit 2 via the CLI),
the resolved config in the run directory, and every shipped config loads."""

from __future__ import annotations

import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, TINY, run_cli

import pipeline.training.trainer as train_mod
from pipeline import config, keys
from pipeline.__main__ import main
from pipeline.config import Config, ConfigError
from pipeline.model.rnn import build_model

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.startswith("sweep_"))


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_defaults_without_file_or_overrides():
    cfg = config.load(None, [])
    assert config.to_dict(cfg) == {
        **config.to_dict(Config()),
        "run": {**config.to_dict(Config())["run"], "name": "run", "dir": str(Path("runs") / "run")},
    }


def test_dotted_overrides_and_types():
    cfg = config.load(
        None,
        [
            "train.max_steps=40",
            "model.kind=gru",
            "model.dropout=0.25",
            "generate.prefixes=[分开,不分开,我]",
            "train.betas=[0.8,0.95]",
            "logging.wandb.mode=offline",
            "train.lr=1e-3",
            "run.overwrite=true",
            "data.path=/tmp/some file.txt",
        ],
    )
    assert cfg.train.max_steps == 40 and cfg.model.kind == "gru"
    assert cfg.model.dropout == 0.25 and cfg.train.lr == pytest.approx(1e-3)
    assert cfg.generate.prefixes == ["分开", "不分开", "我"] and cfg.train.betas == [0.8, 0.95]
    assert cfg.logging.wandb.mode == "offline" and cfg.run.overwrite is True
    assert cfg.data.path == "/tmp/some file.txt"


@pytest.mark.parametrize(
    "override,key,value",
    [
        ("train.amp=off", "train.amp", "off"),
        ("logging.progress=off", "logging.progress", "off"),
        ("run.name=yes", "run.name", "yes"),
    ],
)
def test_yaml_1_1_words_stay_strings(tmp_path, override, key, value):
    # YAML 1.1 reads off/on/yes/no as booleans; train.amp=off must stay the string "off"
    assert config.get(config.load(None, [override]), key) == value
    section, leaf = key.split(".")
    path = write(tmp_path, f"{section}:\n  {leaf}: {value}\n")
    assert config.get(config.load(path, []), key) == value


def test_precedence_defaults_yaml_cli(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.5\n  epochs: 7\nmodel:\n  hidden_size: 64\n")
    cfg = config.load(path, ["train.lr=0.25"])
    assert cfg.train.lr == 0.25  # command line beats YAML
    assert cfg.train.epochs == 7 and cfg.model.hidden_size == 64  # YAML beats defaults
    assert cfg.train.num_steps == Config().train.num_steps  # default where nobody says
    assert cfg.run.name == "c" and cfg.run.dir == str(Path("runs") / "c")  # from the file name
    later = config.load(path, ["train.lr=0.25", "train.lr=0.125"])
    assert later.train.lr == 0.125  # the last override wins


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["train.bogus=1"], r"config key 'train.bogus' does not exist"),
        (["nosuch.section.key=1"], r"config key 'nosuch.section.key' does not exist"),
        (["train.epochs=abc"], r"config key 'train.epochs'.*abc"),
        (["train.epochs=1.5"], r"config key 'train.epochs'"),
        (["train.lr=fast"], r"config key 'train.lr'"),
        (["model.kind=transformer"], r"config key 'model.kind': 'transformer' is not one of"),
        (["train.sampling=sequential"], r"config key 'train.sampling'"),
        (["train.batch_size=0"], r"config key 'train.batch_size' must be > 0"),
        (["train.clip=-1"], r"config key 'train.clip' must be >= 0"),
        (["data.valid_fraction=1.0"], r"config key 'data.valid_fraction'"),
        (["model.num_layers=0"], r"config key 'model.num_layers'"),
        (["data.source=text"], r"config key 'data.path' is required"),
        (["generate.prefixes=[a"], r"config key 'generate.prefixes'.*not valid YAML"),
        (["train.max_steps"], r"override 'train.max_steps' is not of the form key=value"),
    ],
)
def test_override_errors_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.load(None, overrides)


def test_yaml_errors_name_the_key_or_file(tmp_path):
    with pytest.raises(ConfigError, match=r"train.bogus"):
        config.load(write(tmp_path, "train:\n  bogus: 3\n"), [])
    with pytest.raises(ConfigError, match=r"model.hidden_size"):
        config.load(write(tmp_path, "model:\n  hidden_size: big\n"), [])
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        config.load(write(tmp_path, "train: [1, 2\n"), [])
    with pytest.raises(ConfigError, match=r"config file '.*missing.yaml' does not exist"):
        config.load(str(tmp_path / "missing.yaml"), [])


@pytest.mark.slow
def test_cli_unknown_key_exits_2(tmp_path):
    proc = run_cli(
        [
            "train",
            "--config",
            str(ROOT / "configs" / "seed_scratch_random.yaml"),
            "train.max_step=40",
            f"run.dir={tmp_path / 'run'}",
        ],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert "train.max_step" in proc.stderr and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.slow
def test_cli_wrong_type_in_yaml_exits_2(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: many\n")
    proc = run_cli(["train", "--config", path, f"run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode == 2, proc.stderr
    assert "train.batch_size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resolved_config_written_to_run_dir(tmp_path):
    path = write(tmp_path, "run: {name: tiny}\ntrain:\n  lr: 0.5\n  epochs: 3\n")
    cfg = config.load(
        path, [*TINY, f"run.dir={tmp_path / 'run'}", "train.max_steps=2", "train.threads=1"]
    )
    train_mod.run(cfg)
    written = tmp_path / "run" / "config.yaml"
    assert written.is_file()
    again = config.load(str(written), [])  # complete and valid on its own
    assert config.to_dict(again) == config.to_dict(cfg)
    assert again.train.lr == 1.0 and again.train.epochs == 3  # CLI over YAML, YAML over default
    assert again.train.max_steps == 2 and again.run.name == "tiny"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path, tmp_path):
    cfg = config.load(str(path), [])
    assert cfg.run.name == path.stem
    with torch.device("meta"):  # shapes only: no memory for the large models
        build_model(cfg.model, 100)
    for kind in ["rnn", "gru", "lstm", "rnn_scratch"]:  # any model.kind, rest unchanged
        other = config.load(str(path), [f"model.kind={kind}"])
        with torch.device("meta"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build_model(other.model, 100)
        multi = other.model.num_layers > 1 or other.model.dropout or other.model.embedding_size
        if kind == "rnn_scratch" and multi:  # the chapter's model says what it ignores
            assert any("ignoring model." in str(w.message) for w in caught)
    text = tmp_path / "any.txt"
    text.write_text("分开 不分开\n" * 20, encoding="utf-8")
    assert config.load(str(path), [f"data.path={text}"]).data.path == str(text)


def test_seed_configs_are_the_chapters():
    for name, kind, opt, lr, sampling in [
        ("seed_scratch_random", "rnn_scratch", "sgd", 100.0, "random"),
        ("seed_scratch_consecutive", "rnn_scratch", "sgd", 100.0, "consecutive"),
        ("seed_concise", "rnn", "adam", 1e-3, "consecutive"),
    ]:
        cfg = config.load(str(ROOT / "configs" / f"{name}.yaml"), [])
        assert (cfg.model.kind, cfg.train.optimizer, cfg.train.sampling) == (kind, opt, sampling)
        assert cfg.train.lr == pytest.approx(lr) and cfg.train.clip == pytest.approx(0.01)
        assert (cfg.data.max_chars, cfg.data.newlines, cfg.data.valid_fraction) == (
            10000,
            "space",
            0.0,
        )
        assert (
            cfg.model.hidden_size,
            cfg.train.batch_size,
            cfg.train.num_steps,
            cfg.train.epochs,
        ) == (256, 32, 35, 250)
        assert cfg.generate.prefixes == ["分开", "不分开"] and cfg.generate.length == 50
        assert cfg.train.eval_every_epochs == 50 and cfg.generate.temperature == 0


def test_dict_round_trip():
    cfg = config.load(None, ["model.kind=lstm", "generate.prefixes=[a]"])
    assert config.to_dict(config.from_dict(config.to_dict(cfg))) == config.to_dict(cfg)
    with pytest.raises(ConfigError, match="train.nope"):
        config.from_dict({"train": {"nope": 1}})


NONE_SPELLINGS = ["{k}=", "{k}=''", "{k}=none", "{k}=null", "{k}=None"]


@pytest.mark.parametrize("spelling", NONE_SPELLINGS)
@pytest.mark.parametrize(
    "key,empty",
    [
        ("data.valid_split", ""),
        ("data.test_split", ""),
        ("data.name", ""),
        ("run.dir", str(Path("runs") / "run")),  # "" = runs/<name>
        ("logging.wandb.entity", ""),
        ("data.max_chars", 0),
        ("data.valid_fraction", 0.0),
        ("model.adaptive_cutoffs", []),
        ("generate.prefixes", []),
    ],
)
def test_an_empty_value_means_none(key, empty, spelling):
    """Every optional key takes every spelling of "none", as a shell hands it over: `key=''`
    arrives as `key=`; YAML's null in a config file means the same."""
    (override,) = shlex.split(spelling.format(k=key))
    assert config.get(config.load(None, [override]), key) == empty


def test_none_in_a_yaml_file_and_keys_that_need_a_value(tmp_path):
    path = write(tmp_path, "data:\n  test_split: null\n  valid_split:\n  name: none\n")
    cfg = config.load(path, [])
    assert (cfg.data.test_split, cfg.data.valid_split, cfg.data.name) == ("", "", "")
    assert cfg.data.separator == "\n"  # whitespace is a value, not "none"
    for override, what in [
        ("train.lr=", "a number"),
        ("train.amp=none", "one of"),
        ("run.overwrite=null", "true or false"),
        ("train.resume=''", "a string"),
        ("data.train_split=", "a string"),
    ]:
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=rf"config key '{key}' needs a value \({what}"):
            config.load(None, shlex.split(override))
    with pytest.raises(ConfigError, match="config key 'model.hidden_size' needs a value"):
        config.load(write(tmp_path, "model: {hidden_size: null}\n", "n.yaml"), [])


def test_fractions_are_checked():
    with pytest.raises(ConfigError, match="'data.test_fraction' must be in"):
        config.load(None, ["data.test_fraction=-0.1"])
    with pytest.raises(ConfigError, match=r"'data.valid_fraction' \+ 'data.test_fraction'"):
        config.load(None, ["data.valid_fraction=0.5", "data.test_fraction=0.5"])


@pytest.mark.slow
def test_empty_overrides_through_a_real_shell(tmp_path):
    """`bash -c` hands the overrides over as a user's shell does; --print-config shows them."""
    cmd = (
        f"{shlex.quote(sys.executable)} -m pipeline train --print-config "
        "data.source=hf data.path=x data.valid_split= data.test_split='' data.name=none "
        "data.max_chars=null model.adaptive_cutoffs=''"
    )
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)["data"]
    assert (data["valid_split"], data["test_split"], data["name"]) == ("", "", "")
    assert data["max_chars"] == 0 and yaml.safe_load(proc.stdout)["model"]["adaptive_cutoffs"] == []


# ---------------------------------------------------------------- every key, every wrong shape

# For each type in the schema: values of a wrong type, and of a wrong shape (a list where a
# scalar belongs, a mapping, a mapping or a list inside a list). A type not here fails the walk.
WRONG = {
    "str": ["{a: 1}", "[a]", "[{a: 1}]"],
    "int": ["abc", "1.5", "[1]", "{a: 1}"],
    "float": ["abc", "[1.0]", "{a: 1}"],
    "bool": ["maybe", "[true]", "{a: 1}"],
    "list[str]": ["abc", "{a: 1}", "[{a: 1}]", "[[a]]", "[ROMEO:]"],
    "list[int]": ["abc", "{a: 1}", "[abc]", "[{a: 1}]", "[[1]]"],
    "list[float]": ["abc", "{a: 1}", "[x]", "[{a: 1}]", "[[1.0]]"],
    "list[list[int]]": ["abc", "[1]", "[[x]]", "[[{a: 1}]]", "[[1, 2, 3]]"],
}
# Text keys an empty string is wrong for; every other text key takes '' as "none"/default.
MUST_NOT_BE_EMPTY = {
    "data.corpus",
    "data.text_field",
    "data.train_split",
    "logging.wandb.project",
    "train.resume",
}


def _rejected(argv: list[str], key: str, capsys) -> None:
    assert main(argv) == 2, f"{argv} was accepted"
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert f"'{key}'" in lines[0] or f"'{key}[" in lines[0], err  # [i]: the list's element
    assert "Traceback" not in err


def _yaml(key: str, value: str) -> str:
    *sections, leaf = key.split(".")
    text = "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
    return text + f"{'  ' * len(sections)}{leaf}: {value}\n"


@pytest.fixture
def quick_cli(monkeypatch):
    """main() without building `train --help`'s key table (read from the schema's source)."""
    monkeypatch.setattr(keys, "help_text", lambda: "")


def test_every_key_rejects_a_wrong_type_or_shape_at_load(tmp_path, capsys, quick_cli):
    """The schema walked key by key, on the command line (every wrong value) and in a YAML
    file (the first): exit 2, one line naming the key, no traceback (the shell that drops the
    quotes of `generate.prefixes=['ROMEO:']` passes a mapping inside the list)."""
    walked = 0
    for key, kind, _, _ in keys.keys():
        assert kind in WRONG, f"{key}: no wrong values for type {kind}"
        for value in WRONG[kind]:
            _rejected(["train", "--print-config", f"{key}={value}"], key, capsys)
            walked += 1
        path = write(tmp_path, _yaml(key, WRONG[kind][0]))
        _rejected(["train", "--config", path, "--print-config"], key, capsys)
    assert walked > 3 * len(keys.keys())


def test_an_empty_string_is_wrong_only_where_a_value_is_required(capsys, quick_cli):
    rejected = set()
    for key, kind, _, _ in keys.keys():
        if kind != "str":
            continue
        if main(["train", "--print-config", f"{key}=''"]) == 2:
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"'{key}'" in err[0], err
            rejected.add(key)
        capsys.readouterr()
    assert rejected >= MUST_NOT_BE_EMPTY  # the choice keys name their choices too
    assert rejected - MUST_NOT_BE_EMPTY == set(config.CHOICES)


def test_a_mapping_in_a_list_says_how_to_quote_it():
    with pytest.raises(ConfigError) as err:
        config.load(None, ["generate.prefixes=[分开,ROMEO:]"])
    assert str(err.value) == (
        "config key 'generate.prefixes' must be a list of strings, got ['分开', {'ROMEO': None}] "
        "({'ROMEO': None} is not a string); quote an element that holds ':', e.g. "
        "\"generate.prefixes=['分开','ROMEO:']\""
    )
    assert config.load(None, ["generate.prefixes=['ROMEO:']"]).generate.prefixes == ["ROMEO:"]


@pytest.mark.slow
def test_cli_a_dropped_quote_exits_2_without_a_traceback(tmp_path):
    proc = run_cli(
        ["train", *TINY, "generate.prefixes=[ROMEO:]", f"run.dir={tmp_path / 'run'}"],
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().startswith("error: config key 'generate.prefixes' must be a list")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
