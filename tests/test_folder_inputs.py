"""Image folders as a user lays them out, through `python -m vit_jax.main`.

Labels come from the training split (evaluation splits map class names to
its indices; hidden folders are no classes), damaged evaluation files are
warned of and counted, and a one-class folder is refused.
"""

import json
import os

import numpy as np
import PIL.Image
import pytest

from vit_jax import analyze
from vit_jax import checkpoint
from vit_jax import fewshot
from vit_jax import main
from vit_jax import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Class colours: far apart, so that pixels alone tell the classes.
COLOURS = {"a": (230, 30, 30), "b": (30, 230, 30), "c": (30, 30, 230),
           "zebra": (200, 200, 200)}

TINY = [
    "--config=configs/digits.py:runlocal", "--config.total_steps=6",
    "--config.log_steps=3", "--config.checkpoint_steps=0",
    "--config.evals.eval.every=0", "--config.progress=False",
    "--config.batch_size=8", "--config.eval_batch_size=8",
    "--config.image_size=(8, 8)", "--config.model.hidden_size=16",
    "--config.model.mlp_dim=32", "--config.model.num_heads=2",
    "--config.model.patch_size=4", "--config.optim.lr=0.01",
    "--config.label_smoothing=0.0", "--config.pp.inception_crop=False",
    # Few-shot on pixels: a 1-shot probe is exact when labels agree.
    "--config.evals.fewshot.representation=pixels",
    "--config.evals.fewshot.shots=(1,)", "--config.evals.fewshot.seeds=(0,)",
    "--config.evals.fewshot.batch_size=8",
]


def _image(path, name, seed):
  """An 8x8 RGB PNG: the class colour with a little noise."""
  rng = np.random.default_rng(seed)
  pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-12, 13, (8, 8, 3)),
                   0, 255).astype(np.uint8)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  PIL.Image.fromarray(pixels).save(path)


def _folder(root, splits):
  """Writes `root/<split>/<class>/<i>.png`: {split: {class: count}}."""
  seed = 0
  for split, classes in splits.items():
    for name, count in classes.items():
      for i in range(count):
        seed += 1
        _image(os.path.join(root, split, name, f"{i}.png"), name, seed)
  return str(root)


