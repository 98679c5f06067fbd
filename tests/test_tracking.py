"""Live tracking: TensorBoard events and a W&B offline run hold each step's values once."""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from pathlib import Path

import pytest
from evolve_fixtures import FakeEvaluator, recipe_data, task_files, tiny_llama

from mergekit_sae.driver.checkpoint import load_state
from mergekit_sae.errors import RecipeError
from mergekit_sae.outputs.tracking import comparison_tracking, open_tracker, with_tracking
from mergekit_sae.recipe.loading import parse_recipe
from mergekit_sae.recipe.schema import TrackingSettings, WandbSettings
from mergekit_sae.run import run

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[list[Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("tracking")
    parents = [tiny_llama(root / "p0", 30, tied=True), tiny_llama(root / "p1", 31, tied=True)]
    return parents, task_files(root / "data")


def tracked_recipe(setup, tmp_path: Path, **overrides):
    parents, files = setup
    data = recipe_data(parents, files, steps=4, **overrides)
    data["tasks"] = [
        {"name": "a", "type": "lm_eval", "subsample": 10},
        {"name": "b", "type": "lm_eval"},
    ]
    data["tracking"] = {
        "tensorboard": str(tmp_path / "tb"),
        "wandb": {"project": "tests", "mode": "offline"},
    }
    return parse_recipe(data)


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "wandb-dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    return folder


def expected_values(state) -> dict[str, float]:
    """What the last checkpointed step must log, computed here from the state."""
    record = state.history[-1]
    best = state.members[record.best]
    living = [state.members[i] for i in record.population_after]
    values = {
        "fitness/best": record.best_fitness,
        "fitness/mean": record.mean_fitness,
        "performance/best": record.best_performance,
        "zeros/best": best.zero_fraction,
        "zeros/population": sum(m.zero_fraction for m in living) / len(living),
        "evaluations": record.evaluations,
    }
    values.update({f"train/{t}": s for t, s in best.scores.items()})
    values.update({f"seconds/{k}": v for k, v in record.seconds.items()})
    if record.info.get("rate") is not None:
        values["schedule/rate"] = record.info["rate"]
    return values


def tracked_run(recipe, out: Path, expected: dict, **options):
    """Run with the fake evaluator, keeping each checkpoint's expected values by step."""

    def remember(state) -> None:
        if state.history:
            expected[state.history[-1].step] = expected_values(state)

    return run(
        recipe,
        out,
        progress=False,
        make_evaluator=lambda r, i: FakeEvaluator(),
        on_checkpoint=remember,
        **options,
    )


def raw_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar event in every event file, purged or not, by tag."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    found: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "scalars":
                    number = float(tensor_util.make_ndarray(value.tensor))
                    found[value.tag].append((event.step, number))
    return found


def wandb_records(folder: Path, run_id: str):
    """The records of every offline run directory of ``run_id`` (the .wandb log format)."""
    from wandb.proto import wandb_internal_pb2

    block = 32768
    for path in sorted(folder.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        position, pending = 7, b""
        while position + 7 <= len(data):
            if block - position % block < 7:
                position += block - position % block
                continue
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            body = data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind == 0:
                continue
            pending = body if kind in (1, 2) else pending + body
            if kind in (1, 4):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                yield record


def test_tensorboard_and_wandb_hold_the_history_once_across_a_resume(
    tmp_path: Path, setup, offline_wandb: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tracked_recipe(setup, tmp_path)
    out, expected = tmp_path / "run", {}
    partial = tracked_run(recipe, out, expected, stop_after=2)
    assert partial.step == 2 and partial.wandb_run_id
    state = tracked_run(recipe, out, expected, resume=True)
    assert state.finished and state.wandb_run_id == partial.wandb_run_id
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert sorted(expected) == [r["step"] for r in history] == [1, 2, 3, 4]
    for record in history:
        assert expected[record["step"]]["fitness/best"] == record["best_fitness"]
        assert expected[record["step"]]["evaluations"] == record["evaluations"]

    # TensorBoard: EventAccumulator's view equals the history, and no file holds a step twice
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    for tag in expected[1]:
        events = accumulator.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3, 4], tag
        for event in events:
            assert event.value == pytest.approx(expected[event.step][tag], rel=1e-6, abs=1e-7)
    raw = raw_scalars(tmp_path / "tb")
    for tag in expected[1]:
        assert sorted(step for step, _ in raw[tag]) == [1, 2, 3, 4], tag
    assert any(tag.startswith("test/") for tag in accumulator.Tags()["scalars"])
    assert any(tag.startswith("plots/") for tag in accumulator.Tags()["images"])

    # W&B offline: every history row of both run directories, each step once, same values
    rows, config, summary = {}, {}, {}
    for record in wandb_records(offline_wandb, state.wandb_run_id):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            if "fitness/best" in items:
                assert items["_step"] not in rows, "a step was logged twice"
                rows[items["_step"]] = items
        elif kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
        elif kind == "summary":
            summary.update(
                {u.key or "/".join(u.nested_key): u.value_json for u in record.summary.update}
            )
    assert sorted(rows) == [1, 2, 3, 4]
    for step, values in expected.items():
        for tag, value in values.items():
            assert rows[step][tag] == pytest.approx(value, rel=1e-12), (step, tag)
    assert config["steps"] == 4 and config["tracking"]["tensorboard"] == str(tmp_path / "tb")
    assert any(key.startswith("test/") for key in summary)


def test_resume_after_a_crash_before_logging_logs_the_missed_step(
    tmp_path: Path, setup, offline_wandb: Path
) -> None:
    """A checkpoint whose step was never logged (crash in between) is logged on resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    recipe = tracked_recipe(setup, tmp_path)
    out, expected = tmp_path / "run", {}
    tracked_run(recipe, out, expected, stop_after=2)
    # as if the process died after checkpoint 2 and after TensorBoard, before the marker
    marker = out / ".work" / "tracking.json"
    marker.write_text(json.dumps({"tensorboard": 1, "wandb": 1}))
    state = tracked_run(recipe, out, expected, resume=True)
    assert state.finished
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    events = accumulator.Scalars("fitness/best")
    assert [e.step for e in events] == [1, 2, 3, 4]
    assert events[1].value == pytest.approx(expected[2]["fitness/best"], rel=1e-6)
    assert json.loads(marker.read_text()) == {"tensorboard": 4, "wandb": 4}
    assert load_state(out).wandb_run_id == state.wandb_run_id


def test_missing_library_names_the_install_command(tmp_path: Path, setup, monkeypatch) -> None:
    import importlib.util

    recipe = tracked_recipe(setup, tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(RecipeError) as caught:
        open_tracker(recipe.tracking, tmp_path / "out", recipe, None, "r.yml")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("r.yml: tracking.wandb:")
    assert 'pip install "mergekit-sae[tracking]"' in message


def test_command_line_options_fill_the_tracking_block(tmp_path: Path, setup) -> None:
    recipe = tracked_recipe(setup, tmp_path)
    block = WandbSettings(project="old", entity="team", mode="offline")
    recipe = recipe.model_copy(update={"tracking": TrackingSettings(wandb=block)})
    changed = with_tracking(recipe, "logs", "new")
    assert changed.tracking.tensorboard == "logs"
    assert changed.tracking.wandb.model_dump() == {
        "project": "new",
        "entity": "team",
        "mode": "offline",
        "group": None,
        "name": None,
    }
    empty = recipe.model_copy(update={"tracking": TrackingSettings()})
    assert not empty.tracking.enabled
    plain = with_tracking(empty, None, "p")
    assert plain.tracking.tensorboard is None and plain.tracking.wandb.project == "p"
    assert plain.tracking.wandb.mode == "online"


def test_comparison_runs_get_their_own_log_dir_and_one_group() -> None:
    data = {"tracking": {"tensorboard": "tb", "wandb": {"project": "p"}}, "seed": 1}
    one = comparison_tracking(data, Path("sae") / "seed1", "cmp")
    assert one["tracking"]["tensorboard"] == str(Path("tb") / "sae" / "seed1")
    assert one["tracking"]["wandb"] == {"project": "p", "group": "cmp", "name": "sae/seed1"}
    assert data["tracking"]["tensorboard"] == "tb"  # the base recipe data is not changed
    own = {"tracking": {"wandb": {"project": "p", "group": "mine"}}}
    assert comparison_tracking(own, Path("pso/seed0"), "cmp")["tracking"]["wandb"]["group"] == (
        "mine"
    )
    assert comparison_tracking({"seed": 0}, Path("pso/seed0"), "cmp") == {"seed": 0}
