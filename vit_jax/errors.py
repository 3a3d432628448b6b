"""The project's one user-error type.

`Error` is a problem the user can fix (a bad config value, a missing file, a
checkpoint that does not fit): its message names the cause and the fix. It is
a `ValueError`, so library code may raise either; the command-line tools catch
`Error` at their top and print it as one line `error: <message>`, exit 1, no
traceback.
"""


class Error(ValueError):
  """A problem the user can fix; CLIs print it as one line."""
