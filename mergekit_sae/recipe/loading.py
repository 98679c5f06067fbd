"""Reading an evolve recipe: YAML (refusing duplicate keys), validation with errors that name
the file and field, and the local folder of each model.

Relative paths (models, task files) resolve against the current directory, as in
``mergekit-yaml``. A model that is not a local directory is taken as a Hugging Face Hub id and
fetched (weights, configuration, tokenizer) before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergekit_sae.errors import RecipeError
from mergekit_sae.recipe.schema import Recipe, field_path


def format_validation_error(source: str, error: ValidationError) -> str:
    """One line per problem: the file, the field and what is wrong."""
    lines = []
    for problem in error.errors():
        where = field_path(tuple(problem["loc"])) or "(top level)"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where}: {message}")
    return "\n".join(lines)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate recipe data; raise RecipeError naming the source and the fields."""
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: expected a mapping of recipe fields, got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(format_validation_error(source, error)) from None


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        explicit = sum(key.tag != "tag:yaml.org,2002:merge" for key, _ in node.value)
        self.flatten_mapping(node)  # `<<:` merges first: explicit keys may override them
        seen: dict[Any, int] = {}
        for key_node, _ in node.value[len(node.value) - explicit :]:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the safe loader's own error follows
                break
            if first is not None:
                message = f"duplicate key {key!r} (first on line {first})"
                raise yaml.constructor.ConstructorError(None, None, message, key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The YAML document of a file; RecipeError for bytes that are not UTF-8, bad YAML, a
    duplicate key or nesting too deep to read."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: line {line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset "
            f"{error.start})",
            file=path,
        ) from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({error})", file=path) from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to read", file=path) from None


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file does not exist")
    return parse_recipe(read_yaml(path), str(path))


def looks_like_path(name: str) -> bool:
    """Whether a model name can only be a local path (a Hub id is exactly ``owner/name``)."""
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or "\\" in name
        or Path(name).suffix in (".safetensors", ".bin")
    )


def resolve_model(name: str, field: str, source: str = "recipe") -> Path:
    """The local directory of a model: the path itself, or a Hub snapshot fetched now."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RecipeError(f"{source}: {field}: {path} has no config.json (not a model folder)")
        return path.absolute()
    if looks_like_path(name):
        raise RecipeError(f"{source}: {field}: model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        fetched = snapshot_download(
            name,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    except Exception as error:
        raise RecipeError(
            f"{source}: {field}: {name!r} is not a local model directory and could not be "
            f"fetched from the Hugging Face Hub ({type(error).__name__}: {error})"
        ) from None
    return Path(fetched)
