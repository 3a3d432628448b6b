"""SimMIM pre-training through the one training loop.

- the loss the loop logs at step 1 equals Hugging Face's
  `ViTForMaskedImageModeling` loss on the same batch, weights and masks;
- masks depend only on (seed, step, position in the global batch): the same
  under jit on 1 and on 8 devices;
- the reconstruction evaluator's masked L1 equals the HF formula and writes
  its PNG.
"""

import os

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from vit_jax import config_utils
from vit_jax import data
from vit_jax import losses
from vit_jax import metrics
from vit_jax import models
from vit_jax import sharding
from vit_jax import train
from vit_jax.convert import hf
from vit_jax.evaluators import reconstruction
from vit_jax.tasks import simmim

from test_sharding import load_config  # pylint: disable=g-bad-import-order


def tiny_mim_config(**overrides):
  """A few steps of a tiny SimMIM model on digits; masks of 2x2 patches."""
  c = load_config("simmim", "digits,runlocal")
  c.total_steps = 2
  c.optim.warmup_steps = 1
  c.log_steps = 1
  c.checkpoint_steps = 0
  c.progress = False
  c.batch_size = 16
  c.eval_batch_size = 120
  c.image_size = (16, 16)
  c.simmim.mask_unit = 8
  c.evals.reconstruction.mask_unit = 8
  c.evals.fewshot.every = -1
  c.model.update(dict(hidden_size=16, mlp_dim=32, num_heads=4, num_layers=1,
                      patch_size=4))
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir) of a 2-step SimMIM run."""
  workdir = str(tmp_path_factory.mktemp("mim"))
  config = tiny_mim_config()
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _initial_params_and_model(config, workdir):
  resolved = config_utils.load_config(workdir).resolved
  model = models.create(config.model_name, **resolved.model_kwargs.to_dict())
  params = model.init({"params": jax.random.PRNGKey(config.seed)},
                      np.zeros((1, 16, 16, 1), np.float32),
                      train=False)["params"]
  return model, jax.device_get(params)


def test_logged_loss_equals_hugging_face(run, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config, workdir = run
  model, params = _initial_params_and_model(config, workdir)
  assert model.decoder and model.num_classes == 0
  # The loop's first batch and masks, rebuilt from the seed.
  source = data.get_source(config.dataset, config.train_split)
  batch = next(iter(train._train_loader(config, source, (16, 16))))  # pylint: disable=protected-access
  step_rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0)
  mask = np.array(simmim.masks(model, step_rng, np.arange(16), (16, 16),
                                 0.6, 8))
  assert mask.shape == (16, 16) and np.all(mask.sum(1) == 8)  # 2 of 4 cells.

  cfg = {f: getattr(model, f) for f in models.FIELDS}
  arch, _ = hf.export(params, cfg, str(tmp_path / "hf"))
  assert arch == "ViTForMaskedImageModeling"
  theirs = transformers.ViTForMaskedImageModeling.from_pretrained(
      str(tmp_path / "hf")).eval()
  with torch.no_grad():
    res = theirs(torch.from_numpy(batch["image"].transpose(0, 3, 1, 2)),
                 bool_masked_pos=torch.from_numpy(mask))
  logged = [r["train/loss"] for r in metrics.read_jsonl(workdir)
            if r.get("step") == 1 and "train/loss" in r]
  assert len(logged) == 1
  np.testing.assert_allclose(logged[0], float(res.loss), rtol=2e-5)
  # And the library's masked L1 on HF's own reconstruction.
  recon = res.reconstruction.numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(
      float(losses.masked_l1(batch["image"], recon, mask, 4)),
      float(res.loss), rtol=1e-5)


def test_masks_same_on_1_and_8_devices():
  model = models.create("testing", patch_size=4, image_size=32, decoder=True,
                        num_classes=0, num_channels=1)
  step_rng = jax.random.fold_in(jax.random.PRNGKey(7), 123)
  indices = np.arange(64, dtype=np.int32)

  def fn(idx):
    return simmim.masks(model, step_rng, idx, (32, 32), 0.6, 8)

  mesh = sharding.make_mesh((("data", -1), ("model", 1)))
  assert mesh.shape["data"] == 8
  sharded = jax.jit(fn, in_shardings=NamedSharding(mesh, P("data")),
                    out_shardings=NamedSharding(mesh, P("data")))(indices)
  single = jax.jit(fn)(jax.device_put(indices, jax.devices()[0]))
  assert len(single.devices()) == 1 and len(sharded.devices()) == 8
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
  again = np.asarray(fn(indices))
  np.testing.assert_array_equal(again, np.asarray(single))
  masks = np.asarray(single)
  # 8x8 patches, cells of 2x2 patches: round(0.6 * 16) = 10 cells masked.
  assert np.all(masks.sum(1) == 10 * 4)
  assert len({m.tobytes() for m in masks}) > 32  # Differ per example.
  other_step = simmim.masks(model, jax.random.fold_in(
      jax.random.PRNGKey(7), 124), indices, (32, 32), 0.6, 8)
  assert not np.array_equal(np.asarray(other_step), masks)


def test_reconstruction_evaluator(run):
  config, workdir = run
  rows = [r for r in metrics.read_jsonl(workdir)
          if "reconstruction/masked_l1" in r]
  assert rows and rows[-1]["reconstruction/num_examples"] == 360
  assert rows[-1]["reconstruction/baseline_l1"] > 0
  assert os.path.exists(os.path.join(workdir, "reconstructions_2.png"))
  # The evaluator's number is the HF formula over the whole split.
  model, params = _initial_params_and_model(config, workdir)
  mesh = sharding.make_mesh((("data", -1), ("model", 1)))

  def predict(p, x, **kw):
    return model.apply({"params": p}, x, train=False, **kw)

  ev = reconstruction.Evaluator(
      predict, mesh, dataset="digits", split="test", batch_size=120,
      image_size=(16, 16), mask_ratio=0.6, mask_unit=8)
  got = ev.run(params)

  def split_images(split):
    return np.concatenate([b["image"][b["mask"]] for b in data.eval_batches(
        data.get_source("digits", split), 120, (16, 16))]).astype(np.float64)

  images = split_images("test")
  assert len(images) == 360
  mask, _ = ev.masks(params, np.arange(len(images), dtype=np.int32))
  recon, _ = predict(params, images.astype(np.float32), bool_masked_pos=mask)
  # HF's masked L1 in numpy: patch mask [N, 16] -> pixel mask [N, 16, 16, 1].
  pixels = np.repeat(np.repeat(np.asarray(mask).reshape(-1, 4, 4), 4, 1), 4,
                     2)[..., None]
  assert pixels.sum() == 8 * 16 * len(images)  # 2 of 4 cells of 8x8 px.

  def masked_l1(prediction):
    return (np.abs(images - prediction) * pixels).sum() / pixels.sum()

  np.testing.assert_allclose(
      got["masked_l1"], masked_l1(np.asarray(recon, np.float64)), rtol=1e-4)
  # The baseline predicts the mean image of the 1437 training images.
  train_images = split_images("train")
  assert len(train_images) == 1437
  mean_image = train_images.mean(0)
  np.testing.assert_allclose(got["baseline_l1"], masked_l1(mean_image),
                             rtol=1e-4)
  np.testing.assert_allclose(got["ratio_to_baseline"],
                             got["masked_l1"] / got["baseline_l1"], rtol=1e-6)


def test_convert_mim_workdir_to_hf(run, tmp_path, capsys):
  transformers = pytest.importorskip("transformers")
  from vit_jax.convert import cli  # pylint: disable=g-import-not-at-top
  _, workdir = run
  out = tmp_path / "hf"
  assert cli.main([f"--from={workdir}", "--to=hf", f"--out={out}",
                   "--verify"]) == 0
  printed = capsys.readouterr().out
  assert "verify: OK" in printed
  assert "reconstruction" in printed and "loss" in printed
  theirs = transformers.ViTForMaskedImageModeling.from_pretrained(str(out))
  assert theirs.config.architectures == ["ViTForMaskedImageModeling"]
