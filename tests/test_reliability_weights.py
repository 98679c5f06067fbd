"""Truncated, corrupt and pickle weight files: one line naming the file (driver and MergeKit)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from evolve_fixtures import assert_identical, load_weights, tiny_llama
from method_fixtures import run_cli
from safetensors import safe_open

from mergekit_sae.cli import main
from mergekit_sae.errors import MergeInputError
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import resolve_inputs
from mergekit_sae.weight_files import check_model_files, check_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    good = {name: tiny_llama(root / name, seed) for seed, name in enumerate("ab")}
    truncated = tiny_llama(root / "truncated", 5)
    path = truncated / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    pickled = tiny_llama(root / "pickled", 1)  # the same weights as b, as a pickle
    torch.save(load_weights(pickled), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return {**good, "truncated": truncated, "pickled": pickled}


def header_of(path: Path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return length, json.loads(raw[8 : 8 + length])


def test_header_check_agrees_with_safetensors(models, tmp_path: Path) -> None:
    path = models["a"] / "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(check_safetensors(path)) == sorted(handle.keys())
    length, header = header_of(path)
    raw = path.read_bytes()
    cases = {
        "short": (raw[:5], "too short"),
        "truncated": (raw[:-1], "truncated"),
        "longer": (raw + b"\0", "longer than its header says"),
        "length": (struct.pack("<Q", len(raw)) + raw[8:], "does not fit"),
        "json": (raw[:8] + b"{" * length + raw[8 + length :], "not valid JSON"),
    }
    name = next(k for k in header if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end - 4]
    text = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(text) == length
    cases["entry"] = (raw[:8] + text + raw[8 + length :], f"tensor {name!r}")
    for label, (data, message) in cases.items():
        bad = tmp_path / label / "model.safetensors"
        bad.parent.mkdir()
        bad.write_bytes(data)
        with pytest.raises(MergeInputError, match=message) as caught:
            check_model_files(bad.parent)
        assert str(bad) in str(caught.value) and caught.value.file == str(bad)


def recipe_for(models, first: str) -> dict:
    return {
        "models": [str(models[first]), str(models["a"])],
        "tasks": [{"name": "t", "type": "lm_eval"}],
        "device": "cpu",
    }


def test_driver_names_a_truncated_parent(models, tmp_path: Path) -> None:
    path = models["truncated"] / "model.safetensors"
    with pytest.raises(MergeInputError, match="models\\[0\\]: .*truncated") as caught:
        resolve_inputs(parse_recipe(recipe_for(models, "truncated")), "r.yml")
    assert str(path) in str(caught.value)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(recipe_for(models, "truncated")))
    result = CliRunner().invoke(main, ["evolve", str(recipe), str(tmp_path / "OUT"), "-q"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0]
    assert not (tmp_path / "OUT").exists()


def test_driver_refuses_pickle_unless_allowed(models, tmp_path: Path) -> None:
    with pytest.raises(MergeInputError, match="pickle") as caught:
        resolve_inputs(parse_recipe(recipe_for(models, "pickled")), "r.yml")
    message = str(caught.value)
    assert "pytorch_model.bin" in message and "safe_serialization=True" in message
    assert "--allow-pickle" in message and "MERGEKIT_SAE_ALLOW_PICKLE=1" in message
    allowed = parse_recipe({**recipe_for(models, "pickled"), "allow_pickle": True})
    assert resolve_inputs(allowed, "r.yml").models[0] == models["pickled"].absolute()
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(recipe_for(models, "pickled")))
    result = CliRunner().invoke(main, ["evolve", str(recipe), str(tmp_path / "OUT"), "-q"])
    assert result.exit_code == 1 and "holds only pickle weights" in result.output


def mergekit_recipe(tmp_path: Path, first: Path, second: Path) -> Path:
    recipe = {
        "merge_method": "sae_evolve",
        "models": [
            {"model": str(first), "parameters": {"score": 0.6}},
            {"model": str(second), "parameters": {"score": 0.4}},
        ],
        "dtype": "float32",
    }
    path = tmp_path / f"{first.name}.yml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_mergekit_yaml_names_a_truncated_parent(models, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    recipe = mergekit_recipe(tmp_path, models["truncated"], models["a"])
    result = run_cli("mergekit-yaml", str(recipe), str(out), "--no-copy-tokenizer")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and str(models["truncated"] / "model.safetensors") in error[0]
    assert "truncated" in error[0] and not out.exists()


def test_mergekit_yaml_refuses_pickle_unless_the_environment_allows(
    models, tmp_path: Path, monkeypatch
) -> None:
    recipe = mergekit_recipe(tmp_path, models["pickled"], models["a"])
    result = run_cli("mergekit-yaml", str(recipe), str(tmp_path / "no"), "--no-copy-tokenizer")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "holds only pickle weights" in result.stderr and "safe_serialization" in result.stderr
    assert not (tmp_path / "no").exists()
    monkeypatch.setenv("MERGEKIT_SAE_ALLOW_PICKLE", "1")
    allowed = tmp_path / "allowed"
    result = run_cli("mergekit-yaml", str(recipe), str(allowed), "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr
    # the same weights in safetensors merge to the same tensors
    reference = mergekit_recipe(tmp_path, models["b"], models["a"])
    result = run_cli("mergekit-yaml", str(reference), str(tmp_path / "ref"), "--no-copy-tokenizer")
    assert result.returncode == 0, result.stderr
    assert_identical(allowed, tmp_path / "ref")


def test_trust_remote_code_is_passed_and_off_by_default(models, monkeypatch) -> None:
    import transformers

    from mergekit_sae.evaluate.resident import ResidentModel

    assert parse_recipe(recipe_for(models, "b")).trust_remote_code is False
    seen = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto.from_pretrained.__func__

        def spy(cls, *args, _original=original, **kwargs):
            seen.append((cls.__name__, kwargs.get("trust_remote_code")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    ResidentModel(models["a"], device="cpu")
    ResidentModel(models["a"], device="cpu", trust_remote_code=True)
    assert sorted(seen) == sorted(
        [(c, v) for c in ("AutoModelForCausalLM", "AutoTokenizer") for v in (False, True)]
    )
