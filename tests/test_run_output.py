"""What a training run prints: progress lines or a progress bar.

A progress bar drawn on a real terminal (a pty), and plain lines without it.
"""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import ROOT, _env  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_progress_bar_on_a_terminal_only(tmp_path):
  """On a terminal (a pty as stderr) `progress=True` draws the tqdm bar and
  prints no plain lines; `progress=False` prints them."""
  code = (
      "from vit_jax import metrics\n"
      "for progress in (True, False):\n"
      f"  w = metrics.MetricWriter({str(tmp_path)!r}, 4, progress=progress)\n"
      "  for step in (2, 4):\n"
      "    w.advance(2)\n"
      "    w.write(step, {'train/loss': 0.5, 'train/lr': 1e-3,\n"
      "                   'perf/img_per_sec': 100.0})\n"
      "  w.close()\n")
  leader, follower = pty.openpty()
  # 24 rows of 100 columns (a new pty has 0: tqdm would draw nothing).
  fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                          env=_env(1), stdout=subprocess.PIPE,
                          stderr=follower, text=True)
  os.close(follower)
  terminal = b""
  while True:
    try:
      chunk = os.read(leader, 4096)
    except OSError:  # The child closed the terminal.
      break
    if not chunk:
      break
    terminal += chunk
  os.close(leader)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, terminal.decode(errors="replace")
  terminal = terminal.decode(errors="replace")
  assert "\r" in terminal and "4/4" in terminal and "loss=0.5000" in terminal
  assert [l.split()[:2] for l in out.splitlines()] == [
      ["step", "2/4"], ["step", "4/4"]], out
  assert "loss 0.5000" not in terminal
