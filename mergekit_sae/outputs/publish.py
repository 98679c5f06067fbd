"""``mergekit-sae publish OUT/``: upload an evolved model folder to the Hugging Face Hub.

Only the publishable part of OUT/ goes up: hidden entries (the ``.work/`` checkpoints, temporary
files of atomic writes) are left out, so a run folder can be published as it is.

The lineage (``mergekit_config.yml``) and the card of a run on local folders name those folders,
which nobody else can rebuild from. Publishing maps each local model to a Hub id (``--parent-id
LOCAL=owner/name``, else the ``_name_or_path`` of the folder's ``config.json`` when that is a Hub
id), uploads the card and lineage rewritten with the ids (OUT/ itself is left as it is), and
refuses a lineage that still names a local path unless ``--allow-local-paths``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mergekit_sae.errors import PublishError
from mergekit_sae.merging.recipes import render_recipe

# fnmatch patterns, matched as huggingface_hub matches them (``*`` spans ``/``):
# every hidden file or folder, at the top level or below it (this covers .git and .cache too).
EXCLUDE_PATTERNS: tuple[str, ...] = (".*", "*/.*")
DEFAULT_COMMIT_MESSAGE = "Upload SAE-evolved model (mergekit-sae)"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
RECIPE_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"


@dataclass(frozen=True)
class UploadFile:
    """One file that would be uploaded: its path inside the repository and its size in bytes."""

    path: str
    size: int


def check_publishable(folder: Path) -> None:
    """Raise a ``PublishError`` naming what ``folder`` lacks to be a model with a card."""
    if not folder.is_dir():
        raise PublishError(
            f"{folder}: not a directory (expected an evolve output folder)", file=folder
        )
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json (the model configuration)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"model weights ({' or '.join(WEIGHT_FILES)})")
    if not (folder / "README.md").is_file():
        missing.append("README.md (the model card)")
    if missing:
        raise PublishError(
            f"{folder} cannot be published, it lacks: {'; '.join(missing)}. "
            "Run `mergekit-sae evolve RECIPE.yml OUT/` to completion first.",
            file=folder,
        )


def upload_files(folder: Path, exclude: Sequence[str] = EXCLUDE_PATTERNS) -> list[UploadFile]:
    """List the files of ``folder`` that an upload with ``exclude`` as ignore patterns sends."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=list(exclude))
    return [UploadFile(path, (folder / path).stat().st_size) for path in kept]


def human_size(size: int) -> str:
    """Format a byte count for people (1.5 KiB, 2.0 GiB)."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_listing(files: Sequence[UploadFile]) -> str:
    """A plain table of the files to upload with their sizes and a total line."""
    width = max((len(f.path) for f in files), default=0)
    lines = [f"{f.path:<{width}}  {human_size(f.size):>10}" for f in files]
    total = sum(f.size for f in files)
    lines.append(f"{len(files)} files, {human_size(total)} in total")
    return "\n".join(lines)


def is_local_reference(reference: str) -> bool:
    """Whether a recipe's model reference is a local path rather than a Hub id."""
    from mergekit_sae.recipe.loading import looks_like_path  # the schema loads torch: not at start

    return looks_like_path(reference) or Path(reference).expanduser().is_dir()


def lineage_references(recipe_text: str) -> list[str]:
    """The models a lineage file names (``models[].model``, ``base_model``), stages excluded."""
    documents = [doc for doc in yaml.safe_load_all(recipe_text) if isinstance(doc, dict)]
    stages = {doc["name"] for doc in documents if "name" in doc}
    found: list[str] = []
    for doc in documents:
        names = [m.get("model") if isinstance(m, dict) else m for m in doc.get("models") or []]
        names.append(doc.get("base_model"))
        for name in names:
            if isinstance(name, str) and name not in stages and name not in found:
                found.append(name)
    return found


def same_path(first: str, second: str) -> bool:
    """Whether two path spellings name the same place (``./a``, ``a``, its absolute path)."""
    return Path(first).expanduser().absolute().resolve() == (
        Path(second).expanduser().absolute().resolve()
    )


