"""The NaN/inf scan of dictionary files runs once per version of a file (dictionaries/verified_files.py).

The scan is counted through ``torch.isfinite`` (the elements it is given), so these tests measure how many weights
a load reads for the check, whatever function runs it.
"""

from __future__ import annotations

import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch

from dictionaries.assembly import random_dictionary_set
from dictionaries.errors import DictionaryFileError
from dictionaries.formats.circuit_tracer import save_circuit_tracer
from dictionaries.formats.gemma_scope_2 import save_gemma_scope_2
from dictionaries.formats.native import layer_file, save_native
from dictionaries.formats.registry import load_dictionaries
from dictionaries.safetensors_io import read_header, write_tensors

N_LAYERS, D_MODEL, WIDTH = 3, 16, 24


@pytest.fixture
def scanned(monkeypatch) -> list[int]:
    """The number of elements each call of torch.isfinite saw (the scan's reads)."""
    counts: list[int] = []
    real = torch.isfinite

    def counting(tensor: torch.Tensor) -> torch.Tensor:
        counts.append(tensor.numel())
        return real(tensor)

    monkeypatch.setattr(torch, "isfinite", counting)
    return counts


@pytest.fixture
def record(tmp_path, monkeypatch) -> Path:
    """A record of this test only."""
    path = tmp_path / "record" / "verified_files.json"
    monkeypatch.setenv("CIRCUITSCOPE_VERIFIED_FILES", str(path))
    return path


def _age(directory: Path, seconds: float = 60.0) -> None:
    """Set every file's times ``seconds`` into the past (a freshly written file is not recorded)."""
    past = time.time_ns() - int(seconds * 1e9)
    for path in directory.rglob("*"):
        if path.is_file():
            os.utime(path, ns=(past, past))


def _elements(dicts, layers=None) -> int:
    """The weights the scan reads: every tensor of the native layout of ``layers`` (default: all)."""
    layers = range(dicts.n_layers) if layers is None else layers
    return sum(t.numel() for layer in layers for t in dicts.layer_tensors(layer).values())


def _write(tmp_path: Path, layout: str) -> Path:
    architecture = "cross-layer" if layout.endswith("clt") else "per-layer"
    dicts = random_dictionary_set(N_LAYERS, D_MODEL, WIDTH, architecture=architecture, skip=True, seed=3)
    save = {"native": save_native, "gs2": save_gemma_scope_2, "gs2-clt": save_gemma_scope_2,
            "ct-clt": save_circuit_tracer}[layout]
    directory = save(dicts, tmp_path / layout)
    _age(directory)
    return directory


def _load(directory: Path, scanned: list[int]):
    """Load ``directory``; returns (the set, the elements scanned by this load)."""
    before = sum(scanned)
    dicts = load_dictionaries(directory)
    return dicts, sum(scanned) - before


@pytest.mark.parametrize("layout", ["native", "gs2", "gs2-clt", "ct-clt"])
def test_a_set_is_scanned_once(tmp_path, record, scanned, layout):
    directory = _write(tmp_path, layout)
    dicts, first = _load(directory, scanned)
    assert first == _elements(dicts) > 0
    again, second = _load(directory, scanned)
    assert second == 0  # nothing read for the check
    earlier_decoder_scans = N_LAYERS - 1 if layout == "gs2-clt" else 0  # layers 1.. of a Gemma Scope 2 CLT
    assert len(json.loads(record.read_text())["entries"]) == N_LAYERS + earlier_decoder_scans
    for layer in range(N_LAYERS):
        for name, tensor in again.layer_tensors(layer).items():
            assert torch.equal(tensor, dicts.layer_tensors(layer)[name])


@pytest.mark.parametrize(("layout", "touched"), [("native", "layer_1.safetensors"),
                                                 ("ct-clt", "W_dec_1.safetensors")])
def test_a_touched_file_is_scanned_again(tmp_path, record, scanned, layout, touched):
    """A new mtime rescans the layer that file belongs to (for a circuit-tracer CLT, its decoder file too)."""
    directory = _write(tmp_path, layout)
    dicts, _ = _load(directory, scanned)
    past = time.time_ns() - 30 * 10**9
    os.utime(directory / touched, ns=(past, past))
    assert _load(directory, scanned)[1] == _elements(dicts, [1])
    assert _load(directory, scanned)[1] == 0


def test_a_freshly_written_file_is_not_recorded(tmp_path, record, scanned):
    """A file modified within RACY_SECONDS of its scan could change again in the same clock tick unseen."""
    directory = save_native(random_dictionary_set(N_LAYERS, D_MODEL, WIDTH, seed=3), tmp_path / "fresh")
    dicts, first = _load(directory, scanned)
    assert first == _load(directory, scanned)[1] == _elements(dicts)


