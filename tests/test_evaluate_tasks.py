"""Built-in JSONL tasks: specs, data loading, extraction, generation and log-likelihood scoring."""

from __future__ import annotations

import json

import pytest
import torch
from evaluate_toy import bigram_llama, make_tokenizer, random_llama
from pydantic import ValidationError

from mergekit_sae.evaluate import TaskDataError, TaskSpec, load_jsonl, load_task, subsample
from mergekit_sae.evaluate.extract import (
    answers_match,
    extract_answer,
    extract_flexible,
    extract_strict,
)
from mergekit_sae.evaluate.generation import greedy_generate

MC_ITEMS = [
    {"prompt": "the colour of the sky is", "choices": ["blue", "green", "white 3"], "label": 0},
    {"prompt": "le ciel", "choices": ["blue", "red"], "label": 1},
    {"prompt": "Q: snow A:", "choices": ["white", "red", "blue green"], "label": 0},
    {"prompt": "what is the colour of grass", "choices": ["green", "7", "red"], "label": 2},
    {"prompt": "la herbe", "choices": ["A:", "B", "blue", "1 2 3"], "label": 1},
]
GEN_PROMPTS = [
    "Q: what is 3 plus 4 A:",
    "Q: 5 minus 2 A:",
    "the",
    "le ciel is the colour of snow and grass",
    "what is 12",
]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return random_llama(seed=1)


def direct_loglik(model, tokenizer, prompt: str, continuation: str) -> float:
    """Log-likelihood of continuation after prompt, read straight off one unpadded forward."""
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + continuation)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(len(context), len(whole)))


# --- specs and data -----------------------------------------------------------------------


def test_spec_names_missing_file(tmp_path):
    with pytest.raises(ValidationError, match=r"test file .*nope\.jsonl does not exist"):
        TaskSpec(name="m", type="multiple_choice", test=tmp_path / "nope.jsonl")


def test_spec_lists_known_types(tmp_path):
    known = "generate_exact_match, generate_text_match, lm_eval, multiple_choice"
    with pytest.raises(ValidationError, match=f"unknown task type 'mcq'; known types: {known}"):
        TaskSpec(name="m", type="mcq", test=write_jsonl(tmp_path / "t.jsonl", MC_ITEMS))


