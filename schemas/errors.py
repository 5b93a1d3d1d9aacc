"""The one exception type for mistakes a user can cause and fix, and how every entry point turns it (and a
full disk) into one sentence and exit status 2."""
from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """A bad config, URL list, path or endpoint: the message is one sentence that says what to do.

    Entry points print it without a traceback and exit with status 2.
    """


def disk_full_error(err: BaseException) -> OSError | None:
    """The "no space left on device" OSError behind `err`, or None. Engines wrap it (Beam in a RuntimeError,
    Ray in a RayTaskError) and Arrow's own OSError carries no errno, so the chain and the text are read."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and (err.errno == errno.ENOSPC or "No space left on device" in str(err)):
            return err
        err = err.__cause__ or err.__context__
    return None


def no_space_sentence(err: OSError, where: Path | str | None = None) -> str:
    if path := err.filename or where:
        return f"No space left on device writing {path}; free some space there or set output_root to a disk with room."
    return "No space left on device; free some space or set output_root to a disk with room."


@contextlib.contextmanager
def disk_full_is_user_error(where: Path | str | None) -> Iterator[None]:
    """A full disk inside the block becomes one sentence naming the file (or `where`, when the writer's error
    does not say which file) and "no space left"; other errors pass through."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if (full := disk_full_error(err)) is None:
            raise
        raise UserError(no_space_sentence(full, where)) from None


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Runs `main`; a UserError (or a full disk, wherever it happens) ends the process with one sentence and
    status 2, no traceback."""
    try:
        with disk_full_is_user_error(where=None):
            main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
