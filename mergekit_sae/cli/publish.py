"""``mergekit-sae publish OUT --repo-id USER/NAME``: upload an evolved model to the Hub."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import click

from mergekit_sae.outputs.publish import (
    DEFAULT_COMMIT_MESSAGE,
    check_publishable,
    format_listing,
    publish_rewrites,
    staged_folder,
    upload,
    upload_files,
)


def parse_parent_ids(values: Sequence[str]) -> dict[str, str]:
    """``LOCAL=owner/name`` options as a mapping; BadParameter on a malformed one."""
    mapping = {}
    for value in values:
        local, sep, hub_id = value.partition("=")
        if not sep or not local or hub_id.count("/") != 1 or not all(hub_id.split("/")):
            raise click.BadParameter(
                f"{value!r} is not of the form LOCAL=owner/name", param_hint="--parent-id"
            )
        mapping[local] = hub_id
    return mapping


@click.command("publish")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--repo-id", required=True, help="Target Hub repository, USER/NAME or ORG/NAME.")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded; no network.")
@click.option("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login).")
@click.option("--commit-message", default=DEFAULT_COMMIT_MESSAGE, show_default=True)
@click.option(
    "--parent-id",
    "parent_id",
    multiple=True,
    metavar="LOCAL=OWNER/NAME",
    help="Hub id of a local model the lineage names (repeatable).",
)
@click.option(
    "--allow-local-paths",
    is_flag=True,
    help="Publish a lineage that still names local paths (nobody else can rebuild it).",
)
def publish(
    out: Path,
    repo_id: str,
    private: bool,
    dry_run: bool,
    token: str | None,
    commit_message: str,
    parent_id: tuple[str, ...],
    allow_local_paths: bool,
) -> None:
    """Upload the evolved model in OUT/ (weights, tokenizer, card, recipe, plots) to the Hub."""
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise click.BadParameter(
            f"{repo_id!r} is not of the form USER/NAME", param_hint="--repo-id"
        )
    explicit = parse_parent_ids(parent_id)
    check_publishable(out)
    files = upload_files(out)
    mapping, texts = publish_rewrites(out, explicit, allow_local=allow_local_paths)
    for local, hub_id in mapping.items():
        click.echo(f"lineage: {local} -> {hub_id}")
    if dry_run:
        visibility = "private" if private else "public"
        click.echo(f"Dry run: would upload to {repo_id} ({visibility}):")
        click.echo(format_listing(files))
        return
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(staged_folder(out, files, texts)) if texts else out
        url = upload(folder, repo_id, private=private, token=token, commit_message=commit_message)
    click.echo(f"Uploaded {len(files)} files to https://huggingface.co/{repo_id} ({url})")
