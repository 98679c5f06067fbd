"""A plug-in that lives outside mergekit_sae: a search, a merge method and a command.

tests/test_plugins.py exposes it through a distribution's entry points (as a package would in
its pyproject.toml) and runs it through `evolve`, `compare`, `mergekit-yaml` and the CLI.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click
import torch
from mergekit.merge_methods import TensorGroup, merge_method
from pydantic import BaseModel, Field

from mergekit_sae.records import Member, MergeInput, MergeRecord
from mergekit_sae.search.base import Driver, Proposal, Search, SearchSettings


@merge_method(name="demo_scaled_mean", pretty_name="Demo scaled mean", reference_url="")
def demo_scaled_mean(group: TensorGroup, scale: float = 1.0) -> torch.Tensor:
    """The mean of the non-base models' tensors, times ``scale``."""
    tensors = [entry.tensor.float() for entry in group.non_base]
    return (torch.stack(tensors).mean(dim=0) * scale).to(tensors[0].dtype)


class ScaleSettings(SearchSettings):
    """The ``scale_sweep:`` block."""

    scales: list[float] = Field(default_factory=lambda: [0.5, 1.0], min_length=1)


class ScaleState(BaseModel):
    """The models made so far."""

    made: list[str] = Field(default_factory=list)


class ScaleSweep(Search):
    """Tries ``demo_scaled_mean`` of the parents at each scale, one per step; keeps the best."""

    name = "scale_sweep"
    title = "a scale sweep (plug-in)"
    settings_model = ScaleSettings
    state_model = ScaleState
    settings: ScaleSettings
    state: ScaleState

    def start(self, driver: Driver) -> None:
        """Nothing to make before step 1."""

    def step(self, driver: Driver, step: int) -> None:
        """Make and score the merge at this step's scale."""
        scale = self.settings.scales[(step - 1) % len(self.settings.scales)]
        record = MergeRecord(
            method="demo_scaled_mean",
            inputs=[MergeInput(member=i) for i in driver.parents],
            parameters={"scale": scale},
            dtype=driver.dtype,
        )
        made = driver.make([Proposal(record, "candidate", tuple(driver.parents), f"x{scale}")])
        self.state.made += [result.member.id for result in made]

    def keep(self) -> list[str]:
        """Every model made."""
        return list(self.state.made)

    def best(self, members: Mapping[str, Member]) -> str:
        """The best-performing model made, else the first parent."""
        scored = [members[i] for i in self.state.made if members[i].performance is not None]
        if not scored:
            return next(m.id for m in members.values() if m.origin == "parent")
        return max(scored, key=lambda m: float(m.performance or 0.0)).id

    @classmethod
    def natural_budget(cls, recipe: Any, settings: SearchSettings) -> int | None:
        """One evaluation per step."""
        return recipe.steps


@click.command("hello")
@click.argument("name")
def hello(name: str) -> None:
    """Greet NAME (a plug-in command)."""
    click.echo(f"hello {name} from a plug-in")
