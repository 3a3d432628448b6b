"""One training process per workdir.

`WorkdirLock(workdir)` holds an exclusive `fcntl.flock` on DIR/.lock for as
long as the run lasts, with the process id written in the file. A second
process on the same workdir is refused with one line naming the first one.
The operating system releases the lock when its process ends in any way
(SIGKILL included), so the lock of a killed run never blocks the next one.
Only process 0 of a multi-process run takes it (they share the workdir).
"""

import fcntl
import os

from vit_jax import errors

NAME = ".lock"


class WorkdirLock:
  """Context manager: an exclusive lock on `workdir` (see module doc)."""

  def __init__(self, workdir, active=True):
    self.path = os.path.join(os.path.abspath(workdir), NAME)
    self._active = active
    self._file = None

  def __enter__(self):
    if not self._active:
      return self
    f = open(self.path, "a+")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      owner = f.read().strip() or "unknown"
      f.close()
      raise errors.Error(
          f"{os.path.dirname(self.path)} is in use by process {owner}: wait "
          "for it to finish (or stop it), or pass another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None
