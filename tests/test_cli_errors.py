"""Every command line turns bad input into one line `error: ...` and exit 1.

Each row is run in-process: the CLI must return 1, print exactly one stderr
line, starting with `error:`, and no traceback.
"""

import json
import os
import pickle
import shutil
import sys

import jax
import numpy as np
import PIL.Image
import pytest

from vit_jax import checkpoint
from vit_jax import config_utils
from vit_jax import fewshot
from vit_jax import main
from vit_jax import models
from vit_jax import npz
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
  inits = {}  # .npz checkpoints whose structure differs from TINY's model.
  for name, fields in (("wide", dict(hidden_size=32, mlp_dim=64)),
                       ("heads", dict(num_heads=2, patch_size=2)),
                       ("bigger", dict(image_size=16))):
    inits[name] = str(d / f"{name}.npz")
    npz.save_npz(inits[name], _tiny_params(**fields))
  sweep = d / "sweep.py"
  sweep.write_text("def get_sweep():\n  return dict(settings=[dict(name='a', "
                   "config='configs/digits.py')], seeds=(0, 1))\n")
  return {"notes": str(notes), "sweep": str(sweep), "dir": str(d / "not_a_workdir"),
          "truncated": truncated, "truncated_file": str(jpeg),
          "not_image": not_image,
          "not_image_file": str(d / "not_image" / "train" / "b" / "x.jpg"),
          "workdir": str(d / "w"), **inits}


def _tiny_params(**fields):
  """Random parameters shaped as TINY's model with some fields changed."""
  fields = {**dict(hidden_size=16, mlp_dim=32, num_heads=4, patch_size=4,
                   num_layers=1, image_size=8, num_channels=1,
                   num_classes=10), **fields}
  model = models.create("testing", **fields)
  size = fields["image_size"]
  images = jax.ShapeDtypeStruct((1, size, size, fields["num_channels"]),
                                np.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      shapes["params"])


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


def test_main_init_of_another_structure(files, capfd):
  """--config.init= an .npz of another model names the fields that differ;
  the resample hint is for position counts alone."""
  for name, message in (
      ("wide", "has width 32, the model 16 (--config.model.hidden_size); MLP "
               "width 64, the model 32 (--config.model.mlp_dim): set the model "
               "fields to the checkpoint's (or its variant with "
               "--config.model_name)"),
      ("heads", "has heads 2, the model 4 (--config.model.num_heads); patch "
                "size 2, the model 4 (--config.model.patch_size):"),
      ("bigger", "checkpoint has 17 positions, model expects 5: pass "
                 "--config.resample_posemb")):
    rc = main.run(["main", *TINY, f"--config.init={files[name]}",
                   f"--workdir={files['workdir']}_{name}"])
    line = one_error_line(rc, capfd)
    assert message in line, line
    if name != "bigger":
      assert f"init checkpoint {files[name]} " in line
      assert "positions" not in line


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


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A directory holding `run`, a workdir of TINY's model (one checkpoint)."""
  root = tmp_path_factory.mktemp("relative")
  run = str(root / "run")
  os.makedirs(run)
  config = config_utils.default_config()
  config.model_name = "testing"
  fields = dict(hidden_size=16, mlp_dim=32, num_heads=4, patch_size=4,
                num_layers=1, image_size=[8, 8], num_channels=1,
                num_classes=10)
  config_utils.save_config(config, run, extra={"resolved": dict(
      num_classes=10, image_size=[8, 8], num_channels=1,
      model_kwargs=fields)})
  manager = checkpoint.Manager(run, max_to_keep=1)
  manager.save(4, {"params": _tiny_params(), "step": np.int32(4)}, {"step": 4})
  manager.close()
  return root


def test_relative_paths(saved_run, monkeypatch, capfd):
  """Paths relative to the current directory work in every command line."""
  monkeypatch.chdir(saved_run)
  params, _ = checkpoint.latest_params(str(saved_run / "run"))
  relative, _ = checkpoint.latest_params("run")  # The library alone.
  jax.tree.map(np.testing.assert_array_equal, relative, params)

  assert convert.main(["--from=run", "--to=npz", "--out=run.npz"]) == 0
  written = npz.flatten(npz.load_npz(str(saved_run / "run.npz")))
  expected = npz.flatten(params)
  assert set(written) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(written[key], value, err_msg=key)

  assert fewshot.run([
      "fewshot", "--workdir=run", "--output_dir=fewshot",
      f"--config={ROOT}/configs/fewshot.py:digits,pre_logits,runlocal",
      "--config.shots=(1,)", "--config.seeds=(0,)"]) == 0
  # Written elsewhere than the workdir: named after it too.
  written, = (saved_run / "fewshot").glob("fewshot_pre_logits_run_*.json")
  with open(written) as f:
    assert set(json.load(f)["results"]["digits"]) == {"1"}

  from vit_jax import analyze  # pylint: disable=g-import-not-at-top
  assert analyze.run(["analyze", "--workdir=run", "--what=posemb",
                      "--output_dir=analysis"]) == 0
  assert (saved_run / "analysis" / "posemb_similarity.png").is_file()

  # Fine-tuning from a relative workdir into a relative workdir; config.json
  # records both absolute, for commands started elsewhere.
  config = [a.replace("=configs/", f"={ROOT}/configs/") for a in TINY]
  assert main.run(["main", *config, "--config.init=run",
                   "--workdir=tuned"]) == 0
  with open(saved_run / "tuned" / "config.json") as f:
    assert json.load(f)["init"] == str(saved_run / "run")
  assert checkpoint.latest_params(str(saved_run / "tuned"))[1].init == str(
      saved_run / "run")
  out, err = capfd.readouterr()
  assert "error:" not in out + err and "Traceback" not in out + err


