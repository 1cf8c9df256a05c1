"""User-facing input errors: one line that names the file and the problem, exit code 2."""

from __future__ import annotations

EXIT_INPUT_ERROR = 2


class InputError(Exception):
    """Bad input from the user (a file, a config key, a value).

    The CLI prints it as a single line, ``error: <where>: <problem>``, with no
    traceback and exits with :data:`EXIT_INPUT_ERROR`.
    """

    def __init__(self, where: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.where = str(where)
        self.problem = problem


def one_line(exc: BaseException) -> tuple[str, int] | None:
    """The one-line message and exit code for an error the CLI reports without a traceback, else None.

    - :class:`InputError`, also when raised inside a Ray worker: Ray hands it back as a ``RayTaskError``
      whose ``cause`` is the original, or (an actor's ``__init__`` failed) as an ``ActorDiedError`` that
      keeps only the traceback's text, whose last ``InputError:`` line is the message: exit 2.
    - ``OSError`` (a file that cannot be read or written): the file and the system's reason: exit 2.
    - any other error from a Ray worker: its type and first line, exit 1 (not an input error, but 130
      lines of someone else's traceback help nobody; ``MTA_RAY_TRACEBACK=1`` shows them).
    """
    cause = exc
    for _ in range(8):  # RayTaskError.cause, possibly nested
        inner = getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    if isinstance(cause, InputError):
        return f"error: {cause.where}: {cause.problem}", EXIT_INPUT_ERROR
    if isinstance(cause, OSError) and cause is exc:
        where = cause.filename if cause.filename is not None else "file system"
        return f"error: {where}: {cause.strerror or cause}", EXIT_INPUT_ERROR
    if not type(exc).__module__.startswith("ray"):
        return None
    if cause is not exc:
        return f"error: in a Ray worker: {type(cause).__name__}: {_first_line(str(cause))}", 1
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        head, sep, rest = ln.partition(": ")
        if sep and head.rsplit(".", 1)[-1] == "InputError":
            return f"error: {rest}", EXIT_INPUT_ERROR
    for ln in reversed(lines):
        head, sep, rest = ln.partition(": ")
        if sep and head.replace(".", "_").isidentifier() and head.endswith(("Error", "Exception")):
            return f"error: in a Ray worker: {head}: {rest}", 1
    return f"error: Ray: {_first_line(str(exc))}", 1


def _first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
