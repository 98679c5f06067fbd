"""The testbed builder with a very small config: loadable models, valid splits, report, cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergekit_sae.testbed.build import MODELS, TestbedError, build_testbed, load_report
from mergekit_sae.testbed.config import TestbedConfig
from mergekit_sae.testbed.data import TASKS, task_file

EQUATION = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A testbed built with the very small config."""
    out = tmp_path_factory.mktemp("testbed") / "tb"
    build_testbed(out, TestbedConfig.tiny())
    return out


def read_jsonl(path):
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("name", MODELS)
def test_models_load_and_generate(root, name):
    tokenizer = AutoTokenizer.from_pretrained(root / name)
    model = AutoModelForCausalLM.from_pretrained(root / name)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer)
    prompt = tokenizer("tom has 3 apples .", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert torch.equal(out[0, : prompt["input_ids"].shape[1]], prompt["input_ids"][0])
    assert int(out.max()) < len(tokenizer)


def test_splits_follow_the_schema(root):
    for task, (_, required) in TASKS.items():
        for split in ("train", "test"):
            items = read_jsonl(task_file(root, task, split))
            assert items, (task, split)
            for item in items:
                assert set(required) <= set(item)
                assert isinstance(item["prompt"], str) and item["prompt"]
                if task == "multilingual":
                    assert len(item["choices"]) == TestbedConfig.tiny().n_choices
                    assert len(set(item["choices"])) == len(item["choices"])
                    assert 0 <= item["label"] < len(item["choices"])


def test_train_and_test_are_disjoint(root):
    for task in TASKS:
        train = {i["prompt"] for i in read_jsonl(task_file(root, task, "train"))}
        test = {i["prompt"] for i in read_jsonl(task_file(root, task, "test"))}
        assert not train & test
    ml_train = {i["country"] for i in read_jsonl(task_file(root, "multilingual", "train"))}
    ml_test = {i["country"] for i in read_jsonl(task_file(root, "multilingual", "test"))}
    assert not ml_train & ml_test


def test_math_answers_follow_from_the_prompt(root):
    for item in read_jsonl(task_file(root, "math", "test")):
        numbers = [int(n) for n in re.findall(r"\d+", item["prompt"])]
        steps = EQUATION.findall(item["solution"])
        assert len(steps) == 2
        (a, op1, b, x), (x2, op2, c, y) = steps
        assert [int(a), int(b), int(c)] == numbers
        assert x == x2
        assert int(x) == (int(a) + int(b) if op1 == "+" else int(a) - int(b))
        assert int(y) == (int(x) + int(c) if op2 == "+" else int(x) - int(c))
        assert item["answer"] == y
        assert item["solution"].endswith(f"#### {y}")


def test_multilingual_questions_share_facts_across_languages(root):
    items = read_jsonl(task_file(root, "multilingual", "test"))
    answers = {}
    for item in items:
        key = (item["country"], item["relation"])
        answers.setdefault(key, set()).add(item["language"])
        assert item["country"] in item["prompt"].split()
    languages = {i["language"] for i in items}
    assert len(languages) == TestbedConfig.tiny().n_languages
    assert all(langs == languages for langs in answers.values())


def test_report_holds_the_quality_table(root):
    report = load_report(root)
    rows = {*MODELS, "linear_50_50"}
    assert rows <= set(report["accuracy"])
    for scores in report["accuracy"].values():
        assert set(scores) == set(TASKS)
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert report["quality_passed"] == all(report["quality_checks"].values())
    for spec in report["tasks"].values():
        assert (root / spec["test"]).is_file()


def test_linear_merge_row_is_the_average_of_the_experts(root):
    from mergekit_sae.testbed.merges import static_merge

    experts = {m: AutoModelForCausalLM.from_pretrained(root / m) for m in MODELS[1:]}
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    merged = static_merge("linear_50_50", base, experts)
    a, b = (load_file(root / m / "model.safetensors") for m in MODELS[1:])
    for key, tensor in a.items():
        torch.testing.assert_close(merged[key], (tensor + b[key]) / 2)


def test_second_build_reuses_the_folder(root):
    weights = root / "base" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    report = build_testbed(root, TestbedConfig.tiny())
    assert weights.stat().st_mtime_ns == before
    assert report == load_report(root)


def test_other_settings_need_force(root, tmp_path):
    with pytest.raises(TestbedError, match="--force"):
        build_testbed(root, TestbedConfig.tiny(seed=1))
    (tmp_path / "junk").mkdir()
    with pytest.raises(TestbedError, match="--force"):
        build_testbed(tmp_path / "junk", TestbedConfig.tiny())


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    import mergekit_sae.testbed.build as build_module

    def broken(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(build_module, "finetune_math", broken)
    with pytest.raises(RuntimeError, match="stop here"):
        build_testbed(tmp_path / "tb", TestbedConfig.tiny())
    assert list(tmp_path.iterdir()) == []


def test_cli_build_then_info(tmp_path):
    from mergekit_sae.cli import main
    from mergekit_sae.cli.testbed import testbed

    config = tmp_path / "tiny.json"
    config.write_text(TestbedConfig.tiny().model_dump_json())
    out = tmp_path / "tb"
    runner = CliRunner()
    first = runner.invoke(testbed, ["build", "--out", str(out), "--config", str(config), "--quiet"])
    assert first.exit_code == 0, first.output
    assert "linear_50_50" in first.output
    second = runner.invoke(testbed, ["build", "--out", str(out), "--config", str(config)])
    assert second.exit_code == 0, second.output
    assert "already built" in second.output
    info = runner.invoke(testbed, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "multilingual" in info.output and str(out / "math") in info.output
    missing = runner.invoke(main, ["testbed", "info", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "report.json is missing" in missing.output


def test_bad_config_file_is_named(tmp_path):
    from mergekit_sae.cli import main

    config = tmp_path / "bad.yml"
    config.write_text("hidden_size: 30\nnum_heads: 4\n")
    result = CliRunner().invoke(main, ["testbed", "build", "--config", str(config)])
    assert result.exit_code == 1 and result.output.startswith("error: testbed config")
    assert "bad.yml" in result.output and "divisible" in result.output


SHIPPED_CONFIGS = sorted((Path(__file__).parent.parent / "recipes").glob("pair*/testbed.yml"))


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.parent.name)
def test_shipped_pair_configs_load_as_written(path):
    """Each pair's testbed.yml is a valid TestbedConfig whose fields are the file's values."""
    from mergekit_sae.testbed.config import load_config

    written = yaml.safe_load(path.read_text(encoding="utf-8"))
    config = load_config(path)
    assert written and {k: getattr(config, k) for k in written} == written


def test_mergekit_merges_the_experts(root, tmp_path):
    """A plain MergeKit linear recipe over the experts gives their average, with a tokenizer."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(root / m), "parameters": {"weight": 0.5}} for m in MODELS[1:]],
        "dtype": "float32",
    }
    out = tmp_path / "merged"
    run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(quiet=True))
    merged = load_file(out / "model.safetensors")
    a, b = (load_file(root / m / "model.safetensors") for m in MODELS[1:])
    assert merged.keys() == a.keys()
    for key, tensor in a.items():
        torch.testing.assert_close(merged[key], (tensor + b[key]) / 2)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        tokenizer("7 + 5")["input_ids"]
        == AutoTokenizer.from_pretrained(root / "math")("7 + 5")["input_ids"]
    )
