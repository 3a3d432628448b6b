"""Checkpoints: fine-tuning init from .npz, restoring onto another mesh."""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import errors
from vit_jax import main
from vit_jax import models
from vit_jax import npz
from vit_jax import posemb
from vit_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
ARCH = dict(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=2,
            patch_size=4)


def _init(image_size, num_classes, **kw):
  model = models.create("testing", num_classes=num_classes,
                        image_size=image_size, **{**ARCH, **kw})
  x = jnp.zeros((1, image_size, image_size, 3))
  return jax.tree.map(np.asarray, model.init(
      {"params": jax.random.PRNGKey(1)}, x)["params"])


@pytest.fixture(scope="module")
def pretrained_npz(tmp_path_factory):
  """A 16x16, 10-class checkpoint in the published .npz layout."""
  params = _init(16, 10)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype),
                        params)
  path = str(tmp_path_factory.mktemp("npz") / "pretrained.npz")
  npz.save_npz(path, params)
  return path, params


def _cfg(path, **kw):
  c = ml_collections.ConfigDict(dict(init=path, init_head=True,
                                     resample_posemb=True, dont_load=()))
  c.update(kw)
  return c


def test_load_init_resamples_positions_and_zeros_head(pretrained_npz):
  path, pre = pretrained_npz
  target = _init(32, 3)
  out = checkpoint.load_init(target, _cfg(path), grid=(8, 8), log=print)
  flat, flat_pre = checkpoint.flatten(out), checkpoint.flatten(pre)
  key = "Transformer/posembed_input/pos_embedding"
  assert flat_pre[key].shape == (1, 17, 16) and flat[key].shape == (1, 65, 16)
  np.testing.assert_allclose(
      flat[key], posemb.resample(flat_pre[key], (4, 4), (8, 8), 1,
                                 method="zoom"), rtol=1e-6)
  np.testing.assert_array_equal(flat[key][:, :1], flat_pre[key][:, :1])
  # Another class count: the head is zeros.
  assert flat["head/kernel"].shape == (16, 3)
  assert not flat["head/kernel"].any() and not flat["head/bias"].any()
  for k in flat:
    if k != key and not k.startswith("head/"):
      np.testing.assert_array_equal(flat[k], flat_pre[k], err_msg=k)


def test_load_init_options(pretrained_npz):
  path, pre = pretrained_npz
  # Same class count: head loaded unless init_head=False.
  target = _init(16, 10)
  out = checkpoint.load_init(target, _cfg(path), grid=(4, 4), log=print)
  np.testing.assert_array_equal(out["head"]["kernel"], pre["head"]["kernel"])
  out = checkpoint.load_init(target, _cfg(path, init_head=False), (4, 4),
                             log=print)
  assert not out["head"]["kernel"].any()
  # "Don't load" regexes keep the random init.
  out = checkpoint.load_init(target, _cfg(path, dont_load=(r"^cls$",)),
                             (4, 4), log=print)
  np.testing.assert_array_equal(out["cls"], target["cls"])
  # Without resample_posemb the grid change is an error with the fix.
  with pytest.raises(errors.Error, match=r"checkpoint has 17 positions"
                     r", model expects 65: pass --config.resample_posemb"):
    checkpoint.load_init(_init(32, 3), _cfg(path, resample_posemb=False),
                         (8, 8), log=print)
  # Another width: the fields that differ are named.
  with pytest.raises(errors.Error, match=r"has width 16, the model 32 \(--config"
                     r"\.model\.hidden_size\); MLP width 32, the model 64"):
    checkpoint.load_init(_init(16, 10, hidden_size=32, mlp_dim=64), _cfg(path),
                         (4, 4), log=print)
  # A scanned model loads per-block checkpoints (stacked on the fly).
  scanned = _init(16, 10, scan=True)
  out = checkpoint.load_init(scanned, _cfg(path), (4, 4), log=print)
  stacked = out["Transformer"]["encoderblock"]["MlpBlock_3"]["Dense_0"]
  np.testing.assert_array_equal(
      stacked["kernel"][1], pre["Transformer"]["encoderblock_1"]["MlpBlock_3"]
      ["Dense_0"]["kernel"])


