"""Dictionary locations: local paths, hub ids with subfolders, and a clear error when the hub is out of reach."""

import pytest

from dictionaries import hub
from dictionaries.errors import CircuitscopeError


def test_parse_hub_spec():
    assert hub.parse_hub_spec("google/gemma-scope-2-270m-pt") == ("google/gemma-scope-2-270m-pt", None)
    assert hub.parse_hub_spec("hf://google/gemma-scope-2-270m-pt/transcoder_all/x") == (
        "google/gemma-scope-2-270m-pt", "transcoder_all/x")
    assert hub.parse_hub_spec("just-a-name") is None
    assert hub.parse_hub_spec("./local/dir") is None
    assert hub.parse_hub_spec("/abs/dir") is None


def test_existing_local_path_is_used_as_is(tmp_path):
    assert hub.resolve_dictionary_path(tmp_path) == tmp_path


def test_missing_local_path_gets_a_clear_message():
    with pytest.raises(CircuitscopeError, match="no such file or directory"):
        hub.resolve_dictionary_path("./does/not/exist")


def test_unreachable_hub_names_the_repo_and_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the same answer with or without network
    with pytest.raises(CircuitscopeError, match=(
        "google/gemma-scope-2-270m-pt \\(subfolder transcoder_all\\): cannot reach the Hugging Face hub.*"
        "huggingface-cli download google/gemma-scope-2-270m-pt --include 'transcoder_all/\\*'")):
        hub.resolve_dictionary_path("google/gemma-scope-2-270m-pt/transcoder_all")


def test_subfolder_of_a_downloaded_snapshot(tmp_path, monkeypatch):
    (tmp_path / "clt").mkdir()
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve_dictionary_path("hf://owner/repo/clt") == tmp_path / "clt"
    assert calls == [("owner/repo", ["clt/**"])]
    with pytest.raises(CircuitscopeError, match="has no folder 'missing'"):
        hub.resolve_dictionary_path("owner/repo/missing")
