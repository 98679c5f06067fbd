"""Merge methods registered in MergeKit: this package's (`sae_evolve`, `sae_prune`, `scf_rkl`,
`dare_seeded`) and those other packages declare in the entry-point group
``mergekit_sae.merge_methods`` (a MergeKit ``MergeMethod`` object each). The start-up hook
calls :func:`register_all` in every process that imports MergeKit, so plain ``mergekit-yaml``
runs them all."""

from __future__ import annotations

from mergekit import merge_methods
from mergekit.merge_methods import MergeMethod

from mergekit_sae import plugins
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
    """Register every method (ours, then the plug-ins') in MergeKit's registry; calling it
    again is a no-op."""
    registered = {method.spec.name for method in merge_methods.registered_methods()}
    for method in METHODS:
        if method.spec.name not in registered:
            merge_methods.register(method)
            registered.add(method.spec.name)
    for entry in plugins.declared(plugins.MERGE_METHODS):
        if entry.name not in registered:
            method = plugins.load(entry)
            merge_methods.register(method)
            registered.add(method.spec.name)


register_all()
