"""The lm_eval task type: lm-eval-harness tasks on an in-memory model, fully offline."""

from __future__ import annotations

import json

import pytest
import yaml
from evaluate_toy import bigram_llama, make_tokenizer, random_llama

from mergekit_sae.evaluate import TaskSpec, load_task, subsample
from mergekit_sae.evaluate.lm_eval_export import write_lm_eval_task

pytest.importorskip("lm_eval")

MC_ITEMS = [
    {"prompt": "the colour of the sky is", "choices": ["blue", "green", "white 3"], "label": 0},
    {"prompt": "le ciel", "choices": ["blue", "red"], "label": 1},
    {"prompt": "Q: snow A:", "choices": ["white", "red", "blue green"], "label": 0},
    {"prompt": "what is the colour of grass", "choices": ["green", "7", "red"], "label": 2},
    {"prompt": "la herbe", "choices": ["A:", "3", "blue", "1 2 3"], "label": 1},
    {"prompt": "Q: what is 3 plus 4", "choices": ["7", "8", "6"], "label": 0},
]
GEN_ITEMS = [
    {"prompt": "Q: what is 3 plus 4 A:", "answer": "7"},
    {"prompt": "Q: what is 3 plus 5 A:", "answer": "8"},
    {"prompt": "Q: what is 6 plus 6 is", "answer": "12"},
    {"prompt": "Q: what is 6 plus 7 is", "answer": "13"},
    {"prompt": "Q: 4 minus 1 the", "answer": "3"},
]
# "A:" -> "#### 7"; "is" -> "12" (no marker); "the" -> "3 #### 1" (strict 1, flexible 1).
MC_SPEC = {"name": "mc", "type": "multiple_choice"}
GEN_SPEC = {"name": "gen", "type": "generate_exact_match", "max_new_tokens": 8}
BIGRAMS = {"A:": "####", "####": "7", "is": "12", "the": "3", "3": "####", "7": "\n", "12": "\n"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with local JSONL data and the lm-eval task YAMLs exported from their specs."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, items in (("mc", MC_ITEMS), ("gen", GEN_ITEMS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    write_lm_eval_task(TaskSpec(**MC_SPEC, test=root / "mc.jsonl"), root, "toy_mc")
    write_lm_eval_task(TaskSpec(**GEN_SPEC, test=root / "gen.jsonl"), root, "toy_gen")
    return root


def test_exported_config_reads_the_jsonl_with_gsm8k_filters(task_dir):
    config = yaml.safe_load((task_dir / "toy_gen.yaml").read_text())
    assert config["dataset_path"] == "json"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(task_dir / "gen.jsonl")}}
    assert config["generation_kwargs"] == {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}
    assert [f["name"] for f in config["filter_list"]] == ["strict-match", "flexible-extract"]


@pytest.mark.parametrize(("metric", "normalize"), [("acc", "none"), ("acc_norm", "chars")])
def test_multiple_choice_matches_builtin(task_dir, metric, normalize):
    model, tokenizer = random_llama(seed=2), make_tokenizer()
    spec = {"name": "toy_mc", "type": "lm_eval", "include_path": [task_dir], "metric": metric}
    adapter = load_task(spec)
    builtin = load_task({**MC_SPEC, "test": task_dir / "mc.jsonl", "normalize": normalize})
    items = adapter.items("test")
    assert items == [{"task": "toy_mc", "doc_id": i} for i in range(len(MC_ITEMS))]
    theirs = adapter.score_details(model, tokenizer, items, batch_size=4)
    ours = builtin.score_details(model, tokenizer, builtin.items("test"))
    assert [d["score"] for d in theirs] == [d["score"] for d in ours]
    assert 0 < adapter.aggregate([d["score"] for d in ours]) < 1  # a non-trivial comparison
    for t, o in zip(theirs, ours, strict=True):
        assert [r[0][0] for r in t["sample"]["resps"]] == pytest.approx(o["logliks"], abs=1e-4)


def test_seeded_subsample_scores_only_those_docs(task_dir):
    model, tokenizer = random_llama(seed=2), make_tokenizer()
    adapter = load_task({"name": "toy_mc", "type": "lm_eval", "include_path": [task_dir]})
    builtin = load_task({**MC_SPEC, "test": task_dir / "mc.jsonl"})
    picked = subsample(adapter.items("test"), 3, seed=11)
    theirs = adapter.score_details(model, tokenizer, list(reversed(picked)))
    assert [d["sample"]["doc_id"] for d in theirs] == [i["doc_id"] for i in reversed(picked)]
    ours = builtin.score(model, tokenizer, [MC_ITEMS[i["doc_id"]] for i in reversed(picked)])
    assert [d["score"] for d in theirs] == ours


@pytest.mark.parametrize(
    ("lm_filter", "extraction"), [("strict-match", "strict"), ("flexible-extract", "flexible")]
)
def test_generation_matches_builtin(task_dir, lm_filter, extraction):
    model, tokenizer = bigram_llama(BIGRAMS), make_tokenizer()
    spec = {"name": "toy_gen", "type": "lm_eval", "include_path": [task_dir], "filter": lm_filter}
    adapter = load_task(spec)
    builtin = load_task({**GEN_SPEC, "test": task_dir / "gen.jsonl", "extraction": extraction})
    theirs = adapter.score(model, tokenizer, adapter.items("test"))
    ours = builtin.score_details(model, tokenizer, builtin.items("test"))
    assert theirs == [d["score"] for d in ours]
    assert 0 < sum(theirs) < len(theirs)


def test_limit_and_unknown_names(task_dir):
    spec = {"name": "toy_mc", "type": "lm_eval", "include_path": [task_dir], "limit": 2}
    assert len(load_task(spec).items("test")) == 2
    with pytest.raises(ValueError, match="no metric 'f1'"):
        task = load_task({**spec, "metric": "f1"})
        task.score(random_llama(), make_tokenizer(), task.items("test"))
    with pytest.raises(ValueError, match="lm-eval does not know task 'toy_nope'"):
        load_task({**spec, "lm_eval_task": "toy_nope"}).items("test")
