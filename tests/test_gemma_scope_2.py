"""Gemma Scope 2 reader and writer: the loaded set computes exactly what the source files' own math gives,
round trips are bit-exact, and every damaged input ends in one clear message."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig
from dictionaries.errors import CircuitscopeError, DictionaryFileError
from dictionaries.formats.gemma_scope_2 import (
    FOLDERS_KEY,
    load_gemma_scope_2,
    save_gemma_scope_2,
    width_token,
)
from dictionaries.formats.native import load_native, save_native

N_LAYERS, D_MODEL, D_SAE = 3, 16, 24


# --- source files, written the way the release writes them ----------------------------------------------
def gs2_tensors(seed: int, d: int = D_MODEL, w: int = D_SAE, n_dec: int | None = None, skip: bool = False,
                dtype: torch.dtype = torch.float32, layer: int = 0, earlier: bool = False) -> dict[str, torch.Tensor]:
    """Random Gemma Scope 2 tensors; ``n_dec`` makes a CLT ``w_dec`` [w, n_dec, d] whose decoders to layers
    before ``layer`` are zero unless ``earlier``. Thresholds in [0, 0.8) leave some features on, some off."""
    gen = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(w, d, generator=gen) if n_dec is None else torch.randn(w, n_dec, d, generator=gen)
    if n_dec is not None and not earlier:
        w_dec[:, :layer, :] = 0
    out = {
        "w_enc": torch.randn(d, w, generator=gen) / d**0.5,
        "b_enc": torch.randn(w, generator=gen) * 0.1,
        "threshold": torch.rand(w, generator=gen) * 0.8,
        "w_dec": w_dec,
        "b_dec": torch.randn(d, generator=gen),
    }
    if skip:
        out["affine_skip_connection"] = torch.randn(d, d, generator=gen)  # not symmetric
    return {k: v.to(dtype) for k, v in out.items()}


def folder(layer: int, skip: bool = False, width: str = "24", l0: str = "small") -> str:
    return f"layer_{layer}_width_{width}_l0_{l0}" + ("_affine" if skip else "")


def write_per_layer(root: Path, skip: bool = False, dtype: torch.dtype = torch.float32, n_layers: int = N_LAYERS,
                    **folder_kwargs) -> list[dict[str, torch.Tensor]]:
    layers = [gs2_tensors(10 + L, skip=skip, dtype=dtype) for L in range(n_layers)]
    for L, tensors in enumerate(layers):
        path = root / "transcoder_all" / folder(L, skip, **folder_kwargs) / "params.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path)
    return layers


def write_clt(root: Path, skip: bool = False, dtype: torch.dtype = torch.float32, earlier: bool = False,
              n_layers: int = N_LAYERS) -> list[dict[str, torch.Tensor]]:
    root.mkdir(parents=True, exist_ok=True)
    layers = [gs2_tensors(20 + i, n_dec=n_layers, skip=skip, dtype=dtype, layer=i, earlier=earlier)
              for i in range(n_layers)]
    for i, tensors in enumerate(layers):
        save_file(tensors, root / f"params_layer_{i}.safetensors")
    return layers


def inputs(n: int = N_LAYERS, d: int = D_MODEL, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randn(2, 5, d, generator=gen).to(dtype) for _ in range(n)]


# --- the release's math, computed from the raw source tensors ------------------------------------------
def reference(raw: list[dict[str, torch.Tensor]], xs: list[torch.Tensor]) -> tuple[list, list]:
    """JumpReLU f = relu(z) * (z > threshold), z = x @ w_enc + b_enc; per-layer y = f @ w_dec + b_dec (+ x @ A);
    CLT y_t = sum_{s <= t} f_s @ w_dec_s[:, t] + b_dec_t (+ x_t @ A_t)."""
    feats = []
    for tensors, x in zip(raw, xs, strict=True):
        z = x @ tensors["w_enc"] + tensors["b_enc"]
        feats.append(torch.relu(z) * (z > tensors["threshold"]))
    outs = []
    for t, (tensors, x) in enumerate(zip(raw, xs, strict=True)):
        if tensors["w_dec"].ndim == 2:
            y = feats[t] @ tensors["w_dec"] + tensors["b_dec"]
        else:
            y = tensors["b_dec"] + sum(feats[s] @ raw[s]["w_dec"][:, t, :] for s in range(t + 1))
        if "affine_skip_connection" in tensors:
            y = y + x @ tensors["affine_skip_connection"]
        outs.append(y)
    return feats, outs


def assert_matches_reference(dicts, raw, xs) -> None:
    ref_feats, ref_outs = reference(raw, xs)
    for f in ref_feats:  # the thresholds matter: some features on, some off
        assert 0 < (f > 0).float().mean() < 1
    feats, outs = dicts(xs)
    for layer in range(len(raw)):
        torch.testing.assert_close(feats[layer], ref_feats[layer])
        torch.testing.assert_close(dicts.encode(layer, xs[layer]), ref_feats[layer])
        torch.testing.assert_close(outs[layer], ref_outs[layer])
    torch.testing.assert_close(dicts.decode(ref_feats, xs), ref_outs)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- math ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [False, True])
def test_per_layer_matches_the_release_math(tmp_path, skip):
    raw = write_per_layer(tmp_path, skip=skip)
    dicts = load_gemma_scope_2(tmp_path)
    assert (dicts.kind, dicts.n_layers, dicts.d_model, dicts.widths) == (
        "skip-transcoder" if skip else "transcoder", N_LAYERS, D_MODEL, [D_SAE] * N_LAYERS)
    assert dicts.config.source_format == "gemma-scope-2"
    assert_matches_reference(dicts, raw, inputs())


@pytest.mark.parametrize("skip", [False, True])
def test_clt_matches_the_release_math(tmp_path, skip):
    raw = write_clt(tmp_path, skip=skip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero earlier-layer decoders: no warning
        dicts = load_gemma_scope_2(tmp_path)
    assert dicts.kind == "clt" and dicts.has_skip == skip
    assert [dicts.layer_tensors(i)["W_dec"].shape[1] for i in range(N_LAYERS)] == [3, 2, 1]
    assert_matches_reference(dicts, raw, inputs())


def test_clt_ignores_non_zero_decoders_to_earlier_layers_with_a_warning(tmp_path):
    raw = write_clt(tmp_path, earlier=True)
    expected = r"w_dec in params_layer_1\.safetensors, params_layer_2\.safetensors has non-zero decoders to layers"
    with pytest.warns(UserWarning, match=expected):
        dicts = load_gemma_scope_2(tmp_path)
    assert_matches_reference(dicts, raw, inputs())  # the reference sums s <= t only
    save_gemma_scope_2(dicts, tmp_path / "out")
    back = load_gemma_scope_2(tmp_path / "out")  # no warning now: zeros written
    assert torch.equal(back.layer_tensors(2)["W_dec"], dicts.layer_tensors(2)["W_dec"])


# --- round trips ---------------------------------------------------------------------------------------
KINDS = [("per-layer", False), ("per-layer", True), ("clt", False), ("clt", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layout", "skip"), KINDS)
def test_gemma_scope_2_to_native_and_back_is_bit_exact(tmp_path, layout, skip, dtype):
    src = tmp_path / "src"
    (write_per_layer if layout == "per-layer" else write_clt)(src, skip=skip, dtype=dtype)
    loaded = load_gemma_scope_2(src)
    assert loaded.dtype == dtype and loaded.config.dtype == str(dtype).removeprefix("torch.")
    native = load_native(save_native(loaded, tmp_path / "native"))
    assert native.config == loaded.config
    for layer in range(N_LAYERS):
        for name, tensor in loaded.layer_tensors(layer).items():
            assert torch.equal(native.layer_tensors(layer)[name], tensor)
    save_gemma_scope_2(native, tmp_path / "back")
    assert tree(tmp_path / "back") == tree(src)  # same folder and file names, same bytes


def test_folder_names_are_kept_in_the_metadata(tmp_path):
    write_per_layer(tmp_path, skip=True, width="262k", l0="medium")
    dicts = load_gemma_scope_2(tmp_path / "transcoder_all")  # the folder itself works too
    assert json.loads(dicts.config.metadata[FOLDERS_KEY]) == [folder(L, True, "262k", "medium") for L in range(3)]


def test_folder_names_of_a_loaded_set_survive_even_with_unusual_width_tokens(tmp_path):
    write_per_layer(tmp_path / "src", width="16k")  # d_sae 24 named 16k
    save_gemma_scope_2(load_gemma_scope_2(tmp_path / "src"), tmp_path / "out")
    assert tree(tmp_path / "out") == tree(tmp_path / "src")
    trained = random_dictionary_set(3, D_MODEL, 32)
    trained.config.metadata[FOLDERS_KEY] = json.dumps([folder(L, width="16k") for L in range(3)])  # stale
    save_gemma_scope_2(trained, tmp_path / "trained")
    assert (tmp_path / "trained" / "transcoder_all" / "layer_0_width_32_l0_custom").is_dir()


def test_trained_sets_get_generated_folder_names(tmp_path):
    dicts = random_dictionary_set(2, 8, 4096, skip=True)
    save_gemma_scope_2(dicts, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out" / "transcoder_all").iterdir()) == [
        "layer_0_width_4k_l0_custom_affine", "layer_1_width_4k_l0_custom_affine"]
    back = load_gemma_scope_2(tmp_path / "out")
    for name, tensor in dicts.layer_tensors(1).items():
        assert torch.equal(back.layer_tensors(1)[name], tensor)


def test_width_tokens_follow_gemma_scope():
    assert [width_token(w) for w in (24, 4096, 16384, 65536, 262144, 2**20)] == ["24", "4k", "16k", "65k", "262k", "1m"]


def test_relu_sets_are_written_with_threshold_zero(tmp_path):
    dicts = random_dictionary_set(2, 8, 12, activation=ActivationConfig(type="relu"), seed=3)
    save_gemma_scope_2(dicts, tmp_path / "out")
    back = load_gemma_scope_2(tmp_path / "out")
    xs = inputs(2, 8)
    torch.testing.assert_close(back(xs)[1], dicts(xs)[1])
    assert not back.layer_tensors(0)["threshold"].any()


def test_topk_sets_cannot_be_written_and_nothing_is(tmp_path):
    dicts = random_dictionary_set(2, 8, 12, activation=ActivationConfig(type="topk", k=2))
    with pytest.raises(CircuitscopeError, match=r"JumpReLU transcoders only; these use topk\(k=2\)"):
        save_gemma_scope_2(dicts, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_a_non_empty_destination_and_leaves_it_untouched(tmp_path):
    write_per_layer(tmp_path / "src")
    before = tree(tmp_path / "src")
    with pytest.raises(CircuitscopeError, match="already exists and is not empty"):
        save_gemma_scope_2(random_dictionary_set(2, 8, 12), tmp_path / "src")
    assert tree(tmp_path / "src") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import dictionaries.formats.gemma_scope_2 as gs2

    calls = []

    def fail_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")

    monkeypatch.setattr(gs2, "write_tensors", fail_on_second)
    with pytest.raises(OSError):
        save_gemma_scope_2(random_dictionary_set(3, 8, 12), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- selection ---------------------------------------------------------------------------------------
def test_several_folders_per_layer_need_selectors(tmp_path):
    write_per_layer(tmp_path, l0="small")
    write_per_layer(tmp_path, l0="big")
    write_per_layer(tmp_path, skip=True, l0="small")
    with pytest.raises(DictionaryFileError,
                       match=r"layer 0: several folders match .*available: layer_0_width_24_l0_big,"
                       r".*layer_0_width_24_l0_small_affine.*width=, l0= and affine= selectors"):
        load_gemma_scope_2(tmp_path)
    with pytest.raises(DictionaryFileError, match="layer 0: several folders match"):
        load_gemma_scope_2(tmp_path, l0="small")
    dicts = load_gemma_scope_2(tmp_path, l0="small", affine=True)
    assert dicts.has_skip and json.loads(dicts.config.metadata[FOLDERS_KEY])[0] == folder(0, True)
    assert not load_gemma_scope_2(tmp_path, width=24, l0="big").has_skip
    with pytest.raises(DictionaryFileError, match=r"layer 0: no folder matches width='1m'.*available"):
        load_gemma_scope_2(tmp_path, width="1m")


def test_an_ambiguous_folder_names_the_variants_and_the_flags_that_choose(tmp_path):
    from click.testing import CliRunner

    from cli import main

    write_per_layer(tmp_path / "gs", l0="small")
    write_per_layer(tmp_path / "gs", l0="big", width="16k")
    write_per_layer(tmp_path / "gs", skip=True, l0="small")
    flags = ["--width 16k --l0 big --no-affine", "--width 24 --l0 small --no-affine", "--width 24 --l0 small --affine"]
    with pytest.raises(DictionaryFileError) as error:
        load_gemma_scope_2(tmp_path / "gs")
    assert error.value.fix == (
        "Choose one variant with the width=, l0= and affine= selectors; on the command line: "
        + " or ".join(f"'{f}'" for f in flags)
    )
    with pytest.raises(DictionaryFileError) as error:  # only the variants that match what was given
        load_gemma_scope_2(tmp_path / "gs", width="24")
    assert error.value.fix.endswith(f"on the command line: '{flags[1]}' or '{flags[2]}'")
    result = CliRunner().invoke(main, ["dictionaries", "convert", str(tmp_path / "gs"), str(tmp_path / "out"),
                                       "--from", "gemma-scope-2"])
    assert result.exit_code == 2 and f"'{flags[2]}'" in result.output
    result = CliRunner().invoke(main, ["dictionaries", "convert", str(tmp_path / "gs"), str(tmp_path / "out"),
                                       "--from", "gemma-scope-2", *flags[2].split()])
    assert result.exit_code == 0, result.output
    assert json.loads(load_native(tmp_path / "out").config.metadata[FOLDERS_KEY]) == [folder(L, True) for L in range(3)]


def test_layers_that_differ_in_skip_are_refused(tmp_path):
    write_per_layer(tmp_path)
    (tmp_path / "transcoder_all" / folder(1)).rename(tmp_path / "transcoder_all" / folder(1, skip=True))
    with pytest.raises(DictionaryFileError, match="some chosen layers have an affine skip.*Pass affine=True"):
        load_gemma_scope_2(tmp_path)


# --- damaged inputs ------------------------------------------------------------------------------------
def per_layer_file(root: Path, layer: int) -> Path:
    return root / "transcoder_all" / folder(layer) / "params.safetensors"


def rewrite(path: Path, **changes) -> None:
    from dictionaries.safetensors_io import read_tensors

    tensors = {k: v.clone() for k, v in read_tensors(path).items()}
    tensors.update(changes)
    save_file({k: v for k, v in tensors.items() if v is not None}, path)


def test_missing_layer_folder_is_named(tmp_path):
    write_per_layer(tmp_path)
    (tmp_path / "transcoder_all" / folder(1)).rename(tmp_path / "elsewhere")
    with pytest.raises(DictionaryFileError, match=r"no folder for layer 1 \(found layers \[0, 2\]\)"):
        load_gemma_scope_2(tmp_path)


def test_missing_params_file_is_named(tmp_path):
    write_per_layer(tmp_path)
    per_layer_file(tmp_path, 2).unlink()
    with pytest.raises(DictionaryFileError, match=r"layer_2_width_24_l0_small/params.safetensors: missing"):
        load_gemma_scope_2(tmp_path)


def test_missing_clt_layer_file_is_named(tmp_path):
    write_clt(tmp_path)
    (tmp_path / "params_layer_1.safetensors").unlink()
    with pytest.raises(DictionaryFileError, match=r"missing params_layer_1\.safetensors"):
        load_gemma_scope_2(tmp_path)
    (tmp_path / "params_layer_2.safetensors").unlink()  # now w_dec of layer 0 decodes past the files
    with pytest.raises(DictionaryFileError, match=r"w_dec decodes to 3 layers but only 1 layer files.*params_layer_1"):
        load_gemma_scope_2(tmp_path)


def test_d_model_that_differs_between_layers(tmp_path):
    write_per_layer(tmp_path)
    save_file(gs2_tensors(1, d=20), per_layer_file(tmp_path, 1))
    with pytest.raises(DictionaryFileError, match=r"layer_1.*: layer 1 has d_model 20 but layer 0 has d_model 16"):
        load_gemma_scope_2(tmp_path)


def test_wrong_tensor_shape(tmp_path):
    write_per_layer(tmp_path)
    rewrite(per_layer_file(tmp_path, 1), w_dec=torch.randn(D_SAE, D_MODEL - 1))
    with pytest.raises(DictionaryFileError,
                       match=r"tensor 'w_dec' of layer 1 has shape \[24, 15\], expected \[24, 16\] "):
        load_gemma_scope_2(tmp_path)


def test_missing_tensor_name(tmp_path):
    write_per_layer(tmp_path)
    rewrite(per_layer_file(tmp_path, 0), threshold=None)
    with pytest.raises(DictionaryFileError,
                       match=r"params.safetensors: missing tensor\(s\) threshold \(the file has b_dec"):
        load_gemma_scope_2(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_refused(tmp_path, bad):
    write_per_layer(tmp_path)
    w_dec = torch.randn(D_SAE, D_MODEL)
    w_dec[3, 4] = bad
    rewrite(per_layer_file(tmp_path, 2), w_dec=w_dec)
    with pytest.raises(DictionaryFileError,
                       match=r"layer_2.*params.safetensors: tensor 'W_dec' contains NaN or infinite"):
        load_gemma_scope_2(tmp_path)
    load_gemma_scope_2(tmp_path, verify_values=False)  # the scan can be skipped


def test_negative_threshold(tmp_path):
    write_per_layer(tmp_path)
    rewrite(per_layer_file(tmp_path, 0), threshold=-torch.rand(D_SAE))
    with pytest.raises(DictionaryFileError, match="layer 0 has negative JumpReLU thresholds"):
        load_gemma_scope_2(tmp_path)


def test_truncated_file(tmp_path):
    write_per_layer(tmp_path)
    path = per_layer_file(tmp_path, 1)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DictionaryFileError, match=r"layer_1.*params.safetensors: file is truncated"):
        load_gemma_scope_2(tmp_path)


def test_corrupt_header(tmp_path):
    write_per_layer(tmp_path)
    path = per_layer_file(tmp_path, 1)
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32
    path.write_bytes(bytes(data))
    with pytest.raises(DictionaryFileError, match=r"params.safetensors: corrupt safetensors header"):
        load_gemma_scope_2(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(DictionaryFileError, match=r"no Gemma Scope 2 transcoder folders"):
        load_gemma_scope_2(tmp_path)


# --- memory mapping ------------------------------------------------------------------------------------
def mapped_file(tensor: torch.Tensor) -> str | None:
    """The file whose memory mapping holds ``tensor``'s data, from /proc/self/maps (Linux)."""
    ptr = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if start <= ptr < end:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_tensors_stay_memory_mapped(tmp_path):
    write_clt(tmp_path)
    dicts = load_gemma_scope_2(tmp_path)
    w_dec = dicts.layer_tensors(1)["W_dec"]
    assert mapped_file(w_dec) == str(tmp_path / "params_layer_1.safetensors")
    assert not w_dec.is_contiguous()  # the t >= 1 view of w_dec, not a copy


