"""The testbeds: a Llama base, a math expert and a multilingual expert tuned from it, and the
two tasks (GSM8K-style math, MMLU-ProX-style multilingual multiple choice).

`build_testbed` writes the embedded tiny one (trained here from scratch), `build_smollm2` the
real-model one (SmolLM2-135M-Instruct read from GGUF, two full fine-tunes of it): the models,
the JSONL task splits and a quality report. The heavy modules (torch, transformers) load only
when they are used.
"""

from __future__ import annotations

from importlib import import_module

from mergekit_sae.testbed.config import SmolLM2Config, StageConfig, TestbedConfig, load_config

_LAZY = {
    "build_testbed": "mergekit_sae.testbed.build",
    "build_smollm2": "mergekit_sae.testbed.smollm2",
    "load_gguf": "mergekit_sae.testbed.gguf_model",
    "load_report": "mergekit_sae.testbed.build",
    "TestbedError": "mergekit_sae.testbed.build",
    "task_specs": "mergekit_sae.testbed.data",
}

__all__ = ["SmolLM2Config", "StageConfig", "TestbedConfig", "load_config", *_LAZY]


def __getattr__(name: str):
    """Import the builder's names on first use."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
