"""Text sources, packing, model samples, harvesting, the shuffling blocks and the activation cache."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from training_helpers import fast_config

import dictionaries.training.harvest as harvest_module
from dictionaries.errors import CircuitscopeError
from dictionaries.models.hook_sites import record_mlp_io
from dictionaries.safetensors_io import read_tensors
from dictionaries.training import train
from dictionaries.training.data import (
    HELDOUT_EVERY,
    DataSpec,
    hub_documents,
    open_context_source,
    parse_data_spec,
    sample_from_model,
)
from dictionaries.training.harvest import (
    ShardCache,
    block_permutation,
    harvest,
    normalising_scales,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def test_data_specs(tmp_path, text_file):
    assert parse_data_spec("model") == DataSpec("model")
    assert parse_data_spec(str(text_file)) == DataSpec("file", str(text_file))
    assert parse_data_spec("hf://HuggingFaceFW/fineweb:sample-10BT@train") == DataSpec(
        "hub", "HuggingFaceFW/fineweb", "sample-10BT", "train")
    assert parse_data_spec("Salesforce/wikitext") == DataSpec("hub", "Salesforce/wikitext", None, "train")
    for missing in ("data/train.txt", "./corpus", str(tmp_path / "none.jsonl")):
        with pytest.raises(CircuitscopeError, match="no such file or directory"):
            parse_data_spec(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CircuitscopeError, match="holds no"):
        parse_data_spec(str(tmp_path / "empty"))


def test_hub_dataset_without_datasets_package_says_what_to_do(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CircuitscopeError, match=r"needs the `datasets` package .* or --data model"):
        next(hub_documents(DataSpec("hub", "owner/name")))


def test_hub_datasets_stream_through_the_datasets_package(tiny_lm, monkeypatch):
    import sys
    import types

    calls = []

    def load_dataset(name, config_name, split, streaming):
        calls.append((name, config_name, split, streaming))
        if name == "owner/offline":
            raise ConnectionError("hub unreachable")
        return iter([{"text": "the cat was in the tree"}] * 40)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    source = open_context_source(parse_data_spec("hf://owner/corpus:en@validation"), tiny_lm, 4, "train", 0)
    assert source.contexts(0, 2).shape == (2, 4) and calls[0] == ("owner/corpus", "en", "validation", True)
    with pytest.raises(CircuitscopeError, match=r"cannot open the dataset on the Hugging Face hub \(ConnectionError"):
        next(hub_documents(DataSpec("hub", "owner/offline")))


def test_packing_text_files(tiny_lm, tmp_path):
    (tmp_path / "a.txt").write_text("the cat\n\nthe dog was in the tree\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "one two three"}) + "\n\n" + json.dumps({"text": "red"}) + "\n"
    )
    source = open_context_source(parse_data_spec(str(tmp_path)), tiny_lm, 4, "train", 0)
    tok = tiny_lm.tokenizer
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stream = ids("the cat") + [1] + ids("the dog was in the tree") + [1] + ids("one two three") + [1] + ids("red") + [1]
    contexts = source.contexts(0, 4)
    assert contexts.shape == (4, 4) and (contexts[:, 0] == tok.bos_token_id).all()
    assert contexts[:, 1:].reshape(-1).tolist()[:12] == stream[:12]
    assert torch.equal(source.contexts(2, 2), contexts[2:])  # random access = sequential
    assert torch.equal(source.contexts(1, 1), contexts[1:2])  # and backwards
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(CircuitscopeError, match=r'bad.jsonl:1: no "text" field'):
        open_context_source(parse_data_spec(str(tmp_path / "bad.jsonl")), tiny_lm, 4, "train", 0).contexts(0, 1)


def test_held_out_contexts_are_never_trained_on_and_text_cycles(tiny_lm, text_file):
    spec = parse_data_spec(str(text_file))
    train_source = open_context_source(spec, tiny_lm, 16, "train", 0)
    heldout = open_context_source(spec, tiny_lm, 16, "heldout", 0)
    everything = open_context_source(spec, tiny_lm, 16, "train", 0)._packed()
    packed = [tuple(c) for c in everything]
    n_train = len(packed) - len(packed) // HELDOUT_EVERY
    train_rows = {tuple(r) for r in train_source.contexts(0, n_train).tolist()}
    heldout_rows = {tuple(r) for r in heldout.contexts(0, len(packed) // HELDOUT_EVERY).tolist()}
    assert heldout_rows == {packed[i] for i in range(HELDOUT_EVERY - 1, len(packed), HELDOUT_EVERY)}
    assert not train_rows & heldout_rows
    assert torch.equal(train_source.contexts(n_train, 3), train_source.contexts(0, 3))  # second epoch


def test_model_samples_are_reproducible_and_never_bos(tiny_lm):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = sample_from_model(tiny_lm, 3, 10, seed=5)
    assert not [w for w in caught if "past_key_values" in str(w.message)]  # the KV cache by its current name
    assert a.shape == (3, 10) and torch.equal(a, sample_from_model(tiny_lm, 3, 10, seed=5))
    assert (a[:, 0] == 2).all() and not (a[:, 1:] == 2).any() and not (a[:, 1:] == 0).any()
    assert not torch.equal(a, sample_from_model(tiny_lm, 3, 10, seed=6))
    source = open_context_source(DataSpec("model"), tiny_lm, 8, "train", 0)
    both = source.contexts(30, 4)  # spans two sampling batches
    assert torch.equal(both[:2], source.contexts(30, 2)) and torch.equal(both[2:], source.contexts(32, 2))
    heldout = open_context_source(DataSpec("model"), tiny_lm, 8, "heldout", 0)
    assert not torch.equal(heldout.contexts(0, 4), source.contexts(0, 4))


def test_harvest_keeps_every_layer_without_bos(tiny_lm):
    contexts = torch.tensor([[2, 10, 11, 12, 13], [2, 20, 21, 22, 23], [2, 7, 8, 9, 10]])
    acts = harvest(tiny_lm, contexts, [1, 3], batch_size=2)
    rec = record_mlp_io(tiny_lm, contexts, with_logits=False)
    assert acts.shape == (2, 2, 12, 32)
    torch.testing.assert_close(acts[0, 1].reshape(3, 4, 32), rec.inputs[3][:, 1:])
    torch.testing.assert_close(acts[1, 0].reshape(3, 4, 32), rec.outputs[1][:, 1:])
    in_scale, out_scale = normalising_scales(acts)
    for scale, side in ((in_scale, 0), (out_scale, 1)):
        mean_sq = (acts[side] * scale.view(-1, 1, 1)).pow(2).sum(-1).mean(-1)
        torch.testing.assert_close(mean_sq, torch.full((2,), 32.0))


def test_block_permutation_is_a_pure_function_of_seed_and_block():
    a = block_permutation(0, 3, 100, 60)
    assert torch.equal(a, block_permutation(0, 3, 100, 60)) and len(set(a.tolist())) == 60
    assert not torch.equal(a, block_permutation(0, 4, 100, 60))
    assert not torch.equal(a, block_permutation(1, 3, 100, 60))


def test_cache_is_reused_and_gives_the_same_run(tiny_lm, tiny_checkpoint_dir, text_file, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = fast_config(tiny_checkpoint_dir, text_file, tmp_path / "a", cache_dir=cache, tokens=2048)
    train(first, tiny_lm)
    shards = sorted(p.name for p in cache.iterdir())
    assert shards == ["block_0.safetensors", "block_1.safetensors", "manifest.json"]
    assert read_tensors(cache / "block_0.safetensors")["inputs"].shape[:2] == (4, 69 * 15)

    def no_model(*args, **kwargs):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(harvest_module, "harvest", no_model)
    train(first.model_copy(update={"out": tmp_path / "b"}), tiny_lm)
    for layer in range(4):
        a, b = (read_tensors(tmp_path / d / f"layer_{layer}.safetensors") for d in ("a", "b"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CircuitscopeError, match=r"holds activations of another harvest \(different context_length"):
        ShardCache(cache, {**json.loads((cache / "manifest.json").read_text()), "context_length": 64})