@pytest.mark.parametrize("scan", [False, True])
def test_load_init_resamples_relative_tables(tmp_path, scan):
  """posemb="relative": each block's table resized bilinearly to the grid."""
  pre = _init(16, 10, posemb="relative")
  rng = np.random.default_rng(0)
  pre = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), pre)
  path = str(tmp_path / "relative.npz")
  npz.save_npz(path, pre)
  target = _init(32, 10, posemb="relative", scan=scan)
  out = checkpoint.flatten(checkpoint.load_init(target, _cfg(path), (8, 8),
                                                log=print))
  flat_pre = checkpoint.flatten(pre)
  for i in range(2):
    key = f"Transformer/encoderblock_{i}/{npz.RELATIVE_BIAS}"
    assert flat_pre[key].shape == (7 * 7 + 3, 2)
    expected = posemb.resample_relative(flat_pre[key], (4, 4), (8, 8), 1)
    got = (out[f"Transformer/encoderblock/{npz.RELATIVE_BIAS}"][i] if scan
           else out[key])
    assert got.shape == (15 * 15 + 3, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_array_equal(got[-3:], flat_pre[key][-3:])
  with pytest.raises(errors.Error, match=r"relative_position_bias in .* has 52 "
                     r"relative positions, model expects 228: pass "
                     r"--config.resample_posemb"):
    checkpoint.load_init(target, _cfg(path, resample_posemb=False), (8, 8),
                         log=print)


def test_load_init_from_simmim_checkpoint(tmp_path):
  """SimMIM -> classification: decoder and mask token dropped, encoder kept."""
  mim = _init(16, 0, decoder=True)
  rng = np.random.default_rng(0)
  mim = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(p.dtype), mim)
  flat_mim = checkpoint.flatten(mim)
  assert {"mask_token", "decoder/kernel", "decoder/bias"} <= set(flat_mim)
  assert flat_mim["decoder/kernel"].shape == (1, 1, 16, 4 * 4 * 3)
  assert not any(k.startswith("head/") for k in flat_mim)
  path = str(tmp_path / "simmim.npz")
  npz.save_npz(path, mim)

  target = _init(16, 10)
  logs, report = [], {}
  out = checkpoint.load_init(target, _cfg(path), (4, 4), log=logs.append,
                             report=report)
  assert set(report["mim_dropped"]) == {"decoder/kernel", "decoder/bias",
                                        "mask_token"}
  assert report["ignored"] == [] and report["kept"] == []
  assert ("init: dropped the masked-image-modeling decoder and mask token "
          "(decoder/bias, decoder/kernel, mask_token)") in logs
  assert not any("ignored" in line for line in logs), logs
  flat = checkpoint.flatten(out)
  assert set(flat) == set(checkpoint.flatten(target))
  encoder = [k for k in flat if not k.startswith("head/")]
  assert len(encoder) == len(flat_mim) - 3
  for k in encoder:  # embedding, cls, posembed, every block, encoder_norm
    assert flat[k].dtype == flat_mim[k].dtype, k
    np.testing.assert_array_equal(flat[k], flat_mim[k], err_msg=k)
  assert flat["head/kernel"].shape == (16, 10)
  assert not flat["head/kernel"].any() and not flat["head/bias"].any()


def test_split_unused():
  target = ["cls", "embedding/kernel", "head/kernel"]
  assert checkpoint.split_unused(
      ["cls", "embedding/kernel", "mask_token", "decoder/kernel",
       "decoder/bias", "pre_logits/kernel"], target) == (
           ["decoder/bias", "decoder/kernel", "mask_token"],
           ["pre_logits/kernel"])
  # A model that has them (another MIM run) does not drop them.
  assert checkpoint.split_unused(
      ["mask_token", "decoder/kernel"], target + ["mask_token",
                                                  "decoder/kernel"]) == ([], [])
  assert checkpoint.split_unused(
      ["mask_token", "decoder/extra"], target + ["decoder/kernel"]) == (
          ["mask_token"], ["decoder/extra"])


