"""Exports loaded the way PyTorch users load models, against the project's own predictions.

A training workdir (a real orbax checkpoint of a tiny model with random, not
zero-initialised, weights and the config.json a run writes, class names included)
is converted by the command line; then

  * `transformers.pipeline("image-classification", model=DIR)` classifies image
    files, and
  * `timm.create_model("local-dir:DIR", pretrained=True)` with the transform of
    `timm.data.resolve_data_config({}, model=model)` classifies them too,

and both must give the labels and probabilities (max |Δ| <= 1e-4, fp32) that the
project's evaluation gives the same files: the image folder source, `eval_batches`
(central crop, bilinear resize, [-1, 1]) and the workdir's model in JAX. The
images are 16x16, 8x8 and 12x12 for a 16x16 model: the resize is the identity or an
upsampling, where transformers' default (torchvision) resize, PIL's and ours give
the same pixels; a downsampled image may differ there by one level of 255 in a few
pixels (PIL's, `backend="pil"`, stays exact), which is checked on the pixels.
A 1-channel model (the bundled digits model is one) gets a 1-channel processor;
the pipeline turns PIL images and paths into RGB, so it is given (H, W, 1) arrays.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest

from tests.folder_fixture import make_image_folder
from tests.test_convert import BASE, make_params, _assert_params_equal  # pylint: disable=g-bad-import-order
from vit_jax import checkpoint
from vit_jax import config_utils
from vit_jax import data
from vit_jax import npz
from vit_jax import sizes
from vit_jax.convert import cli
from vit_jax.convert import core
from vit_jax.convert import hf
from vit_jax.convert import parity
from vit_jax.convert import timm as timm_conv

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

CLASSES = ("ant", "bee", "cat", "dog", "eel")
SIZES = ((16, 16), (8, 8), (12, 12))  # Identity and upsamplings of a 16x16 model.
TOL = 1e-4  # Probabilities and logits, fp32, across JAX and PyTorch.
PIXEL_TOL = 1e-6  # (x / 255 - 0.5) / 0.5 vs (x - 127.5) / 127.5 in float32.


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb", "gray"])
def run(request, tmp_path_factory):
  """A workdir as training leaves it, and test images of the model's classes.

  The weights are random but for the head, a ridge regression (L2 0.01) of the
  test images' labels (4 for the class, 0 for the others) on their
  representations: like a trained model, and unlike a random one, it answers
  several classes, with moderate weights (|w| <= ~10) and margins (>= ~0.07).
  """
  channels = request.param
  root = tmp_path_factory.mktemp(f"loading{channels}")
  folder = make_image_folder(str(root / "images"), classes=CLASSES,
                             splits={"test": 3}, sizes=SIZES,
                             mode="RGB" if channels == 3 else "L")
  cfg = core.full_config(dict(BASE, num_channels=channels))
  flat = npz.flatten(make_params(cfg, seed=channels))
  src = data.get_source(f"folder:{folder}", "test")
  batch = next(data.eval_batches(src, len(src), (16, 16)))
  _, out = parity.ours(npz.unflatten(flat), cfg, batch["image"])
  features = np.concatenate(
      [out["pre_logits"], np.ones((len(src), 1), np.float32)], axis=1)
  features = features.astype(np.float64)
  targets = 4 * np.eye(len(CLASSES))[batch["label"]]
  head = np.linalg.solve(features.T @ features + 0.01 * np.eye(features.shape[1]),
                         features.T @ targets).astype(np.float32)
  flat["head/kernel"], flat["head/bias"] = head[:-1], head[-1]
  params = npz.unflatten(flat)

  workdir = str(root / "work")
  config = config_utils.default_config()
  config.model_name = "testing"
  config.image_size = (16, 16)
  config.model = ml_collections.ConfigDict(
      {k: cfg[k] for k in ("hidden_size", "num_layers", "num_heads", "mlp_dim",
                           "patch_size")})
  mngr = checkpoint.Manager(workdir)
  mngr.save(3, {"params": params, "step": np.int32(3)}, {"pos": 0})
  mngr.close()
  model_kwargs = {k: cfg[k] for k in ("hidden_size", "num_layers", "num_heads",
                                      "mlp_dim", "patch_size", "classifier",
                                      "num_classes", "num_channels")}
  # What train.py keeps of the run (no config.labels: the class names come from here).
  config_utils.save_config(config, workdir, extra={"resolved": dict(
      total_steps=3, num_classes=5, image_size=[16, 16], num_channels=channels,
      model_kwargs=dict(model_kwargs, image_size=[16, 16]),
      class_names=list(CLASSES))})
  run = dict(workdir=workdir, folder=folder, channels=channels, root=root)
  run["paths"], run["probs"], run["logits"], run["images"] = _ours(run)
  return run


def _ours(run):
  """The project's evaluation of the test images: (paths, probabilities, logits)."""
  src = data.get_source(f"folder:{run['folder']}", "test")
  batch = next(data.eval_batches(src, len(src), (16, 16)))
  params, model, _ = checkpoint.model_from_workdir(run["workdir"])
  logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
      params, batch["image"])
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  paths = list(src.files)
  assert [list(CLASSES)[l] for l in batch["label"]] == [
      os.path.basename(os.path.dirname(p)) for p in paths]
  return paths, probs, logits, batch["image"]


