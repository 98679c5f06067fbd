"""Scale features of the driver that need no Ray: read-ahead, executor settings, profile,
device choice, and the CUDA path (skipped without a GPU)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch
from evolve_fixtures import FakeEvaluator, assert_identical, tiny_llama

from mergekit_sae.driver.context import RunContext
from mergekit_sae.driver.loop import evolve
from mergekit_sae.driver.ray_executor import import_ray, split_wall
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate import device as device_module
from mergekit_sae.merging import stream as merging
from mergekit_sae.methods.sae_evolve import sae_merge
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.records import MergeInput, MergeRecord

pytestmark = pytest.mark.usefixtures("one_thread")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("scale")
    return [tiny_llama(root / "p0", 40), tiny_llama(root / "p1", 41), tiny_llama(root / "b", 42)]


def offspring(prune_target: str = "weights") -> MergeRecord:
    return MergeRecord(
        method="sae_evolve",
        inputs=[
            MergeInput(member="m0", parameters={"score": 0.7, "density": 0.6}),
            MergeInput(member="m1", parameters={"score": 0.3, "density": 0.8}),
        ],
        base_model="base" if prune_target == "delta" else None,
        parameters={"sparsity_weight": 0.5, "prune_target": prune_target, "offspring_density": 0.7},
        dtype="bfloat16",
    )


@pytest.mark.parametrize("target", ["weights", "delta"])
def test_read_ahead_gives_the_same_tensors(tmp_path: Path, parents, monkeypatch, target) -> None:
    base = parents[2] if target == "delta" else None
    outcomes = {}
    for prefetch in (False, True):
        monkeypatch.setattr(merging, "PREFETCH", prefetch)
        received: dict[str, torch.Tensor] = {}
        outcomes[prefetch] = (
            merging.stream_merge(
                offspring(target),
                parents[:2],
                base,
                tmp_path / str(prefetch),
                sink=lambda name, t, seen=received: seen.__setitem__(name, t.clone()),
            ),
            received,
        )
    assert_identical(tmp_path / "False", tmp_path / "True")
    assert outcomes[True][0].stats == outcomes[False][0].stats
    plain, ahead = outcomes[False][1], outcomes[True][1]
    assert list(plain) == list(ahead)  # same tensors, same order
    assert all(torch.equal(plain[n].view(torch.int16), ahead[n].view(torch.int16)) for n in plain)


def test_read_ahead_yields_every_name_once_in_order(parents) -> None:
    loaders = [merging.open_model(p) for p in parents[:2]]
    names = merging.tensor_names(loaders, parents[:2])
    read = list(merging.read_ahead(loaders, names, "cpu"))
    assert len(read) == len(names)
    for name, tensors in zip(names, read, strict=True):
        assert torch.equal(tensors[1], loaders[1].get_tensor(name))
    assert list(merging.read_ahead(loaders, [], "cpu")) == []


@pytest.mark.parametrize("limit", [1, 3000, 10**12])
def test_reads_close_the_shard_past_the_mapped_limit(parents, monkeypatch, limit) -> None:
    """A shard is closed once ``MAPPED_LIMIT`` bytes were read from it (its mapped pages would
    stay in RSS), and the tensors are the loader's own."""
    monkeypatch.setattr(merging, "MAPPED_LIMIT", limit)
    loader, reference = merging.open_model(parents[0]), merging.open_model(parents[0])
    since_open = 0
    for name in loader.index.tensor_paths:
        expected = reference.get_tensor(name)
        assert torch.equal(merging.read_tensor(loader, name), expected)
        since_open += expected.numel() * expected.element_size()
        closed = since_open >= limit
        assert (loader.current_shard is None) == closed
        since_open = 0 if closed else since_open
    assert reference.current_shard is not None  # MergeKit's loader alone keeps it open


