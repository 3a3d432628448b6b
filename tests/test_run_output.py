"""What a training run prints: progress lines, few-shot tables, the summary.

One tiny digits run in a subprocess whose stdout and stderr are pipes (as
when logged to a file), with the default `progress=True`, then the same
command again on its finished workdir (the block of a run stopped by a
signal: tests/test_train.py); a progress bar drawn on a real terminal (a
pty); the commands suggested for models that a conversion target cannot
hold.
"""

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

from vit_jax import main
from vit_jax import metrics
from vit_jax import models
from vit_jax import run_summary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import ROOT, _env, _finish, _main  # pylint: disable=g-import-not-at-top,wrong-import-position

# 8 steps, a line and an evaluation every 4, few-shot at the end with three
# seeds, one checkpoint at the end; `progress` keeps its default.
RUN = [
    "--config=configs/digits.py:runlocal", "--config.total_steps=8",
    "--config.log_steps=4", "--config.evals.eval.every=4",
    "--config.checkpoint_steps=0", "--config.evals.fewshot.every=0",
    "--config.evals.fewshot.seeds=(0, 1, 2)", "--config.batch_size=16",
    "--config.eval_batch_size=120", "--config.image_size=(8, 8)",
    "--config.model.hidden_size=16", "--config.model.mlp_dim=32",
    "--config.model.num_heads=4", "--config.model.num_layers=1",
    "--config.model.patch_size=4",
]

PROGRESS = re.compile(
    r"^step +(\d+)/8  loss (\S+)  lr (\S+)  (\d+) img/s  ETA \d+:\d\d:\d\d$")
FEWSHOT_ROW = re.compile(
    r"^ *(?:digits)? +(\d+)  (\S+) ± (\S+)  2\^(-?\d+) +(\S+) ± (\S+)$")


def _block(out, head):
  """The lines from the one starting with `head` to the end."""
  lines = out.rstrip("\n").splitlines()
  starts = [i for i, l in enumerate(lines) if l.startswith(head)]
  assert len(starts) == 1, out[-3000:]
  return lines[starts[0]:]


def _row(block, label):
  """The lines of the summary row `label`: its first line (without the
  label) and the lines under it."""
  first = [i for i, l in enumerate(block) if l.split()[:1] == [label]]
  assert len(first) == 1, block
  i = first[0]
  column = block[i].index(label) + len(label)
  column += len(block[i][column:]) - len(block[i][column:].lstrip())
  rows = [block[i][column:]]
  for line in block[i + 1:]:
    if line[:column].strip():
      break
    rows.append(line[column:])
  return rows


def _check_fewshot(lines, row):
  """`lines` (caption, header, one line per shot count) hold the metrics of
  `row`, as printed: 4 decimals, L2 as a power of two."""
  assert lines[0] == ("pre_logits, 3 seeds: mean ± std; L2 chosen by "
                      "leave-one-out"), lines
  assert lines[1].split() == ["dataset", "shots", "accuracy", "L2",
                              "at", "L2=2^10"], lines
  shots = []
  for line in lines[2:]:
    n, acc, std, l2, fixed, fixed_std = FEWSHOT_ROW.match(line).groups()
    key = f"fewshot/digits/{n}shot"
    for printed, value in ((acc, row[key]), (std, row[key + "_std"]),
                           (fixed, row[key + "_fixed_l2"]),
                           (fixed_std, row[key + "_fixed_l2_std"])):
      assert abs(float(printed) - value) <= 5e-5, (line, key, value)
    assert 2.0 ** int(l2) == row[key + "_l2"]
    shots.append(int(n))
  assert shots == [1, 5]


