"""The MergeKit recipe that reproduces an evolved model from its lineage.

Every merged member records the MergeKit stage that made it (:class:`MergeRecord`: registered
method, inputs with their per-model parameters, base, shared parameters, dtype). Replaying the
lineage stage by stage with MergeKit gives the same tensors, because the search merged with the
same registered methods. One stage is a plain ``mergekit-yaml`` config; a deeper lineage is a
``mergekit-multi`` file: ``---``-separated documents, every intermediate stage with a ``name:``
that later stages use as a model path, and the final stage unnamed.

Stage names are written ``./m0004``: MergeKit's card writer (``mergekit.card.is_hf``) asks the
Hub whether an existing path with exactly one ``/`` is a repository, which fails offline; with
the ``./`` prefix, ``mergekit-multi --intermediate-dir stages`` reads ``stages/./m0004`` (two
slashes: local) and a stage-by-stage ``mergekit-yaml`` run reads ``./m0004`` (not a valid Hub
id, so it is never looked up). Local parents get the same prefix (:func:`local_reference`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergekit_sae.atomic import atomic_dir, write_text
from mergekit_sae.errors import RecipeError
from mergekit_sae.records import Member, MergeInput, lineage

RECIPE_FILE = "mergekit_config.yml"

SINGLE_STAGE_HEADER = """\
# Reproduces this model's weights with MergeKit (install mergekit-sae so that its merge
# methods are registered in every MergeKit process):
#   mergekit-yaml {file} ./merged
"""
MULTI_STAGE_HEADER = """\
# Reproduces this model's weights with MergeKit in {count} stages (install mergekit-sae so that
# its merge methods are registered in every MergeKit process). Named stages are written to the
# intermediate directory and referenced by name from later stages; the last stage is the model:
#   mergekit-multi {file} --intermediate-dir ./stages --out-path ./merged
# or stage by stage, from one folder: save each document as its own file and run them in order
# with `mergekit-yaml STAGE.yml NAME` (NAME: the stage's name, such as ./m0004), the last one
# with `mergekit-yaml LAST.yml ./merged`. Both work offline.
"""


def local_reference(name: str) -> str:
    """Write a relative local model folder as ``./path``.

    MergeKit's model card writer takes an existing path with exactly one ``/`` (``testbed/math``)
    for a possible Hub id and asks the Hub, which fails offline; ``./testbed/math`` is local.
    """
    if Path(name).is_dir() and not Path(name).is_absolute() and not name.startswith("."):
        return f"./{name}"
    return name


def stage_name(identifier: str) -> str:
    """The name of the stage that makes a member: ``./<id>``, a path no Hub id can be."""
    return f"./{identifier}"


def model_reference(member: Member) -> str:
    """How a recipe names a member's weights: the original model, or the stage that made it."""
    if member.merge is None:
        if member.source is None and not member.path:
            raise ValueError(f"member {member.id}: an original model without source or path")
        return local_reference(member.source or member.path)
    return stage_name(member.id)


def _input_reference(item: MergeInput, members: Mapping[str, Member]) -> str:
    """The model reference of one merge input (a member, or an original model by name)."""
    if item.member is None:
        return local_reference(str(item.model))
    if item.member not in members:
        raise ValueError(f"merge input names member {item.member!r}, which has no record")
    return model_reference(members[item.member])


def copy_stage_name(reference: str) -> str:
    """Name of the stage that copies ``reference``, usable as a folder name."""
    plain = reference.removeprefix("./")
    return stage_name(re.sub(r"[^A-Za-z0-9_.-]", "_", plain).lstrip(".") + "-copy")


def stage_config(
    member: Member, members: Mapping[str, Member], copies: dict[str, str] | None = None
) -> dict[str, Any]:
    """The MergeKit config (one mergekit-yaml document) of the stage that made ``member``.

    MergeKit identifies a stage's inputs by model path, so a model given twice (a dense parent
    that is also a ``dense_reference``) is given the second time as the output of a copy
    stage; ``copies`` collects those (model reference -> copy stage name).
    """
    if member.merge is None:
        raise ValueError(f"member {member.id} was not made by a merge")
    record = member.merge
    models = []
    seen: set[str] = set()
    for item in record.inputs:
        reference = _input_reference(item, members)
        if reference in seen and copies is not None:
            reference = copies.setdefault(reference, copy_stage_name(reference))
        if reference in seen:
            raise ValueError(
                f"member {member.id}: input {reference!r} appears more often in one merge than "
                "MergeKit can tell apart (it identifies inputs by model path)"
            )
        seen.add(reference)
        entry: dict[str, Any] = {"model": reference}
        if item.parameters:
            entry["parameters"] = dict(item.parameters)
        models.append(entry)
    config: dict[str, Any] = {"merge_method": record.method, "models": models}
    if record.base_member is not None:
        config["base_model"] = _input_reference(MergeInput(member=record.base_member), members)
    elif record.base_model is not None:
        config["base_model"] = local_reference(record.base_model)
    if record.parameters:
        config["parameters"] = dict(record.parameters)
    # The search lets the method compute in the inputs' promoted dtype and casts the result to
    # ``record.dtype``; MergeKit does the same when only ``out_dtype`` is set.
    config["out_dtype"] = record.dtype
    return config


