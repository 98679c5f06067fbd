"""CMA-ES over per-layer merge parameters, as MergeKit's (deprecated) ``mergekit-evolve`` does.

The genotype follows ``mergekit/evo/genome.py`` (``ModelGenome``): per layer group, per expert,
the parameters of the merge method in MergeKit's order (``weight``, then ``density`` for
``ties``), flattened row-major as ``genotype.view(-1)`` does, i.e. index
``(group * n_models + model) * n_params + param``. It starts at weight 1/n and density 1
(``initial_genotype(random=False)``) and is decoded as ``genotype_merge_config`` does: weight
= abs(x) (MergeKit's default ``allow_negative_weights: false``; weights are not clamped),
density = clamp(abs(x), 0, 1); no CMA bounds. ``normalize`` defaults to MergeKit's (true for
``linear`` and ``ties``, false for ``task_arithmetic``) and ``int8_mask`` is set as MergeKit's
evolve sets it (a memory saving only: the mask holds 0/1 either way).

Layer groups are :func:`~mergekit_sae.merging.per_tensor.layer_groups`: ``layer_granularity``
consecutive decoder layers per group, then one group of the tensors outside the layers
(embeddings, final norm, head); granularity 0 gives one group for the whole model.

Each candidate is one MergeKit stage over the experts with the recipe's base model as
``base_model``; the per-model values are MergeKit ``filter:`` lists
(:func:`~mergekit_sae.merging.per_tensor.conditional`), so ``mergekit-yaml`` rebuilds the stage
bit for bit.

Invariants:

- one step is one generation: the strategy asks ``popsize`` solutions, the driver makes and
  scores them, the strategy is told ``-performance`` (CMA-ES minimises);
- the state holds every told generation's solutions and fitnesses (JSON, no pickle). At every
  step the strategy is rebuilt from the recipe seed and these generations are replayed with
  ask()/tell(), checking that each replayed ask() returns the recorded solutions. ``cma``
  draws from NumPy's global generator, which its constructor seeds; the caller's global
  NumPy state is saved and restored around every use, so nothing else in the process can
  shift the draws, and a resumed run asks exactly what an uninterrupted one asks;
- a generation the budget cuts is kept as ``pending`` and not told; a later step (a run
  continued with a larger budget before it finished) makes its remaining candidates first;
- the answer is the best candidate so far (strictly higher fitness replaces it, so ties keep
  the earliest); only its weights are kept on disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, Field, field_validator

from mergekit_sae.merging.per_tensor import conditional, layer_groups
from mergekit_sae.merging.stream import open_model, tensor_names
from mergekit_sae.records import Member, MergeInput, MergeRecord
from mergekit_sae.search.base import Driver, Proposal, Search, SearchSettings

CmaesMethod = Literal["ties", "task_arithmetic", "linear"]
METHODS: tuple[str, ...] = get_args(CmaesMethod)
# Per-model parameters of each method, in MergeKit's genome order (METHOD_PARAM_MAPS).
METHOD_PARAMETERS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
}
NEEDS_BASE = frozenset({"ties", "task_arithmetic"})
# MergeKit's evolve: normalize defaults to true for linear and ties (and each method's own
# default agrees); int8_mask is set for the task-arithmetic family.
DEFAULT_NORMALIZE: dict[str, bool] = {"linear": True, "ties": True, "task_arithmetic": False}
INT8_MASK = frozenset({"ties", "task_arithmetic"})
INSTALL_HINT = "pip install 'mergekit-sae[cmaes]'"


class CmaesSettings(SearchSettings):
    """CMA-ES's own block (``cmaes:``)."""

    method: CmaesMethod = Field(
        "ties", description="the MergeKit method of every candidate: ties, task_arithmetic, linear"
    )
    layer_granularity: int = Field(
        1, ge=0, description="consecutive layers per group (0: one group for the whole model)"
    )
    sigma0: float = Field(1 / 6, gt=0, description="initial step size of CMA-ES")
    popsize: int | None = Field(
        None, ge=2, description="candidates per generation (None: cma's 4 + floor(3 ln n))"
    )
    normalize: bool | None = Field(
        None, description="the method's normalize (None: MergeKit's default for the method)"
    )
    resample: bool = Field(
        False, description="draw fresh training items every step (default: step 1's items)"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _known_method(cls, value: Any) -> Any:
        """Only deterministic MergeKit methods: a candidate must rebuild bit for bit."""
        if value not in METHODS:
            raise ValueError(
                f"unknown method {value!r}; choose one of {', '.join(METHODS)} (dare_* methods "
                "draw unseeded random masks, so their candidates could not be rebuilt)"
            )
        return value


class Generation(BaseModel):
    """One generation: the solutions asked, and the members made and their fitnesses so far."""

    solutions: list[list[float]]
    members: list[str] = Field(default_factory=list)
    fitnesses: list[float] = Field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Whether every solution was made and scored."""
        return len(self.fitnesses) == len(self.solutions)


class CmaesState(BaseModel):
    """Everything the strategy is rebuilt from, and the best candidate so far.

    ``seed`` is the seed given to cma; ``popsize`` its effective population; ``dimension``
    the genotype length; ``generations`` the told generations in order; ``pending`` a
    generation the budget cut (not told); ``cma_version`` the version that wrote the state.
    """

    seed: int | None = None
    popsize: int | None = None
    dimension: int | None = None
    cma_version: str | None = None
    generations: list[Generation] = Field(default_factory=list)
    pending: Generation | None = None
    best: str | None = None
    best_fitness: float | None = None


def import_cma() -> Any:
    """The ``cma`` module, or an error saying how to install it."""
    try:
        import cma
    except ImportError as error:
        raise ImportError(f"search 'cmaes' needs the cma package: {INSTALL_HINT}") from error
    return cma


def initial_genotype(n_groups: int, n_models: int, method: str) -> list[float]:
    """MergeKit's x0: weight 1/n_models and density 1 for every group and model."""
    start = {"weight": 1.0 / n_models, "density": 1.0}
    per_model = [start[p] for p in METHOD_PARAMETERS[method]]
    return per_model * (n_groups * n_models)


def decode(genotype: Sequence[float], n_groups: int, n_models: int, method: str) -> np.ndarray:
    """Merge parameters of a genotype, shape (groups, models, params), as MergeKit decodes.

    weight = abs(x) (no clamp); density = clamp(abs(x), 0, 1).
    """
    names = METHOD_PARAMETERS[method]
    values = np.abs(np.asarray(genotype, dtype=np.float64)).reshape(n_groups, n_models, len(names))
    if "density" in names:
        index = names.index("density")
        values[..., index] = np.clip(values[..., index], 0.0, 1.0)
    return values


def group_of(groups: Sequence[Sequence[str]]) -> dict[str, int]:
    """The group index of every tensor name."""
    return {name: index for index, group in enumerate(groups) for name in group}


def tensor_parameters(
    values: np.ndarray, groups: Sequence[Sequence[str]], method: str
) -> list[dict[str, Any]]:
    """Per expert, each parameter as a MergeKit setting giving every tensor its group's value."""
    where = group_of(groups)
    per_model = []
    for model in range(values.shape[1]):
        settings = {}
        for index, name in enumerate(METHOD_PARAMETERS[method]):
            by_tensor = {t: float(values[g, model, index]) for t, g in where.items()}
            settings[name] = conditional(by_tensor)
        per_model.append(settings)
    return per_model


def shared_parameters(settings: CmaesSettings) -> dict[str, Any]:
    """The stage's shared parameters: normalize (MergeKit's default unless set), int8_mask."""
    method = settings.method
    normalize = DEFAULT_NORMALIZE[method] if settings.normalize is None else settings.normalize
    shared: dict[str, Any] = {"normalize": normalize}
    if method in INT8_MASK:
        shared["int8_mask"] = True
    return shared


def candidate_record(
    settings: CmaesSettings,
    experts: Sequence[str],
    per_model: Sequence[Mapping[str, Any]],
    base_model: str | None,
    dtype: str,
) -> MergeRecord:
    """The one MergeKit stage of a candidate: the experts with their per-tensor values."""
    return MergeRecord(
        method=settings.method,
        inputs=[
            MergeInput(member=expert, parameters=dict(params))
            for expert, params in zip(experts, per_model, strict=True)
        ],
        base_model=base_model if settings.method in NEEDS_BASE else None,
        parameters=shared_parameters(settings),
        dtype=dtype,
    )


def cma_options(seed: int, popsize: int | None) -> dict[str, Any]:
    """Options of the strategy: the seed, the population, and no output or log files."""
    options: dict[str, Any] = {"seed": seed, "verbose": -9, "verb_disp": 0, "verb_log": 0}
    if popsize is not None:
        options["popsize"] = popsize
    return options


@contextlib.contextmanager
def numpy_rng_kept() -> Iterator[None]:
    """Restore NumPy's global generator state afterwards (cma seeds and draws from it)."""
    saved = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(saved)


def same_solutions(asked: Sequence[np.ndarray], recorded: Sequence[Sequence[float]]) -> bool:
    """Whether the asked solutions are bit for bit the recorded ones."""
    return len(asked) == len(recorded) and all(
        np.array_equal(np.asarray(a, dtype=np.float64), np.asarray(r, dtype=np.float64))
        for a, r in zip(asked, recorded, strict=True)
    )


def replay(
    x0: Sequence[float],
    sigma0: float,
    seed: int,
    popsize: int | None,
    generations: Sequence[Generation],
) -> Any:
    """A strategy rebuilt from the seed with the recorded generations told again.

    Call inside :func:`numpy_rng_kept` and keep the returned strategy's next ask() in the
    same block (cma draws from NumPy's global generator). Raises when a replayed ask() differs
    from the recorded solutions (another cma version, or another x0).
    """
    cma = import_cma()
    strategy = cma.CMAEvolutionStrategy(list(x0), sigma0, cma_options(seed, popsize))
    for number, generation in enumerate(generations, start=1):
        asked = strategy.ask()
        if not same_solutions(asked, generation.solutions):
            raise RuntimeError(
                f"cma {cma.__version__} does not replay generation {number} of the checkpoint "
                "as it was recorded; resume with the cma version that started the run"
            )
        strategy.tell(asked, [-f for f in generation.fitnesses])
    return strategy


def improves(value: float, best: float | None) -> bool:
    """Whether a fitness strictly beats the best so far (ties keep the earlier)."""
    return best is None or value > best


class CmaesSearch(Search):
    """CMA-ES over per-layer-group, per-expert weights (and TIES densities)."""

    name = "cmaes"
    title = "CMA-ES over per-layer merge weights (as MergeKit's evolve tooling)"
    settings_model = CmaesSettings
    state_model = CmaesState
    settings: CmaesSettings
    state: CmaesState

    def __init__(self, recipe: Any, settings: SearchSettings, state: BaseModel | None = None):
        super().__init__(recipe, settings, state)
        self._groups: list[list[str]] | None = None

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """ties and task_arithmetic need the recipe's base_model; the cma package is needed."""
        method = getattr(settings, "method", "ties")
        if method in NEEDS_BASE and recipe.base_model is None:
            raise ValueError(
                f"cmaes.method {method!r} merges task vectors against a base model: set "
                "base_model (or use cmaes.method 'linear')"
            )
        import_cma()

    def groups(self, driver: Driver) -> list[list[str]]:
        """The layer groups of the experts' tensors (read from the weight index, cached)."""
        if self._groups is None:
            ids = [*driver.parents, *([driver.base] if driver.base is not None else [])]
            paths = [Path(driver.members[i].path) for i in ids]
            names = tensor_names([open_model(p) for p in paths], paths)
            self._groups = layer_groups(names, self.settings.layer_granularity)
        return self._groups

    def x0(self, driver: Driver) -> list[float]:
        """The initial genotype for this recipe's models."""
        return initial_genotype(len(self.groups(driver)), len(driver.parents), self.settings.method)

    def start(self, driver: Driver) -> None:
        """No stored models are needed: fix the seed, the population and the dimension."""
        cma = import_cma()
        x0 = self.x0(driver)
        seed = driver.rng("cmaes").randrange(1, 2**31)  # cma treats seed 0 as "use the time"
        with numpy_rng_kept():
            strategy = replay(x0, self.settings.sigma0, seed, self.settings.popsize, [])
        self.state = CmaesState(
            seed=seed, popsize=strategy.popsize, dimension=len(x0), cma_version=cma.__version__
        )

    def step(self, driver: Driver, step: int) -> None:
        """Ask one generation (or finish a cut one), make and score it, tell it when complete."""
        state, settings = self.state, self.settings
        assert state.seed is not None, "start() sets the seed"
        x0 = self.x0(driver)
        if len(x0) != state.dimension:
            raise RuntimeError(f"genotype has {len(x0)} values, the state {state.dimension}")
        with numpy_rng_kept():
            strategy = replay(x0, settings.sigma0, state.seed, state.popsize, state.generations)
            asked = strategy.ask()
        generation = state.pending or Generation(solutions=[[float(v) for v in x] for x in asked])
        if not same_solutions(asked, generation.solutions):
            raise RuntimeError("the pending generation does not replay as it was recorded")
        number = len(state.generations) + 1
        done = len(generation.fitnesses)
        proposals = [
            self.proposal(driver, solution, f"generation {number} candidate {index}")
            for index, solution in enumerate(generation.solutions[done:], start=done)
        ]
        for result in driver.make(proposals):
            member = result.member
            value = float(member.fitness)
            generation.members.append(member.id)
            generation.fitnesses.append(value)
            if improves(value, state.best_fitness):
                state.best, state.best_fitness = member.id, value
        notes: dict[str, Any] = {"generation": number, "candidates": len(generation.fitnesses)}
        if generation.complete:
            state.generations.append(generation)
            state.pending = None
            with numpy_rng_kept():  # told by replaying it, as the next step will
                strategy = replay(x0, settings.sigma0, state.seed, state.popsize, state.generations)
            notes["sigma"] = float(strategy.sigma)
            stop = {str(k): str(v) for k, v in strategy.stop().items()}
            if stop:
                notes["cma_stop"] = stop
        else:
            state.pending = generation
            notes["cut_by_budget"] = True
        driver.note(cmaes=notes)

    def proposal(self, driver: Driver, solution: Sequence[float], label: str) -> Proposal:
        """The candidate a solution decodes to."""
        groups = self.groups(driver)
        values = decode(solution, len(groups), len(driver.parents), self.settings.method)
        record = candidate_record(
            self.settings,
            driver.parents,
            tensor_parameters(values, groups, self.settings.method),
            self.recipe.base_model,
            driver.dtype,
        )
        return Proposal(merge=record, origin="candidate", inputs=tuple(driver.parents), label=label)

    def keep(self) -> list[str]:
        """Only the best candidate so far keeps its weights."""
        return [self.state.best] if self.state.best is not None else []

    def best(self, members: Mapping[str, Member]) -> str:
        """The best candidate so far (the earliest on ties)."""
        if self.state.best is None:
            raise ValueError("no CMA-ES candidate has been scored yet")
        return self.state.best
