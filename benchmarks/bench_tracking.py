"""Cost of live tracking per step: the testbed search with and without TensorBoard + W&B offline.

Runs ``recipes/evolve_testbed.yml`` for a few steps twice into temporary folders: once without
tracking, once with a TensorBoard log directory and an offline W&B run. Prints the mean wall
time per step of each run, their ratio, and the time spent inside the tracker's per-step call
(measured directly, so it does not depend on how busy the machine is) as a share of a step.
Start-up (library imports, ``wandb.init``) and the final logging are reported apart.

    python benchmarks/bench_tracking.py [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

from mergekit_sae.outputs import tracking
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.run import run

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "evolve_testbed.yml"


def timed_tracker_calls() -> dict[str, list[float]]:
    """Wrap the tracker's methods so that each call's seconds are recorded by method name."""
    seconds: dict[str, list[float]] = {"checkpointed": [], "final": [], "open": [], "close": []}

    def wrap(owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds[key].append(time.perf_counter() - start)

        setattr(owner, name, timed)

    wrap(tracking.Tracker, "checkpointed", "checkpointed")
    wrap(tracking.Tracker, "final", "final")
    wrap(tracking.Tracker, "close", "close")
    import mergekit_sae.run as runner

    wrap(runner, "open_tracker", "open")
    return seconds


def one_run(data: dict, out: Path) -> list[float]:
    """Run the recipe; return the wall seconds between consecutive checkpoints (one per step)."""
    stamps: list[float] = []
    run(parse_recipe(data), out, progress=False, on_checkpoint=lambda s: stamps.append(time.time()))
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base = yaml.safe_load(RECIPE.read_text())
    base.update(steps=args.steps, test_baselines=[])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.update(WANDB_DIR=str(root), WANDB_SILENT="true")
        plain = one_run(base, root / "plain")
        seconds = timed_tracker_calls()
        tracked_data = {
            **base,
            "tracking": {
                "tensorboard": str(root / "tb"),
                "wandb": {"project": "bench", "mode": "offline"},
            },
        }
        tracked = one_run(tracked_data, root / "tracked")
    step_plain = sum(plain) / len(plain)
    step_tracked = sum(tracked) / len(tracked)
    per_step = seconds["checkpointed"][1:]  # the first call is the (empty) start at step 0
    tracker_step = sum(per_step) / max(1, len(per_step))
    print(f"steps: {args.steps}")
    print(f"wall per step, no tracking:      {step_plain:.3f} s")
    print(f"wall per step, TensorBoard+W&B:  {step_tracked:.3f} s")
    print(f"ratio tracked / untracked:       {step_tracked / step_plain:.4f}")
    print(f"tracker call per step (direct):  {1000 * tracker_step:.2f} ms")
    print(f"tracker share of a step:         {100 * tracker_step / step_plain:.3f} %")
    print(f"start-up (imports, wandb.init):  {sum(seconds['open']):.2f} s once")
    print(f"final logging + close:           {sum(seconds['final'] + seconds['close']):.2f} s once")


if __name__ == "__main__":
    main()
