"""Getting the text: the download path against a real HTTP server on 127.0.0.1, the look-up
order, local text files, and the chapter's preprocessing."""

from __future__ import annotations

import http.server
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import JAYCHOU_ZIP, ROOT, run_cli

from pipeline import config
from pipeline.config import DataConfig
from pipeline.data.common import DataError, sha256_of
from pipeline.data.corpus import BUILTIN, download, load_corpus, locate_builtin
from pipeline.data.textfile import read_text

GOOD = JAYCHOU_ZIP.read_bytes()
SHA = BUILTIN["jaychou"].sha256
with zipfile.ZipFile(JAYCHOU_ZIP) as _zf:
    RAW = _zf.read("jaychou_lyrics.txt").decode("utf-8")


class Handler(http.server.BaseHTTPRequestHandler):
    """/good: the zip; /bad: same length, one byte changed; /short: a Content-Length larger
    than the body, then the connection closes; /cut: half the body, no Content-Length."""

    protocol_version = "HTTP/1.1"
    hits: list[str] = []

    def do_GET(self):
        Handler.hits.append(self.path)
        if self.path == "/good":
            body, length = GOOD, len(GOOD)
        elif self.path == "/bad":
            body = bytearray(GOOD)
            body[len(body) // 2] ^= 0xFF
            body, length = bytes(body), len(body)
        elif self.path == "/short":
            body, length = GOOD[: len(GOOD) // 3], len(GOOD)
        elif self.path == "/cut":
            body, length = GOOD[: len(GOOD) // 2], None
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Handler.hits = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


@pytest.fixture
def no_data_dir(tmp_path, monkeypatch):
    """No $PIPELINE_DATA_DIR copy: the cache and then the download are used."""
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path / "empty-data-dir"))
    cache = tmp_path / "dl-cache"
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    return cache


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ---------------------------------------------------------------- the download


def test_good_download_is_cached_and_used(server, no_data_dir):
    data = DataConfig(url=f"{server}/good", newlines="space", max_chars=10000)
    corpus = load_corpus(data)
    assert Handler.hits == ["/good"]
    cached = no_data_dir / "jaychou_lyrics.txt.zip"
    assert files_in(no_data_dir) == [cached.name]  # no temporary file left behind
    assert sha256_of(cached) == SHA
    assert len(corpus.vocab) == 1038
    again = load_corpus(data)  # from the cache: the server is not asked again
    assert Handler.hits == ["/good"]
    assert again.vocab.to_list() == corpus.vocab.to_list()
    assert locate_builtin(data) == cached


@pytest.mark.parametrize(
    "path,pattern",
    [
        ("/bad", r"has sha256 [0-9a-f]{64}, expected " + SHA),
        ("/short", r"is truncated: got \d+ of 53443 bytes"),
        ("/cut", r"has sha256 [0-9a-f]{64}, expected"),
        ("/missing", r"could not download .*/missing.*404"),
    ],
    ids=["bad-checksum", "short-content-length", "closed-early", "404"],
)
def test_bad_download_is_an_error_and_leaves_no_file(server, no_data_dir, path, pattern):
    url = f"{server}{path}"
    with pytest.raises(DataError, match=pattern) as err:
        load_corpus(DataConfig(url=url))
    assert url in str(err.value)
    assert files_in(no_data_dir) == []  # nothing cached, no partial file
    # and the next good download works into the same folder
    download(f"{server}/good", no_data_dir / "x.zip", SHA, progress=False)
    assert files_in(no_data_dir) == ["x.zip"]


def test_download_replaces_a_damaged_cached_file(server, no_data_dir):
    no_data_dir.mkdir(parents=True)
    cached = no_data_dir / "jaychou_lyrics.txt.zip"
    cached.write_bytes(GOOD[:1000])  # e.g. an old partial copy
    path = locate_builtin(DataConfig(url=f"{server}/good"))
    assert path == cached and Handler.hits == ["/good"]
    assert sha256_of(cached) == SHA


# ---------------------------------------------------------------- look-up order


def test_lookup_order(server, tmp_path, monkeypatch):
    data_dir, cache = tmp_path / "data", tmp_path / "cache2"
    data_dir.mkdir()
    cache.mkdir()
    (data_dir / "jaychou_lyrics.txt.zip").write_bytes(GOOD)
    (cache / "jaychou_lyrics.txt.zip").write_bytes(GOOD)
    explicit = tmp_path / "mine.txt"
    explicit.write_text("分开 不分开 分开", encoding="utf-8")
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(cache))
    url = f"{server}/good"

    # 1. data.path beats everything
    assert locate_builtin(DataConfig(path=str(explicit), url=url)) == explicit
    assert load_corpus(DataConfig(path=str(explicit), url=url)).vocab.to_list() == [
        "分",
        "开",
        " ",
        "不",
    ]
    # 2. then $PIPELINE_DATA_DIR
    assert locate_builtin(DataConfig(url=url)) == data_dir / "jaychou_lyrics.txt.zip"
    # 3. then the cache
    (data_dir / "jaychou_lyrics.txt.zip").unlink()
    assert locate_builtin(DataConfig(url=url)) == cache / "jaychou_lyrics.txt.zip"
    monkeypatch.delenv("PIPELINE_DATA_DIR")
    assert locate_builtin(DataConfig(url=url)) == cache / "jaychou_lyrics.txt.zip"
    assert Handler.hits == []
    # 4. then the download
    (cache / "jaychou_lyrics.txt.zip").unlink()
    assert locate_builtin(DataConfig(url=url)) == cache / "jaychou_lyrics.txt.zip"
    assert Handler.hits == ["/good"]
    # data.cache_dir names another cache
    other = tmp_path / "other-cache"
    assert (
        locate_builtin(DataConfig(url=url, cache_dir=str(other)))
        == other / "jaychou_lyrics.txt.zip"
    )


