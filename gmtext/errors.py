"""Errors the user can fix (a setting, a launch, a missing package), as opposed to bugs.

The console scripts print a `UserError` (like a ValueError) as one line and exit 2; any
other RuntimeError, a torch error say, keeps its traceback, because it is a bug to
report, not a setting to change. A RuntimeError subclass, so code catching RuntimeError
for these cases keeps working.
"""


class UserError(RuntimeError):
    pass
