"""PSO-Merging (arXiv 2508.19839) as a search of the shared driver.

The swarm holds 2N+1 particles, each a whole model: the base, the N experts and N DARE
sparsified experts (``dare_seeded`` at drop rate p, made and stored in :meth:`PsoSearch.start`).
Call these initial particles P_0 .. P_{K-1}. Every position and velocity lives in coefficient
space over them: a position is x = sum_j c_j P_j, made as ONE MergeKit ``linear`` stage
(``normalize: false``, per-model ``weight: c_j``) over the initial particles, which is also its
lineage, so ``mergekit-yaml``/``mergekit-multi`` rebuild it bit for bit.

Step t (1-based):

1. score every particle once at its current position (K evaluations, in particle order; a
   budget cut scores only the first that fit). At step 1 the positions are the initial
   particles themselves (coefficients = identity), so the stored base, experts and DARE
   members are re-scored (``driver.rescore``) instead of being merged again;
2. update each scored particle's personal best and the global best (strictly better fitness
   replaces; on ties the one found first, i.e. earlier step, then lower particle index stays);
3. move each scored particle: v = w v + c1 r1 (pbest - x) + c2 r2 (gbest - x), x = x + v,
   with r1, r2 one uniform scalar each per particle and step (``driver.rng(step, "pso", i)``).

Invariants: velocities start at zero and are never clamped, r1 and r2 are scalars, so every
velocity is a combination of differences of positions (its coefficients sum to 0) and every
position stays an affine combination of the initial particles (its coefficients sum to 1, up
to rounding; single coefficients may be negative or above 1). Fitness is the plain
performance (task-weighted mean of the task scores). The answer is the final global best.
Scores are compared on a fixed dev set: with ``resample: false`` (the default) the driver gives
every step the training items of step 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from mergekit_sae.domains import NonNegative, Rate
from mergekit_sae.records import Member, MergeInput, MergeRecord
from mergekit_sae.search.base import Driver, Proposal, Result, Search, SearchSettings

# DARE seeds are drawn below this bound (readable in the written recipe; any int >= 0 works).
SEED_BOUND = 2**31


class PsoSettings(SearchSettings):
    """PSO-Merging's own block (``pso:``); the paper's values are the defaults."""

    drop_rate: Rate = Field(0.8, description="drop rate p of the DARE particles, in [0, 1)")
    inertia: NonNegative = Field(0.2, description="inertia weight w of the velocity update")
    c1: NonNegative = Field(2.0, description="pull towards the particle's personal best")
    c2: NonNegative = Field(2.0, description="pull towards the swarm's global best")
    resample: bool = Field(
        False, description="draw fresh training items every step (PSO uses a fixed dev set)"
    )
    include_base: bool = Field(True, description="the base model is a particle")
    dare_particles: bool = Field(True, description="add a DARE-sparsified particle per expert")


class Best(BaseModel):
    """A best position found: its coefficients, its fitness and the member that holds it."""

    position: list[float]
    fitness: float
    member: str


class PsoState(BaseModel):
    """The swarm, in coefficient space over the initial particles (all plain JSON).

    ``particles`` are the member ids of the initial particles P_j (base, experts, DARE), the
    basis of every coefficient vector; ``positions[i]``/``velocities[i]`` are particle i's
    coefficients; ``members[i]`` is the stored member already holding particle i's current
    position (the initial particle before step 1), None when it still has to be merged;
    ``pbest[i]`` is particle i's personal best (None until scored); ``gbest`` the global best.
    """

    particles: list[str] = Field(default_factory=list)
    positions: list[list[float]] = Field(default_factory=list)
    velocities: list[list[float]] = Field(default_factory=list)
    members: list[str | None] = Field(default_factory=list)
    pbest: list[Best | None] = Field(default_factory=list)
    gbest: Best | None = None


def identity(count: int) -> list[list[float]]:
    """Initial positions: particle i sits exactly at P_i."""
    return [[1.0 if j == i else 0.0 for j in range(count)] for i in range(count)]


def pso_update(
    x: Sequence[float],
    v: Sequence[float],
    pbest: Sequence[float],
    gbest: Sequence[float],
    r1: float,
    r2: float,
    w: float,
    c1: float,
    c2: float,
) -> tuple[list[float], list[float]]:
    """One PSO move: v' = w v + c1 r1 (pbest - x) + c2 r2 (gbest - x); x' = x + v'.

    Returns (x', v'). r1 and r2 are scalars, so x' stays in the affine span of the points
    involved; nothing is clamped.
    """
    velocity = [
        w * vj + c1 * r1 * (pj - xj) + c2 * r2 * (gj - xj)
        for xj, vj, pj, gj in zip(x, v, pbest, gbest, strict=True)
    ]
    position = [xj + vj for xj, vj in zip(x, velocity, strict=True)]
    return position, velocity


def improves(candidate: float, incumbent: Best | None) -> bool:
    """Whether a fitness replaces a best: strictly higher, or there is no best yet."""
    return incumbent is None or candidate > incumbent.fitness


def update_bests(
    pbest: Sequence[Best | None], gbest: Best | None, scored: Sequence[tuple[int, Best]]
) -> tuple[list[Best | None], Best | None]:
    """Personal and global bests after a step's scores, given as (particle index, candidate)
    in particle order. Ties keep the earlier best (earlier step, then lower index)."""
    personal = list(pbest)
    best = gbest
    for index, candidate in scored:
        if improves(candidate.fitness, personal[index]):
            personal[index] = candidate
        if improves(candidate.fitness, best):
            best = candidate
    return personal, best


def step_randoms(driver: Driver, step: int, particle: int) -> tuple[float, float]:
    """r1, r2 of one particle at one step, from the run seed, the step and the particle."""
    rng = driver.rng(step, "pso", particle)
    return rng.random(), rng.random()


def dare_record(
    expert: str, base_model: str, drop_rate: float, seed: int, dtype: str
) -> MergeRecord:
    """The ``dare_seeded`` stage that makes the DARE particle of an expert (member id)."""
    return MergeRecord(
        method="dare_seeded",
        inputs=[MergeInput(member=expert)],
        base_model=base_model,
        parameters={"drop_rate": drop_rate, "seed": seed, "rescale": True},
        dtype=dtype,
    )


def position_record(particles: Sequence[str], position: Sequence[float], dtype: str) -> MergeRecord:
    """The ``linear`` stage (``normalize: false``) making sum_j c_j P_j.

    Initial particles with coefficient exactly 0 are left out (they add nothing and need not
    be read); when every coefficient is 0 the first particle is kept with weight 0.
    """
    inputs = [
        MergeInput(member=member, parameters={"weight": float(c)})
        for member, c in zip(particles, position, strict=True)
        if c != 0.0
    ]
    if not inputs:
        inputs = [MergeInput(member=particles[0], parameters={"weight": 0.0})]
    return MergeRecord(method="linear", inputs=inputs, parameters={"normalize": False}, dtype=dtype)


class PsoSearch(Search):
    """Particle swarm over affine combinations of the base, the experts and their DARE variants."""

    name = "pso"
    title = "PSO-Merging ([arXiv 2508.19839](https://arxiv.org/abs/2508.19839))"
    settings_model = PsoSettings
    state_model = PsoState
    settings: PsoSettings
    state: PsoState

    @classmethod
    def check_recipe(cls, recipe: Any, settings: SearchSettings) -> None:
        """The base is a particle and the DARE particles sparsify model - base: need a base."""
        needs_base = getattr(settings, "include_base", True) or getattr(
            settings, "dare_particles", True
        )
        if needs_base and recipe.base_model is None:
            raise ValueError(
                "search 'pso' needs base_model: the base is a particle (pso.include_base) and "
                "the DARE particles drop parts of model - base (pso.dare_particles)"
            )

    def start(self, driver: Driver) -> None:
        """Record the initial particles: base, experts, then one stored DARE member per expert."""
        recipe, settings = self.recipe, self.settings
        experts = list(driver.parents)
        particles: list[str] = []
        if settings.include_base:
            if driver.base is None:
                raise ValueError("search 'pso' with include_base needs the base model")
            particles.append(driver.base)
        particles += experts
        if settings.dare_particles:
            proposals = []
            for index, expert in enumerate(experts):
                seed = driver.rng(0, "pso", "dare", index).randrange(SEED_BOUND)
                record = dare_record(
                    expert, recipe.base_model, settings.drop_rate, seed, driver.dtype
                )
                proposals.append(
                    Proposal(merge=record, origin="pruned", inputs=(expert,), label=f"dare {index}")
                )
            particles += [made.member.id for made in driver.make(proposals, score=False)]
        count = len(particles)
        self.state = PsoState(
            particles=particles,
            positions=identity(count),
            velocities=[[0.0] * count for _ in range(count)],
            members=list(particles),
            pbest=[None] * count,
        )

    def evaluate(self, driver: Driver, particle: int) -> Result | None:
        """Score one particle at its position (re-score its stored member, or merge it);
        None when the budget is spent."""
        state = self.state
        stored = state.members[particle]
        if stored is not None:
            results = driver.rescore([stored])
        else:
            position = state.positions[particle]
            record = position_record(state.particles, position, driver.dtype)
            proposal = Proposal(
                merge=record,
                origin="particle",
                inputs=tuple(item.member for item in record.inputs if item.member is not None),
                label=f"particle {particle}",
            )
            results = driver.make([proposal])
        return results[0] if results else None

    def step(self, driver: Driver, step: int) -> None:
        """Score every particle once, update the bests, then move the scored particles."""
        state, settings = self.state, self.settings
        scored: list[tuple[int, Best]] = []
        for particle in range(len(state.particles)):
            result = self.evaluate(driver, particle)
            if result is None:
                break  # the budget is spent: later particles are neither scored nor moved
            member = result.member
            member.fitness = member.performance  # PSO's fitness is the plain performance
            position = list(state.positions[particle])
            scored.append(
                (particle, Best(position=position, fitness=float(member.fitness), member=member.id))
            )
        state.pbest, state.gbest = update_bests(state.pbest, state.gbest, scored)
        assert state.gbest is not None or not scored
        for particle, _ in scored:
            personal = state.pbest[particle]
            assert personal is not None and state.gbest is not None
            r1, r2 = step_randoms(driver, step, particle)
            state.positions[particle], state.velocities[particle] = pso_update(
                state.positions[particle],
                state.velocities[particle],
                personal.position,
                state.gbest.position,
                r1,
                r2,
                settings.inertia,
                settings.c1,
                settings.c2,
            )
            state.members[particle] = None
        driver.note(
            particle_members={str(i): best.member for i, best in scored},
            particle_fitness={str(i): best.fitness for i, best in scored},
            gbest=state.gbest.member if state.gbest else None,
            gbest_fitness=state.gbest.fitness if state.gbest else None,
        )

    def keep(self) -> list[str]:
        """Weights needed later: the initial particles (the DARE members; the base and experts
        are the recipe's own folders and are never deleted), members still holding a current
        position (before step 1) and the global best (written out at the end)."""
        wanted = [*self.state.particles, *(m for m in self.state.members if m is not None)]
        if self.state.gbest is not None:
            wanted.append(self.state.gbest.member)
        return list(dict.fromkeys(wanted))

    def best(self, members: Mapping[str, Member]) -> str:
        """The global best's member (before any score: the first initial particle)."""
        if self.state.gbest is not None:
            return self.state.gbest.member
        return self.state.particles[0]