def test_finetune_from_npz_through_main(pretrained_npz, tmp_path, capfd,
                                       monkeypatch):
  import folder_fixture  # pylint: disable=g-import-not-at-top
  path, pre = pretrained_npz
  root = folder_fixture.make_image_folder(
      str(tmp_path / "images"), classes=("a", "b", "c"),
      splits={"train": 8, "test": 2}, image_size=(32, 32))
  workdir = str(tmp_path / "w")
  monkeypatch.chdir(ROOT)
  rc = main.run([
      "vit_jax.main", "--config=configs/vit.py:testing,cifar10,runlocal",
      f"--config.dataset=folder:{root}", "--config.train_split=train",
      "--config.eval_split=test", "--config.image_size=(32, 32)",
      "--config.model.hidden_size=16", "--config.model.mlp_dim=32",
      "--config.model.num_heads=2", "--config.model.num_layers=2",
      "--config.model.patch_size=4", "--config.total_steps=2",
      "--config.batch_size=8", "--config.eval_batch_size=8",
      "--config.progress=False", f"--config.init={path}",
      "--config.optim.frozen=^(?!head/)", f"--workdir={workdir}"])
  out = capfd.readouterr()
  assert rc == 0, out
  params, config = checkpoint.latest_params(workdir)
  assert config.init == path
  assert params["head"]["kernel"].shape == (16, 3)
  # Everything but the head is frozen, so the trained parameters are those
  # training started from: the .npz's, bitwise (the position table resampled
  # to the 8x8 grid, its cls row kept), not a random initialisation.
  flat, flat_pre = checkpoint.flatten(params), checkpoint.flatten(pre)
  key = "Transformer/posembed_input/pos_embedding"
  assert flat[key].shape == (1, 65, 16)
  np.testing.assert_array_equal(flat[key][:, 0], flat_pre[key][:, 0])
  assert set(flat) == set(flat_pre)
  for name in sorted(set(flat) - {key, "head/kernel", "head/bias"}):
    np.testing.assert_array_equal(flat[name], flat_pre[name], err_msg=name)
  # The head (3 classes, not the checkpoint's 10) started from zeros and
  # trained.
  assert np.any(flat["head/kernel"] != 0)


def test_restore_onto_another_mesh(tmp_path):
  devices = jax.devices()
  params = {"a": np.arange(64 * 8, dtype=np.float32).reshape(64, 8),
            "b": np.arange(8, dtype=np.float32)}
  mesh8 = sharding.make_mesh((("data", 8), ("model", 1)))
  shard8 = sharding.tree_shardings(params, mesh8, fsdp_min_size=8)
  state = {"params": jax.tree.map(
      lambda x, s: jax.device_put(x, s), params, shard8)}
  assert state["params"]["a"].sharding.spec == jax.sharding.PartitionSpec(
      "data", None)
  mngr = checkpoint.Manager(str(tmp_path), max_to_keep=2, log=print)
  mngr.save(3, state, {"step": 3, "data": "x"})
  mngr.wait()
  for mesh_spec, devs in (((("data", 2), ("model", 4)), devices),
                          ((("data", 1), ("model", 1)), devices[:1])):
    mesh = sharding.make_mesh(mesh_spec, devs)
    shardings = {"params": sharding.tree_shardings(
        params, mesh, rules=((r"^a$", (None, "model")),))}
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        {"params": params}, shardings)
    step, restored, data_state = checkpoint.Manager(
        str(tmp_path), log=print).restore_latest(abstract)
    assert step == 3 and data_state == {"step": 3, "data": "x"}
    assert restored["params"]["a"].sharding == shardings["params"]["a"]
    for k in params:
      np.testing.assert_array_equal(np.asarray(restored["params"][k]),
                                    params[k])
  mngr.close()


def _checksum_by_hand(x):
  """The checkpoint checksum in numpy: bit patterns as uint32, times the
  odd weights 2 i + 0x9E3779B1 of their flat positions, summed mod 2^32."""
  x = np.asarray(x)
  words = x.view(f"uint{8 * x.itemsize}").astype(np.uint64).ravel()
  weights = (2 * np.arange(words.size, dtype=np.uint64) + 0x9E3779B1)
  return int(np.sum((words * weights) % 2**32) % 2**32)


def test_checksums_do_not_depend_on_the_mesh_and_see_one_bit(tmp_path):
  rng = np.random.default_rng(0)
  tree = {"w": rng.normal(size=(64, 8)).astype(np.float32),
          "b": rng.normal(size=(8,)).astype(jnp.bfloat16),
          "step": np.int32(7), "rng": np.array([3, 4], np.uint32)}
  expected = {k: _checksum_by_hand(v) for k, v in tree.items()}
  mesh8 = sharding.make_mesh((("data", 8), ("model", 1)))
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, s), tree,
                         sharding.tree_shardings(tree, mesh8, fsdp_min_size=8))
  assert sharded["w"].sharding.spec == jax.sharding.PartitionSpec("data", None)
  one = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), tree)
  assert checkpoint.checksums(sharded) == checkpoint.checksums(one) == expected
  # Any single flipped bit of any array changes that array's checksum.
  for key in ("w", "b"):
    for position, bit in ((0, 0), (37 % tree[key].size, 13)):
      flipped = dict(tree)
      words = np.array(tree[key]).view(f"uint{8 * tree[key].itemsize}")
      words.ravel()[position] ^= 1 << bit
      flipped[key] = words.view(tree[key].dtype)
      sums = checkpoint.checksums(flipped)
      assert sums[key] != expected[key]
      assert {k: v for k, v in sums.items() if k != key} == {
          k: v for k, v in expected.items() if k != key}
