"""The project's one user-error type.

`Error` is a problem the user can fix (a bad config value, a missing file, a
checkpoint that does not fit): its message names the cause and the fix. It is
a `ValueError`, so library code may raise either; the command-line tools catch
`Error` at their top and print it as one line `error: <message>`, exit 1, no
traceback.
"""

import functools
import sys


class Error(ValueError):
  """A problem the user can fix; CLIs print it as one line."""


def first_line(error, limit=None):
  """`Type: first line` of an exception's message (its first non-empty
  line; the type alone for an empty message), cut to `limit` characters:
  the cause of a failure inside an `Error` of one line."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text[:limit] if limit else text


def fail(message):
  """Prints `error: <message>` as one line on stderr; returns exit status 1."""
  text = " ".join(str(message).split())
  print(f"error: {text}", file=sys.stderr, flush=True)
  return 1


def command_line(run):
  """Decorates a CLI's `run(argv) -> status`: an `Error` or a bad flag it
  raises becomes one line `error: <message>` and exit status 1."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  @functools.wraps(run)
  def wrapped(argv):
    try:
      status = run(argv)
    except Error as e:
      return fail(e)
    except flags.Error as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      return fail(lines[-1] if lines else e)
    return 0 if status is None else status

  return wrapped