def _empty_file(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  open(path, "wb").close()
  return str(path)


def _run(capfd, cli, *argv):
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    rc = cli.run([cli.__name__, *argv])
  finally:
    os.chdir(cwd)
  out, err = capfd.readouterr()
  return rc, out + err


def _one_error(rc, out):
  """The one `error:` line of a failed command (no traceback)."""
  assert rc == 1, out
  assert "Traceback" not in out, out
  errors = [l for l in out.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, out
  return errors[0]


def _nll(workdir, root, class_names):
  """Mean NLL of the checkpoint on root/test, by hand (float64 softmax).

  Labels are the index of each image's folder name in `class_names`;
  pixels are the PNGs scaled to [-1, 1] (8x8 images, no resizing).
  """
  params, model, _ = checkpoint.model_from_workdir(workdir)
  paths = sorted(
      os.path.join(root, "test", c, f)
      for c in os.listdir(os.path.join(root, "test"))
      for f in os.listdir(os.path.join(root, "test", c))
      if os.path.getsize(os.path.join(root, "test", c, f)))
  images = np.stack([np.asarray(PIL.Image.open(p), np.float32)
                     for p in paths]) / 127.5 - 1.0
  labels = np.array([class_names.index(os.path.basename(os.path.dirname(p)))
                     for p in paths])
  logits, _ = model.apply({"params": params}, images, train=False)
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -log_probs[np.arange(len(labels)), labels].mean()


def test_evaluations_label_by_the_training_classes(capfd, tmp_path):
  # train: a, b, c, a stray .ipynb_checkpoints/ with an image and a hidden
  # 0-byte file; test: no class a, and a 0-byte file in b.
  root = _folder(tmp_path / "images", {
      "train": {"a": 3, "b": 3, "c": 3},
      "test": {"b": 2, "c": 2}})
  _image(os.path.join(root, "train", ".ipynb_checkpoints", "x.png"), "c", 99)
  _empty_file(os.path.join(root, "train", "a", ".x.png"))
  broken = _empty_file(os.path.join(root, "test", "b", "broken.png"))
  workdir = str(tmp_path / "w")
  dataset = f"folder:{root}"
  fewshot_data = f"--config.evals.fewshot.datasets=(('f', '{dataset}', " \
                 "'train', 'test'),)"
  rc, out = _run(capfd, main, *TINY, f"--config.dataset={dataset}",
                 fewshot_data, f"--workdir={workdir}")
  assert rc == 0, out

  # The stray folder is no class; the run keeps the training classes.
  with open(os.path.join(workdir, "config.json")) as f:
    resolved = json.load(f)["resolved"]
  assert resolved["class_names"] == ["a", "b", "c"]
  assert resolved["num_classes"] == 3

  # The damaged test file is warned of once and counted for both
  # evaluators; the hidden training file is not looked at.
  warnings = [l for l in out.splitlines() if l.startswith("warning: skipped")]
  assert warnings == [
      f"warning: skipped 1 damaged image file(s) of {dataset} test: {broken} "
      "(--config.pp.strict_images=True makes this an error)"], out
  rows = metrics.read_jsonl(workdir)
  counts = [r for r in rows if "data/skipped_images" in r]
  assert len(counts) == 1
  assert counts[0]["data/skipped_images"] == 0
  assert counts[0]["eval/skipped_images"] == 1
  assert counts[0]["fewshot/skipped_images"] == 1

  # Evaluation labels are the training indices of the folder names: test b
  # and c are 1 and 2, not 0 and 1.
  final = [r for r in rows if "eval/loss" in r][-1]
  assert final["eval/num_examples"] == 4
  # Logits of 8 sharded devices vs one call here: float32 rounding, far
  # below what a shifted label costs.
  nll = _nll(workdir, root, ["a", "b", "c"])
  shifted_nll = _nll(workdir, root, ["b", "c", "a"])
  assert abs(shifted_nll - nll) > 0.05  # The check can tell them apart.
  np.testing.assert_allclose(final["eval/loss"], nll, rtol=1e-4)
  # Few-shot on pixels: exact with labels that agree between its splits.
  assert final["fewshot/f/1shot"] == 1.0

  # The few-shot command line reads the run's splits in the same way.
  rc, out = _run(capfd, fewshot, f"--workdir={workdir}")
  assert rc == 0, out
  assert f"warning: skipped 1 damaged image file(s) of {dataset} test: " \
         f"{broken}\n" in out
  written, = [l.split()[1] for l in out.splitlines() if l.startswith("wrote ")]
  assert os.path.dirname(written) == workdir
  with open(written) as f:
    assert json.load(f)["results"]["f"]["1"]["mean"] == 1.0
  # With strict_images, the damaged evaluation file is an error.
  line = _one_error(*_run(capfd, main, *TINY, f"--config.dataset={dataset}",
                          fewshot_data, "--config.pp.strict_images=True",
                          f"--workdir={workdir}"))
  assert f"damaged image {broken}" in line

  # A test class that training never saw: one error line from main (the
  # evaluators of the finished run), few-shot and analyze alike.
  _image(os.path.join(root, "test", "zebra", "0.png"), "zebra", 7)
  for cli, argv in [
      (main, [*TINY, f"--config.dataset={dataset}", fewshot_data]),
      (fewshot, []), (analyze, ["--what=distance", "--num_images=4"])]:
    line = _one_error(*_run(capfd, cli, *argv, f"--workdir={workdir}"))
    assert "['zebra'] that are not among the training classes" in line, (
        cli.__name__, line)
    assert os.path.join(root, "test") in line


def test_one_class_folder_is_refused(capfd, tmp_path):
  root = _folder(tmp_path / "images", {"train": {"a": 3}, "test": {"a": 1}})
  rc, out = _run(capfd, main, *TINY, f"--config.dataset=folder:{root}",
                 "--config.evals.fewshot.every=-1",
                 f"--workdir={tmp_path / 'w'}")
  line = _one_error(rc, out)
  assert "has one class ('a')" in line and "needs at least two" in line
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