def test_clt_layers_of_different_widths(tmp_path):
    write_clt(tmp_path)
    save_file(gs2_tensors(5, w=D_SAE + 8, n_dec=N_LAYERS, layer=2), tmp_path / "params_layer_2.safetensors")
    with pytest.raises(DictionaryFileError, match=r"params_layer_2\.safetensors: layer 2 has d_sae 32 but layer 0 has"):
        load_gemma_scope_2(tmp_path)


def test_float64_files_are_refused_with_a_fix(tmp_path):
    write_per_layer(tmp_path, dtype=torch.float64)
    with pytest.raises(DictionaryFileError, match=r"params.safetensors: .*not float64. Convert the files to float32"):
        load_gemma_scope_2(tmp_path)


def anonymous_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:"))) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status")
def test_loading_a_100_mb_file_does_not_copy_it(tmp_path):
    d, w = 64, 204_800  # w_enc and w_dec 52 MB each
    tensors = {"w_enc": torch.zeros(d, w), "b_enc": torch.zeros(w), "threshold": torch.zeros(w),
               "w_dec": torch.zeros(w, d), "b_dec": torch.zeros(d)}
    path = tmp_path / "transcoder_all" / "layer_0_width_204k_l0_small" / "params.safetensors"
    path.parent.mkdir(parents=True)
    save_file(tensors, path)
    del tensors
    assert path.stat().st_size > 100e6
    before = anonymous_rss_mb()
    dicts = load_gemma_scope_2(tmp_path, verify_values=False)
    dicts([torch.randn(1, d)])  # reads every weight once
    assert anonymous_rss_mb() - before < 20


def test_tensors_of_mixed_dtypes_are_refused(tmp_path):
    write_per_layer(tmp_path)
    rewrite(per_layer_file(tmp_path, 1), w_dec=torch.randn(D_SAE, D_MODEL).bfloat16())
    with pytest.raises(DictionaryFileError, match=r"layer_1.*: tensor 'W_dec' is torch.bfloat16 but layer 0's tensors "
                       r"are torch.float32. Store every tensor in one dtype"):
        load_gemma_scope_2(tmp_path)