class _Payload:
  """Unpickling this would create a directory: it must never happen."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Hugging Face directories written by transformers (tiny, random weights):
  DeiT, BEiT, and ViT ones with a damaged or pickled weights file."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  d = tmp_path_factory.mktemp("hf")
  size = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=32, image_size=8, patch_size=4,
              num_channels=1, num_labels=3)
  torch.manual_seed(0)
  for name, model in (
      ("deit", transformers.DeiTForImageClassificationWithTeacher(
          transformers.DeiTConfig(**size))),
      ("beit", transformers.BeitForImageClassification(
          transformers.BeitConfig(**size))),
      ("vit", transformers.ViTForImageClassification(
          transformers.ViTConfig(**size)))):
    model.save_pretrained(str(d / name))
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  out = {name: str(d / name) for name in ("deit", "beit", "vit")}
  for name in ("truncated", "payload", "numpy_pickle", "broken_zip"):
    os.makedirs(d / name)
    shutil.copy(d / "vit" / "config.json", d / name / "config.json")
    out[name] = str(d / name)
  data = (d / "vit" / "model.safetensors").read_bytes()
  (d / "truncated" / "model.safetensors").write_bytes(data[:len(data) // 2])
  out["marker"] = str(d / "unpickled")
  torch.save({"vit.embeddings.cls_token": _Payload(out["marker"])},
             str(d / "payload" / "pytorch_model.bin"))
  with open(d / "numpy_pickle" / "pytorch_model.bin", "wb") as f:
    pickle.dump({k: v.numpy() for k, v in state.items()}, f)
  torch.save(state, str(d / "broken_zip" / "pytorch_model.bin"))
  data = (d / "broken_zip" / "pytorch_model.bin").read_bytes()
  (d / "broken_zip" / "pytorch_model.bin").write_bytes(data[:len(data) // 2])
  return out


@pytest.mark.parametrize("name,message", [
    ("deit", "{deit} is a Hugging Face 'deit' model "
             "(DeiTForImageClassificationWithTeacher); convert reads 'vit' "
             "(ViTForImageClassification, ViTModel, ViTForMaskedImageModeling) "
             "directories"),
    ("beit", "{beit} is a Hugging Face 'beit' model "
             "(BeitForImageClassification); convert reads 'vit'"),
    ("truncated", "model.safetensors in {truncated} is damaged "
                  "(SafetensorError: Error while deserializing header"),
    ("payload", "{payload} holds pytorch_model.bin, a pickle that is not a "
                "weights-only PyTorch file (it refers to os.makedirs) and is "
                "never unpickled here"),
    ("numpy_pickle", "{numpy_pickle} holds pytorch_model.bin, a pickle that "
                     "is not a weights-only PyTorch file (pickle opcode"),
    ("broken_zip", "pytorch_model.bin in {broken_zip} is damaged ("),
])
def test_convert_hf_directory(name, message, hf_dirs, tmp_path, capfd):
  """Other HF model types, damaged and pickled weights: one line each."""
  capfd.readouterr()  # What building the directories printed.
  rc = convert.main([f"--from={hf_dirs[name]}", "--to=npz",
                     f"--out={tmp_path / 'o.npz'}"])
  line = one_error_line(rc, capfd)
  assert message.format(**hf_dirs) in line, line
  if name in ("payload", "numpy_pickle", "broken_zip"):
    assert "model.save_pretrained(DIR, safe_serialization=True)" in line
  assert not os.path.exists(hf_dirs["marker"])
  assert not (tmp_path / "o.npz").exists()


def test_convert_without_the_torch_extra(saved_run, monkeypatch, capfd):
  """Without PyTorch installed (an import of it fails, as in an install
  without the `torch` extra), --verify is one line naming the extra."""
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises.
  rc = convert.main([f"--from={saved_run}/run", "--to=hf",
                     f"--out={saved_run}/hf_without_torch", "--verify"])
  line = one_error_line(rc, capfd)
  assert line.startswith("error: torch is not installed") and "[torch]" in line