def recipe(parents, **overrides):
    data = {
        "models": [str(p) for p in parents[:2]],
        "tasks": [{"name": "a", "type": "lm_eval"}, {"name": "b", "type": "lm_eval"}],
        "steps": 2,
        "sae": {"archive_size": 4, "children_per_step": 2},
        "dtype": "float32",
        **overrides,
    }
    return parse_recipe(data)


def test_executor_settings(parents) -> None:
    assert recipe(parents).executor.kind == "serial"
    settings = recipe(parents, executor="ray").executor
    assert (settings.kind, settings.transfer, settings.workers) == ("ray", "path", None)
    full = {"kind": "ray", "address": "auto", "workers": 3, "gpus_per_worker": 1}
    assert recipe(parents, executor=full).executor.gpus_per_worker == 1.0
    with pytest.raises(RecipeError, match="executor"):
        recipe(parents, executor={"kind": "dask"})
    with pytest.raises(RecipeError, match="executor.workers"):
        recipe(parents, executor={"kind": "ray", "workers": 0})
    # where scoring runs is not part of the run's identity: a resume may change it
    assert "executor" not in recipe(parents, executor="ray").digest_fields()


def test_ray_missing_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RecipeError, match=r"pip install \"mergekit-sae\[ray\]\""):
        import_ray()


@pytest.mark.parametrize("profile", [False, True])
def test_profile_adds_memory_and_load_split(tmp_path: Path, parents, profile: bool) -> None:
    ctx = RunContext(
        recipe=recipe(parents, profile=profile),
        out=tmp_path,
        models=list(parents[:2]),
        base=None,
        evaluator=FakeEvaluator(),
        progress=False,
    )
    state = evolve(ctx)
    for record in state.history:
        assert set(record.seconds) == {"merge", "write", "load", "score"}
        assert record.seconds["load"] > 0  # merged tensors copied into the scorer
        assert ("profile" in record.info) is profile
        if profile:
            info = record.info["profile"]
            assert info["peak_rss_mib"] >= info["rss_mib"] > 0
            assert info["models_scored"] == len(record.offspring)


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available.*use device: auto or cpu"):
        device_module.resolve_device("cuda")


def test_auto_without_a_gpu_says_so_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_module, "_said_cpu_fallback", False)
    with caplog.at_level(logging.WARNING, logger=device_module.__name__):
        assert device_module.resolve_device("auto")[0] == torch.device("cpu")
        device_module.resolve_device("auto")
    lines = [r.getMessage() for r in caplog.records if r.name == device_module.__name__]
    assert lines == ["device auto: no CUDA GPU found, merging and scoring on the CPU"]


def test_no_batch_sizing_on_cpu() -> None:
    model = torch.nn.Linear(4, 4)
    assert device_module.fitting_batch_size(model, torch.device("cpu")) is None


@cuda
def test_sae_merge_on_cuda_matches_cpu_in_bfloat16() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3000, 700, generator=generator).to(torch.bfloat16) for _ in range(3)]
    options = {"densities": [0.5, 0.7], "offspring_density": 0.6, "prune_target": "delta"}
    cpu = sae_merge(tensors[:2], [0.6, 0.4], base=tensors[2], **options)
    gpu = sae_merge([t.cuda() for t in tensors[:2]], [0.6, 0.4], base=tensors[2].cuda(), **options)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bfloat16
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=1e-2, rtol=1e-2)


@cuda
def test_fitting_batch_size_on_cuda() -> None:
    model = torch.nn.Linear(64, 64).cuda()
    size = device_module.fitting_batch_size(model, torch.device("cuda"))
    assert size is not None and 1 <= size <= 256


def test_split_wall_shares_the_parallel_wall_time() -> None:
    # 2 actors: 1 s + 3 s loading, 2 s + 2 s scoring, in 5 s of wall time: 4/8 of it loading
    assert split_wall(5.0, 4.0, 4.0) == (2.5, 2.5)
    assert split_wall(6.0, 1.0, 2.0) == (2.0, 4.0)
    assert split_wall(3.0, 0.0, 0.0) == (0.0, 3.0)
