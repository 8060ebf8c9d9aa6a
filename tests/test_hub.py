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

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hub.resolve_dictionary_path("hf://owner/repo/clt") == tmp_path / "clt"
    assert calls == [("owner/repo", ["clt/*"])]
    with pytest.raises(CircuitscopeError, match="has no folder 'missing'"):
        hub.resolve_dictionary_path("owner/repo/missing")


# --- only the chosen Gemma Scope 2 variant is downloaded (issue 17) ----------------------------------------------
def _release_listing() -> list[str]:
    """Files of a Gemma Scope 2 repository: per-layer transcoders in several variants, and other folders."""
    files = ["README.md", ".gitattributes"]
    for layer in range(3):
        for variant in ("16k_l0_small", "16k_l0_big", "262k_l0_small", "16k_l0_small_affine", "262k_l0_big_affine"):
            files += [f"transcoder_all/layer_{layer}_width_{variant}/{name}" for name in ("params.safetensors",
                                                                                       "config.json")]
        files.append(f"resid_post/layer_{layer}_width_16k_l0_small/params.safetensors")
    files += [f"clt/params_layer_{layer}.safetensors" for layer in range(3)]
    return files


def _fetched(subfolder, **selectors) -> set[str]:
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = hub.hub_patterns(subfolder, **selectors)
    return set(filter_repo_objects(_release_listing(), allow_patterns=allow, ignore_patterns=ignore))


def _folders(files: set[str]) -> set[str]:
    return {f.rsplit("/", 1)[0] for f in files}


def _layers(*variants: str, root: str = "transcoder_all") -> set[str]:
    return {f"{root}/layer_{layer}_width_{v}" for layer in range(3) for v in variants}


@pytest.mark.parametrize("subfolder", ["transcoder_all", None])
@pytest.mark.parametrize(("selectors", "variants"), [
    ({"width": "16k", "l0": "small"}, ["16k_l0_small", "16k_l0_small_affine"]),
    ({"width": "16k", "l0": "small", "affine": False}, ["16k_l0_small"]),
    ({"width": 16384, "l0": "small", "affine": True}, ["16k_l0_small_affine"]),
    ({"l0": "big"}, ["16k_l0_big", "262k_l0_big_affine"]),
    ({"width": "262k"}, ["262k_l0_small", "262k_l0_big_affine"]),
    ({"affine": False}, ["16k_l0_small", "16k_l0_big", "262k_l0_small"]),
    ({"width": "1m"}, []),
])
def test_selectors_fetch_only_the_chosen_variant(subfolder, selectors, variants):
    fetched = _fetched(subfolder, **selectors)
    assert _folders(fetched) == _layers(*variants)
    assert all(f.endswith(("params.safetensors", "config.json")) for f in fetched)
    assert len(fetched) == 2 * len(_layers(*variants))  # every file of the chosen folders


def test_without_selectors_the_whole_subfolder_is_fetched():
    assert _fetched("transcoder_all") == {f for f in _release_listing() if f.startswith("transcoder_all/")}
    assert _fetched("transcoder_all", width=None, l0=None, affine=None) == _fetched("transcoder_all")
    # a selector hub.py cannot translate into file names (another format's) cannot narrow the download
    assert _fetched("transcoder_all", width="16k", other_format_choice="x") == _fetched("transcoder_all")
    assert _fetched("clt") == {f"clt/params_layer_{layer}.safetensors" for layer in range(3)}
    assert _fetched(None) == set(_release_listing())


def test_download_passes_the_variant_patterns(tmp_path, monkeypatch):
    (tmp_path / "transcoder_all").mkdir()
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, ignore_patterns=None):
        calls.append((repo_id, allow_patterns, ignore_patterns))
        return str(tmp_path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    spec = "google/gemma-scope-2-270m-pt/transcoder_all"
    assert hub.resolve_dictionary_path(spec, width="16k", l0="small", affine=False) == tmp_path / "transcoder_all"
    assert calls == [("google/gemma-scope-2-270m-pt", ["transcoder_all/layer_*_width_16k_l0_small/*"],
                      ["transcoder_all/layer_*_affine/*"])]
    with pytest.raises(CircuitscopeError, match=r"subfolder nothing\): no layer folder .* matches width='1m'"):
        hub.resolve_dictionary_path("google/gemma-scope-2-270m-pt/nothing", width="1m")


def test_unreachable_hub_names_the_variant_to_download(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CircuitscopeError, match=(
        "huggingface-cli download google/gemma-scope-2-270m-pt "
        "--include 'transcoder_all/layer_\\*_width_16k_l0_small_affine/\\*'\\)")):
        hub.resolve_dictionary_path("google/gemma-scope-2-270m-pt/transcoder_all", width="16k", l0="small",
                                    affine=True)
