"""circuit-tracer files: the loaded set computes what circuit-tracer's own math gives (F.linear encoders,
``x @ W_skip.T`` per layer but ``x @ W_skip_i`` in a CLT), writes back bit-exact, and damaged files fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_gemma_scope_2 import mapped_file, tree

from dictionaries.assembly import random_dictionary_set
from dictionaries.config import ActivationConfig
from dictionaries.errors import CircuitscopeError, DictionaryFileError
from dictionaries.formats.circuit_tracer import load_circuit_tracer, save_circuit_tracer
from dictionaries.safetensors_io import read_tensors

N_LAYERS, D_MODEL, D_SAE = 3, 16, 24


def _rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def write_per_layer(root: Path, skip: bool = False, threshold: bool = True, dtype: torch.dtype = torch.float32,
                    d_models: tuple[int, ...] = (D_MODEL,) * N_LAYERS) -> list[dict[str, torch.Tensor]]:
    """circuit-tracer ``layer_{L}.safetensors``: W_enc [d_sae, d_model] (F.linear), W_dec [d_sae, d_model]."""
    root.mkdir(parents=True, exist_ok=True)
    layers = []
    for L, d in enumerate(d_models):
        gen = torch.Generator().manual_seed(30 + L)
        t = {"W_enc": _rand(gen, D_SAE, d, scale=d**-0.5), "b_enc": _rand(gen, D_SAE, scale=0.1),
             "W_dec": _rand(gen, D_SAE, d), "b_dec": _rand(gen, d)}
        if threshold:
            t["activation_function.threshold"] = torch.rand(D_SAE, generator=gen) * 0.8
        if skip:
            t["W_skip"] = _rand(gen, d, d)  # not symmetric
        t = {k: v.to(dtype) for k, v in t.items()}
        save_file(t, root / f"layer_{L}.safetensors")
        layers.append(t)
    return layers


def write_clt(root: Path, skip: bool = False, threshold: bool = True, dtype: torch.dtype = torch.float32):
    """circuit-tracer ``W_enc_{i}.safetensors`` and ``W_dec_{i}.safetensors`` (W_dec_i [d_sae, n - i, d_model])."""
    root.mkdir(parents=True, exist_ok=True)
    layers = []
    for i in range(N_LAYERS):
        gen = torch.Generator().manual_seed(40 + i)
        enc = {f"W_enc_{i}": _rand(gen, D_SAE, D_MODEL, scale=D_MODEL**-0.5),
               f"b_enc_{i}": _rand(gen, D_SAE, scale=0.1), f"b_dec_{i}": _rand(gen, D_MODEL)}
        if threshold:
            enc[f"threshold_{i}"] = torch.rand(D_SAE, generator=gen) * 0.8
        if skip:
            enc[f"W_skip_{i}"] = _rand(gen, D_MODEL, D_MODEL)
        dec = {f"W_dec_{i}": _rand(gen, D_SAE, N_LAYERS - i, D_MODEL)}
        enc, dec = ({k: v.to(dtype) for k, v in part.items()} for part in (enc, dec))
        save_file(enc, root / f"W_enc_{i}.safetensors")
        save_file(dec, root / f"W_dec_{i}.safetensors")
        layers.append(enc | dec)
    return layers


def inputs(n: int = N_LAYERS, d: int = D_MODEL) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(4, d, generator=gen) for _ in range(n)]


def act(z: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    return torch.relu(z) if threshold is None else z * (z > threshold)  # circuit-tracer's JumpReLU


def reference_per_layer(raw, xs):
    feats = [act(F.linear(x, t["W_enc"], t["b_enc"]), t.get("activation_function.threshold"))
             for t, x in zip(raw, xs, strict=True)]
    outs = [f @ t["W_dec"] + t["b_dec"] + (x @ t["W_skip"].T if "W_skip" in t else 0)
            for f, t, x in zip(feats, raw, xs, strict=True)]
    return feats, outs


def reference_clt(raw, xs):
    feats = [act(F.linear(x, t[f"W_enc_{i}"], t[f"b_enc_{i}"]), t.get(f"threshold_{i}"))
             for i, (t, x) in enumerate(zip(raw, xs, strict=True))]
    outs = []
    for t_layer, x in enumerate(xs):
        y = raw[t_layer][f"b_dec_{t_layer}"]
        y = y + sum(feats[s] @ raw[s][f"W_dec_{s}"][:, t_layer - s, :] for s in range(t_layer + 1))
        if f"W_skip_{t_layer}" in raw[t_layer]:
            y = y + x @ raw[t_layer][f"W_skip_{t_layer}"]
        outs.append(y)
    return feats, outs


def assert_matches(dicts, ref, xs, threshold: bool):
    ref_feats, ref_outs = ref
    if threshold:
        assert all(0 < (f > 0).float().mean() < 1 for f in ref_feats)
    feats, outs = dicts(xs)
    torch.testing.assert_close(feats, ref_feats)
    torch.testing.assert_close(outs, ref_outs)
    torch.testing.assert_close([dicts.encode(L, x) for L, x in enumerate(xs)], ref_feats)
    torch.testing.assert_close(dicts.decode(ref_feats, xs), ref_outs)


@pytest.mark.parametrize("threshold", [True, False])
@pytest.mark.parametrize("skip", [False, True])
def test_per_layer_matches_circuit_tracer_math(tmp_path, skip, threshold):
    raw = write_per_layer(tmp_path, skip=skip, threshold=threshold)
    dicts = load_circuit_tracer(tmp_path)
    assert dicts.kind == ("skip-transcoder" if skip else "transcoder")
    assert dicts.config.activation.type == ("jumprelu" if threshold else "relu")
    assert dicts.config.source_format == "circuit-tracer"
    assert_matches(dicts, reference_per_layer(raw, inputs()), inputs(), threshold)


@pytest.mark.parametrize("threshold", [True, False])
@pytest.mark.parametrize("skip", [False, True])
def test_clt_matches_circuit_tracer_math(tmp_path, skip, threshold):
    raw = write_clt(tmp_path, skip=skip, threshold=threshold)
    dicts = load_circuit_tracer(tmp_path)
    assert dicts.kind == "clt" and dicts.has_skip == skip
    assert_matches(dicts, reference_clt(raw, inputs()), inputs(), threshold)


def test_skip_orientation_differs_between_the_two_layouts(tmp_path):
    """The same matrix stored as W_skip (per layer) and W_skip_0 (CLT) acts transposed."""
    raw = write_per_layer(tmp_path / "plt", skip=True)
    write_clt(tmp_path / "clt", skip=True)
    plt, clt = load_circuit_tracer(tmp_path / "plt"), load_circuit_tracer(tmp_path / "clt")
    assert torch.equal(plt.skip_weight(0), raw[0]["W_skip"].T)
    assert not torch.equal(plt.skip_weight(0), plt.skip_weight(0).T)
    assert torch.equal(clt.skip_weight(0), read_tensors(tmp_path / "clt" / "W_enc_0.safetensors")["W_skip_0"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("layout", "skip"), [("per-layer", False), ("per-layer", True), ("clt", False), ("clt", True)])
def test_writer_round_trip_is_bit_exact(tmp_path, layout, skip, dtype):
    (write_per_layer if layout == "per-layer" else write_clt)(tmp_path / "src", skip=skip, dtype=dtype)
    save_circuit_tracer(load_circuit_tracer(tmp_path / "src"), tmp_path / "back")
    assert tree(tmp_path / "back") == tree(tmp_path / "src")


def test_writer_refuses_topk(tmp_path):
    dicts = random_dictionary_set(2, 8, 8, activation=ActivationConfig(type="topk", k=3))
    with pytest.raises(CircuitscopeError, match=r"JumpReLU or ReLU .* topk\(k=3\)"):
        save_circuit_tracer(dicts, tmp_path / "o")
    assert list(tmp_path.iterdir()) == []


# --- damaged inputs ------------------------------------------------------------------------------------
def test_missing_layer_file(tmp_path):
    write_per_layer(tmp_path)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(DictionaryFileError, match=r"missing layer_1\.safetensors"):
        load_circuit_tracer(tmp_path)


def test_missing_clt_decoder_file(tmp_path):
    write_clt(tmp_path)
    (tmp_path / "W_dec_2.safetensors").unlink()
    with pytest.raises(DictionaryFileError, match=r"W_dec_2\.safetensors: missing: layer 2 has an encoder file"):
        load_circuit_tracer(tmp_path)


def test_d_model_that_differs_between_layers(tmp_path):
    write_per_layer(tmp_path, d_models=(16, 16, 20))
    with pytest.raises(DictionaryFileError,
                       match=r"layer_2\.safetensors: layer 2 has d_model 20 but layer 0 has d_model 16"):
        load_circuit_tracer(tmp_path)


def test_wrong_shapes(tmp_path):
    raw = write_per_layer(tmp_path / "plt")
    save_file(raw[1] | {"W_dec": torch.randn(D_SAE, D_MODEL + 1)}, tmp_path / "plt" / "layer_1.safetensors")
    with pytest.raises(DictionaryFileError,
                       match=r"tensor 'W_dec' of layer 1 has shape \[24, 17\], expected \[24, 16\]"):
        load_circuit_tracer(tmp_path / "plt")
    write_clt(tmp_path / "clt")
    save_file({"W_dec_1": torch.randn(D_SAE, 3, D_MODEL)}, tmp_path / "clt" / "W_dec_1.safetensors")
    with pytest.raises(DictionaryFileError, match=r"W_dec_1\.safetensors: tensor 'W_dec_1' has shape \[24, 3, 16\], "
                       r"expected \[24, 2, 16\]"):
        load_circuit_tracer(tmp_path / "clt")


def test_missing_tensor_name(tmp_path):
    raw = write_clt(tmp_path)
    save_file({k: v for k, v in raw[0].items() if k not in ("b_enc_0", "W_dec_0")}, tmp_path / "W_enc_0.safetensors")
    with pytest.raises(DictionaryFileError, match=r"W_enc_0\.safetensors: missing tensor\(s\) b_enc_0"):
        load_circuit_tracer(tmp_path)


def test_threshold_in_some_layers_only(tmp_path):
    raw = write_per_layer(tmp_path)
    save_file({k: v for k, v in raw[2].items() if "threshold" not in k}, tmp_path / "layer_2.safetensors")
    with pytest.raises(DictionaryFileError,
                       match=r"layer_2\.safetensors: lacks tensor 'activation_function.threshold'"):
        load_circuit_tracer(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf(tmp_path, bad):
    raw = write_per_layer(tmp_path)
    w_enc = raw[0]["W_enc"].clone()
    w_enc[0, 0] = bad
    save_file(raw[0] | {"W_enc": w_enc}, tmp_path / "layer_0.safetensors")
    with pytest.raises(DictionaryFileError, match=r"layer_0\.safetensors: tensor 'W_enc' contains NaN or infinite"):
        load_circuit_tracer(tmp_path)


def test_negative_threshold(tmp_path):
    raw = write_clt(tmp_path)
    enc = {k: v for k, v in raw[1].items() if k != "W_dec_1"} | {"threshold_1": -torch.ones(D_SAE)}
    save_file(enc, tmp_path / "W_enc_1.safetensors")
    with pytest.raises(DictionaryFileError, match=r"W_enc_1\.safetensors: layer 1 has negative JumpReLU thresholds"):
        load_circuit_tracer(tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    write_clt(tmp_path)
    path = tmp_path / "W_dec_1.safetensors"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DictionaryFileError, match=r"W_dec_1\.safetensors: file is truncated"):
        load_circuit_tracer(tmp_path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"garbage!" * 4)
    with pytest.raises(DictionaryFileError, match=r"W_dec_1\.safetensors: corrupt safetensors header \(not JSON\)"):
        load_circuit_tracer(tmp_path)


def test_empty_directory(tmp_path):
    with pytest.raises(DictionaryFileError, match="no circuit-tracer files"):
        load_circuit_tracer(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_encoder_is_a_transposed_view_of_the_mapped_file(tmp_path):
    write_per_layer(tmp_path)
    dicts = load_circuit_tracer(tmp_path)
    w_enc = dicts.encoder_weight(1)
    assert not w_enc.is_contiguous() and w_enc.shape == (D_MODEL, D_SAE)
    assert mapped_file(w_enc) == str(tmp_path / "layer_1.safetensors")


def test_clt_layers_of_different_widths(tmp_path):
    write_clt(tmp_path)
    save_file({"W_enc_1": torch.randn(8, D_MODEL), "b_enc_1": torch.randn(8), "b_dec_1": torch.randn(D_MODEL),
               "threshold_1": torch.rand(8)}, tmp_path / "W_enc_1.safetensors")
    with pytest.raises(DictionaryFileError, match=r"W_enc_1\.safetensors: layer 1 has d_sae 8 but layer 0 has 24"):
        load_circuit_tracer(tmp_path)


def test_tensors_of_mixed_dtypes_are_refused(tmp_path):
    write_per_layer(tmp_path / "a", dtype=torch.bfloat16)
    write_per_layer(tmp_path / "b")
    (tmp_path / "b" / "layer_2.safetensors").replace(tmp_path / "a" / "layer_2.safetensors")
    with pytest.raises(DictionaryFileError, match=r"layer_2\.safetensors: tensor 'W_enc' is torch.float32 but layer 0"):
        load_circuit_tracer(tmp_path / "a")