def test_run_prints_progress_lines_fewshot_table_and_summary(
    tmp_path, capfd, monkeypatch):
  workdir = str(tmp_path / "w")
  env = _env(8)
  rc, out = _finish(_main(RUN + [f"--workdir={workdir}"], env))
  assert rc == 0, out[-3000:]
  assert "\r" not in out  # No progress bar without a terminal.
  rows = metrics.read_jsonl(workdir)
  train = {r["step"]: r for r in rows if "train/loss" in r}

  # A plain line every log_steps, with the logged loss, lr and img/s.
  printed = [PROGRESS.match(l) for l in out.splitlines()
             if l.startswith("step ") and "/8 " in l]
  assert [int(m[1]) for m in printed if m] == [4, 8], out[-3000:]
  for m in printed:
    r = train[int(m[1])]
    assert abs(float(m[2]) - r["train/loss"]) <= 5e-5
    assert float(m[3]) == pytest.approx(r["train/lr"], rel=0.05)
    assert abs(int(m[4]) - r["perf/img_per_sec"]) <= 0.5

  # Few-shot as a table, not one line of keys.
  assert "fewshot/digits/1shot=" not in out
  final = [r for r in rows if "fewshot/digits/1shot" in r]
  assert [r["step"] for r in final] == [8]
  final = final[0]
  table = _block(out, "step 8: fewshot: ")[:4]
  _check_fewshot([table[0][len("step 8: fewshot: "):]] +
                 [l[2:] for l in table[1:]], final)

  # The summary: final metrics as logged, the checkpoint, what to run next.
  block = _block(out, "run summary: 8 of 8 steps")
  assert len(block) <= 16, block
  assert all(len(l.replace(workdir, "DIR")) <= 100 for l in block), block
  evals = dict(kv.split("=") for kv in _row(block, "eval")[0].split())
  assert set(evals) == {"accuracy", "loss", "num_correct", "num_examples"}
  for k, v in evals.items():
    assert abs(float(v) - final[f"eval/{k}"]) <= 5e-5, (k, v)
  assert int(evals["num_examples"]) == 360
  _check_fewshot(_row(block, "fewshot"), final)
  assert re.fullmatch(r"[0-9.]+ s: setup [0-9.]+ s, training [0-9.]+ s, "
                      r"evaluation [0-9.]+ s, checkpoints [0-9.]+ s",
                      _row(block, "time")[0]), block
  assert _row(block, "XLA")[0].startswith("compiled ")
  checkpoint = _row(block, "checkpoint")
  assert checkpoint == [os.path.join(workdir, "checkpoints", "8")]
  assert os.path.isdir(checkpoint[0])
  assert _row(block, "next") == [
      f"python -m vit_jax.fewshot --workdir={workdir}",
      f"python -m vit_jax.convert --from={workdir} --to=hf --out={workdir}/hf",
      f"python -m vit_jax.convert --from={workdir} --to=timm "
      f"--out={workdir}/timm",
      f"python -m vit_jax.analyze --workdir={workdir}"]
  assert _row(block, "curves") == [os.path.join(workdir, "curves.png")]
  assert os.path.isfile(os.path.join(workdir, "curves.png"))

  # The same command again (in this process): nothing to train; the
  # checkpoint is evaluated (the same computation: the same metrics) and
  # summarised.
  monkeypatch.chdir(ROOT)
  rc = main.run(["vit_jax.main", *RUN, f"--workdir={workdir}"])
  again = capfd.readouterr().out
  assert rc == 0, again[-3000:]
  assert "already trained for 8 steps; evaluating" in again
  block_again = _block(again, "run summary: already trained for 8 steps; "
                       "evaluated the checkpoint at step 8")
  assert _row(block_again, "eval") == _row(block, "eval")
  assert _row(block_again, "fewshot") == _row(block, "fewshot")
  assert _row(block_again, "checkpoint") == checkpoint
  assert not PROGRESS.search(again)


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


@pytest.mark.parametrize("fields,targets", [
    (dict(classifier="token"), ["hf", "timm"]),
    (dict(classifier="gap"), ["timm"]),  # HF ViT has a cls token.
    (dict(decoder=True, use_mask_token=True), ["hf"]),  # timm: no decoder.
    (dict(posemb="relative"), ["npz"]),  # Neither PyTorch class.
])
def test_next_commands_convert_to_what_holds_the_model(fields, targets):
  model = models.create("testing", num_classes=10, **fields)
  commands = run_summary.next_commands("/runs/a b", model)
  assert commands[0] == "python -m vit_jax.fewshot --workdir='/runs/a b'"
  assert commands[-1] == "python -m vit_jax.analyze --workdir='/runs/a b'"
  assert [re.search(r"--to=(\w+) ", c)[1] for c in commands[1:-1]] == targets
