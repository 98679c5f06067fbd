"""MergeKit stages, streamed: one stage tensor by tensor through the lazy
loader and the registered methods, writing shards, per-tensor parameters, the MergeKit recipes
of a lineage, and the guard around MergeKit runs of this package's methods."""
