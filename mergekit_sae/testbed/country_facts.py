"""MMLU-ProX-style multiple choice for the real-model testbed: facts about real countries asked
in invented languages.

A pretrained model knows these facts in English (the capital of France is Paris). The
questions are asked in invented languages that translate every word but the country's name,
and each item's four choices are the right answer, the same kind of answer for another
country, and two other facts about the asked country: a model that cannot read the question
cannot tell which fact it asks for. Train and test are split by country, so a test question
is about a country the expert never saw a question about: answering it needs the pretrained
model's knowledge and the expert's grasp of the languages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from mergekit_sae.testbed.multilingual_task import QUESTION, translate
from mergekit_sae.testbed.vocab import invented_words

RELATIONS = ("capital", "language", "currency", "continent")
# country -> (capital, language, currency, continent); each answer unambiguous
FACTS: dict[str, tuple[str, str, str, str]] = {
    "France": ("Paris", "French", "euro", "Europe"),
    "Germany": ("Berlin", "German", "euro", "Europe"),
    "Italy": ("Rome", "Italian", "euro", "Europe"),
    "Spain": ("Madrid", "Spanish", "euro", "Europe"),
    "Portugal": ("Lisbon", "Portuguese", "euro", "Europe"),
    "Greece": ("Athens", "Greek", "euro", "Europe"),
    "the Netherlands": ("Amsterdam", "Dutch", "euro", "Europe"),
    "Poland": ("Warsaw", "Polish", "zloty", "Europe"),
    "Sweden": ("Stockholm", "Swedish", "krona", "Europe"),
    "Norway": ("Oslo", "Norwegian", "krone", "Europe"),
    "Denmark": ("Copenhagen", "Danish", "krone", "Europe"),
    "Finland": ("Helsinki", "Finnish", "euro", "Europe"),
    "Hungary": ("Budapest", "Hungarian", "forint", "Europe"),
    "the Czech Republic": ("Prague", "Czech", "koruna", "Europe"),
    "the United Kingdom": ("London", "English", "pound", "Europe"),
    "Japan": ("Tokyo", "Japanese", "yen", "Asia"),
    "China": ("Beijing", "Chinese", "yuan", "Asia"),
    "South Korea": ("Seoul", "Korean", "won", "Asia"),
    "Thailand": ("Bangkok", "Thai", "baht", "Asia"),
    "Vietnam": ("Hanoi", "Vietnamese", "dong", "Asia"),
    "Indonesia": ("Jakarta", "Indonesian", "rupiah", "Asia"),
    "Iran": ("Tehran", "Persian", "rial", "Asia"),
    "Saudi Arabia": ("Riyadh", "Arabic", "riyal", "Asia"),
    "Egypt": ("Cairo", "Arabic", "pound", "Africa"),
    "Morocco": ("Rabat", "Arabic", "dirham", "Africa"),
    "Ethiopia": ("Addis Ababa", "Amharic", "birr", "Africa"),
    "Nigeria": ("Abuja", "English", "naira", "Africa"),
    "Brazil": ("Brasilia", "Portuguese", "real", "South America"),
    "Argentina": ("Buenos Aires", "Spanish", "peso", "South America"),
    "Peru": ("Lima", "Spanish", "sol", "South America"),
    "Chile": ("Santiago", "Spanish", "peso", "South America"),
    "Mexico": ("Mexico City", "Spanish", "peso", "North America"),
    "the United States": ("Washington", "English", "dollar", "North America"),
    "Cuba": ("Havana", "Spanish", "peso", "North America"),
    "Australia": ("Canberra", "English", "dollar", "Oceania"),
    "New Zealand": ("Wellington", "English", "dollar", "Oceania"),
}
# The English question is the tiny testbed's (QUESTION); every word but {country} is translated.
FRAME_WORDS = ("question", "what", "is", "the", "of", "answer", *RELATIONS)
N_CHOICES = 4


@dataclass(frozen=True)
class FactWorld:
    """The invented languages' dictionaries and the countries held out for the test."""

    languages: dict[str, dict[str, str]]  # language name -> English word -> word
    test_countries: frozenset[str]


def make_fact_world(rng: random.Random, n_test: int, n_languages: int) -> FactWorld:
    """Draw `n_languages` dictionaries of the question's words and `n_test` test countries."""
    if not 1 <= n_test < len(FACTS):
        raise ValueError(f"n_test_countries must be between 1 and {len(FACTS) - 1}, not {n_test}")
    taken = {w.lower() for text in FACTS for w in text.split()}
    languages = {}
    for i in range(n_languages):
        words = invented_words(rng, len(FRAME_WORDS), taken, syllables=(1, 3))
        languages[f"lang{i + 1}"] = dict(zip(FRAME_WORDS, words, strict=True))
    return FactWorld(languages, frozenset(rng.sample(sorted(FACTS), n_test)))


def fact(country: str, relation: str) -> str:
    """The answer of `relation` for `country` (in English)."""
    return FACTS[country][RELATIONS.index(relation)]


def distractors(country: str, relation: str, rng: random.Random) -> list[str]:
    """The same kind of answer for another country, and two other facts about `country`."""
    answer = fact(country, relation)
    same_kind = sorted({fact(c, relation) for c in FACTS} - {answer})
    own = [fact(country, r) for r in RELATIONS if r != relation]
    others = [v for v in own if v != answer]
    return [rng.choice(same_kind), *rng.sample(others, N_CHOICES - 2)]


def fact_item(world: FactWorld, country: str, relation: str, language: str, rng) -> dict:
    """One item: the question in `language`, four English choices, the right one's index."""
    answer = fact(country, relation)
    options = [answer, *distractors(country, relation, rng)]
    rng.shuffle(options)
    frame = QUESTION.format(relation=relation, country="{country}")
    return {
        "prompt": translate(frame, world.languages[language]).format(country=country),
        "choices": options,
        "label": options.index(answer),
        "language": language,
        "country": country,
        "relation": relation,
    }


def fact_splits(world: FactWorld, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """Every (country, relation, language) question, split by country into (train, test)."""
    train, test = [], []
    for country in FACTS:
        for relation in RELATIONS:
            for language in world.languages:
                item = fact_item(world, country, relation, language, rng)
                (test if country in world.test_countries else train).append(item)
    return train, test
