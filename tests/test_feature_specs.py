"""Features named on the command line (cli/feature_specs.py): one grammar for ``L:F[=VALUE][@POS]``, read the same
way by ``intervene`` and ``query ... search --feature``. (``parse_intervention`` is tested in test_interventions.py.)"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from graph_helpers import hand_built_graph

from cli import main
from cli.feature_specs import parse_feature_search, read_feature_spec
from dictionaries.errors import CircuitscopeError


def test_read_feature_spec():
    assert read_feature_spec("3:17") == (3, 17, None, None)
    assert read_feature_spec(" 3 : 17 = 2.5 @ -1 ") == (3, 17, "2.5", -1)
    assert read_feature_spec("3") is None and read_feature_spec("a:b") is None and read_feature_spec("3:17@x") is None


def test_feature_search_terms():
    assert parse_feature_search("17") == 17
    assert parse_feature_search(" 3 : 17 ") == "3:17"
    for bad in ("x", "3:17@2", "3:17=1", "-1:2", ""):
        with pytest.raises(CircuitscopeError, match="--feature .*: give an index such as 17 or a key such as 3:17"):
            parse_feature_search(bad)


def test_query_search_reads_feature_keys_with_the_same_grammar(tmp_path):
    hand_built_graph().save(tmp_path / "g.json")

    def search(feature):
        result = CliRunner().invoke(main, ["query", str(tmp_path / "g.json"), "search", "--feature", feature, "--json"])
        return result.exit_code, result.output

    code, out = search("0:5")
    assert code == 0, out
    assert {n["feature_key"] for n in json.loads(out)} == {"0:5"}
    assert search(" 0 : 5 ") == (code, out)
    code, out = search("0:5@1")
    assert code == 2 and "give an index such as 17 or a key such as 3:17" in out
