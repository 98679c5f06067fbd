"""``mergekit-sae compare``: searches and one-shot merges at equal evaluations, over seeds."""
