"""`circuitscope trace-many`: bad lines named before any work, one graph per prompt, resume after a kill equals an
uninterrupted run, a failing prompt is recorded without stopping the run, 2 torchrun processes equal 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from circuits.graph.attribution_graph import AttributionGraph
from cli import main
from dictionaries.assembly import random_dictionary_set
from dictionaries.formats.native import save_native

D_MODEL, N_LAYERS = 32, 4  # the tiny checkpoint's shape (tests/conftest.py)
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"id": "a1", "prompt": "the cat was in the tree", "group": "a"},
    {"id": "a2", "prompt": "the dog was in the house", "group": "a"},
    {"prompt": "one two three four five", "group": "b"},
    {"id": "b2", "prompt": "red green blue red green", "group": "b", "target": "blue"},
    {"id": "b3", "prompt": "the capital of france is", "group": "b", "logit_diff": ["paris", "city"]},
]

pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def dictionaries_dir(tmp_path_factory):
    return str(save_native(random_dictionary_set(N_LAYERS, D_MODEL, 16, seed=0),
                           tmp_path_factory.mktemp("many-dicts") / "tc"))


def _write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts), encoding="utf-8")
    return path


def _args(prompts: Path, out: Path, checkpoint, dictionaries) -> list[str]:
    return ["trace-many", str(prompts), "--out", str(out), "--model", str(checkpoint), "--dictionaries",
            dictionaries, "--batch-size", "16"]


def _run(*args):
    return CliRunner().invoke(main, list(args))


def _content(out: Path) -> dict[str, str]:
    """Every graph's content hash (timings excluded) and the bytes of the index and the aggregate tables."""
    found = {p.name: AttributionGraph.load(p).content_hash for p in sorted((out / "graphs").glob("*.safetensors"))}
    for name in ("index.json", "features.csv", "edges.csv", "prompts.csv", "summary.json"):
        found[name] = (out / name).read_text(encoding="utf-8")
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_checkpoint_dir, dictionaries_dir):
    root = tmp_path_factory.mktemp("many-full")
    out = root / "out"
    result = _run(*_args(_write_prompts(root / "p.jsonl"), out, tiny_checkpoint_dir, dictionaries_dir))
    assert result.exit_code == 0, (result.output, result.exception)
    return out


@pytest.mark.parametrize("line, words", [
    ("not json", ["line 2", "not JSON"]),
    (json.dumps({"id": "x"}), ["line 2", "prompt"]),
    (json.dumps({"prompt": "a", "colour": "red"}), ["line 2", "colour"]),
    (json.dumps({"prompt": "a", "id": "a1"}), ["line 2", "'a1'", "line 1"]),
    (json.dumps({"prompt": "a", "id": "../x"}), ["line 2", "id"]),
    (json.dumps({"prompt": "a", "target": "x", "logit_diff": ["a", "b"]}), ["line 2", "not both"]),
])
def test_a_bad_line_is_named_before_any_work(tmp_path, line, words):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps(PROMPTS[0]) + "\n" + line + "\n", encoding="utf-8")
    result = _run("trace-many", str(prompts), "--out", str(tmp_path / "out"), "--model", "/no/such/model")
    assert result.exit_code == 2, (result.output, result.exception)
    error = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(error) == 1 and error[0].startswith("error: "), result.stderr
    for word in words:
        assert word.lower() in error[0].lower(), error[0]
    assert not (tmp_path / "out").exists()


