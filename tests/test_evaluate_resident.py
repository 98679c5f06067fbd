"""ResidentModel: one model in memory, weights copied in place from state dicts and folders."""

from __future__ import annotations

import json

import pytest
import torch
from evaluate_toy import make_tokenizer, random_llama
from safetensors.torch import save_file

from mergekit_sae.errors import MergekitSaeError
from mergekit_sae.evaluate import ResidentModel, WeightLoadError

PROMPT = torch.tensor([[5, 9, 12, 30, 7, 2]])


def save_model(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path):
    """A resident model of seed 0 and a folder with the weights of seed 1 (same tying)."""
    tie = request.param
    base = save_model(random_llama(0, tie=tie), tmp_path / "base")
    other = save_model(random_llama(1, tie=tie), tmp_path / "other")
    return ResidentModel(base, device="cpu"), other


def test_load_weights_from_folder_equals_fresh_load(pair):
    resident, other = pair
    params_before = {n: p.data_ptr() for n, p in resident.model.named_parameters()}
    resident.load_weights(other)
    fresh = ResidentModel(other, device="cpu").model
    assert torch.equal(logits(resident.model), logits(fresh))
    assert {n: p.data_ptr() for n, p in resident.model.named_parameters()} == params_before


def test_load_weights_from_state_dict_and_sharded_folder(pair, tmp_path):
    resident, other = pair
    fresh = ResidentModel(other, device="cpu").model
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    if fresh.config.tie_word_embeddings:
        del state["lm_head.weight"]  # a tied model needs the tensor under one name only
    resident.load_weights(state)
    assert torch.equal(logits(resident.model), logits(fresh))
    # Shard the same weights in two files with an index, as large checkpoints are saved.
    resident.load_weights({k: torch.zeros_like(v) for k, v in state.items()})
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, folder / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    resident.load_weights(folder)
    assert torch.equal(logits(resident.model), logits(fresh))


def test_load_weights_from_folder_reads_the_files_mergekit_reads(pair):
    """A stray safetensors file beside model.safetensors (an adapter, say) is not read, as
    MergeKit's loader does not read it; a shard index naming a missing shard is refused."""
    resident, other = pair
    save_file({"stray.weight": torch.ones(3)}, other / "adapter.safetensors")
    resident.load_weights(other)
    assert torch.equal(logits(resident.model), logits(ResidentModel(other, device="cpu").model))
    (other / "model.safetensors").rename(other / "part-1.safetensors")
    (other / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "part-2.safetensors"}})
    )
    with pytest.raises(MergekitSaeError, match="names shard part-2.safetensors, which is missing"):
        resident.load_weights(other)


def test_load_weights_casts_to_the_resident_dtype(tmp_path):
    path = save_model(random_llama(0), tmp_path / "m")
    resident = ResidentModel(path, device="cpu", dtype="bfloat16")
    source = random_llama(1).state_dict()
    resident.load_weights(source)
    for name, tensor in resident.model.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, source[name].to(torch.bfloat16))


def test_load_weights_errors_name_the_tensor_and_leave_model_unchanged(tmp_path):
    resident = ResidentModel(save_model(random_llama(0), tmp_path / "m"), device="cpu")
    before = logits(resident.model)
    good = {k: v + 1 for k, v in random_llama(1).state_dict().items()}

    bad_shape = {**good, "model.norm.weight": torch.ones(7)}
    with pytest.raises(WeightLoadError, match=r"model\.norm\.weight has shape \(7,\).*\(32,\)"):
        resident.load_weights(bad_shape)
    missing = {k: v for k, v in good.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(WeightLoadError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        resident.load_weights(missing)
    with pytest.raises(WeightLoadError, match=r"does not have: model\.extra\.weight"):
        resident.load_weights({**good, "model.extra.weight": torch.ones(2)})
    with pytest.raises(WeightLoadError, match="holds no safetensors"):
        resident.load_weights(tmp_path)
    assert torch.equal(logits(resident.model), before)


def test_tied_aliases_must_agree(tmp_path):
    resident = ResidentModel(save_model(random_llama(0, tie=True), tmp_path / "m"), device="cpu")
    state = dict(random_llama(1, tie=True).state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(WeightLoadError, match="tied in the model but differ"):
        resident.load_weights(state)
