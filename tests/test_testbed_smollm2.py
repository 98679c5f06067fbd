"""The real-model testbed's builder, run on a tiny random Llama written as GGUF: its folder,
full fine-tunes, report, reuse, refusal of other settings, and a stopped build that continues
to the same tensors as an unbroken one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gguf_fixtures import write_tiny_gguf
from safetensors.torch import load_file

from mergekit_sae.errors import TestbedError
from mergekit_sae.testbed import checkpointed
from mergekit_sae.testbed.config import SmolLM2Config, StageConfig
from mergekit_sae.testbed.data import TASKS, task_file
from mergekit_sae.testbed.smollm2 import MODELS, TRAINING, build_smollm2

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None,
        reason='writing a GGUF file needs the gguf package (pip install "mergekit-sae[smollm2]")',
    ),
    pytest.mark.usefixtures("one_thread"),
]


def small_config(gguf, **changes) -> SmolLM2Config:
    """A config that builds in seconds on the tiny model (its experts learn nothing)."""
    stage = StageConfig(steps=4, lr=1e-3, batch_size=2, warmup=1)
    settings = {
        "gguf": gguf,
        "math_train": 12,
        "math_test": 3,
        "max_new_tokens": 8,
        "n_test_countries": 1,
        "n_languages": 1,
        "math_expert": stage,
        "multilingual_expert": stage,
        "checkpoint_every": 1,
    }
    return SmolLM2Config(**{**settings, **changes})


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


@pytest.fixture(scope="module")
def built(gguf, tmp_path_factory):
    """A testbed built in one go, with its report."""
    out = tmp_path_factory.mktemp("smollm2") / "tb"
    return out, build_smollm2(out, small_config(gguf))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_folder_holds_models_data_and_report(built):
    out, report = built
    for name in MODELS:
        assert (out / name / "model.safetensors").is_file()
        assert (out / name / "tokenizer.json").is_file()
        assert (out / name / "chat_template.jinja").is_file()
    for task in TASKS:
        for split in ("train", "test"):
            assert read_jsonl(task_file(out, task, split))
    assert not (out / TRAINING).exists()  # checkpoints go once the experts are saved
    assert json.loads((out / "report.json").read_text()) == report
    assert set(report["accuracy"]) == {*MODELS, "linear_50_50"}
    assert report["quality_passed"] == all(report["quality_checks"].values())
    assert any("base + 0.30" in name for name in report["quality_checks"])
    assert report["tasks"]["math"]["max_new_tokens"] == 8
    assert report["source"]["file"] == "tiny.gguf"
    base = load_file(out / "base" / "model.safetensors")
    assert report["parameters"] == sum(t.numel() for t in base.values())


def test_every_weight_of_each_expert_is_trained(built):
    out, _ = built
    base = load_file(out / "base" / "model.safetensors")
    for name in MODELS[1:]:
        expert = load_file(out / name / "model.safetensors")
        assert expert.keys() == base.keys()
        unchanged = [key for key in base if torch.equal(base[key], expert[key])]
        assert unchanged == [], name


def test_test_questions_are_about_countries_never_trained_on(built):
    out, _ = built
    train = read_jsonl(task_file(out, "multilingual", "train"))
    test = read_jsonl(task_file(out, "multilingual", "test"))
    assert not {i["country"] for i in train} & {i["country"] for i in test}
    for item in train + test:
        assert item["choices"][item["label"]] in item["choices"]
        assert len(set(item["choices"])) == 4
        assert item["country"] in item["prompt"]


def test_second_build_reuses_the_folder(built, gguf):
    out, report = built
    weights = out / "math" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_smollm2(out, small_config(gguf)) == report
    assert weights.stat().st_mtime_ns == before


def test_other_settings_need_force(built, gguf):
    out, _ = built
    with pytest.raises(TestbedError, match="--force"):
        build_smollm2(out, small_config(gguf, seed=1))


def test_stopped_build_continues_to_the_same_experts(built, gguf, tmp_path, monkeypatch):
    out, report = built
    calls = {"n": 0}
    real_step = checkpointed.train_step

    def stop_after_six(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 6:  # the math expert done, the multilingual one half-way
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(checkpointed, "train_step", stop_after_six)
    stopped = tmp_path / "tb"
    with pytest.raises(KeyboardInterrupt):
        build_smollm2(stopped, small_config(gguf))
    assert (stopped / "math" / "model.safetensors").is_file()
    assert not (stopped / "multilingual").exists()
    state = json.loads((stopped / TRAINING / "multilingual" / "state.json").read_text())
    assert state["step"] == 2
    monkeypatch.setattr(checkpointed, "train_step", real_step)
    resumed = build_smollm2(stopped, small_config(gguf))
    for name in MODELS:
        a = load_file(out / name / "model.safetensors")
        b = load_file(stopped / name / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["accuracy"] == report["accuracy"]


def test_cli_builds_the_preset_and_refuses_gguf_for_tiny(gguf, tmp_path):
    from mergekit_sae.cli import main

    config = tmp_path / "small.json"
    config.write_text(small_config(None).model_dump_json(exclude={"gguf"}))
    out = tmp_path / "tb"
    args = ["testbed", "build", "--preset", "smollm2", "--gguf", str(gguf), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "linear_50_50" in result.output and "base + 0.30" in result.output
    info = CliRunner().invoke(main, ["testbed", "info", str(out)])
    assert info.exit_code == 0 and str(out / "multilingual") in info.output
    wrong = CliRunner().invoke(main, ["testbed", "build", "--gguf", str(gguf)])
    assert wrong.exit_code == 2 and "--gguf applies to --preset smollm2 only" in wrong.output


def test_recipe_runs_on_the_built_testbed(built, tmp_path, monkeypatch):
    """recipes/evolve_smollm2.yml, pointed at a built testbed, runs a search to its outputs."""
    import yaml

    from mergekit_sae.cli import main

    out, _ = built
    text = (Path(__file__).parent.parent / "recipes" / "evolve_smollm2.yml").read_text()
    recipe = yaml.safe_load(text.replace("./testbed_smollm2", str(out)))
    assert recipe["prune_target"] == "delta" and recipe["sae"] == {"archive_size": 4}
    recipe |= {"search": "m2n2", "budget": 3, "steps": 1, "test_baselines": []}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["evolve", str(path), str(tmp_path / "run"), "--quiet"])
    assert result.exit_code == 0, result.output
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").open()]
    assert [record["evaluations"] for record in history] == [3]
    assert (tmp_path / "run" / "model.safetensors").is_file()
