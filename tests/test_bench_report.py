"""bench.report: the tables of record go between their markers in docs/benchmarks.md, and a
page without a table's markers is refused whole (nothing is appended at its end)."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT

from bench import report

RESULTS = json.loads((ROOT / "bench" / "results.json").read_text(encoding="utf-8"))


def test_rendering_the_recorded_results_again_changes_nothing(tmp_path):
    page = tmp_path / "benchmarks.md"
    page.write_text((ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8"))
    before = page.read_text(encoding="utf-8")
    report.write_docs(RESULTS, page)
    assert page.read_text(encoding="utf-8") == before


def test_a_page_without_a_table_s_markers_is_refused_and_left_as_it_was(tmp_path):
    page = tmp_path / "benchmarks.md"
    text = (ROOT / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    name = next(n for n in report.RENDER if n in RESULTS)
    pair = rf"<!-- bench.run:{name} -->.*?<!-- /bench.run:{name} -->"
    page.write_text(re.sub(pair, "", text, flags=re.S), encoding="utf-8")
    before = page.read_text(encoding="utf-8")
    with pytest.raises(SystemExit, match=f"no '<!-- bench.run:{name} -->'"):
        report.write_docs(RESULTS, page)
    assert page.read_text(encoding="utf-8") == before


def test_a_fresh_page_has_every_table_s_markers(tmp_path):
    page = tmp_path / "new.md"
    report.write_docs(RESULTS, page)
    text = page.read_text(encoding="utf-8")
    for name in report.RENDER:
        assert text.count(f"<!-- bench.run:{name} -->") == 1, name
