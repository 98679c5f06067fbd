"""Loss landscapes and Hessian convexity maps along two shared random directions.

The maps of the SAE paper's Figures 3-5 (after Li et al. 2018): the loss at
``theta + alpha * d1 + beta * d2`` over a grid, and optionally the extreme Hessian
eigenvalues at each grid point. ``directions`` draws and filter-normalises the directions,
``answer_loss`` is the differentiable loss of a recipe's tasks, ``hessian`` the extreme
eigenvalues from Hessian-vector products, ``grid`` the resumable grid run, ``plot`` the
heatmaps and ``cli`` the ``mergekit-sae landscape`` command.
"""