def _convert(argv, capfd):
  assert cli.main(argv) == 0
  return capfd.readouterr().out


def test_hf_pipeline_gives_our_predictions(run, capfd):
  out_dir = str(run["root"] / "hf")
  out = _convert([f"--from={run['workdir']}", "--to=hf", f"--out={out_dir}"], capfd)
  assert f"transformers.pipeline('image-classification', model='{out_dir}')" in out
  assert ("pipeline converts PIL images and paths to RGB" in out) == (run["channels"] == 1)
  with open(os.path.join(out_dir, "preprocessor_config.json")) as f:
    pre = json.load(f)
  c = run["channels"]
  assert pre["size"] == {"height": 16, "width": 16} and pre["resample"] == 2
  assert pre["image_mean"] == pre["image_std"] == [0.5] * c

  paths, probs, images = run["paths"], run["probs"], run["images"]
  pipe = transformers.pipeline("image-classification", model=out_dir)
  assert pipe.model.config.id2label == dict(enumerate(CLASSES))
  # PIL images and paths become RGB in the pipeline: a 1-channel model takes arrays.
  inputs = paths if c == 3 else [
      np.array(PIL.Image.open(p).convert("L"))[..., None] for p in paths]
  pixels = pipe.image_processor(images=[PIL.Image.open(p) for p in paths],
                                return_tensors="np")["pixel_values"]
  np.testing.assert_allclose(pixels.transpose(0, 2, 3, 1), images, atol=PIXEL_TOL)
  results = pipe(inputs, top_k=len(CLASSES))
  assert len(results) == len(paths) == 15
  for i, result in enumerate(results):
    theirs = {r["label"]: r["score"] for r in result}
    assert result[0]["label"] == CLASSES[int(np.argmax(probs[i]))], paths[i]
    np.testing.assert_allclose([theirs[n] for n in CLASSES], probs[i], atol=TOL)
  # The comparison means something: the model does not answer one class for all.
  assert len({r[0]["label"] for r in results}) > 1


@pytest.mark.parametrize("channels", [3, 1])
def test_hf_processor_downsampling(tmp_path, channels):
  """Images larger than the model: PIL's resize (backend="pil") is ours; the
  default torchvision resize may differ by one level of 255 in a few pixels."""
  cfg = core.full_config(dict(BASE, num_channels=channels))
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "preprocessor_config.json").write_text(
      json.dumps(hf.preprocessor_config(cfg)))
  folder = make_image_folder(str(tmp_path / "big"), classes=CLASSES,
                             splits={"test": 1}, sizes=((40, 40), (17, 17)),
                             mode="RGB" if channels == 3 else "L")
  src = data.get_source(f"folder:{folder}", "test")
  ours = next(data.eval_batches(src, len(src), (16, 16)))["image"]
  pils = [PIL.Image.open(f) for f in src.files]
  for backend, tol in (("pil", PIXEL_TOL), ("torchvision", 1 / 127.5 + PIXEL_TOL)):
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf",
                                                           backend=backend)
    pixels = proc(images=pils, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pixels.transpose(0, 2, 3, 1), ours, atol=tol,
                               err_msg=backend)


