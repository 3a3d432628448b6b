"""Every command line turns bad input into one line `error: ...` and exit 1.

Each row is run in-process: the CLI must return 1, print exactly one stderr
line, starting with `error:`, and no traceback.
"""

import os

import PIL.Image
import pytest

from vit_jax import fewshot
from vit_jax import main
from vit_jax.bench import __main__ as bench
from vit_jax.convert import cli as convert

import folder_fixture  # pylint: disable=g-bad-import-order
from test_main import TINY  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A text file, a non-workdir directory, folders with damaged images."""
  d = tmp_path_factory.mktemp("bad")
  notes = d / "notes.txt"
  notes.write_text("these are notes, not a checkpoint\n")
  (d / "not_a_workdir").mkdir()
  (d / "not_a_workdir" / "readme.md").write_text("hello\n")
  truncated = folder_fixture.make_image_folder(
      str(d / "truncated"), classes=("a", "b"), splits={"train": 6, "test": 2},
      image_size=(8, 8))
  victim = sorted((d / "truncated" / "train" / "a").iterdir())[0]
  jpeg = victim.with_suffix(".jpg")
  PIL.Image.open(victim).convert("RGB").save(jpeg, quality=90)
  victim.unlink()
  jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
  not_image = folder_fixture.make_image_folder(
      str(d / "not_image"), classes=("a", "b"), splits={"train": 6, "test": 2},
      image_size=(8, 8))
  (d / "not_image" / "train" / "b" / "x.jpg").write_text("not an image")
  sweep = d / "sweep.py"
  sweep.write_text("def get_sweep():\n  return dict(settings=[dict(name='a', "
                   "config='configs/digits.py')], seeds=(0, 1))\n")
  return {"notes": str(notes), "sweep": str(sweep), "dir": str(d / "not_a_workdir"),
          "truncated": truncated, "truncated_file": str(jpeg),
          "not_image": not_image,
          "not_image_file": str(d / "not_image" / "train" / "b" / "x.jpg"),
          "workdir": str(d / "w")}


def _no_image_size(args):
  return [a for a in args if "image_size" not in a]


MAIN = [
    (["--config.batch_size=0"], "--config.batch_size=0 is invalid"),
    (["--config.optim.lr=nan"], "--config.optim.lr=nan is invalid"),
    (["--config.optim.lr=-1"], "--config.optim.lr=-1.0 is invalid"),
    (["--config.total_steps=0"], "--config.total_steps=0 is invalid"),
    (["--config.init={notes}"], "{notes}"),
    (["--config.init={dir}"], "is not a training workdir"),
    (["--config.dataset=folder:{truncated}", "--config.pp.strict_images=True"],
     "{truncated_file}"),
    (["--config.dataset=folder:{not_image}", "--config.pp.strict_images=True"],
     "{not_image_file}"),
    (["--config.task=nope"], "unknown task 'nope'"),
    (["--config.evals.eval.type=nope"], "unknown evaluator type 'nope'"),
    (["--config.loss=mse"], "--config.task=regression"),
    (["--config.task=regression", "--config.evals.eval.type=classification"],
     "evals.eval: the classification evaluator reads logits, but the model of "
     "the regression task outputs values: use --config.evals.eval.type="
     "regression"),
    (["--config.model.classifier=avg"], "unknown classifier 'avg'"),
    (["--config.model.patch_size=(4,4,4)"], "patch_size must be an int or"),
    (["--config.model_name=R26+S/32", "--config.model.patch_size=1",
      "--config.model.resnet={{'num_layers': (1,), 'width_factor': 0.25}}"],
     "cannot build R26+S/32 from these fields: Number of groups (32)"),
]


def one_error_line(rc, capfd):
  """Asserts exit 1, one stderr line `error: ...`, no traceback; returns it."""
  out, err = capfd.readouterr()
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == 1, (out, err)
  assert "Traceback" not in out + err
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0]


@pytest.mark.parametrize("args,message", MAIN)
def test_main(args, message, files, capfd):
  args = [a.format(**files) for a in args]
  rc = main.run(["main", *TINY, *args, f"--workdir={files['workdir']}"])
  assert message.format(**files) in one_error_line(rc, capfd)


@pytest.mark.parametrize("args,message", [
    (["--workdir={dir}"], "is not a training workdir"),
    (["--workdir={workdir}", "--init={notes}", "--model=testing"],
     "{notes}"),
    (["--workdir={workdir}", "--init={notes}"], "--init needs --model"),
    (["--workdir={workdir}", "--init=/no/such.npz", "--model=testing"],
     "does not exist"),
    (["--workdir={dir}", "--config=configs/fewshot.py:nope"],
     "unknown few-shot preset 'nope'"),
])
def test_fewshot(args, message, files, capfd):
  rc = fewshot.run(["fewshot", *[a.format(**files) for a in args]])
  assert message.format(**files) in one_error_line(rc, capfd)


@pytest.mark.parametrize("args,message", [
    (["--from={dir}", "--to=hf", "--out={workdir}/hf"],
     "is not a training workdir"),
    (["--from={notes}", "--to=hf", "--out={workdir}/hf"], "{notes}"),
    (["--from=/no/such/file.npz", "--to=hf", "--out={workdir}/hf"],
     "does not exist"),
    (["--from={notes}"], "--to"),
])
def test_convert(args, message, files, capfd):
  rc = convert.main([a.format(**files) for a in args])
  assert message.format(**files) in one_error_line(rc, capfd)


@pytest.mark.parametrize("args,message", [
    ([], "name a benchmark"),
    (["nope"], "nope"),
    (["throughput", "--batch=0"], "batch"),
    (["throughput", "--model=Q/7"], "Q/7"),
    (["fewshot", "--shots=x"], "shots"),
])
def test_bench(args, message, capfd):
  rc = bench.main(["bench", *args])
  assert message in one_error_line(rc, capfd)


@pytest.mark.parametrize("args,message", [
    (["--workdir={dir}"], "is not a training workdir"),
    (["--init={notes}", "--model=testing"], "{notes}"),
    (["--init={notes}", "--model=testing", "--what=nope"], "nope"),
])
def test_analyze(args, message, files, capfd):
  from vit_jax import analyze  # pylint: disable=g-import-not-at-top
  rc = analyze.run(["analyze", *[a.format(**files) for a in args]])
  assert message.format(**files) in one_error_line(rc, capfd)


@pytest.mark.parametrize("args,message", [
    (["--workdir={workdir}"], "pass --config="),
    (["--config={notes}", "--workdir={workdir}"], "get_sweep"),
    (["--config=/no/sweep.py", "--workdir={workdir}"], "not found"),
    (["--config={sweep}", "--workdir={workdir}", "--point=99"],
     "--point=99 is not in [0, 2)"),
])
def test_sweep(args, message, files, capfd):
  from vit_jax import sweep  # pylint: disable=g-import-not-at-top
  rc = sweep.run(["sweep", *[a.format(**files) for a in args]])
  assert message.format(**files) in one_error_line(rc, capfd)
