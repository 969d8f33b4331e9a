"""Showing a model: `export --web` writes a page that generates in a browser from the folder's
own files, and `export --onnx` a model.onnx that onnxruntime runs without PyTorch's model.

The page runs in headless Chromium (Debian's `chromium`, driven over the DevTools protocol:
tests/browser.py) from the folder served by http.server on 127.0.0.1, and its greedy text must
equal `python -m pipeline generate`'s, character for character, for every model kind. CI
(.ci/run) installs Chromium and sets PIPELINE_REQUIRE_CHROMIUM=1, so these tests fail there
rather than skip; elsewhere they skip when no `chromium` is installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import CHROMIUM, Browser, served
from conftest import ROOT, TINY

from pipeline.__main__ import main

STEPS = [*TINY, "data.valid_fraction=0.1", "train.max_steps=30", "train.eval_every=15"]
STEPS += ["train.optimizer=adam", "train.lr=0.02", "train.threads=1"]
KINDS = {  # every kind; tied and not; one and two layers; the adaptive input/output both ways
    "rnn_scratch": ["model.kind=rnn_scratch", "train.optimizer=sgd", "train.lr=1.0"],
    "rnn_2layers": ["model.kind=rnn", "model.num_layers=2", "model.embedding_size=16"],
    "gru_tied": ["model.kind=gru", "model.tie_weights=true"],
    "lstm_2layers_tied": ["model.kind=lstm", "model.num_layers=2", "model.tie_weights=true"],
    "lstm_adaptive_tied": [
        "model.kind=lstm",
        "model.adaptive_cutoffs=[20,100]",
        "model.tie_weights=true",
    ],
    "gru_2layers_adaptive": [
        "model.kind=gru",
        "model.num_layers=2",
        "model.adaptive_cutoffs=[40,200]",
        "model.dropout=0.1",
    ],
}
PREFIXES = ("分开", "不分开", "我想")  # the first through the URL, the others typed
LENGTH = 100
NEED_CHROMIUM = os.environ.get("PIPELINE_REQUIRE_CHROMIUM") == "1"
MAIN_JOB_MIN_RATE = 200  # characters/s the page must generate for the main job's model

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not NEED_CHROMIUM,
    reason="no `chromium` here (apt-get install chromium fonts-wqy-microhei); CI installs it",
)


def export(checkpoint: Path, out: Path, *flags: str) -> Path:
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out), *flags]) == 0
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """{kind: folder exported with --web --onnx} from short runs of tiny models."""
    out = {}
    for name, extra in KINDS.items():
        root = tmp_path_factory.mktemp(name)
        assert main(["train", *STEPS, *extra, f"run.dir={root / 'run'}"]) == 0
        best = root / "run" / "checkpoints" / "best.pt"
        out[name] = export(best, root / "hf", "--web", "--onnx")
    return out


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("PIPELINE_REQUIRE_CHROMIUM=1 but no `chromium` is installed")
    b = Browser()
    yield b
    b.close()


def generate_cli(capsys, folder: Path, prefix: str, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["generate", "--checkpoint", str(folder), "--prefix", prefix, *extra])
    captured = capsys.readouterr()
    return code, captured.out.rstrip("\n"), captured.err.strip()


_greedy: dict[tuple[Path, str], str] = {}


def greedy_cli(capsys, folder: Path, prefix: str) -> str:
    """`generate`'s greedy LENGTH characters (once per folder and prefix: the module's tests
    compare the page and ONNX with the same texts)."""
    if (folder, prefix) not in _greedy:
        code, out, err = generate_cli(capsys, folder, prefix, "--length", str(LENGTH))
        assert code == 0 and out.startswith(prefix), err
        _greedy[folder, prefix] = out
    return _greedy[folder, prefix]


def page_state(b: Browser) -> str:
    return b.evaluate("document.getElementById('out').dataset.state")


def wait_done(b: Browser, timeout: float = 60) -> None:
    b.wait("['done', 'error'].includes(document.getElementById('out').dataset.state)", timeout)


def page_run(b: Browser, url: str, prefix: str | None = None, **fields) -> dict:
    """Generate in the page: through the URL (`url` holds the query) or, with `prefix`, by
    typing into the text box and pressing Generate. The page's `lastRun` (text, rate)."""
    if prefix is not None:
        for name, value in {"prefix": prefix, **fields}.items():
            b.type_into(f"#{name}", str(value))
        b.evaluate("document.getElementById('go').click()")
    else:
        b.open(url)
    wait_done(b)
    assert page_state(b) == "done", b.evaluate("document.getElementById('status').textContent")
    return b.evaluate("window.lastRun")


