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
