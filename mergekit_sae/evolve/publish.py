"""``mergekit-sae publish OUT/``: upload an evolved model folder to the Hugging Face Hub.

Only the publishable part of OUT/ goes up: hidden entries (the ``.work/`` checkpoints, temporary
files of atomic writes) are left out, so a run folder can be published as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from mergekit_sae.errors import PublishError

# fnmatch patterns, matched as huggingface_hub matches them (``*`` spans ``/``):
# every hidden file or folder, at the top level or below it (this covers .git and .cache too).
EXCLUDE_PATTERNS: tuple[str, ...] = (".*", "*/.*")
DEFAULT_COMMIT_MESSAGE = "Upload SAE-evolved model (mergekit-sae)"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class UploadFile:
    """One file that would be uploaded: its path inside the repository and its size in bytes."""

    path: str
    size: int


def check_publishable(folder: Path) -> None:
    """Raise a ``PublishError`` naming what ``folder`` lacks to be a model with a card."""
    if not folder.is_dir():
        raise PublishError(
            f"{folder}: not a directory (expected an evolve output folder)", file=folder
        )
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json (the model configuration)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"model weights ({' or '.join(WEIGHT_FILES)})")
    if not (folder / "README.md").is_file():
        missing.append("README.md (the model card)")
    if missing:
        raise PublishError(
            f"{folder} cannot be published, it lacks: {'; '.join(missing)}. "
            "Run `mergekit-sae evolve RECIPE.yml OUT/` to completion first.",
            file=folder,
        )


def upload_files(folder: Path, exclude: Sequence[str] = EXCLUDE_PATTERNS) -> list[UploadFile]:
    """List the files of ``folder`` that an upload with ``exclude`` as ignore patterns sends."""
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=list(exclude))
    return [UploadFile(path, (folder / path).stat().st_size) for path in kept]


def human_size(size: int) -> str:
    """Format a byte count for people (1.5 KiB, 2.0 GiB)."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_listing(files: Sequence[UploadFile]) -> str:
    """A plain table of the files to upload with their sizes and a total line."""
    width = max((len(f.path) for f in files), default=0)
    lines = [f"{f.path:<{width}}  {human_size(f.size):>10}" for f in files]
    total = sum(f.size for f in files)
    lines.append(f"{len(files)} files, {human_size(total)} in total")
    return "\n".join(lines)


def upload(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
) -> str:
    """Create ``repo_id`` if needed, upload ``folder`` minus hidden entries; return commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=list(EXCLUDE_PATTERNS),
    )
    return str(getattr(info, "commit_url", info))


@click.command("publish")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--repo-id", required=True, help="Target Hub repository, USER/NAME or ORG/NAME.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded; no network.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
@click.option("--commit-message", default=DEFAULT_COMMIT_MESSAGE, show_default=True)
def publish(
    out: Path, repo_id: str, private: bool, dry_run: bool, token: str | None, commit_message: str
) -> None:
    """Upload the evolved model in OUT/ (weights, tokenizer, card, recipe, plots) to the Hub."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise click.BadParameter(
            f"{repo_id!r} is not of the form USER/NAME", param_hint="--repo-id"
        )
    check_publishable(out)
    files = upload_files(out)
    if dry_run:
        visibility = "private" if private else "public"
        click.echo(f"Dry run: would upload to {repo_id} ({visibility}):")
        click.echo(format_listing(files))
        return
    url = upload(out, repo_id, private=private, token=token, commit_message=commit_message)
    click.echo(f"Uploaded {len(files)} files to https://huggingface.co/{repo_id} ({url})")
