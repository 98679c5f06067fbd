"""Loss landscapes and convexity maps: grid values, eigenvalues, directions, resume, command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from evolve_fixtures import recipe_data, task_files, tiny_llama
from torch.func import functional_call

from mergekit_sae.errors import OutputFolderError, UsageError
from mergekit_sae.evaluate.spec import TaskSpec
from mergekit_sae.landscape.directions import draw_directions, filter_normalize, point
from mergekit_sae.landscape.grid import Entry, GridSettings, hessian_subset, run_grid
from mergekit_sae.landscape.hessian import convexity, curvature
from mergekit_sae.landscape.models import model_entry

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"w1": (3, 4), "w2": (2, 3)}  # 2-D, so the directions are not zero


def quadratic(seed: int):
    """Random parameters and a known indefinite quadratic 0.5 x'Ax + b'x of their concatenation."""
    rng = np.random.default_rng(seed)
    params = {n: torch.as_tensor(rng.normal(size=s)) for n, s in SHAPES.items()}
    size = sum(int(np.prod(s)) for s in SHAPES.values())
    basis, _ = np.linalg.qr(rng.normal(size=(size, size)))
    spectrum = np.linspace(-2.0, 5.0, size)
    matrix = basis @ np.diag(spectrum) @ basis.T
    matrix = (matrix + matrix.T) / 2
    vector = rng.normal(size=size)
    return params, matrix, vector


def quadratic_value(params, matrix, vector) -> float:
    """The closed form, in numpy."""
    x = np.concatenate([params[n].numpy().ravel() for n in SHAPES])
    return float(0.5 * x @ matrix @ x + vector @ x)


class Quadratic(torch.nn.Module):
    """A tiny module whose output is the quadratic of its two weight matrices."""

    def __init__(self, params, matrix, vector):
        super().__init__()
        self.w1 = torch.nn.Parameter(params["w1"].clone(), requires_grad=False)
        self.w2 = torch.nn.Parameter(params["w2"].clone(), requires_grad=False)
        self.register_buffer("a", torch.as_tensor(matrix))
        self.register_buffer("b", torch.as_tensor(vector))

    def forward(self) -> torch.Tensor:
        x = torch.cat([self.w1.reshape(-1), self.w2.reshape(-1)])
        return 0.5 * x @ self.a @ x + self.b @ x


def quadratic_entry(label: str, seed: int, calls: list | None = None, fail_after=None) -> Entry:
    """A landscape entry: the Quadratic module's parameters, its output as the loss
    (optionally counting the loss evaluations and failing after some)."""
    module = Quadratic(*quadratic(seed))

    def loss_fn(p):
        if calls is not None:
            if fail_after is not None and len(calls) >= fail_after:
                raise RuntimeError("interrupted")
            calls.append(label)
        return functional_call(module, dict(p), ())

    return Entry(label, lambda: ({n: t.detach() for n, t in module.named_parameters()}, loss_fn))


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_quadratic_grid_matches_closed_form_and_hessian(tmp_path: Path) -> None:
    settings = GridSettings(grid=3, span=0.5, seed=3, convexity=True, eig_tol=1e-10)
    run_grid([quadratic_entry("q", 1)], tmp_path, settings, {}, progress=False)
    params, matrix, vector = quadratic(1)
    d1, d2 = (filter_normalize(d, params) for d in draw_directions(params, 3))
    eigenvalues = np.linalg.eigvalsh(matrix)
    rows = read_rows(tmp_path / "landscape.csv")
    assert [float(r["alpha"]) for r in rows[:3]] == [-0.5, -0.5, -0.5]
    assert len(rows) == 9
    for row in rows:
        alpha, beta = float(row["alpha"]), float(row["beta"])
        expected = quadratic_value(point(params, d1, d2, alpha, beta), matrix, vector)
        assert float(row["loss"]) == pytest.approx(expected, rel=1e-9)
        assert float(row["lambda_min"]) == pytest.approx(eigenvalues[0], rel=1e-6)
        assert float(row["lambda_max"]) == pytest.approx(eigenvalues[-1], rel=1e-6)
        assert float(row["convexity"]) == pytest.approx(min(0.5, 2.0 / 5.0), rel=1e-6)
    assert len({r["loss"] for r in rows}) == 9  # the directions do move the point


def test_convexity_is_the_clipped_ratio() -> None:
    assert convexity(-1.0, 4.0) == pytest.approx(0.25)
    assert convexity(-3.0, 1.0) == 0.5
    assert convexity(0.0, 0.0) == 0.0


def test_two_parameters_use_separate_eigsh_runs() -> None:
    matrix = torch.tensor([[2.0, 1.0], [1.0, -3.0]], dtype=torch.float64)
    params = {"x": torch.tensor([0.3, -0.2], dtype=torch.float64)}
    found = curvature(lambda p: 0.5 * p["x"] @ matrix @ p["x"], params, ["x"], tol=1e-12)
    expected = np.linalg.eigvalsh(matrix.numpy())
    assert (found.lambda_min, found.lambda_max) == pytest.approx(tuple(expected), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_curvature_on_cuda() -> None:
    params, matrix, vector = quadratic(2)
    a, b = torch.as_tensor(matrix).cuda(), torch.as_tensor(vector).cuda()
    cuda_params = {n: t.cuda() for n, t in params.items()}

    def loss_fn(p):
        x = torch.cat([p[n].reshape(-1) for n in SHAPES])
        return 0.5 * x @ a @ x + b @ x

    found = curvature(loss_fn, cuda_params, list(SHAPES), tol=1e-10)
    eigenvalues = np.linalg.eigvalsh(matrix)
    assert found.lambda_min == pytest.approx(eigenvalues[0], rel=1e-6)
    assert found.lambda_max == pytest.approx(eigenvalues[-1], rel=1e-6)


def test_tiny_llama_eigenvalues_match_a_dense_hessian(tmp_path: Path) -> None:
    model_dir = tiny_llama(tmp_path / "model", seed=0)
    files = task_files(tmp_path / "data")
    specs = [
        TaskSpec(name="colours", type="multiple_choice", test=files["mc_test"]),
        TaskSpec(name="sums", type="generate_exact_match", test=files["em_test"]),
    ]
    items = [
        [json.loads(x) for x in files[k].read_text().splitlines()] for k in ("mc_test", "em_test")
    ]
    entry = model_entry(
        model_dir,
        "tiny",
        specs,
        items,
        device=torch.device("cpu"),
        dtype=torch.float64,
        answer_key="answer",
        batch_size=4,
    )
    subset = ["model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.k_proj.weight"]
    settings = GridSettings(
        grid=2,
        span=0.5,
        seed=1,
        convexity=True,
        eig_tol=1e-10,
        hessian_params=("*layers.0.input_layernorm.weight", "*layers.1.self_attn.k_proj*"),
    )
    run_grid([entry], tmp_path / "out", settings, {}, progress=False)
    row = read_rows(tmp_path / "out" / "landscape.csv")[1]  # alpha -0.5, beta 0.5

    params, loss_fn = entry.load()
    d1, d2 = (filter_normalize(d, params) for d in draw_directions(params, 1))
    at = point(params, d1, d2, float(row["alpha"]), float(row["beta"]))

    def sliced(norm: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
        return loss_fn({**at, subset[0]: norm, subset[1]: proj})

    blocks = torch.autograd.functional.hessian(sliced, (at[subset[0]], at[subset[1]]))
    sizes = [at[n].numel() for n in subset]
    dense = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1)
            for i in range(2)
        ]
    )
    eigenvalues = torch.linalg.eigvalsh(dense).numpy()
    assert float(row["loss"]) == pytest.approx(
        float(sliced(at[subset[0]], at[subset[1]])), rel=1e-9
    )
    assert float(row["lambda_min"]) == pytest.approx(eigenvalues[0], rel=1e-5, abs=1e-8)
    assert float(row["lambda_max"]) == pytest.approx(eigenvalues[-1], rel=1e-5)
    assert eigenvalues[0] < 0 < eigenvalues[-1]  # an indefinite slice: both ends are tested


def test_filter_normalisation_and_shared_directions() -> None:
    generator = torch.Generator().manual_seed(5)
    shapes = {"embed": (6, 4), "conv": (3, 2, 5), "norm": (4,), "bias": (3,)}
    first = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    second = {n: 3.0 * torch.randn(s, generator=generator) for n, s in shapes.items()}
    raw = draw_directions(first, seed=7)
    assert all(
        torch.equal(a, b)
        for a, b in zip(raw[0].values(), draw_directions(first, 7)[0].values(), strict=True)
    )
    assert not torch.equal(raw[0]["embed"], raw[1]["embed"])
    for weights in (first, second):
        for direction in (filter_normalize(d, weights) for d in raw):
            for name, tensor in direction.items():
                if weights[name].dim() < 2:
                    assert torch.count_nonzero(tensor) == 0
                    continue
                for f in range(tensor.shape[0]):
                    assert tensor[f].norm() == pytest.approx(
                        float(weights[name][f].norm()), rel=1e-5
                    )
    # Shared by both models: the same drawn filter, only rescaled per model.
    one, two = filter_normalize(raw[0], first), filter_normalize(raw[0], second)
    for f in range(6):
        assert torch.allclose(
            one["embed"][f] / one["embed"][f].norm(), two["embed"][f] / two["embed"][f].norm()
        )
    with pytest.raises(UsageError, match="embed"):
        filter_normalize(raw[0], {**first, "embed": torch.ones(5, 4)})


def test_resume_skips_finished_points_and_writes_the_same_csv(tmp_path: Path) -> None:
    settings = GridSettings(grid=3, span=1.0, seed=0, convexity=True)
    whole = run_grid(
        [quadratic_entry("a", 1), quadratic_entry("b", 2)],
        tmp_path / "whole",
        settings,
        {"x": 1},
        progress=False,
    )
    assert len(whole) == 18
    calls: list[str] = []
    broken = [
        quadratic_entry("a", 1, calls, fail_after=11),
        quadratic_entry("b", 2, calls, fail_after=11),
    ]
    with pytest.raises(RuntimeError, match="interrupted"):
        run_grid(broken, tmp_path / "out", settings, {"x": 1}, progress=False)
    assert len(calls) == 11
    assert not (tmp_path / "out" / "landscape.csv").exists()
    calls.clear()
    entries = [quadratic_entry("a", 1, calls), quadratic_entry("b", 2, calls)]
    run_grid(entries, tmp_path / "out", settings, {"x": 1}, progress=False)
    assert calls == ["b"] * 7  # only the unfinished points of the second model
    first = (tmp_path / "whole" / "landscape.csv").read_text()
    assert (tmp_path / "out" / "landscape.csv").read_text() == first
    calls.clear()
    run_grid(entries, tmp_path / "out", settings, {"x": 1}, progress=False)
    assert calls == []  # everything finished: nothing is computed again

    other = GridSettings(grid=3, span=0.5, seed=0, convexity=True)
    with pytest.raises(OutputFolderError, match="grid"):
        run_grid(entries, tmp_path / "out", other, {"x": 1}, progress=False)
    with pytest.raises(OutputFolderError, match="x"):
        run_grid(entries, tmp_path / "out", settings, {"x": 2}, progress=False)
    run_grid(entries, tmp_path / "out", other, {"x": 1}, force=True, progress=False)
    assert len(calls) == 18


def test_command_writes_the_maps_and_refuses_other_options(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mergekit_sae.cli import main

    models = [tiny_llama(tmp_path / name, seed) for name, seed in (("a", 0), ("b", 1))]
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump(recipe_data(models, task_files(tmp_path / "data"))))
    out = tmp_path / "out"
    arguments = ["landscape", str(recipe), str(out), *map(str, models), "--grid", "2", "--quiet"]
    result = CliRunner().invoke(main, [*arguments, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out / "landscape.csv")
    assert list(rows[0]) == ["model", "alpha", "beta", "loss"]
    assert [r["model"] for r in rows] == ["a"] * 4 + ["b"] * 4
    assert (out / "landscape.png").stat().st_size > 0
    refused = CliRunner().invoke(main, [*arguments, "--span", "0.5"])
    assert refused.exit_code == 1 and "other options" in refused.output
    missing = CliRunner().invoke(main, [*arguments, "--task", "nope"])
    assert missing.exit_code == 2 and "nope" in missing.output


def test_hessian_subset_patterns() -> None:
    names = [
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "lm_head.weight",
    ]
    assert hessian_subset(names, []) == names
    assert hessian_subset(names, ["*layers.1.*", "lm_head*"]) == names[1:]
    with pytest.raises(UsageError, match="layers.2"):
        hessian_subset(names, ["*layers.2.*"])
