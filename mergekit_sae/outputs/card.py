"""The Hugging Face model card (``OUT/README.md``) of an evolved model.

YAML front matter (``base_model``, ``tags``, ``library_name``) built with huggingface_hub's
:class:`ModelCardData`, then a short description, the test-accuracy table (parents, static
baselines, the evolved model), the search settings and the MergeKit recipe that reproduces
the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergekit_sae.atomic import write_text

CARD_FILE = "README.md"
TAGS = ("merge", "mergekit", "sae_evolve", "mergekit-sae")
PAPER = "https://arxiv.org/abs/2602.08218"


def is_hub_id(model: str) -> bool:
    """Whether a model name is a Hub id (``owner/name``, not a local directory)."""
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not Path(model).expanduser().is_dir()


def format_score(value: float | None) -> str:
    """An accuracy as a percentage with one decimal, or a dash when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}"


def results_table(
    results: Mapping[str, Mapping[str, float]], tasks: Sequence[str], highlight: str | None = None
) -> str:
    """Markdown table: one row per model, one column per task, then the mean over tasks."""
    header = ["Model", *tasks, "Mean"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, scores in results.items():
        values = [scores.get(task) for task in tasks]
        known = [v for v in values if v is not None]
        mean = sum(known) / len(known) if len(known) == len(tasks) and tasks else None
        cells = [label, *map(format_score, values), format_score(mean)]
        if label == highlight:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings_list(settings: Mapping[str, Any]) -> str:
    """Markdown bullet list ``- key: value`` of the search settings."""
    return "\n".join(f"- {key}: `{value}`" for key, value in settings.items())


def render_card(
    *,
    name: str,
    parents: Sequence[str],
    recipe: str,
    results: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str] | None = None,
    evolved: str | None = None,
    found_by: str = f"Sparsity-Aware Evolution ([SAE]({PAPER}))",
    settings: Mapping[str, Any] | None = None,
    license: str | None = None,
) -> str:
    """Text of the model card: front matter, description, results, settings, recipe.

    ``results`` maps a row label to its test accuracy per task (in [0, 1]), rows in display
    order; ``evolved`` names the row of the evolved model (shown in bold); ``found_by`` names
    the search in the description (Markdown). ``parents`` that are
    Hub ids become the ``base_model`` list; local paths are named in the text only.
    """
    from huggingface_hub import ModelCardData

    tasks = list(tasks) if tasks is not None else sorted({t for r in results.values() for t in r})
    hub_parents = [p for p in parents if is_hub_id(p)]
    data = ModelCardData(
        base_model=hub_parents or None,
        library_name="transformers",
        tags=list(TAGS),
        license=license,
    )
    command = (
        "mergekit-multi mergekit_config.yml --intermediate-dir ./stages --out-path ./merged"
        if len([doc for doc in yaml.safe_load_all(recipe) if doc is not None]) > 1
        else "mergekit-yaml mergekit_config.yml ./merged"
    )
    sections = [
        f"---\n{data.to_yaml()}\n---",
        f"# {name}",
        f"This model is a merge of pre-trained language models, found by {found_by} with "
        "[mergekit-sae](https://pypi.org/project/mergekit-sae/) on top of "
        "[MergeKit](https://github.com/arcee-ai/mergekit).",
        "## Merged models\n\n" + "\n".join(f"- `{parent}`" for parent in parents),
    ]
    if results:
        sections.append(
            "## Results\n\nTest accuracy (%) per task.\n\n" + results_table(results, tasks, evolved)
        )
    if settings:
        sections.append("## Search settings\n\n" + settings_list(settings))
    sections.append(
        "## Reproduce with MergeKit\n\n"
        "With `mergekit-sae` installed (it registers the `sae_evolve` and `sae_prune` methods in "
        f"MergeKit), this recipe rebuilds the weights exactly:\n\n```sh\n{command}\n```\n\n"
        f"```yaml\n{recipe.rstrip()}\n```"
    )
    return "\n\n".join(sections) + "\n"


def write_card(out: str | Path, **card: Any) -> Path:
    """Write ``OUT/README.md`` (arguments as for :func:`render_card`); return its path."""
    path = Path(out) / CARD_FILE
    write_text(path, render_card(**card))
    return path