def test_unknown_builtin_corpus():
    with pytest.raises(DataError, match=r"data.corpus.*unknown corpus 'nope'"):
        load_corpus(DataConfig(corpus="nope"))


# ---------------------------------------------------------------- local files


def test_plain_local_text_file(tmp_path):
    text = "窗外的麻雀\n在电线杆上多嘴\n你说这一句\n很有夏天的感觉\n" * 3
    path = tmp_path / "lyrics.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(DataConfig(source="text", path=str(path)))
    assert list(corpus.splits) == ["train"]
    assert corpus.vocab.decode(corpus.splits["train"]) == text  # newlines kept by default
    spaced = load_corpus(DataConfig(source="text", path=str(path), newlines="space", max_chars=12))
    assert corpus.vocab.decode(corpus.splits["train"][:12]).replace(
        "\n", " "
    ) == spaced.vocab.decode(spaced.splits["train"])


def test_non_utf8_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café olé\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt' is not UTF-8 text: byte 3"):
        load_corpus(DataConfig(source="text", path=str(path)))
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("分开".encode("gbk"))
    with pytest.raises(DataError, match=r"gbk\.txt' is not UTF-8"):
        read_text(gbk)


def test_missing_empty_and_damaged_files(tmp_path):
    with pytest.raises(DataError, match=r"'.*nothere\.txt' does not exist"):
        load_corpus(DataConfig(source="text", path=str(tmp_path / "nothere.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.txt' gives an empty training text"):
        load_corpus(DataConfig(source="text", path=str(empty)))
    broken = tmp_path / "broken.zip"
    broken.write_bytes(GOOD[:-200])  # central directory cut off
    with pytest.raises(DataError, match=r"broken\.zip"):
        load_corpus(DataConfig(path=str(broken)))


@pytest.mark.slow
def test_cli_non_utf8_file_exits_2(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xff\xfeabc")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{source: text, path: '{bad}'}}\n", encoding="utf-8")
    proc = run_cli(["prepare", "--config", str(cfg)], check=False)
    assert proc.returncode == 2, proc.stderr
    assert str(bad) in proc.stderr and "not UTF-8" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- preprocessing


def test_chapter_preprocessing_gives_the_chapters_text():
    cfg = config.load(str(ROOT / "configs" / "seed_scratch_random.yaml"), [])
    corpus = load_corpus(cfg.data)
    # d2l.load_data_jay_lyrics
    corpus_chars = RAW.replace("\n", " ").replace("\r", " ")
    corpus_chars = corpus_chars[0:10000]
    assert corpus.vocab.decode(corpus.splits["train"]) == corpus_chars
    assert "\n" not in corpus_chars and len(set(corpus_chars)) == 1038


def test_full_corpus_newlines_kept_and_validation_tail():
    corpus = load_corpus(DataConfig(valid_fraction=0.1))
    train, valid = corpus.splits["train"], corpus.splits["validation"]
    assert len(train) + len(valid) == len(RAW) == 64925
    cut = len(train)
    assert cut == round(len(RAW) * 0.9)
    assert corpus.vocab.decode(train) == RAW[:cut]  # train chars all have their own id
    assert "\n" in corpus.vocab.stoi
    # characters seen only in the held-out tail map to <unk>, which exists for them
    unk = corpus.vocab.unk
    assert unk is not None
    decoded = [corpus.vocab.itos[i] for i in valid]
    assert all(
        d == c or (i == unk and c not in corpus.vocab.stoi)
        for d, i, c in zip(decoded, valid.tolist(), RAW[cut:])
    )
    # max_chars applies before the split
    small = load_corpus(DataConfig(max_chars=1000, valid_fraction=0.2))
    assert (len(small.splits["train"]), len(small.splits["validation"])) == (800, 200)
