"""Extreme Hessian eigenvalues of a loss from Hessian-vector products, and the convexity score.

The gradient is taken once with ``create_graph=True``; each product ``H v`` is one more
backward pass through that graph (autograd double backward), so the Hessian is never formed.
scipy's ``eigsh`` (ARPACK's implicitly restarted Lanczos) runs on a ``LinearOperator`` of
those products: ``which="BE", k=2`` gives the smallest and the largest algebraic eigenvalue
(lambda_min, lambda_max) in one Lanczos run, half the products of separate ``"SA"`` and
``"LA"`` runs (it needs three or more parameters; two use those separate runs). Its starting
vector comes from a seeded generator, so a point gives the same eigenvalues every time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

from mergekit_sae.errors import UsageError

LossFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
CONVEXITY_EPS = 1e-12
CONVEXITY_MAX = 0.5
logger = logging.getLogger(__name__)


class Curvature(NamedTuple):
    """The loss at a point and the extreme eigenvalues of its Hessian over the chosen tensors."""

    loss: float
    lambda_min: float
    lambda_max: float


def convexity(lambda_min: float, lambda_max: float) -> float:
    """The paper's score ``|lambda_min| / (|lambda_max| + eps)``, clipped to [0, 0.5]."""
    value = abs(lambda_min) / (abs(lambda_max) + CONVEXITY_EPS)
    return float(min(max(value, 0.0), CONVEXITY_MAX))


def curvature(
    loss_fn: LossFn,
    params: Mapping[str, torch.Tensor],
    subset: Sequence[str],
    *,
    tol: float = 1e-3,
    maxiter: int | None = None,
    seed: int = 0,
) -> Curvature:
    """Loss and extreme Hessian eigenvalues with respect to the tensors named in ``subset``.

    Tensors outside the subset are held fixed. ``tol`` is ARPACK's relative accuracy;
    ``maxiter`` its restart limit (None: scipy's default). An eigenvalue that does not
    converge is NaN (with a warning) rather than a wrong number.
    """
    leaves = [params[name].detach().clone().requires_grad_(True) for name in subset]
    full = {**{n: t.detach() for n, t in params.items()}, **dict(zip(subset, leaves, strict=True))}
    with torch.enable_grad():
        loss = loss_fn(full)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    size = flat_grad.numel()
    if size < 2:
        raise UsageError(f"the Hessian needs at least two parameters; the subset has {size}")

    def matvec(vector: np.ndarray) -> np.ndarray:
        if not flat_grad.requires_grad:  # the loss is linear in the subset: H = 0
            return np.zeros(size)
        v = torch.as_tensor(np.ravel(vector), dtype=flat_grad.dtype, device=flat_grad.device)
        with torch.enable_grad():
            products = torch.autograd.grad(
                flat_grad @ v, leaves, retain_graph=True, allow_unused=True
            )
        parts = [
            torch.zeros_like(x) if p is None else p for p, x in zip(products, leaves, strict=True)
        ]
        return torch.cat([p.reshape(-1) for p in parts]).double().cpu().numpy()

    operator = LinearOperator((size, size), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(seed).standard_normal(size)
    if size >= 3:
        low, high = _extremes(operator, "BE", 2, start, tol, maxiter)
    else:
        (low,) = _extremes(operator, "SA", 1, start, tol, maxiter)
        (high,) = _extremes(operator, "LA", 1, start, tol, maxiter)
    return Curvature(float(loss.detach()), low, high)


def _extremes(
    operator: LinearOperator,
    which: str,
    k: int,
    start: np.ndarray,
    tol: float,
    maxiter: int | None,
) -> list[float]:
    """k extreme eigenvalues by eigsh, ascending; NaN with a warning when ARPACK does not
    converge."""
    try:
        values = eigsh(
            operator,
            k=k,
            which=which,
            v0=start,
            tol=tol,
            maxiter=maxiter,
            return_eigenvectors=False,
        )
    except ArpackNoConvergence as error:
        logger.warning("eigsh (%s) did not converge: %s", which, error)
        return [float("nan")] * k
    return sorted(float(v) for v in values)
