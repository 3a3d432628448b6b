"""`--help`, `--helpshort` and `--helpfull` of the absl command lines.

absl answers these flags only under `absl.app.run`; the command lines here
parse their flags themselves (`run(argv)`, so that they can run in-process
side by side), and answer them through this module before parsing:

    if cli_help.requested(argv):
      return cli_help.show(argv, __doc__, FLAGS)

`--help` (also `-h`, `-help`) and `--helpshort` print the module docstring,
its usage lines first, then the command's own flags, each with its help and
default. `--helpfull` prints the docstring and every flag the parser knows in
absl's own format (absl's logging flags, `--flagfile`, ...). Both go to stdout
and the exit status is 0.
"""

import os
import re
import sys
import textwrap

from absl import flags

SHORT = ("-h", "--help", "-help", "--helpshort", "-helpshort")
FULL = ("--helpfull", "-helpfull")


def requested(argv):
  """"short", "full" or None: the first help flag in argv[1:] (before `--`)."""
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in SHORT:
      return "short"
    if arg in FULL:
      return "full"
  return None


def describe(flag):
  """One flag's entry: `--name: help (default: value)`, wrapped to 80."""
  name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
  if flag.short_name:
    name = f"-{flag.short_name},{name}"
  text = " ".join(flag.help.split())
  default = (flag.default_as_str or "").strip("'")
  if isinstance(flag, flags.MultiFlag):  # absl appends its own note.
    text = re.sub(r"; repeat this option to specify a list of values$", "",
                  text)
    text += "" if "(repeatable)" in text else " (repeatable)"
    default = "" if default == "[]" else default
  if default in ("None", "") or (flag.boolean and default == "false"):
    default = ""
  if default:
    text += f" (default: {default})"
  return textwrap.fill(f"{name}: {text}", width=80, initial_indent="  ",
                       subsequent_indent="      ", break_on_hyphens=False,
                       break_long_words=False)


def text(doc, flag_values, names=None, full=False):
  """The help text.

  Args:
    doc: the command's module docstring.
    flag_values: its `absl.flags.FlagValues`.
    names: the command's own flags in `flag_values` (default: all of them,
      in the order they were defined).
    full: every flag the parser knows, in absl's format.

  Returns:
    The docstring and the flags, ending in a newline.
  """
  out = [doc.strip(), ""]
  if full:
    out.append(flag_values.get_help(include_special_flags=True))
  else:
    out.append("flags:")
    own = [flag_values[name] for name in names or flag_values]
    for flag in dict.fromkeys(own):  # A flag's short name is a second key.
      out.append(describe(flag))
    out.append("")
    out.append("--helpfull also lists absl's flags.")
  return "\n".join(out).rstrip() + "\n"


def write(output):
  """Writes `output` to stdout; returns 0, also when a reader such as `head`
  closed the pipe early (stdout then goes to /dev/null: no traceback)."""
  try:
    sys.stdout.write(output)
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  return 0


def show(argv, doc, flag_values, names=None):
  """Prints the help `argv` asks for (see `requested`) to stdout; returns 0."""
  return write(text(doc, flag_values, names, full=requested(argv) == "full"))