def own_hub_id(reference: str) -> str | None:
    """The Hub id a local model folder's ``config.json`` records as ``_name_or_path``."""
    try:
        config = json.loads((Path(reference).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(name, str) and name and not is_local_reference(name):
        return name
    return None


def parent_ids(references: Sequence[str], explicit: Mapping[str, str]) -> dict[str, str]:
    """Hub ids of the local references: the explicit mapping first, then ``_name_or_path``."""
    mapping = {}
    for reference in references:
        if not is_local_reference(reference):
            continue
        given = [hub for local, hub in explicit.items() if same_path(local, reference)]
        hub_id = given[0] if given else own_hub_id(reference)
        if hub_id is not None:
            mapping[reference] = hub_id
    return mapping


def rewrite_recipe(recipe_text: str, mapping: Mapping[str, str]) -> str:
    """The lineage file with mapped model references (its header comment kept)."""
    documents = [doc for doc in yaml.safe_load_all(recipe_text) if isinstance(doc, dict)]
    for doc in documents:
        for entry in doc.get("models") or []:
            if isinstance(entry, dict) and entry.get("model") in mapping:
                entry["model"] = mapping[entry["model"]]
        if doc.get("base_model") in mapping:
            doc["base_model"] = mapping[doc["base_model"]]
    return render_recipe(documents)


def spellings(reference: str) -> list[str]:
    """How a card may spell a local reference: as written, and without a leading ``./``."""
    return sorted({reference, reference.removeprefix("./")}, key=len, reverse=True)


def rewrite_card(card: str, old_recipe: str, new_recipe: str, mapping: Mapping[str, str]) -> str:
    """The card with the new recipe, mapped model names, and the ids in ``base_model``."""
    text = card.replace(old_recipe.rstrip(), new_recipe.rstrip())
    for reference, hub_id in mapping.items():
        for spelling in spellings(reference):
            pattern = r"(?<![\w./~-])" + re.escape(spelling) + r"(?![\w/-]|\.\w)"
            text = re.sub(pattern, hub_id, text)
    match = re.match(r"---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if match is None:
        return text
    data = yaml.safe_load(match.group(1)) or {}
    known = data.get("base_model") or []
    known = [known] if isinstance(known, str) else list(known)
    data["base_model"] = list(dict.fromkeys([*known, *mapping.values()]))
    front = yaml.safe_dump(data, sort_keys=False).rstrip()
    return f"---\n{front}\n---\n" + text[match.end() :]


def publish_rewrites(
    folder: Path, explicit: Mapping[str, str], *, allow_local: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """Map the lineage's local models to Hub ids; return (mapping, rewritten files by name).

    Raises PublishError naming the references still local, unless ``allow_local``.
    """
    recipe_path = folder / RECIPE_FILE
    if not recipe_path.is_file():
        return {}, {}
    recipe_text = recipe_path.read_text(encoding="utf-8")
    references = lineage_references(recipe_text)
    mapping = parent_ids(references, explicit)
    local = [r for r in references if is_local_reference(r) and r not in mapping]
    if local and not allow_local:
        raise PublishError(
            f"{recipe_path} names local paths ({', '.join(local)}), so the published lineage "
            "could not be rebuilt by anyone else; map each to its Hub id with "
            "--parent-id LOCAL=owner/name (or record it as _name_or_path in its config.json), "
            "or pass --allow-local-paths to publish them as they are",
            file=recipe_path,
        )
    if not mapping:
        return {}, {}
    new_recipe = rewrite_recipe(recipe_text, mapping)
    files = {RECIPE_FILE: new_recipe}
    card_path = folder / CARD_FILE
    if card_path.is_file():
        card = card_path.read_text(encoding="utf-8")
        files[CARD_FILE] = rewrite_card(card, recipe_text, new_recipe, mapping)
    return mapping, files


@contextlib.contextmanager
def staged_folder(
    folder: Path, files: Sequence[UploadFile], texts: Mapping[str, str]
) -> Iterator[Path]:
    """A temporary copy of the upload (hard links where possible) with ``texts`` replaced."""
    with tempfile.TemporaryDirectory(prefix=".publish-", dir=folder.parent) as tmp:
        staged = Path(tmp) / folder.name
        for item in files:
            target = staged / item.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if item.path in texts:
                target.write_text(texts[item.path], encoding="utf-8")
                continue
            try:
                os.link(folder / item.path, target)
            except OSError:
                shutil.copy2(folder / item.path, target)
        yield staged


def upload(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Create ``repo_id`` if needed, upload ``folder`` minus hidden entries; return commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=list(EXCLUDE_PATTERNS),
    )
    return str(getattr(info, "commit_url", info))
