"""``mergekit-sae publish``: dry-run listing, refusal of incomplete folders, upload arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from mergekit_sae.cli import main
from mergekit_sae.cli.publish import publish as publish_command
from mergekit_sae.outputs import publish as publish_mod

FILES = {
    "config.json": b"{}",
    "model.safetensors": b"x" * 3000,
    "README.md": b"---\ntags: [merge]\n---\n",
    "mergekit_config.yml": b"merge_method: sae_evolve\n",
    "plots/fitness.png": b"png" * 10,
    ".work/checkpoint/state.json": b"{}",
    ".work/members/m0/model.safetensors": b"y" * 5000,
    "plots/.fitness.png.tmp": b"partial",
}
PUBLIC = [
    "README.md",
    "config.json",
    "mergekit_config.yml",
    "model.safetensors",
    "plots/fitness.png",
]


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    out = tmp_path / "OUT"
    for name, data in FILES.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return out


def test_upload_files_excludes_hidden_entries(out_dir: Path) -> None:
    files = publish_mod.upload_files(out_dir)
    assert [f.path for f in files] == PUBLIC
    assert {f.path: f.size for f in files} == {p: len(FILES[p]) for p in PUBLIC}


def test_dry_run_lists_paths_and_sizes_without_network(out_dir: Path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("dry run must not touch the Hub")

    monkeypatch.setattr("huggingface_hub.HfApi.__init__", no_network)
    result = CliRunner().invoke(
        publish_command, [str(out_dir), "--repo-id", "me/model", "--dry-run", "--private"]
    )
    assert result.exit_code == 0, result.output
    listed = {line.split()[0]: line for line in result.output.splitlines()[1:-1]}
    assert sorted(listed) == PUBLIC
    assert listed["model.safetensors"].endswith(publish_mod.human_size(3000))
    assert "me/model (private)" in result.output
    total = sum(len(FILES[p]) for p in PUBLIC)
    assert result.output.splitlines()[-1] == f"5 files, {publish_mod.human_size(total)} in total"
    assert ".work" not in result.output


class FakeApi:
    """Records the calls made on the Hub client."""

    calls: list[tuple[str, tuple, dict]] = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", (), {"token": token}))

    def create_repo(self, *args, **kwargs):
        FakeApi.calls.append(("create_repo", args, kwargs))

    def upload_folder(self, **kwargs):
        FakeApi.calls.append(("upload_folder", (), kwargs))
        kwargs["ignore_patterns"] += ["appended-by-hub"]  # the real client extends the list

        class Info:
            commit_url = "https://huggingface.co/me/model/commit/abc"

        return Info()


def test_upload_calls_hub_with_exclusions(out_dir: Path, monkeypatch) -> None:
    FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    args = [str(out_dir), "--repo-id", "me/model", "--private", "--token", "tok"]
    result = CliRunner().invoke(publish_command, [*args, "--commit-message", "first"])
    assert result.exit_code == 0, result.output
    names = [name for name, _, _ in FakeApi.calls]
    assert names == ["init", "create_repo", "upload_folder"]
    assert FakeApi.calls[0][2] == {"token": "tok"}
    _, create_args, create_kwargs = FakeApi.calls[1]
    assert create_args == ("me/model",)
    assert create_kwargs == {"private": True, "repo_type": "model", "exist_ok": True}
    upload_kwargs = FakeApi.calls[2][2]
    assert upload_kwargs["repo_id"] == "me/model"
    assert Path(upload_kwargs["folder_path"]) == out_dir
    assert upload_kwargs["commit_message"] == "first"
    assert upload_kwargs["repo_type"] == "model"
    # the module's own patterns stay untouched by the client's in-place extension
    assert publish_mod.EXCLUDE_PATTERNS == (".*", "*/.*")
    from huggingface_hub.utils import filter_repo_objects

    sent = list(FILES)
    kept = filter_repo_objects(sent, ignore_patterns=upload_kwargs["ignore_patterns"])
    assert sorted(kept) == PUBLIC
    assert "commit/abc" in result.output


def test_public_by_default(out_dir: Path, monkeypatch) -> None:
    FakeApi.calls = []
    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    result = CliRunner().invoke(publish_command, [str(out_dir), "--repo-id", "me/model"])
    assert result.exit_code == 0, result.output
    assert FakeApi.calls[1][2]["private"] is False
    assert FakeApi.calls[0][2] == {"token": None}


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("README.md", "README.md (the model card)"),
        ("model.safetensors", "model weights"),
        ("config.json", "config.json"),
    ],
)
def test_incomplete_folder_is_refused(out_dir: Path, remove: str, message: str) -> None:
    (out_dir / remove).unlink()
    result = CliRunner().invoke(
        main, ["publish", str(out_dir), "--repo-id", "me/model", "--dry-run"]
    )
    assert result.exit_code == 1
    assert message in result.output
    assert str(out_dir) in result.output


def test_sharded_weights_count_as_a_model(out_dir: Path) -> None:
    (out_dir / "model.safetensors").rename(out_dir / "model-00001-of-00001.safetensors")
    (out_dir / "model.safetensors.index.json").write_text("{}")
    publish_mod.check_publishable(out_dir)


def test_missing_folder_and_bad_repo_id(tmp_path: Path, out_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["publish", str(tmp_path / "nope"), "--repo-id", "me/x"])
    assert result.exit_code == 1 and "not a directory" in result.output
    result = runner.invoke(publish_command, [str(out_dir), "--repo-id", "justname"])
    assert result.exit_code != 0 and "USER/NAME" in result.output


@pytest.mark.parametrize(
    ("size", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 1024**3, "3.0 GiB")]
)
def test_human_size(size: int, text: str) -> None:
    assert publish_mod.human_size(size) == text
