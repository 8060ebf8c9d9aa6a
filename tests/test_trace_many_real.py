"""`trace-many` then `aggregate --compare` end to end on the real Gemma 3 270M with the shipped transcoders, on
3 capitals and 3 antonyms of the shipped prompts (tests/data/two_groups_prompts.jsonl).

Run with ``pytest -m real_model tests/test_trace_many_real.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from circuits.many.prompts import read_prompts
from cli import main

pytestmark = pytest.mark.real_model

SHIPPED = Path(__file__).parent / "data" / "two_groups_prompts.jsonl"


def test_the_shipped_prompts_are_two_groups_of_valid_lines():
    specs = read_prompts(SHIPPED)
    assert 20 <= len(specs) <= 40 and {s.group for s in specs} == {"capitals", "antonyms"}


def test_trace_many_and_compare_on_the_real_model(tmp_path):
    lines = SHIPPED.read_text(encoding="utf-8").splitlines()
    subset = tmp_path / "six.jsonl"
    subset.write_text("\n".join(lines[:3] + lines[-3:]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["trace-many", str(subset), "--out", str(out)])
    assert result.exit_code == 0, (result.output, result.exception)
    rows = json.loads((out / "index.json").read_text())["prompts"]
    assert [r["status"] for r in rows] == ["done"] * 6, [r.get("error") for r in rows]
    assert rows[0]["top_logits"][0]["token"] == " Paris"
    result = CliRunner().invoke(main, ["aggregate", str(out), "--compare", "capitals", "antonyms",
                                       "--permutations", "500"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "compare-capitals-antonyms.csv").read_text().count("\n") > 10
    assert "capitals" in (out / "report.html").read_text()
