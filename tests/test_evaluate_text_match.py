"""generate_text_match: text normalisation, regex extraction, validation, and a tiny model."""

from __future__ import annotations

import json

import pytest
from evaluate_toy import bigram_llama, make_tokenizer, random_llama
from pydantic import ValidationError

from mergekit_sae.evaluate import GenerateTextMatchTask, TaskSpec, load_task
from mergekit_sae.evaluate.text_match import extract_text, normalize_text

# Greedy continuations of this model: "... A:" -> "red green blue", "... is" -> "white",
# "... of" -> "7", "... minus" -> "3 3 3 3 ..." (a loop).
TRANSITIONS = {
    "A:": "red",
    "red": "green",
    "green": "blue",
    "blue": "\n",
    "is": "white",
    "white": "\n",
    "of": "7",
    "7": "\n",
    "minus": "3",
    "3": "3",
}
ITEMS = [
    {"prompt": "Q: what is the sky A:", "answer": "red green blue"},
    {"prompt": "Q: A:", "answer": "Red Green BLUE"},
    {"prompt": "Q: A:", "answer": "red, green, blue."},
    {"prompt": "the snow is", "answer": "green"},
    {"prompt": "the colour of", "answer": 7},
    {"prompt": "the colour of", "answer": 7.0},
]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


@pytest.fixture(scope="module")
def model():
    return bigram_llama(TRANSITIONS)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def path(tmp_path):
    return write_jsonl(tmp_path / "t.jsonl", ITEMS)


def text_task(path, **options) -> GenerateTextMatchTask:
    return load_task({"name": "t", "type": "generate_text_match", "test": path, **options})


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ignore_case", "ignore_punctuation", "expected"),
    [
        ("  Paris \n", False, False, "Paris"),
        ("Paris.", False, True, "Paris"),
        ("a, b, c", False, True, "a b c"),
        ("a,b,c", False, True, "abc"),  # punctuation is dropped, not turned into spaces
        ("Straße", True, False, "strasse"),  # casefold, not just lower()
        ("¿Qué? ", True, True, "qué"),
        ("Hello, World!", True, False, "hello, world!"),
    ],
)
def test_normalize_text(text, ignore_case, ignore_punctuation, expected):
    assert normalize_text(text, ignore_case, ignore_punctuation) == expected


def test_extract_text_takes_the_first_group_of_the_first_match():
    assert extract_text("the answer is blue, not red", None) == "the answer is blue, not red"
    assert extract_text("answer: blue. answer: red", r"answer: (\w+)") == "blue"
    assert extract_text("x = 12, y = 3", r"(\d+)\D+(\d+)") == "12"
    assert extract_text("colour green", r"gre+n") == "green"  # no group: the whole match
    assert extract_text("no digits here", r"(\d+)") is None
    assert extract_text("b", r"(a)?b") is None  # the group took no part


# --- validation -----------------------------------------------------------------------------


def test_invalid_regex_is_a_validation_error_naming_the_task(path):
    with pytest.raises(
        ValidationError,
        match=r"task 't' \(generate_text_match\): answer_regex '\(' is not a valid regular",
    ):
        text_task(path, answer_regex="(")


def test_text_and_number_options_do_not_mix(path):
    with pytest.raises(ValidationError, match=r"\['extraction'\] do not apply to this type"):
        text_task(path, extraction="strict")
    own = "['max_new_tokens', 'stop', 'extraction']"
    with pytest.raises(ValidationError, match=rf"\['ignore_case'\] do not apply.*{own}"):
        TaskSpec(name="t", type="generate_exact_match", test=path, ignore_case=True)


def test_items_need_prompt_and_answer(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q:", "answer": ["a"]}])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: key 'answer' has type list"):
        text_task(bad).items("test")


# --- through a tiny model ------------------------------------------------------------------


