"""mergekit-sae: Sparsity-Aware Evolution (SAE) for model merging, as a MergeKit plugin.

Importing this package is cheap (no torch, no mergekit). The merge methods are registered
in MergeKit by :func:`mergekit_sae.methods.register_all`, which the autoload hook runs as
soon as ``mergekit.merge_methods`` is imported in any process.
"""

__version__ = "0.1.0"
