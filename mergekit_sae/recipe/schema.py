"""The evolve recipe's schema: pydantic models whose errors name the field.

Each search's own block (``sae:``, ``pso:``, ...) is validated by the settings model the
search registers (:mod:`mergekit_sae.search`); the run-wide fields are here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_sae.domains import PruneTarget, SparsityMeasure
from mergekit_sae.dtypes import DtypeName
from mergekit_sae.errors import RecipeError
from mergekit_sae.evaluate import TaskSpec
from mergekit_sae.search import search_class, search_names
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
    search: str = Field(
        "sae", description="a registered search (mergekit_sae.search.search_names())"
    )
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
        if value not in search_names():
            raise ValueError(f"unknown search {value!r}; choose one of {', '.join(search_names())}")
        return value

    @field_validator("search_settings")
    @classmethod
    def _valid_blocks(cls, value: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each block validates against its search's settings model (defaults filled in)."""
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