def where_they_differ(folder: Path, page: str, python: str) -> str:
    """The first differing character and how far apart PyTorch's two best logits were
    there (a float32 near-tie flips a greedy character)."""
    from pipeline.run.export import load_any

    pos = next((i for i, (a, b) in enumerate(zip(page, python)) if a != b), None)
    if pos is None:
        return f"lengths differ: page {len(page)}, generate {len(python)}"
    model, vocab, _, _ = load_any(folder)
    ids = torch.tensor([[vocab.stoi[c] for c in python[:pos]]])
    with torch.no_grad():
        logits = model(ids, model.init_state(1, "cpu"))[0][-1, 0]
    top = logits.topk(2).values
    return (
        f"character {pos}: page {page[pos]!r}, generate {python[pos]!r}; PyTorch's two best "
        f"logits there differ by {float(top[0] - top[1]):.3g}"
    )


def query(prefix: str, length: int = LENGTH, **extra) -> str:
    return "?" + urllib.parse.urlencode({"prefix": prefix, "length": length, **extra})


# ---------------------------------------------------------------- the page


@needs_chromium
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_in_the_page_equals_generate(folders, browser, capsys, kind):
    folder = folders[kind]
    with served(folder) as url:
        runs = [page_run(browser, url + query(PREFIXES[0]))]
        assert browser.evaluate("location.search").startswith("?prefix=")
        for prefix in PREFIXES[1:]:
            runs.append(page_run(browser, url, prefix, length=LENGTH))
        about = browser.evaluate("document.getElementById('model').textContent")
        # the plain JavaScript path, for browsers without WebAssembly SIMD
        runs.append(page_run(browser, url + query(PREFIXES[0]) + "&engine=js"))
    texts, engines = [r["text"] for r in runs], [r["engine"] for r in runs]
    for prefix, page in zip([*PREFIXES, PREFIXES[0]], texts):
        python = greedy_cli(capsys, folder, prefix)
        assert page == python, where_they_differ(folder, page, python)
    assert len(set("".join(texts))) >= 5, texts  # not one character over and over
    assert engines == ["WebAssembly SIMD"] * 3 + ["JavaScript"]
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    bpc = f"{meta['best_val_loss'] / math.log(2):.3f} bits/char"
    m = meta["model"]
    for words in (m["kind"], f"of {m['hidden_size']}", "jaychou", bpc, f"{meta['step']} steps"):
        assert words in about, (words, about)


@needs_chromium
def test_a_prefix_outside_the_vocabulary_gets_generates_message(folders, browser, capsys):
    folder = folders["lstm_2layers_tied"]
    with served(folder) as url:
        for prefix in ("分开😀'x\"'", "", "<unk>"):
            code, out, err = generate_cli(capsys, folder, prefix)
            assert code == 2 and out == "" and err.startswith("error: "), err
            browser.open(url + query(prefix))
            wait_done(browser)
            assert page_state(browser) == "error"
            shown = browser.evaluate("document.getElementById('status').textContent")
            assert shown == err


@needs_chromium
def test_a_sampled_link_gives_the_same_lyrics_and_stop_stops(folders, browser):
    folder = folders["gru_tied"]
    with served(folder) as url:
        link = url + query("分开", 60, temperature=0.9, top_k=8, seed=7)
        runs = [page_run(browser, link) for _ in range(2)]
        first, again = (r["text"] for r in runs)
        assert first == again and first.startswith("分开") and runs[0]["generated"] == 60
        other = page_run(browser, url + query("分开", 60, temperature=0.9, top_k=8, seed=8))
        greedy = page_run(browser, url + query("分开", 60))
        assert len({first, other["text"], greedy["text"]}) == 3
        shared = browser.evaluate("document.querySelector('#share a').href")
        assert page_run(browser, shared)["text"] == greedy["text"]
        # sampled without a seed: the page picks one and its link repeats the sample
        drawn = page_run(browser, url, "不分开", length=40, temperature=1.0, top_k=0, seed="")
        shared = browser.evaluate("document.querySelector('#share a').href")
        assert "seed=" in shared and page_run(browser, shared)["text"] == drawn["text"]
        # a long generation stops at the button, characters shown as they came
        browser.type_into("#length", "1000000")
        browser.type_into("#temperature", "")
        browser.evaluate("document.getElementById('go').click()")
        browser.wait("document.getElementById('out').textContent.length > 40")
        browser.evaluate("document.getElementById('stop').click()")
        wait_done(browser)
        run = browser.evaluate("window.lastRun")
        status = browser.evaluate("document.getElementById('status').textContent")
        assert 0 < run["generated"] < 1_000_000 and status.endswith("stopped"), status