def test_plain_match_is_trimmed_exact_text(model, tokenizer, path):
    task = text_task(path)
    details = task.score_details(model, tokenizer, ITEMS)
    outputs = [d["output"].strip() for d in details]
    assert outputs == ["red green blue"] * 3 + ["white", "7", "7"]
    # int 7 is compared as "7"; 7.0 as "7.0", which the text "7" is not.
    assert [d["score"] for d in details] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert details[0]["prediction"] == "red green blue" and details[1]["target"] == "Red Green BLUE"


def test_case_and_punctuation_options(model, tokenizer, path):
    case = text_task(path, ignore_case=True).score(model, tokenizer, ITEMS)
    punct = text_task(path, ignore_punctuation=True).score(model, tokenizer, ITEMS)
    both = text_task(path, ignore_case=True, ignore_punctuation=True).score(model, tokenizer, ITEMS)
    assert case == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    assert punct == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # "7.0" -> "70" without punctuation
    assert both == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]


def test_regex_extraction(model, tokenizer, path):
    task = text_task(path, answer_regex=r"red (\w+)")
    details = task.score_details(model, tokenizer, ITEMS)
    assert [d["extracted"] for d in details] == ["green"] * 3 + [None, None, None]
    assert [d["score"] for d in details] == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    items = [{"prompt": "Q: A:", "answer": "green"}, {"prompt": "the snow is", "answer": "green"}]
    assert task.score(model, tokenizer, items) == [1.0, 0.0]


def test_generation_metrics_from_score_details(model, tokenizer, tmp_path):
    items = [
        {"prompt": "Q: A:", "answer": "x"},
        {"prompt": "Q: A:", "answer": "x"},
        {"prompt": "the snow is", "answer": "x"},
        {"prompt": "5 minus", "answer": "x"},
    ]
    task = text_task(write_jsonl(tmp_path / "g.jsonl", items), max_new_tokens=5)
    details = task.score_details(model, tokenizer, items)
    assert [d["output"].split() for d in details] == [
        ["red", "green", "blue"],
        ["red", "green", "blue"],
        ["white"],
        ["3"] * 5,
    ]
    metrics = task.generation_metrics(details)
    # unigrams: 3 + 3 + 1 + 5 = 12, distinct red green blue white 3 = 5;
    # bigrams: 2 + 2 + 0 + 4 = 8, distinct (red green) (green blue) (3 3) = 3; "3 3 3" loops.
    assert metrics == pytest.approx(
        {"repetition_rate": 0.25, "distinct_1": 5 / 12, "distinct_2": 3 / 8}
    )


def test_generation_metrics_of_exact_match_and_multiple_choice(tokenizer, tmp_path):
    model = bigram_llama({"A:": "####", "####": "7", "7": "\n"})
    gen_items = [{"prompt": "Q: 3 plus 4 A:", "answer": "7"}, {"prompt": "Q: A:", "answer": "8"}]
    gen = load_task(
        {
            "name": "g",
            "type": "generate_exact_match",
            "test": write_jsonl(tmp_path / "g.jsonl", gen_items),
        }
    )
    details = gen.score_details(model, tokenizer, gen_items)
    assert [d["output"] for d in details] == ["#### 7 ", "#### 7 "]
    # 4 unigrams, 2 distinct; 2 bigrams, 1 distinct; nothing loops.
    expected = {"repetition_rate": 0.0, "distinct_1": 0.5, "distinct_2": 0.5}
    assert gen.generation_metrics(details) == expected
    mc_items = [{"prompt": "le ciel", "choices": ["blue", "red"], "label": 0}]
    mc = load_task(
        {
            "name": "c",
            "type": "multiple_choice",
            "test": write_jsonl(tmp_path / "c.jsonl", mc_items),
        }
    )
    assert mc.generation_metrics(mc.score_details(random_llama(), tokenizer, mc_items)) == {}


def test_lm_eval_export_refuses_text_match(path):
    from mergekit_sae.evaluate.lm_eval_export import lm_eval_config

    with pytest.raises(ValueError, match="only generate_exact_match and multiple_choice"):
        lm_eval_config(text_task(path).spec)
