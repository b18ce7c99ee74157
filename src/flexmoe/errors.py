"""One error type for everything a user can get wrong.

Every message names the problem and the fix, so the CLI can print it on one line and exit non-zero
without a traceback.
"""

from __future__ import annotations


class FlexmoeError(Exception):
    """A user-facing error: ``problem`` says what is wrong, ``fix`` says what to do about it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)

    def __reduce__(self):  # crosses process boundaries whole (jobs run in worker processes)
        return (type(self), (self.problem, self.fix))
