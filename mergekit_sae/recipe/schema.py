"""The evolve recipe: a YAML file validated by pydantic, with errors that name the field.

Relative paths (models, task files) resolve against the current directory, as in
``mergekit-yaml``. A model that is not a local directory is taken as a Hugging Face Hub id
and fetched (weights, configuration, tokenizer) before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_sae.domains import PruneTarget, SparsityMeasure
from mergekit_sae.dtypes import DtypeName
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate import TaskSpec
from mergekit_sae.search.sae_settings import moved_fields

Dtype = DtypeName
Baseline = Literal["parents", "linear"]
__all__ = ["Dtype", "Baseline", "RecipeError", "Recipe", "TrackingSettings", "WandbSettings"]


class EvolveTask(TaskSpec):
    """A task of the search: the evaluator spec plus how it enters the optimisation."""

    subsample: int | None = Field(
        None, ge=1, description="training items drawn afresh each step (None: all of them)"
    )
    test_subsample: int | None = Field(
        None, ge=1, description="test items used for the final report (None: all of them)"
    )
    weight: float = Field(1.0, gt=0, description="weight of the task in the performance mean")


class WandbSettings(BaseModel):
    """Where a run is tracked in Weights & Biases (``wandb.init`` arguments)."""

    model_config = ConfigDict(extra="forbid")

    project: str = Field(min_length=1, description="the W&B project")
    entity: str | None = Field(None, description="the W&B user or team (None: your default)")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: write the run locally, upload later with `wandb sync`"
    )
    group: str | None = Field(None, description="runs to overlay (compare sets the comparison)")
    name: str | None = Field(None, description="the run's name (None: the output folder's name)")


class TrackingSettings(BaseModel):
    """Live tracking of every step: a TensorBoard log directory, a W&B run, or both."""

    model_config = ConfigDict(extra="forbid")

    tensorboard: str | None = Field(None, description="TensorBoard log directory")
    wandb: WandbSettings | None = None

    @property
    def enabled(self) -> bool:
        """Whether any tracking backend is asked for."""
        return self.tensorboard is not None or self.wandb is not None


class ExecutorSettings(BaseModel):
    """Where candidates are scored: ``serial`` in the driver, or ``ray`` on Ray actors."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["serial", "ray"] = Field("serial", description="serial or ray")
    address: str | None = Field(
        None, description="Ray cluster address (None: the cluster joined, or a local one)"
    )
    workers: int | None = Field(
        None, ge=1, description="actors (None: one per GPU share, or per cpus_per_worker CPUs)"
    )
    gpus_per_worker: float = Field(0.0, ge=0.0, description="GPUs each actor reserves")
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs each actor reserves")
    transfer: Literal["path", "object_store"] = Field(
        "path", description="weights by path (a store all workers see) or the Ray object store"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        """``executor: ray`` is short for ``executor: {kind: ray}``."""
        return {"kind": data} if isinstance(data, str) else data


class Recipe(BaseModel):
    """Everything `mergekit-sae evolve` needs; defaults are the paper's."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=2, description="the dense parents (paths or Hub ids)")
    base_model: str | None = Field(None, description="shared base (needed by prune_target delta)")
    tasks: list[EvolveTask] = Field(min_length=1)
    steps: int = Field(12, ge=1)
    prune_target: PruneTarget = Field(
        "weights",
        description="what pruning acts on and zeros are counted in: the weights, or the task "
        "vectors (model - base_model)",
    )
    sparsity_measure: SparsityMeasure = Field(
        "zero_count", description="how a model's sparsity is measured (reports, SAE's eq. 5)"
    )
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (merging and scoring)")
    dtype: Dtype | None = Field(None, description="dtype of merged weights (None: first parent's)")
    eval_dtype: Dtype | None = Field(None, description="scoring dtype (None: fp32 CPU, bf16 GPU)")
    eval_batch_size: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1, description="torch CPU threads (None: torch's)")
    test_baselines: list[Baseline] = Field(
        default_factory=lambda: ["parents", "linear"],
        description="reference models scored on the test split for the summary",
    )
    shard_size: int = Field(5 * 1000**3, ge=1, description="bytes per safetensors shard")
    keep_population: bool = Field(False, description="keep members' weights after the run")
    executor: ExecutorSettings = Field(
        default_factory=ExecutorSettings,
        exclude=True,  # changes where scores are computed, never their values: resumable
        description="where candidates are scored (serial, or ray with its settings)",
    )
    profile: bool = Field(
        False, exclude=True, description="record peak memory and per-member times per step"
    )
    allow_pickle: bool = Field(
        False,
        description="accept pickle weights (.bin, .pt, .pth), which can run code when loaded",
    )
    trust_remote_code: bool = Field(
        False, description="let transformers run the model repository's own Python code"
    )
    tracking: TrackingSettings = Field(
        default_factory=TrackingSettings, description="live tracking (TensorBoard, W&B)"
    )
    pareto_max: int = Field(
        8, ge=1, description="Pareto-front members scored on the test splits at the end"
    )
    select: Literal["best", "sparsest_within"] = Field(
        "best",
        description="the final model: the search's best, or the sparsest front member "
        "whose training mean is within `tolerance` of the front's highest",
    )
    tolerance: float = Field(
        1.0,
        ge=0.0,
        le=100.0,
        description="accuracy points allowed below the best (sparsest_within)",
    )
    search: str = Field("sae", description="the search: sae, pso, m2n2 or cmaes")
    budget: int | None = Field(
        None, ge=1, description="fitness evaluations allowed (None: what `steps` take)"
    )
    search_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="each search's own block, by search name"
    )

    @model_validator(mode="before")
    @classmethod
    def _collect_search_blocks(cls, data: Any) -> Any:
        """Move top-level blocks named after a search (``pso:``...) into ``search_settings``;
        refuse fields of the earlier layout, naming where each one moved."""
        from mergekit_sae.search import search_names

        if not isinstance(data, dict):
            return data
        moved = moved_fields(data)
        if moved:
            raise ValueError(
                "these fields moved (SAE's settings live in the `sae:` block): " + "; ".join(moved)
            )
        data = dict(data)
        blocks = dict(data.get("search_settings") or {})
        for name in search_names():
            if name in data:
                block = data.pop(name)
                blocks[name] = {} if block is None else block
        if blocks:
            data["search_settings"] = blocks
        return data

    @field_validator("search")
    @classmethod
    def _known_search(cls, value: str) -> str:
        """The search must be registered."""
        from mergekit_sae.search import search_names

        if value not in search_names():
            raise ValueError(f"unknown search {value!r}; choose one of {', '.join(search_names())}")
        return value

    @field_validator("search_settings")
    @classmethod
    def _valid_blocks(cls, value: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each block validates against its search's settings model (defaults filled in)."""
        from mergekit_sae.search import search_class, search_names

        checked = {}
        for name, block in value.items():
            if name not in search_names():
                raise ValueError(f"unknown search {name!r}; choose one of {search_names()}")
            if not isinstance(block, dict):
                raise ValueError(f"{name}: expected a mapping of settings, got {block!r}")
            try:
                settings = search_class(name).settings_model.model_validate(block)
            except ValidationError as error:
                problems = "; ".join(
                    f"{name}.{field_path(tuple(p['loc']))}: "
                    + p["msg"].removeprefix("Value error, ")
                    for p in error.errors()
                )
                raise ValueError(problems) from None
            checked[name] = settings.model_dump(mode="json")
        return checked

    def settings_for(self, name: str | None = None) -> Any:
        """The validated settings model of a search (default: the recipe's search)."""
        from mergekit_sae.search import search_class

        name = name or self.search
        return search_class(name).settings_model.model_validate(self.search_settings.get(name, {}))

    @field_validator("models")
    @classmethod
    def _distinct_models(cls, value: list[str]) -> list[str]:
        """The same model twice would only merge a model with itself."""
        duplicates = sorted({m for m in value if value.count(m) > 1})
        if duplicates:
            raise ValueError(f"models are listed more than once: {duplicates}")
        return value

    @field_validator("tasks")
    @classmethod
    def _distinct_tasks(cls, value: list[EvolveTask]) -> list[EvolveTask]:
        """Task names key the scores, so they must differ."""
        names = [task.name for task in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique, repeated: {duplicates}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        """Cross-field rules: delta pruning needs a base; the search's own rules."""
        if self.prune_target == "delta" and self.base_model is None:
            raise ValueError("prune_target 'delta' prunes model - base: set base_model")
        from mergekit_sae.search import search_class

        search_class(self.search).check_recipe(self, self.settings_for())
        return self

    def digest_fields(self) -> dict[str, Any]:
        """The recipe as JSON data, for the checkpoint."""
        return self.model_dump(mode="json")


def field_path(location: tuple[int | str, ...]) -> str:
    """A pydantic error location as a readable field path: tasks[0].type."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


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
