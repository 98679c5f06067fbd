"""The same seed builds identical data and tensors; another seed builds different ones."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mergekit_sae.testbed.build import MODELS, build_testbed
from mergekit_sae.testbed.config import TestbedConfig
from mergekit_sae.testbed.data import TASKS, make_data, task_file


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Two testbeds from seed 0 and one from seed 1, each built in its own folder."""
    root = tmp_path_factory.mktemp("determinism")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_testbed(root / name, TestbedConfig.tiny(seed=seed))
    return root


def test_same_seed_same_tensors(builds):
    for model in MODELS:
        a = load_file(builds / "a" / model / "model.safetensors")
        b = load_file(builds / "b" / model / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (model, key)


def test_same_seed_same_data(builds):
    for task in TASKS:
        for split in ("train", "test"):
            a = task_file(builds / "a", task, split).read_bytes()
            assert a == task_file(builds / "b", task, split).read_bytes()


def test_other_seed_other_data_and_tensors(builds):
    assert (
        task_file(builds / "a", "math", "train").read_bytes()
        != task_file(builds / "c", "math", "train").read_bytes()
    )
    a = load_file(builds / "a" / "math" / "model.safetensors")
    c = load_file(builds / "c" / "math" / "model.safetensors")
    assert any(a[k].shape != c[k].shape or not torch.equal(a[k], c[k]) for k in a)


def test_finetuning_copies_the_base_and_leaves_it_untouched():
    from mergekit_sae.testbed.models import finetune_math, pretrain_base

    config = TestbedConfig.tiny()
    data = make_data(config)
    base = pretrain_base(config, data)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    expert = finetune_math(config, data, base)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in expert.state_dict().items())