def passthrough_config(reference: str) -> dict[str, Any]:
    """A one-model ``passthrough`` config: an exact copy of ``reference``."""
    return {"merge_method": "passthrough", "models": [{"model": reference}]}


def recipe_documents(members: Mapping[str, Member], best: str) -> list[dict[str, Any]]:
    """MergeKit documents reproducing ``best``: one per merged ancestor, the final one unnamed.

    Copy stages (``passthrough``) precede the first stage that needs a model twice; a best
    model that is an original parent is a single ``passthrough`` of it.
    """
    if best not in members:
        raise ValueError(f"member {best!r} has no record")
    try:
        ancestry = lineage(members, best)
    except KeyError as error:
        raise ValueError(
            f"the lineage of {best} names member {error.args[0]!r}, which has no record"
        ) from None
    merged = [m for m in ancestry if m.merge is not None]
    if not merged:
        return [passthrough_config(model_reference(members[best]))]
    documents = []
    copies: dict[str, str] = {}
    for member in merged:
        known = set(copies)
        config = stage_config(member, members, copies)
        for reference, name in copies.items():
            if reference not in known:
                documents.append({"name": name, **passthrough_config(reference)})
        if member.id != best:
            config = {"name": stage_name(member.id), **config}
        documents.append(config)
    return documents


def validate_documents(documents: Sequence[Mapping[str, Any]]) -> None:
    """Check every document against MergeKit's own configuration model."""
    from mergekit.config import MergeConfiguration

    for index, document in enumerate(documents):
        body = {key: value for key, value in document.items() if key != "name"}
        try:
            MergeConfiguration.model_validate(body)
        except ValueError as error:
            label = document.get("name", "final stage")
            raise RecipeError(f"recipe document {index} ({label}) is invalid: {error}") from error


def render_recipe(documents: Sequence[Mapping[str, Any]], file_name: str = RECIPE_FILE) -> str:
    """YAML text of the recipe: a usage comment, then the documents separated by ``---``."""
    header = SINGLE_STAGE_HEADER if len(documents) == 1 else MULTI_STAGE_HEADER
    body = yaml.safe_dump_all(
        [dict(document) for document in documents],
        sort_keys=False,
        default_flow_style=False,
        explicit_start=len(documents) > 1,
    )
    return header.format(file=file_name, count=len(documents)) + body


def write_recipe(members: Mapping[str, Member], best: str, out: str | Path) -> Path:
    """Write ``OUT/mergekit_config.yml`` reproducing member ``best``; return its path."""
    documents = recipe_documents(members, best)
    validate_documents(documents)
    path = Path(out) / RECIPE_FILE
    write_text(path, render_recipe(documents))
    return path


def load_stages(path: str | Path) -> list[dict[str, Any]]:
    """The documents of a single- or multi-stage recipe file, with a clear error on bad YAML."""
    path = Path(path)
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}", file=path) from error
    if not documents or not all(isinstance(doc, dict) for doc in documents):
        raise RecipeError(
            f"{path}: expected one or more YAML mappings (MergeKit configs)", file=path
        )
    return documents


def validate_stage(document: Mapping[str, Any], source: str) -> Any:
    """One MergeKit document as a ``MergeConfiguration``; RecipeError naming ``source``."""
    from mergekit.config import MergeConfiguration

    try:
        return MergeConfiguration.model_validate(document)
    except ValueError as error:
        raise RecipeError(f"{source}: invalid recipe: {error}", file=source) from error


def run_recipe(
    path: str | Path,
    out_path: str | Path,
    *,
    intermediate_dir: str | Path | None = None,
    options: Any = None,
) -> Path:
    """Run a single- or multi-stage recipe with MergeKit in this process; return ``out_path``.

    A multi-stage file runs like ``mergekit-multi``: named stages go to ``intermediate_dir``
    (default: ``<out_path>.stages`` beside the output; existing stages are reused) and the
    unnamed last stage to ``out_path``. The output is written once, through
    ``mergekit_sae.atomic.atomic_dir`` (it replaces any previous one whole).
    """
    from mergekit.merge import run_merge  # MergeKit's merge machinery loads only to run
    from mergekit.options import MergeOptions

    from mergekit_sae.merging.run_guard import run_merge_atomic
    from mergekit_sae.methods import register_all

    register_all()
    options = options or MergeOptions()
    documents = load_stages(path)
    out_path = Path(out_path).absolute()
    if len(documents) == 1 and "name" not in documents[0]:
        run_merge_atomic(run_merge, validate_stage(documents[0], str(path)), str(out_path), options)
        return out_path

    from mergekit.graph import Executor
    from mergekit.scripts.multimerge import load_config, make_tasks

    stages = Path(intermediate_dir or out_path.with_name(out_path.name + ".stages")).absolute()
    stages.mkdir(parents=True, exist_ok=True)
    configs, dependencies = load_config(Path(path).read_text(), str(stages))
    if None not in configs:
        raise RecipeError(f"{path}: every stage is named; the final stage must have no 'name:'")
    with atomic_dir(out_path, flush_while_writing=True) as staged:
        tasks = make_tasks(configs, dependencies, options, str(stages), str(staged), lazy=True)
        Executor(tasks, math_device="cpu", storage_device="cpu").execute(desc="Merging stages")
    return out_path
