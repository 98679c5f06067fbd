"""``publish`` maps local parents to Hub ids in the card and lineage, or refuses (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mergekit_sae.cli.publish import publish as publish_command
from mergekit_sae.merging.recipes import render_recipe
from mergekit_sae.outputs import publish as publish_mod
from mergekit_sae.outputs.card import render_card


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """A run folder whose card and lineage name two local parents by absolute path."""
    parents = {}
    for name in ("math", "lang"):
        parents[name] = tmp_path / "models" / name
        parents[name].mkdir(parents=True)
        (parents[name] / "config.json").write_text("{}")
    stage = {
        "name": "./m0004",
        "merge_method": "linear",
        "models": [
            {"model": str(parents["math"]), "parameters": {"weight": 0.5}},
            {"model": str(parents["lang"]), "parameters": {"weight": 0.5}},
        ],
        "out_dtype": "float32",
    }
    final = {"merge_method": "linear", "models": [{"model": "./m0004"}], "out_dtype": "float32"}
    recipe = render_recipe([stage, final])
    out = tmp_path / "OUT"
    out.mkdir()
    (out / "mergekit_config.yml").write_text(recipe)
    card = render_card(
        name="OUT", parents=[str(parents["math"]), str(parents["lang"])], recipe=recipe, results={}
    )
    (out / "README.md").write_text(card)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x" * 100)
    return out


def dry_run(out: Path, *options: str):
    args = [str(out), "--repo-id", "me/merged", "--dry-run", *options]
    return CliRunner().invoke(publish_command, args)


def test_local_paths_are_refused(out_dir: Path) -> None:
    result = dry_run(out_dir)
    assert result.exit_code != 0
    assert "names local paths" in str(result.exception)
    assert str(out_dir.parent / "models" / "math") in str(result.exception)
    assert dry_run(out_dir, "--allow-local-paths").exit_code == 0


def test_parent_ids_rewrite_card_and_lineage(out_dir: Path, monkeypatch) -> None:
    models = out_dir.parent / "models"
    config = models / "lang" / "config.json"
    config.write_text(json.dumps({"_name_or_path": "org/lang-expert"}))  # its own Hub id
    monkeypatch.chdir(out_dir.parent)
    result = dry_run(out_dir, "--parent-id", "./models/math=org/math-expert")
    assert result.exit_code == 0, result.output
    assert f"lineage: {models / 'math'} -> org/math-expert" in result.output
    mapping, texts = publish_mod.publish_rewrites(
        out_dir, {"models/math": "org/math-expert"}, allow_local=False
    )
    assert set(mapping.values()) == {"org/math-expert", "org/lang-expert"}
    documents = list(yaml.safe_load_all(texts["mergekit_config.yml"]))
    assert [m["model"] for m in documents[0]["models"]] == ["org/math-expert", "org/lang-expert"]
    assert documents[1]["models"] == [{"model": "./m0004"}]  # stage names stay
    card = texts["README.md"]
    assert str(models) not in card
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == ["org/math-expert", "org/lang-expert"]
    assert "- `org/math-expert`" in card and "model: org/lang-expert" in card
    assert str(models / "math") in (out_dir / "README.md").read_text()  # OUT/ is unchanged


def test_upload_sends_the_rewritten_files(out_dir: Path, monkeypatch) -> None:
    sent = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            pass

        def upload_folder(self, folder_path, **kwargs):
            folder = Path(folder_path)
            sent.update({p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
            return "url"

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    args = [str(out_dir), "--repo-id", "me/merged"]
    for name in ("math", "lang"):
        args += ["--parent-id", f"{out_dir.parent / 'models' / name}=org/{name}"]
    result = CliRunner().invoke(publish_command, args)
    assert result.exit_code == 0, result.output
    assert sorted(sent) == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors"]
    assert b"org/math" in sent["mergekit_config.yml"] and b"/models/" not in sent["README.md"]
    assert sent["model.safetensors"] == (out_dir / "model.safetensors").read_bytes()


def test_malformed_parent_id_is_a_usage_error(out_dir: Path) -> None:
    result = dry_run(out_dir, "--parent-id", "nohub")
    assert result.exit_code == 2 and "LOCAL=owner/name" in result.output
