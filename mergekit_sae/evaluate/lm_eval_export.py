"""Write a JSONL task as an lm-eval-harness task YAML, to score the same items with lm-eval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mergekit_sae.evaluate.extract import FLEXIBLE_PATTERN, STRICT_PATTERN
from mergekit_sae.evaluate.spec import TaskSpec

# lm-eval's gsm8k filters, which the built-in `strict` and `flexible` extractions mirror.
GSM8K_FILTERS = [
    {
        "name": "strict-match",
        "filter": [
            {"function": "regex", "regex_pattern": STRICT_PATTERN.pattern},
            {"function": "take_first"},
        ],
    },
    {
        "name": "flexible-extract",
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": FLEXIBLE_PATTERN.pattern},
            {"function": "take_first"},
        ],
    },
]
GSM8K_EXACT_MATCH = {
    "metric": "exact_match",
    "aggregation": "mean",
    "higher_is_better": True,
    "ignore_case": True,
    "ignore_punctuation": False,
    "regexes_to_ignore": [",", r"\$", "(?s).*#### ", r"\.$"],
}


def lm_eval_config(spec: TaskSpec, task_name: str | None = None) -> dict[str, Any]:
    """An lm-eval task config reading the spec's JSONL files with the spec's options.

    Generation tasks get lm-eval's gsm8k filters (``strict-match`` = extraction ``strict``,
    ``flexible-extract`` = ``flexible``); multiple-choice tasks report ``acc`` (normalize
    ``none``) and ``acc_norm`` (normalize ``chars``).
    """
    if spec.type not in ("generate_exact_match", "multiple_choice"):
        raise ValueError(
            f"task {spec.name!r}: only generate_exact_match and multiple_choice tasks can be "
            f"written as lm-eval YAML, not {spec.type}"
        )
    files = {s: str(getattr(spec, s)) for s in ("train", "test") if getattr(spec, s) is not None}
    config: dict[str, Any] = {
        "task": task_name or spec.name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "test_split": "test" if "test" in files else "train",
        "doc_to_text": "{{prompt}}",
    }
    if "train" in files and "test" in files:
        config["training_split"] = "train"
    if spec.type == "generate_exact_match":
        config |= {
            "output_type": "generate_until",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {
                "until": list(spec.settings.stop),
                "do_sample": False,
                "max_gen_toks": spec.settings.max_new_tokens,
            },
            "filter_list": GSM8K_FILTERS,
            "metric_list": [GSM8K_EXACT_MATCH],
        }
    else:
        config |= {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "target_delimiter": spec.settings.target_delimiter,
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True}
                for m in ("acc", "acc_norm")
            ],
        }
    return config


def write_lm_eval_task(spec: TaskSpec, folder: str | Path, task_name: str | None = None) -> Path:
    """Write the spec's lm-eval YAML into folder (for lm-eval's include_path); return its path."""
    config = lm_eval_config(spec, task_name)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config['task']}.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    tmp.replace(path)
    return path
