"""The MMLU-ProX-style task: multiple-choice questions about shared facts in several languages.

A world of invented countries has one value per relation (its colour, animal, ...). The base
model reads these facts in English; the questions are asked in invented languages that
translate every word except the country names, so answering a question about a held-out
country needs the base's English knowledge and the expert's grasp of the language.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from mergekit_sae.testbed.vocab import invented_words

RELATIONS: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "yellow", "black", "white"),
    "animal": ("cat", "dog", "horse", "bird", "bear", "wolf"),
    "food": ("bread", "rice", "corn", "beans", "cheese", "soup"),
    "music": ("drum", "flute", "harp", "horn", "bell", "lute"),
}
QUESTION = "question : what is the {relation} of {country} ? answer :"
STATEMENT = "the {relation} of {country} is {value} ."
# Words a language translates: the question frame, the relations and their values.
TRANSLATED = tuple(
    sorted(
        {w for w in QUESTION.split() if w.isalpha() and w not in ("relation", "country")}
        | set(RELATIONS)
        | {v for values in RELATIONS.values() for v in values}
    )
)


@dataclass(frozen=True)
class World:
    """Countries, their facts, and the invented languages' dictionaries."""

    countries: tuple[str, ...]
    facts: dict[tuple[str, str], str]  # (country, relation) -> value (English)
    languages: dict[str, dict[str, str]]  # language name -> English word -> word
    test_countries: frozenset[str]

    def words(self) -> set[str]:
        """Every word the world's texts use."""
        words = set(self.countries) | set(TRANSLATED) | {"the", "of", "is"}
        for dictionary in self.languages.values():
            words |= set(dictionary.values())
        return words


def make_world(rng: random.Random, n_countries: int, n_test: int, n_languages: int) -> World:
    """Draw countries, one value per (country, relation), and `n_languages` dictionaries."""
    taken = set(TRANSLATED) | {"the", "of", "is"}
    countries = tuple(w + "ia" for w in invented_words(rng, n_countries, taken))
    facts = {(c, r): rng.choice(values) for c in countries for r, values in RELATIONS.items()}
    languages = {}
    for i in range(n_languages):
        translations = invented_words(rng, len(TRANSLATED), taken, syllables=(1, 2))
        languages[f"lang{i + 1}"] = dict(zip(TRANSLATED, translations, strict=True))
    test = frozenset(rng.sample(countries, n_test))
    return World(countries, facts, languages, test)


def translate(text: str, dictionary: dict[str, str]) -> str:
    """Replace every word that has a translation; keep names and punctuation."""
    return " ".join(dictionary.get(word, word) for word in text.split())


def question_item(world: World, country: str, relation: str, language: str, rng, n_choices):
    """One multiple-choice item: the question in `language` and `n_choices` translated values."""
    dictionary = world.languages[language]
    answer = world.facts[(country, relation)]
    wrong = rng.sample([v for v in RELATIONS[relation] if v != answer], n_choices - 1)
    options = [answer, *wrong]
    rng.shuffle(options)
    return {
        "prompt": translate(QUESTION.format(relation=relation, country=country), dictionary),
        "choices": [dictionary[v] for v in options],
        "label": options.index(answer),
        "language": language,
        "country": country,
        "relation": relation,
    }


def multilingual_splits(world: World, rng: random.Random, n_choices: int):
    """All questions in every language, split by country into disjoint (train, test) lists."""
    train, test = [], []
    for country in world.countries:
        for relation in RELATIONS:
            for language in world.languages:
                item = question_item(world, country, relation, language, rng, n_choices)
                (test if country in world.test_countries else train).append(item)
    return train, test


def english_questions(world: World) -> list[tuple[str, str]]:
    """Every fact as an English (question, answer) pair."""
    return [
        (QUESTION.format(relation=relation, country=country), world.facts[(country, relation)])
        for country, relation in sorted(world.facts)
    ]


def english_documents(world: World, rng: random.Random) -> Iterator[str]:
    """Generic English text for pretraining: statements of facts and questions answered."""
    keys = sorted(world.facts)
    while True:
        country, relation = rng.choice(keys)
        value = world.facts[(country, relation)]
        if rng.random() < 0.5:
            yield STATEMENT.format(relation=relation, country=country, value=value)
        else:
            yield QUESTION.format(relation=relation, country=country) + " " + value
