"""Two random directions in parameter space, filter-normalised as in Li et al. (2018).

Drawing: one ``torch.Generator`` on the CPU seeded with ``seed`` draws d1 then d2; each walks
the parameters in the order given (a model's ``named_parameters`` order) and draws a standard
Gaussian tensor of each parameter's shape when it has two or more dimensions. Parameters with
fewer dimensions (norm weights, biases) get a zero direction, as Li et al. do, and consume no
random numbers. The draw is float32 on the CPU, so CPU and CUDA runs share it.

Normalisation: for every filter (a slice along dimension 0: a row of a 2-D weight) the drawn
filter is rescaled to the Frobenius norm of the same filter of the weights,
``d_f <- d_f * ||w_f|| / (||d_f|| + 1e-10)``. Several models share one raw draw (made in the
shape of the first model) and each is normalised with its own filter norms.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergekit_sae.errors import UsageError

Params = Mapping[str, torch.Tensor]
EPS = 1e-10


def draw_directions(params: Params, seed: int) -> tuple[dict[str, torch.Tensor], ...]:
    """Two raw Gaussian directions shaped like ``params`` (zero for tensors under 2-D)."""
    generator = torch.Generator().manual_seed(seed)
    directions = []
    for _ in range(2):
        direction = {}
        for name, tensor in params.items():
            shape = tuple(tensor.shape)
            if tensor.dim() >= 2:
                direction[name] = torch.randn(shape, generator=generator, dtype=torch.float32)
            else:
                direction[name] = torch.zeros(shape, dtype=torch.float32)
        directions.append(direction)
    return tuple(directions)


def filter_normalize(direction: Params, weights: Params) -> dict[str, torch.Tensor]:
    """Rescale each filter of ``direction`` to the norm of that filter of ``weights``."""
    if set(direction) != set(weights):
        missing = sorted(set(direction) ^ set(weights))[:3]
        raise UsageError(
            f"the models do not hold the same parameters (first differences: {missing})"
        )
    out = {}
    for name, raw in direction.items():
        weight = weights[name].detach()
        if tuple(weight.shape) != tuple(raw.shape):
            raise UsageError(
                f"parameter {name}: shape {tuple(weight.shape)} differs from the first model's "
                f"{tuple(raw.shape)}; the directions are shared, so every model needs its shapes",
            )
        raw = raw.to(device=weight.device, dtype=weight.dtype)
        if weight.dim() < 2:
            out[name] = torch.zeros_like(weight)
            continue
        w_norm = weight.flatten(1).norm(dim=1)
        d_norm = raw.flatten(1).norm(dim=1)
        scale = (w_norm / (d_norm + EPS)).view(-1, *([1] * (weight.dim() - 1)))
        out[name] = raw * scale
    return out


def point(params: Params, d1: Params, d2: Params, alpha: float, beta: float) -> dict:
    """The parameters ``theta + alpha * d1 + beta * d2`` (detached tensors)."""
    return {n: (t.detach() + alpha * d1[n] + beta * d2[n]) for n, t in params.items()}
