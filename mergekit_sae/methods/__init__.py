"""Merge methods registered in MergeKit: `sae_evolve` (K-parent SAE merge) and `sae_prune`."""

from __future__ import annotations

from mergekit import merge_methods
from mergekit.merge_methods import MergeMethod

from mergekit_sae.methods.dare_seeded import dare_seeded_merge
from mergekit_sae.methods.sae_evolve import sae_evolve_merge
from mergekit_sae.methods.sae_prune import sae_prune_merge
from mergekit_sae.methods.scf_rkl import scf_rkl_merge

METHODS: tuple[MergeMethod, ...] = (
    sae_evolve_merge,
    sae_prune_merge,
    scf_rkl_merge,
    dare_seeded_merge,
)
METHOD_NAMES: frozenset[str] = frozenset(method.spec.name for method in METHODS)


def register_all() -> None:
    """Register every method in MergeKit's registry; calling it again is a no-op."""
    registered = {method.spec.name for method in merge_methods.registered_methods()}
    for method in METHODS:
        if method.spec.name not in registered:
            merge_methods.register(method)


register_all()