def test_spec_rejects_options_of_other_types(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", MC_ITEMS)
    with pytest.raises(ValidationError, match=r"\['max_new_tokens'\] do not apply"):
        TaskSpec(name="m", type="multiple_choice", test=path, max_new_tokens=5)


def test_spec_rejects_unknown_field_and_needs_a_split(tmp_path):
    with pytest.raises(ValidationError, match="tset"):
        TaskSpec(name="m", type="multiple_choice", tset="x.jsonl")
    with pytest.raises(ValidationError, match="give a JSONL file"):
        TaskSpec(name="m", type="multiple_choice")


def test_spec_resolves_paths_against_base_dir(tmp_path):
    write_jsonl(tmp_path / "t.jsonl", MC_ITEMS)
    spec = TaskSpec.model_validate(
        {"name": "m", "type": "multiple_choice", "test": "t.jsonl"},
        context={"base_dir": tmp_path},
    )
    assert spec.test == tmp_path / "t.jsonl"
    assert load_task(spec).items("test") == MC_ITEMS


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MC_ITEMS[0]) + "\n\n{not json\n")
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_jsonl(path, "multiple_choice")
    path.write_text(json.dumps(MC_ITEMS[0]) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: missing key 'choices'"):
        load_jsonl(path, "multiple_choice")
    path.write_text(json.dumps({**MC_ITEMS[0], "label": 7}) + "\n")
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:1: 'label' 7 is out of range"):
        load_jsonl(path, "multiple_choice")
    with pytest.raises(TaskDataError, match="does not exist"):
        load_jsonl(tmp_path / "absent.jsonl")


def test_missing_split_is_named(tmp_path):
    task = load_task(
        {
            "name": "m",
            "type": "multiple_choice",
            "test": write_jsonl(tmp_path / "t.jsonl", MC_ITEMS),
        }
    )
    with pytest.raises(ValueError, match="task 'm' has no train split"):
        task.items("train")


def test_subsample_is_deterministic_and_seeded():
    items = list(range(100))
    a, b = subsample(items, 10, seed=3), subsample(items, 10, seed=3)
    assert a == b and len(set(a)) == 10 and set(a) <= set(items)
    assert a == sorted(a)  # original order kept
    assert subsample(items, 10, seed=4) != a
    assert subsample(items, None, seed=0) == items
    assert subsample(items, 500, seed=0) == items


# --- answer extraction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("so 3 + 4 = 7 #### 7", "7", "7"),
        ("#### 1,234.", "1,234.", "1,234."),
        ("I think 12 then 15", None, "15"),
        ("no number", None, None),
        ("#### -3 and then 9", "-3", "9"),
    ],
)
def test_extraction_follows_gsm8k_filters(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible
    assert extract_answer(text) == (strict if strict is not None else flexible)


def test_numeric_comparison():
    assert answers_match("1,000", "1000")
    assert answers_match("7.0", "7")
    assert answers_match("$12.", "12")
    assert not answers_match("71", "7")
    assert not answers_match(None, "7")


# --- generate_exact_match ------------------------------------------------------------------


def test_forced_answer_scores_one_and_wrong_answer_zero(tmp_path, tokenizer):
    model = bigram_llama({"A:": "####", "####": "7", "7": "\n", "\n": "9"})
    items = [
        {"prompt": "Q: what is 3 plus 4 A:", "answer": "7"},
        {"prompt": "Q: 2 plus 5 A:", "answer": "#### 7"},
        {"prompt": "Q: what is 3 plus 5 A:", "answer": "8"},
    ]
    task = load_task(
        {
            "name": "math",
            "type": "generate_exact_match",
            "test": write_jsonl(tmp_path / "m.jsonl", items),
        }
    )
    details = task.score_details(model, tokenizer, task.items("test"))
    assert [d["output"] for d in details] == ["#### 7 "] * 3  # stopped at "\n", 9 never emitted
    assert task.score(model, tokenizer, task.items("test")) == [1.0, 1.0, 0.0]
    assert task.aggregate([1.0, 1.0, 0.0]) == pytest.approx(2 / 3)


def test_generation_stops_at_max_new_tokens_and_extraction_modes(tmp_path, tokenizer):
    # "A:" -> 5 -> #### -> 6 -> 5 -> #### -> ... : strict takes 6, flexible the last number.
    model = bigram_llama({"A:": "5", "5": "####", "####": "6", "6": "5"})
    items = [{"prompt": "Q: A:", "answer": "6"}]
    path = write_jsonl(tmp_path / "m.jsonl", items)
    outputs = greedy_generate(model, tokenizer, ["Q: A:"], max_new_tokens=4)
    assert outputs == ["5 #### 6 5"]
    scores = {}
    for mode in ("strict", "flexible", "strict_or_flexible"):
        spec = {"name": "m", "type": "generate_exact_match", "test": path}
        task = load_task({**spec, "max_new_tokens": 4, "extraction": mode})
        scores[mode] = task.score(model, tokenizer, items)[0]
    assert scores == {"strict": 1.0, "flexible": 0.0, "strict_or_flexible": 1.0}


def test_generation_stops_at_eos(tokenizer):
    model = bigram_llama({"A:": "3", "3": "</s>", "</s>": "4"})
    assert greedy_generate(model, tokenizer, ["Q: A:"], max_new_tokens=6, stop=[]) == ["3"]


def test_generation_matches_unbatched_and_hf_generate(model, tokenizer):
    stop = ["####"]
    batched = greedy_generate(model, tokenizer, GEN_PROMPTS, max_new_tokens=6, stop=stop)
    single = [
        greedy_generate(model, tokenizer, [p], max_new_tokens=6, stop=stop, batch_size=1)[0]
        for p in GEN_PROMPTS
    ]
    assert batched == single
    for prompt, text in zip(GEN_PROMPTS, single, strict=True):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        reference = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert text == reference.split("####")[0]


def test_generation_ignores_tokenizer_padding_side(model):
    left = greedy_generate(model, make_tokenizer("left"), GEN_PROMPTS, max_new_tokens=5, stop=[])
    right = greedy_generate(model, make_tokenizer("right"), GEN_PROMPTS, max_new_tokens=5, stop=[])
    assert left == right


# --- multiple_choice -----------------------------------------------------------------------


def test_loglik_matches_direct_computation(tmp_path, model, tokenizer):
    task = load_task(
        {
            "name": "mc",
            "type": "multiple_choice",
            "test": write_jsonl(tmp_path / "c.jsonl", MC_ITEMS),
        }
    )
    details = task.score_details(model, tokenizer, MC_ITEMS)
    for item, record in zip(MC_ITEMS, details, strict=True):
        expected = [
            direct_loglik(model, tokenizer, item["prompt"], " " + c) for c in item["choices"]
        ]
        assert record["logliks"] == pytest.approx(expected, abs=1e-4)
        best = max(range(len(expected)), key=expected.__getitem__)
        assert record["chosen"] == best
        assert record["score"] == float(best == item["label"])


def test_loglik_normalization(tmp_path, model, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", MC_ITEMS)
    base = {"name": "mc", "type": "multiple_choice", "test": path}
    plain = load_task(base).score_details(model, tokenizer, MC_ITEMS)
    per_token = load_task({**base, "normalize": "tokens"}).score_details(model, tokenizer, MC_ITEMS)
    per_char = load_task({**base, "normalize": "chars"}).score_details(model, tokenizer, MC_ITEMS)
    for item, p, t, c in zip(MC_ITEMS, plain, per_token, per_char, strict=True):
        n_tokens = [len(tokenizer(choice)["input_ids"]) for choice in item["choices"]]
        assert t["values"] == pytest.approx(
            [v / n for v, n in zip(p["values"], n_tokens, strict=True)]
        )
        lengths = [len(choice) for choice in item["choices"]]
        assert c["values"] == pytest.approx(
            [v / n for v, n in zip(p["values"], lengths, strict=True)]
        )


def test_loglik_batched_equals_unbatched_and_padding_side(tmp_path, model):
    path = write_jsonl(tmp_path / "c.jsonl", MC_ITEMS)
    task = load_task({"name": "mc", "type": "multiple_choice", "test": path})
    runs = [
        task.score_details(model, make_tokenizer(side), MC_ITEMS, batch_size=size)
        for side in ("left", "right")
        for size in (1, 3, 64)
    ]
    for run in runs[1:]:
        for a, b in zip(runs[0], run, strict=True):
            assert a["logliks"] == pytest.approx(b["logliks"], abs=1e-4)
            assert a["chosen"] == b["chosen"]


def test_empty_item_lists_score_to_empty_lists(tmp_path, model, tokenizer):
    mc = load_task(
        {
            "name": "c",
            "type": "multiple_choice",
            "test": write_jsonl(tmp_path / "c.jsonl", MC_ITEMS),
        }
    )
    gen_items = [{"prompt": "Q:", "answer": "1"}]
    gen = load_task(
        {
            "name": "g",
            "type": "generate_exact_match",
            "test": write_jsonl(tmp_path / "g.jsonl", gen_items),
        }
    )
    assert mc.score(model, tokenizer, []) == []
    assert gen.score(model, tokenizer, []) == []
    with pytest.raises(ValueError, match="empty list"):
        mc.aggregate([])


def test_rows_stopping_at_different_steps_keep_their_outputs(model, tokenizer):
    """Rows leave the batch when they stop; the others must continue exactly as alone."""
    free = greedy_generate(model, tokenizer, GEN_PROMPTS, max_new_tokens=8, stop=[])
    words = [w for text in free for w in text.split()]
    stop = max(set(words), key=words.count)  # the most frequent word: rows stop at varied steps
    stopped = greedy_generate(model, tokenizer, GEN_PROMPTS, max_new_tokens=8, stop=[stop])
    assert stopped == [text.split(stop)[0] for text in free]
    assert len({len(text) for text in stopped}) > 1
    single = [
        greedy_generate(model, tokenizer, [p], max_new_tokens=8, stop=[stop])[0]
        for p in GEN_PROMPTS
    ]
    assert stopped == single


def test_empty_prompts_and_empty_choices(tmp_path, model, tokenizer):
    # An empty prompt is conditioned on BOS, as lm-eval does.
    assert greedy_generate(model, tokenizer, [""], max_new_tokens=3, stop=[]) == greedy_generate(
        model, tokenizer, ["<s>"], max_new_tokens=3, stop=[]
    )
    items = [{"prompt": "le ciel", "choices": ["blue", ""], "label": 0}]
    task = load_task(
        {"name": "c", "type": "multiple_choice", "test": write_jsonl(tmp_path / "c.jsonl", items)}
    )
    with pytest.raises(ValueError, match="choice '' of item 0 encodes to no tokens"):
        task.score(model, tokenizer, items)