def test_one_graph_per_prompt_with_its_own_settings_and_an_index(uninterrupted):
    index = json.loads((uninterrupted / "index.json").read_text())
    rows = index["prompts"]
    assert [r["id"] for r in rows] == ["a1", "a2", "prompt-0003", "b2", "b3"]
    assert [r["status"] for r in rows] == ["done"] * 5
    assert [r["group"] for r in rows] == ["a", "a", "b", "b", "b"]
    for row, spec in zip(rows, PROMPTS, strict=True):
        graph = AttributionGraph.load(uninterrupted / row["graph"])
        assert graph.metadata.prompt == spec["prompt"]
        assert row["content_hash"] == graph.content_hash
        assert row["scores"]["replacement"] == graph.metadata.scores.replacement
    b2 = AttributionGraph.load(uninterrupted / rows[3]["graph"])
    assert b2.metadata.settings.targets == ["blue"] and [r["token"] for r in rows[3]["top_logits"]] == ["blue"]
    assert AttributionGraph.load(uninterrupted / rows[4]["graph"]).metadata.settings.logit_diff == ("paris", "city")
    assert (uninterrupted / "report.html").is_file()


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, uninterrupted, tiny_checkpoint_dir,
                                                         dictionaries_dir, monkeypatch):
    import circuits.tracing

    prompts = _write_prompts(tmp_path / "p.jsonl")
    out = tmp_path / "out"
    real_trace = circuits.tracing.trace
    calls = []

    def killed_after_two(*args, **kwargs):  # the process dies while tracing the third prompt
        calls.append(args[2])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(circuits.tracing, "trace", killed_after_two)
    result = _run(*_args(prompts, out, tiny_checkpoint_dir, dictionaries_dir))
    assert result.exit_code != 0 and len(list((out / "graphs").glob("*.safetensors"))) == 2
    (out / "graphs" / "b2.safetensors").write_text('{"schema": 4, "nod', encoding="utf-8")  # a damaged graph: redone
    monkeypatch.setattr(circuits.tracing, "trace", real_trace)
    traced = []

    def counted(*args, **kwargs):
        traced.append(args[2])
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(circuits.tracing, "trace", counted)
    result = _run(*_args(prompts, out, tiny_checkpoint_dir, dictionaries_dir))
    assert result.exit_code == 0, (result.output, result.exception)
    assert traced == [p["prompt"] for p in PROMPTS[2:]]  # the two done graphs were skipped
    assert _content(out) == _content(uninterrupted)


def test_a_run_with_json_graphs_resumes_without_tracing_them_again(tmp_path, uninterrupted, tiny_checkpoint_dir,
                                                                  dictionaries_dir, monkeypatch):
    """A folder written before the compact file (graphs/ID.json): its done graphs are rewritten as .safetensors
    and not traced again; one whose settings differ is traced; the result equals an uninterrupted run."""
    import circuits.tracing

    out = tmp_path / "out"
    (out / "graphs").mkdir(parents=True)
    for spec in PROMPTS[:4]:
        name = spec.get("id", "prompt-0003")
        AttributionGraph.load(uninterrupted / "graphs" / f"{name}.safetensors").save(out / "graphs" / f"{name}.json")
    stale = AttributionGraph.load(out / "graphs" / "b2.json")  # same prompt, other settings: traced again
    stale.metadata = stale.metadata.model_copy(update={"settings": stale.metadata.settings.model_copy(
        update={"node_threshold": 0.5})})
    stale.save(out / "graphs" / "b2.json")
    real_trace = circuits.tracing.trace
    traced = []

    def counted(*args, **kwargs):
        traced.append(args[2])
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(circuits.tracing, "trace", counted)
    result = _run(*_args(_write_prompts(tmp_path / "p.jsonl"), out, tiny_checkpoint_dir, dictionaries_dir))
    assert result.exit_code == 0, (result.output, result.exception)
    assert traced == [PROMPTS[3]["prompt"], PROMPTS[4]["prompt"]]
    assert _content(out) == _content(uninterrupted)


def test_a_failing_prompt_is_recorded_and_the_run_goes_on(tmp_path, tiny_checkpoint_dir, dictionaries_dir):
    prompts = _write_prompts(tmp_path / "p.jsonl", [PROMPTS[0], {"id": "bad", "prompt": "the cat", "position": 40},
                                                    PROMPTS[1]])
    out = tmp_path / "out"
    result = _run(*_args(prompts, out, tiny_checkpoint_dir, dictionaries_dir))
    assert result.exit_code == 0, (result.output, result.exception)
    rows = json.loads((out / "index.json").read_text())["prompts"]
    assert [r["status"] for r in rows] == ["done", "failed", "done"]
    assert "position" in rows[1]["error"].lower() and "failed     bad:" in result.stderr


def test_two_torchrun_processes_equal_one(tmp_path, uninterrupted, tiny_checkpoint_dir, dictionaries_dir):
    out = tmp_path / "out"
    args = _args(_write_prompts(tmp_path / "p.jsonl"), out, tiny_checkpoint_dir, dictionaries_dir)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "cli",
               *args]
    done = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "failures-rank-1.json").read_text()) == {}
    assert _content(out) == _content(uninterrupted)
