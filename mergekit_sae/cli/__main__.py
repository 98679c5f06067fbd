"""`python -m mergekit_sae.cli`: the `mergekit-sae` command."""

from mergekit_sae.cli import main

main()