def test_timm_local_dir_gives_our_predictions(run, capfd):
  out_dir = str(run["root"] / "timm")
  out = _convert([f"--from={run['workdir']}", "--to=timm", f"--out={out_dir}",
                  "--verify"], capfd)
  assert f"timm.create_model('local-dir:{out_dir}', pretrained=True)" in out
  assert "verify: OK" in out
  assert sorted(os.listdir(out_dir)) == ["config.json", "model.safetensors"]

  paths, probs, logits, images = (run[k] for k in ("paths", "probs", "logits",
                                                   "images"))
  model = timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()
  assert model.pretrained_cfg["label_names"] == list(CLASSES)
  config = timm.data.resolve_data_config({}, model=model)
  c = run["channels"]
  assert config["input_size"] == (c, 16, 16) and config["crop_pct"] == 1.0
  transform = timm.data.create_transform(**config)
  x = torch.stack([transform(PIL.Image.open(p)) for p in paths])
  np.testing.assert_allclose(x.numpy().transpose(0, 2, 3, 1), images, atol=PIXEL_TOL)
  with torch.no_grad():
    theirs = model(x).double()
  np.testing.assert_allclose(theirs.numpy(), logits, atol=TOL)
  np.testing.assert_allclose(theirs.softmax(-1).numpy(), probs, atol=TOL)
  np.testing.assert_array_equal(theirs.argmax(-1).numpy(), probs.argmax(-1))
  assert len(set(probs.argmax(-1).tolist())) > 1

  # Back: the directory converts to the workdir's parameters, labels and all.
  back = str(run["root"] / "back.npz")
  out = _convert([f"--from={out_dir}", "--to=npz", f"--out={back}", "--verify"], capfd)
  assert f"labels: {list(CLASSES)}" in out
  params, _, _ = checkpoint.model_from_workdir(run["workdir"])
  _assert_params_equal(params, npz.load_npz(back))


# Each a feature the directory must carry: MAP head, no q/k/v biases (built
# qkv_bias=False, not zero biases), non-square images and patches, no head.
DIR_CASES = {
    "map": dict(classifier="map", hidden_act="gelu"),
    "token_nobias_nonsquare": dict(qkv_bias=False, image_size=(16, 24)),
    "gap_gelu_nonsquare_patch": dict(classifier="gap", hidden_act="gelu",
                                     patch_size=(4, 8), image_size=(16, 24)),
    "no_head": dict(num_classes=0),
}


@pytest.mark.parametrize("name", list(DIR_CASES))
def test_timm_dir_export(tmp_path, name):
  cfg = core.full_config(dict(BASE, **DIR_CASES[name]))
  params = make_params(cfg)
  kw, config, _ = timm_conv.export_dir(params, cfg, tmp_path)
  assert config["model_args"] == kw and kw["qkv_bias"] == cfg["qkv_bias"]
  assert config["pretrained_cfg"]["input_size"] == [3, *sizes.pair(cfg["image_size"])]
  diffs = parity.verify_timm_dir(tmp_path, params, cfg)  # timm's local-dir loading
  assert diffs["params"] == 0.0 and max(diffs.values()) <= TOL, diffs
  flat, back_cfg, _, _, labels = timm_conv.read_dir(str(tmp_path))
  assert labels is None
  for key in cli.STRUCTURAL + ("classifier", "hidden_act"):
    assert back_cfg[key] == cfg[key], key
  _assert_params_equal(params, flat)


def test_timm_architecture_names():
  """Registered timm names: the variant's own where timm has it, else the nearest."""
  for name in timm_conv.ARCHITECTURES.values():
    assert timm.is_model(name), name
  cases = {("B/16", 224): "vit_base_patch16_224", ("L/16", 384): "vit_large_patch16_384",
           ("S/32", 256): "vit_small_patch32_224", ("H/14", 224): "vit_huge_patch14_224",
           ("Ti/16", 384): "vit_tiny_patch16_384", ("B/8", 224): "vit_base_patch8_224"}
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  for (variant, size), want in cases.items():
    cfg = core.full_config(dict(models.get_config(variant), image_size=size,
                                num_classes=10))
    assert timm_conv.architecture_name(cfg) == want, variant
  assert timm_conv.architecture_name(core.full_config(BASE)) == "vit_tiny_patch16_224"


def test_cli_never_writes_over_its_source_or_a_workdir(tmp_path, capfd):
  """--out must not be --from, nor a training workdir (its config.json), nor a file
  where a directory goes."""
  cfg = core.full_config(BASE)
  path = tmp_path / "m.npz"
  npz.save_npz(path, make_params(cfg))
  workdir = tmp_path / "work"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"model_name": "testing"}')
  (tmp_path / "notes.txt").write_text("notes")
  for to, out, message in (
      ("timm", workdir, "holds a config.json, not a model export's (a training "
       "workdir?), that --to=timm would replace: choose another --out"),
      ("hf", workdir, "that --to=hf would replace"),
      ("npz", path, "is --from, which it would replace: choose another --out"),
      ("timm", tmp_path / "m.safetensors", "--to=timm writes a directory "
       "(model.safetensors + config.json) or FILE.npz"),
      ("hf", tmp_path / "notes.txt", "is a file; --to=hf writes a directory")):
    assert cli.main([f"--from={path}", f"--to={to}", f"--out={out}"]) == 1
    err = capfd.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
  assert (workdir / "config.json").read_text() == '{"model_name": "testing"}'
  assert sorted(os.listdir(workdir)) == ["config.json"]
  assert sorted(os.listdir(tmp_path)) == ["m.npz", "notes.txt", "work"]