def cjk_families() -> set[str]:
    out = subprocess.run(["fc-list", ":lang=zh", "family"], capture_output=True, text=True)
    return {name.strip() for line in out.stdout.splitlines() for name in line.split(",")}


@needs_chromium
def test_a_screenshot_after_a_generation_shows_the_lyrics(folders, browser, tmp_path):
    """docs/web.png: WEB_SCREENSHOT_FOLDER=an exported folder of the main job,
    WEB_SCREENSHOT_TO=docs/web.png."""
    folder = Path(os.environ.get("WEB_SCREENSHOT_FOLDER") or folders["lstm_2layers_tied"])
    with served(folder) as url:
        page_run(browser, url + query("分开", 100, temperature=0.8, top_k=20, seed=1))
        fonts = browser.fonts_for("#out")
        shot = browser.screenshot(tmp_path / "page.png")
    # the lyrics are drawn with a font that has Chinese glyphs, not as empty boxes
    families = cjk_families()
    assert families, "no font with Chinese glyphs: apt-get install fonts-wqy-microhei"
    drawn = {f["familyName"]: f["glyphCount"] for f in fonts}
    assert sum(n for name, n in drawn.items() if name in families) >= 80, (drawn, families)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    if os.environ.get("WEB_SCREENSHOT_TO"):
        shutil.copy(shot, os.environ["WEB_SCREENSHOT_TO"])


@needs_chromium
@pytest.mark.slow
def test_the_main_jobs_model_generates_fast_enough_in_the_page(browser, capsys, tmp_path):
    """configs/jaychou.yaml's model (2-layer LSTM 256, tied, the whole corpus's vocabulary)
    after a few steps: greedy text as `generate`'s, at >= MAIN_JOB_MIN_RATE characters/s."""
    run = tmp_path / "run"
    args = ["train", "--config", str(ROOT / "configs/jaychou.yaml"), "train.max_steps=1"]
    args += ["train.amp=off", "generate.prefixes=[]", "logging.wandb.mode=disabled"]
    args += [f"run.dir={run}"]
    assert main(args) == 0
    folder = export(run / "checkpoints" / "last.pt", tmp_path / "hf", "--web")
    with served(folder) as url:
        page_run(browser, url + query("分开", 20))  # warm the JIT
        fast = page_run(browser, url + query("分开", 1000))
        page = page_run(browser, url + query("不分开", LENGTH))["text"]
        plain = page_run(browser, url + query("分开", 100) + "&engine=js")
    _, python, _ = generate_cli(capsys, folder, "不分开", "--length", str(LENGTH))
    assert page == python, where_they_differ(folder, page, python)
    assert plain["text"] == fast["text"][: len(plain["text"])]
    with capsys.disabled():  # the figure in docs/benchmarks.md
        print(
            f"\nthe main job's model in Chromium: {fast['rate']:.0f} characters/s "
            f"({fast['engine']}), {plain['rate']:.0f} characters/s ({plain['engine']}); "
            f"load average {os.getloadavg()[0]:.1f}"
        )
    assert fast["generated"] == 1000 and fast["rate"] >= MAIN_JOB_MIN_RATE, fast


# ---------------------------------------------------------------- ONNX


