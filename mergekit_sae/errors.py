"""The package's exception types: one base class, one subclass per kind of bad input.

Every error a user can fix derives from :class:`MergekitSaeError`; ``mergekit-sae`` prints
such an error as one line ``error: ...`` (exit code 1, 2 for :class:`UsageError`) and any
other exception as a short message with a hint to rerun with ``--debug``. Each subclass keeps
the builtin base it had before (``ValueError`` or ``RuntimeError``), so ``except ValueError``
in callers keeps working. ``file``, ``field`` and ``tensor`` say what the message names, for
programs that want it without parsing the text. This module imports nothing heavy.
"""

from __future__ import annotations

from errno import ENOSPC
from os import PathLike

__all__ = [
    "MergekitSaeError",
    "UsageError",
    "RecipeError",
    "OutputFolderError",
    "OutputMissingError",
    "MergeInputError",
    "TaskDataError",
    "WeightLoadError",
    "TestbedError",
    "ConfigError",
    "PublishError",
    "PluginError",
    "OutOfSpaceError",
]


class MergekitSaeError(Exception):
    """Base of every error the user can fix; the message names what is wrong and where."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        file: str | PathLike | None = None,
        field: str | None = None,
        tensor: str | None = None,
    ) -> None:
        super().__init__(message)
        self.file = None if file is None else str(file)
        self.field = field
        self.tensor = tensor


class UsageError(MergekitSaeError, ValueError):
    """Options or arguments that contradict each other (exit code 2, like click's)."""

    exit_code = 2


class RecipeError(MergekitSaeError, ValueError):
    """A recipe (evolve or MergeKit) that cannot run; the message names the file and field."""


class OutputFolderError(MergekitSaeError, RuntimeError):
    """The output folder cannot be used as asked (in use, or not a run to resume)."""


class OutputMissingError(MergekitSaeError, RuntimeError):
    """A step that should have written an output folder left none where it was expected."""


class MergeInputError(MergekitSaeError, ValueError):
    """The models of a merge do not hold the same tensors with the same shapes."""


class TaskDataError(MergekitSaeError, ValueError):
    """A task data file is missing or malformed; the message names the file and line."""


class WeightLoadError(MergekitSaeError, ValueError):
    """Candidate weights do not fit the resident model (names or shapes)."""


class TestbedError(MergekitSaeError, RuntimeError):
    """A testbed folder cannot be built, reused or read as asked."""

    __test__ = False  # not a pytest class


class ConfigError(MergekitSaeError, ValueError):
    """A settings file (such as a testbed config) that cannot be read or is invalid."""


class PublishError(MergekitSaeError, ValueError):
    """A folder that cannot be published (not a complete model with a card)."""


class PluginError(MergekitSaeError, ValueError):
    """A plug-in (such as a task type) that cannot be loaded or registered; the message names
    its entry point and distribution, or both owners of a name registered twice."""


class OutOfSpaceError(MergekitSaeError, OSError):
    """A write failed because the disk is full; the message names the file or folder."""

    def __init__(self, message: str, *, file: str | PathLike | None = None) -> None:
        super().__init__(message, file=file)
        self.errno = ENOSPC


def is_out_of_space(error: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) reports a full disk (ENOSPC)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == ENOSPC:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True  # errors of libraries that do not keep the errno (safetensors)
        error = error.__cause__ or error.__context__
    return False