def _nan_into_w_dec(path: Path) -> None:
    """Overwrite one float of W_dec in place (same size, same inode), then restore the file's times."""
    header, _, data_start = read_header(path)
    before = path.stat()
    with path.open("r+b") as fh:
        fh.seek(data_start + header["W_dec"]["data_offsets"][0] + 4 * 5)
        fh.write(struct.pack("<f", float("nan")))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_a_nan_is_found_on_first_load_and_after_a_change(tmp_path, record, scanned):
    directory = _write(tmp_path, "native")
    bad = directory / layer_file(2)
    tensors = {k: v.clone() for k, v in load_dictionaries(directory).layer_tensors(2).items()}  # records all
    tensors["W_dec"][0, 0] = float("inf")
    write_tensors(bad, tensors)
    _age(directory)
    with pytest.raises(DictionaryFileError, match=r"layer_2\.safetensors: tensor 'W_dec' contains NaN or infinite"):
        load_dictionaries(directory)

    directory = _write(tmp_path / "second", "native")
    _load(directory, scanned)
    assert _load(directory, scanned)[1] == 0  # recorded clean
    _nan_into_w_dec(directory / layer_file(2))  # the same size and mtime: the ctime tells
    with pytest.raises(DictionaryFileError, match=r"layer_2\.safetensors: tensor 'W_dec' contains NaN or infinite"):
        load_dictionaries(directory)
    with pytest.raises(DictionaryFileError, match="contains NaN or infinite"):
        load_dictionaries(directory)  # a failed scan is never recorded


def test_an_unwritable_or_corrupt_record_never_fails_a_load(tmp_path, monkeypatch, scanned):
    directory = _write(tmp_path, "native")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CIRCUITSCOPE_VERIFIED_FILES", str(blocker / "verified_files.json"))
    dicts, first = _load(directory, scanned)
    assert first == _load(directory, scanned)[1] == _elements(dicts)  # nothing recorded: scanned each time

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{not json")
    monkeypatch.setenv("CIRCUITSCOPE_VERIFIED_FILES", str(corrupt))
    assert _load(directory, scanned)[1] == _elements(dicts)
    assert len(json.loads(corrupt.read_text())["entries"]) == N_LAYERS
    assert _load(directory, scanned)[1] == 0


def test_the_record_lives_in_the_circuitscope_cache(tmp_path, monkeypatch):
    from dictionaries.verified_files import record_path

    monkeypatch.delenv("CIRCUITSCOPE_VERIFIED_FILES")
    monkeypatch.setenv("CIRCUITSCOPE_CACHE", str(tmp_path))
    assert record_path() == tmp_path / "verified_files.json"


def test_a_clt_files_scan_for_decoders_to_earlier_layers_is_recorded_with_its_result(tmp_path, record, monkeypatch):
    """The scan of a CLT file's w_dec before its source layer (half of a 262k CLT's 217 GB) runs once per file
    version; later loads read its result, so the warning about non-zero earlier decoders is still given."""
    import warnings

    from test_gemma_scope_2 import write_clt

    from dictionaries.formats import gemma_scope_2

    write_clt(tmp_path / "clt", earlier=True)
    _age(tmp_path / "clt")
    scans: list[int] = []
    real = gemma_scope_2._any_nonzero
    monkeypatch.setattr(gemma_scope_2, "_any_nonzero", lambda t: scans.append(t.numel()) or real(t))
    for expected_scans in (2, 2):  # layers 1 and 2 have earlier decoders; the second load scans nothing
        with pytest.warns(UserWarning, match="non-zero decoders to layers before the source layer"):
            gemma_scope_2.load_gemma_scope_2(tmp_path / "clt")
        assert len(scans) == expected_scans
    write_clt(tmp_path / "clean")  # zero earlier decoders: recorded as False, no warning on either load
    _age(tmp_path / "clean")
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gemma_scope_2.load_gemma_scope_2(tmp_path / "clean")
    assert len(scans) == 4


def test_the_finite_scan_of_a_strided_view_copies_no_more_than_a_block(monkeypatch):
    """A CLT's decoders from the source layer on are a strided view of the file's mapping; the scan reads it in
    slices (it flattened it before: a 12 GB copy on a 262k CLT), and still finds a NaN anywhere in it."""
    from dictionaries.errors import DictionaryFileError
    from dictionaries.safetensors_io import check_finite

    whole = torch.zeros(64, 5, 8)
    view = whole[:, 2:, :]  # not contiguous
    seen: list[int] = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real(t))
    check_finite("x", {"W_dec": view}, block=48)
    assert sum(seen) == view.numel() and max(seen) <= 48
    view[63, 2, 7] = float("nan")
    with pytest.raises(DictionaryFileError, match="NaN"):
        check_finite("x", {"W_dec": view}, block=48)