@pytest.mark.parametrize("kind", KINDS)
def test_generate_onnx_equals_generate_without_a_pytorch_model(folders, capsys, monkeypatch, kind):
    folder = folders[kind]
    expected = [greedy_cli(capsys, folder, p) for p in PREFIXES]

    def no_model(*args, **kwargs):
        raise AssertionError("generate --onnx built a PyTorch model")

    monkeypatch.setattr("pipeline.run.export.build_model", no_model)
    monkeypatch.setattr("pipeline.model.rnn.build_model", no_model)
    for prefix, want in zip(PREFIXES, expected):
        code, got, err = generate_cli(capsys, folder, prefix, "--length", str(LENGTH), "--onnx")
        assert code == 0 and got == want, (err, got, want)
    sampled = ["--temperature", "0.8", "--top-k", "5", "--seed", "3", "--num-samples", "2"]
    code, out, _ = generate_cli(capsys, folder, "分开", "--length", "30", "--onnx", *sampled)
    again = generate_cli(capsys, folder, "分开", "--length", "30", "--onnx", *sampled)[1]
    lines = out.splitlines()
    assert code == 0 and out == again and len(lines) == 2 and lines[0] != lines[1]


@pytest.mark.parametrize("kind", KINDS)
def test_model_onnx_takes_any_batch_and_length_and_matches_pytorch(folders, kind):
    import onnxruntime as ort

    from pipeline.run.export import load_any

    folder = folders[kind]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == (["ids", "h", "c"] if "lstm" in kind else ["ids", "h"])
    model, vocab, _, _ = load_any(folder)
    gen = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 1), (3, 7), (5, 2)):
        ids = torch.randint(len(vocab), (batch, seq), generator=gen)
        state = tuple(torch.randn(s.shape, generator=gen) for s in model.init_state(batch, "cpu"))
        with torch.no_grad():
            logits_TBV, new = model(ids, state)
        feeds = {"ids": ids.numpy(), **{n: s.numpy() for n, s in zip(names[1:], state)}}
        got = session.run(None, feeds)
        want = [logits_TBV.transpose(0, 1), *new]
        assert [g.shape for g in got] == [tuple(w.shape) for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def test_export_refuses_an_onnx_file_that_disagrees(folders, capsys, monkeypatch, tmp_path):
    folder = folders["gru_tied"]
    checkpoint = folder.parent / "run" / "checkpoints" / "best.pt"
    monkeypatch.setattr("pipeline.run.onnxstep.TOLERANCE", -1.0)  # any result is now a mismatch
    capsys.readouterr()
    code = main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path), "--onnx"])
    err = capsys.readouterr().err
    assert code == 1 and "model.onnx differs from the PyTorch model" in err, err
    assert "validation split" in err and not list(tmp_path.glob("model.onnx*"))


def test_the_card_says_how_to_serve_the_page_and_a_new_export_leaves_no_stale_file(folders):
    folder = folders["rnn_2layers"]
    page_files = {"index.html", "lyrics.js", "model.onnx"}
    hf_files = {"README.md", "config.json", "model.safetensors"}
    assert {p.name for p in folder.iterdir()} == hf_files | page_files
    card = (folder / "README.md").read_text(encoding="utf-8")
    for words in ("## In a browser", "python -m http.server", "?prefix=", "## ONNX", "--onnx"):
        assert words in card, words
    page = (folder / "index.html").read_text(encoding="utf-8")
    assert '<script src="lyrics.js">' in page and "http" not in page.split("-->", 1)[1]
    script = (folder / "lyrics.js").read_text(encoding="utf-8")  # nothing fetched from elsewhere
    assert re.findall(r"fetch\((.*?)\)", script) == ['"config.json"', '"model.safetensors"']
    assert not re.search(r"https?://|import\(|<script", script)
    again = folder.parent / "again"
    shutil.copytree(folder, again)
    export(folder.parent / "run" / "checkpoints" / "best.pt", again)
    assert {p.name for p in again.iterdir()} == hf_files
    assert "## In a browser" not in (again / "README.md").read_text(encoding="utf-8")


def test_generate_onnx_needs_model_onnx(folders, capsys, tmp_path):
    folder = folders["gru_tied"]
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, tmp_path / name)
    code, out, err = generate_cli(capsys, tmp_path, "分开", "--onnx")
    assert code == 2 and out == "" and str(tmp_path / "model.onnx") in err
    code, out, err = generate_cli(capsys, folder, "分开😀", "--onnx")
    assert code == 2 and "outside the vocabulary" in err and "'😀'" in err
