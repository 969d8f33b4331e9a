"""Sharing a model: the Hugging Face folder `export` writes (safetensors, config.json, a model
card) gives what the checkpoint gives, and loads no code; the CLI explains itself
(`train --help` lists every key, `--print-config` round-trips)."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import yaml
from conftest import TINY

from pipeline import config
from pipeline.__main__ import main
from pipeline.config import flatten

VALID = [*TINY, "data.valid_fraction=0.1", "train.max_steps=12", "train.eval_every=6"]
MODELS = {
    "lstm_tied": ["model.kind=lstm", "model.tie_weights=true", "model.dropout=0.1"],
    "gru_untied": ["model.kind=gru", "model.num_layers=2", "model.embedding_size=16"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{name: (best.pt, exported folder)} for a tied and an untied model."""
    out = {}
    for name, extra in MODELS.items():
        root = tmp_path_factory.mktemp(name)
        args = ["train", *VALID, *extra, f"run.dir={root / 'run'}", "train.threads=1"]
        assert main(args) == 0
        best = root / "run" / "checkpoints" / "best.pt"
        assert main(["export", "--checkpoint", str(best), "--out", str(root / "hf")]) == 0
        out[name] = (best, root / "hf")
    return out


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", MODELS)
def test_the_folder_holds_safetensors_config_and_card(exported, name):
    from safetensors.torch import load_file

    best, folder = exported[name]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    saved = torch.load(best, weights_only=True, map_location="cpu")  # export writes CPU tensors
    weights = load_file(folder / "model.safetensors")
    for key, tensor in weights.items():  # the very parameters (a tied matrix stored once)
        assert torch.equal(tensor, saved["model"][key]), key
    if name == "lstm_tied":
        assert len(weights) == len(saved["model"]) - 1
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert meta["vocab"] == list(saved["vocab"]) and meta["model"] == saved["config"]["model"]
    assert meta["step"] == saved["step"] and meta["best_val_loss"] == saved["best_val_loss"]
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert card.startswith("---\n") and "library_name: lyrics-rnn" in card
    for words in ("Corpus:", "Model:", "Training:", "bits/char", "How to use", "```"):
        assert words in card


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize(
    "how", [[], ["--temperature", "0.8", "--seed", "3", "--num-samples", "2", "--top-k", "5"]]
)
def test_generate_from_the_folder_equals_the_checkpoint(exported, capsys, name, how):
    best, folder = exported[name]
    prefix = ["--prefix", "分开", "--length", "20", *how]
    code_a, a, _ = cli(capsys, "generate", "--checkpoint", str(best), *prefix)
    code_b, b, _ = cli(capsys, "generate", "--checkpoint", str(folder), *prefix)
    assert code_a == code_b == 0 and a == b and a.startswith("分开")


def test_eval_from_the_folder_equals_the_checkpoint(exported, capsys):
    best, folder = exported["lstm_tied"]
    _, a, _ = cli(capsys, "eval", "--checkpoint", str(best), "--device", "cpu")
    _, b, _ = cli(capsys, "eval", "--checkpoint", str(folder), "--device", "cpu")
    a, b = json.loads(a), json.loads(b)
    assert a.pop("checkpoint") != b.pop("checkpoint")
    assert a == b and a["tokens"] > 0


class Boom:  # unpickling this would create a file: proof that code ran
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_folder_with_a_pickle_or_a_bad_file_is_refused(exported, capsys, tmp_path):
    _, folder = exported["lstm_tied"]
    ran = tmp_path / "code-ran"
    cases = {
        "pickled weights": ("model.safetensors", pickle.dumps(Boom(ran))),
        "truncated weights": (
            "model.safetensors",
            (folder / "model.safetensors").read_bytes()[:100],
        ),
        "config not JSON": ("config.json", b"{not json"),
        "foreign config": ("config.json", json.dumps({"architectures": ["GPT2"]}).encode()),
    }
    for what, (name, data) in cases.items():
        bad = tmp_path / what.replace(" ", "_")
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        (bad / name).write_bytes(data)
        (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Boom(ran)))  # never opened
        code, out, err = cli(capsys, "generate", "--checkpoint", str(bad), "--prefix", "分开")
        assert code == 2 and out == "", what
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert str(bad / name) in err, (what, err)
    assert not ran.exists()


def test_export_of_a_missing_checkpoint_is_exit_2(tmp_path, capsys):
    code, _, err = cli(
        capsys, "export", "--checkpoint", str(tmp_path / "no.pt"), "--out", str(tmp_path / "x")
    )
    assert code == 2 and "no.pt" in err and not (tmp_path / "x").exists()


def test_train_help_lists_every_key_with_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    lines = {
        line.split()[0]: line
        for line in text.splitlines()
        if line.startswith("  ") and "." in line.split()[0]
    }
    schema = flatten(config.to_dict(config.Config()))
    assert schema  # every leaf key of the schema
    for key, default in schema.items():
        assert key in lines, key
        typed, _, meaning = lines[key].partition(": ")
        assert repr(default) in typed, (key, lines[key])
        assert len(meaning.strip()) > 3, f"{key} has no meaning in --help"


def test_top_level_help_lists_each_subcommand_on_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("train", "generate", "eval", "prepare", "export", "compare"):
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(command + " ")]
        assert len(line.split()) > 2


def test_print_config_round_trips(tmp_path, capsys):
    args = ["--config", "configs/jaychou.yaml", "train.max_steps=7", "model.kind=gru"]
    code, text, _ = cli(capsys, "train", *args, f"run.dir={tmp_path / 'r'}", "--print-config")
    assert code == 0 and not (tmp_path / "r").exists()  # printed, nothing trained or written
    assert yaml.safe_load(text)["train"]["max_steps"] == 7
    (tmp_path / "resolved.yaml").write_text(text, encoding="utf-8")
    again = config.load(str(tmp_path / "resolved.yaml"))
    first = config.load(
        "configs/jaychou.yaml", ["train.max_steps=7", "model.kind=gru", f"run.dir={tmp_path / 'r'}"]
    )
    assert config.to_dict(again) == config.to_dict(first)
