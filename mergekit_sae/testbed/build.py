"""`build_testbed`: draw the data, train the three models, score them, write it all atomically."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from mergekit_sae.atomic import atomic_dir
from mergekit_sae.errors import TestbedError
from mergekit_sae.testbed.config import TestbedConfig
from mergekit_sae.testbed.data import TASKS, make_data, task_file, task_specs, write_splits
from mergekit_sae.testbed.merges import STATIC_MERGES, static_merge, static_merge_records
from mergekit_sae.testbed.models import finetune_math, finetune_multilingual, pretrain_base
from mergekit_sae.testbed.quality import format_table, quality_checks, score_models

MODELS = ("base", "math", "multilingual")
REPORT = "report.json"
# Bumped whenever the builder's code changes what a config produces (part of the cache key).
BUILDER_VERSION = 2


def cache_key(config: TestbedConfig) -> str:
    """What a finished testbed must have been built with to be reused."""
    return f"v{BUILDER_VERSION}-{config.fingerprint()}"


def load_report(root: str | Path) -> dict:
    """The report of a built testbed; a clear error when the folder is not one."""
    path = Path(root) / REPORT
    if not path.is_file():
        raise TestbedError(f"{root} is not a built testbed: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TestbedError(f"{path} is not valid JSON ({e.msg}); rebuild with --force") from e


def is_complete(root: Path) -> bool:
    """True when every model folder and data file of a testbed exists."""
    models = all((root / m / "config.json").is_file() for m in MODELS)
    data = all(task_file(root, t, s).is_file() for t in TASKS for s in ("train", "test"))
    return models and data and (root / REPORT).is_file()


@contextmanager
def build_environment(threads: int | None):
    """Run the block with `threads` torch threads (None: torch's setting) and without
    transformers' progress bars; both are restored afterwards."""
    from transformers.utils import logging as hf_logging

    previous = torch.get_num_threads()
    bars = hf_logging.is_progress_bar_enabled()
    if threads:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
        if bars:
            hf_logging.enable_progress_bar()


def build_testbed(
    out: str | Path = "testbed",
    config: TestbedConfig | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build the testbed into `out` and return its report; reuse `out` when it was already
    built with the same settings (unless `force`)."""
    config = config or TestbedConfig()
    out = Path(out).absolute()
    say = log or (lambda _message: None)
    if out.exists() and not force:
        if is_complete(out) and load_report(out).get("cache_key") == cache_key(config):
            say(f"{out} is already built with these settings (use --force to rebuild)")
            return load_report(out)
        raise TestbedError(
            f"{out} exists and was not built with these settings; pass --force to replace it "
            "or choose another --out"
        )
    with atomic_dir(out) as work:
        work.mkdir()
        return _build_into(work, config, say)


def _build_into(work: Path, config: TestbedConfig, say) -> dict:
    """Train, save and score everything inside `work`; the report's paths are relative."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    timings = {}
    with build_environment(config.threads):
        data = make_data(config)
        write_splits(work, data.splits)
        say(
            f"data: vocabulary {len(data.tokenizer)} words, "
            + ", ".join(
                f"{t} {len(s['train'])}/{len(s['test'])} train/test" for t, s in data.splits.items()
            )
        )
        stages = (
            ("base", lambda models: pretrain_base(config, data, log=say)),
            ("math", lambda models: finetune_math(config, data, models["base"], log=say)),
            ("multilingual",
             lambda models: finetune_multilingual(config, data, models["base"], log=say)),
        )  # fmt: skip
        models = {}
        for name, make in stages:
            say(f"training {name} model")
            t0 = time.perf_counter()
            models[name] = make(models)
            models[name].save_pretrained(work / name)
            data.tokenizer.save_pretrained(work / name)
            timings[name] = round(time.perf_counter() - t0, 1)
        say("scoring on the test splits")
        t0 = time.perf_counter()
        tokenizer = AutoTokenizer.from_pretrained(work / "base")
        rows = {name: AutoModelForCausalLM.from_pretrained(work / name).eval() for name in MODELS}
        experts = {name: rows[name] for name in MODELS[1:]}
        for merge in STATIC_MERGES:
            merged = AutoModelForCausalLM.from_pretrained(work / "base").eval()
            merged.load_state_dict(static_merge(merge, rows["base"], experts))
            rows[merge] = merged
        table = score_models(rows, tokenizer, task_specs(work))
        timings["scoring"] = round(time.perf_counter() - t0, 1)
    checks = quality_checks(table)
    report = {
        "cache_key": cache_key(config),
        "config": config.model_dump(mode="json"),
        "models": {name: name for name in MODELS},  # folders relative to the testbed
        "tasks": task_specs(Path()),  # JSONL paths relative to the testbed
        "accuracy": table,
        "static_merges": static_merge_records(),
        "quality_checks": checks,
        "quality_passed": all(checks.values()),
        "parameters": sum(p.numel() for p in rows["base"].parameters()),
        "seconds": {**timings, "total": round(time.perf_counter() - start, 1)},
    }
    (work / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    say(format_table(table, checks))
    return report
