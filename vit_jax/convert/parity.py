"""Numerical parity of a conversion: our model and the PyTorch one on the same batch.

Random images in [-1, 1] (NHWC for ours, NCHW for theirs), fp32, eval mode. Each check
returns {quantity: max |ours - theirs|} and raises `ParityError` above the tolerance.
Parameters are checked too: what the PyTorch model holds after loading, mapped back to
our layout, must equal what was exported (timm: every tensor is first filled with NaN,
so one its loader skipped shows up).
"""

import functools

import jax
import numpy as np

from vit_jax import losses
from vit_jax import npz
from vit_jax import sizes
from vit_jax.convert import core
from vit_jax.convert import hf as hf_lib
from vit_jax.convert import timm as timm_lib

TOL = 1e-4


class ParityError(AssertionError):
  """Outputs (or parameters) of the export differ from ours beyond the tolerance."""


def inputs(cfg, batch=2, seed=0):
  """(images [B, H, W, C] in [-1, 1], bool_masked_pos [B, N]) as numpy."""
  rng = np.random.default_rng(seed)
  h, w = sizes.pair(cfg["image_size"])
  images = rng.uniform(-1, 1, (batch, h, w, cfg["num_channels"])).astype(np.float32)
  gh, gw = core.grid(cfg)
  mask = rng.random((batch, gh * gw)) < 0.4
  return images, mask


def ours(params, cfg, images, bool_masked_pos=None):
  """(output, out) of our model in fp32 eval mode, as numpy."""
  cfg = core.full_config(cfg)
  # Scanned blocks: one compiled block whatever the depth (same numerics per block).
  cfg.update(scan=True, remat_policy="none", dtype="float32", param_dtype="float32")
  params = npz.unflatten(npz.stack_blocks(core.flat_params(params)))
  output, out = _apply(core.create(cfg), params, images, bool_masked_pos)
  return np.asarray(output), jax.tree.map(np.asarray, out)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, images, bool_masked_pos):
  """One compiled program (cached per model): faster than op-by-op dispatch."""
  return model.apply({"params": params}, images, train=False,
                     bool_masked_pos=bool_masked_pos)


def _maxdiff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ParityError(f"shapes differ: ours {a.shape} vs theirs {b.shape}")
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def params_diff(exported, loaded):
  """Max |Δ| over parameters; a key on one side only is an error."""
  missing = sorted(exported.keys() - loaded.keys())
  extra = sorted(loaded.keys() - exported.keys())
  if missing or extra:
    raise ParityError(f"parameters differ after loading: exported only {missing}, "
                      f"loaded only {extra}")
  return max(_maxdiff(exported[k], loaded[k]) for k in exported)


def check(diffs, tol=TOL, what="export"):
  """Raises ParityError when any difference exceeds `tol` (or is NaN)."""
  bad = {k: v for k, v in diffs.items() if not v <= tol}
  if bad:
    listing = ", ".join(f"{k} {v:.3g}" for k, v in bad.items())
    raise ParityError(f"{what} does not match our model: max |Δ| {listing} "
                      f"(tolerance {tol:g} in fp32)")


def _torch():
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def load_hf(out_dir, cfg, arch):
  """`arch.from_pretrained(out_dir)`; ParityError on missing/unexpected keys."""
  import transformers  # pylint: disable=g-import-not-at-top
  # Its "Loading weights" bar would break the converter's lines.
  transformers.utils.logging.disable_progress_bar()
  model, info = getattr(transformers, arch).from_pretrained(
      out_dir, output_loading_info=True, attn_implementation="eager",
      **hf_lib.load_kwargs(core.full_config(cfg), arch))
  problems = {k: v for k, v in info.items() if v}
  if problems:
    raise ParityError(f"{arch}.from_pretrained({out_dir}) did not load cleanly: {problems}")
  return model.eval()


def verify_hf(out_dir, params, cfg, arch=None, batch=2, seed=0, tol=TOL):
  """Loads the HF export in `out_dir` and compares it with our model.

  Returns:
    {quantity: max |Δ|}: `logits` / `pooler_output` / `last_hidden_state` /
    `reconstruction` and `loss` (MIM), and `params` (loaded vs exported).
  """
  torch = _torch()
  cfg = core.full_config(cfg)
  arch = arch or hf_lib.architecture(cfg)
  model = load_hf(out_dir, cfg, arch)
  images, mask = inputs(cfg, batch, seed)
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
  diffs = {}
  if arch == hf_lib.MIM:
    output, out = ours(params, cfg, images, mask)
    with torch.no_grad():
      res = model(x, bool_masked_pos=torch.from_numpy(mask))
    diffs["reconstruction"] = _maxdiff(output, res.reconstruction.numpy().transpose(0, 2, 3, 1))
    loss = losses.masked_l1(images, output, mask, sizes.pair(cfg["patch_size"]))
    diffs["loss"] = _maxdiff(loss, res.loss.numpy())
  else:
    output, out = ours(params, cfg, images)
    with torch.no_grad():
      res = model(x)
    if arch == hf_lib.CLASSIFICATION:
      diffs["logits"] = _maxdiff(output, res.logits.numpy())
    else:
      diffs["last_hidden_state"] = _maxdiff(out["encoded"], res.last_hidden_state.numpy())
      if hf_lib.has_pooler(cfg, arch):
        diffs["pooler_output"] = _maxdiff(out["pre_logits"], res.pooler_output.numpy())
  exported, config = hf_lib.read(out_dir)
  loaded = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  diffs["params"] = params_diff(npz.flatten(hf_lib.to_ours(exported, config)[0]),
                                 npz.flatten(hf_lib.to_ours(loaded, config)[0]))
  check(diffs, tol, f"HF {arch} export")
  return diffs


def load_timm(npz_path, kwargs):
  """timm VisionTransformer(**kwargs) with every tensor NaN, then load_pretrained."""
  torch = _torch()
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  model = vision_transformer.VisionTransformer(**kwargs)
  with torch.no_grad():
    for p in model.parameters():
      p.fill_(float("nan"))
  model.load_pretrained(str(npz_path))
  unset = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
  if unset:
    raise ParityError(
        f"timm's npz loader left {len(unset)} tensor(s) unset (it skips heads of the "
        f"wrong size and unknown options silently): {', '.join(unset)}")
  return model.eval()


def _outputs_vs_timm(model, params, cfg, batch, seed):
  """{"logits" (or "features" without a head): max |Δ|} of ours vs timm's."""
  torch = _torch()
  images, _ = inputs(cfg, batch, seed)
  output, out = ours(params, cfg, images)
  with torch.no_grad():
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  name = "logits" if cfg["num_classes"] else "features"
  return {name: _maxdiff(output if cfg["num_classes"] else out["pre_logits"], theirs)}


def verify_timm(npz_path, kwargs, params, cfg, batch=2, seed=0, tol=TOL):
  """Loads the timm export and compares it with our model.

  Returns:
    {quantity: max |Δ|}: `logits` (or `features` without a head) and `params`.
  """
  cfg = core.full_config(cfg)
  model = load_timm(npz_path, kwargs)
  diffs = _outputs_vs_timm(model, params, cfg, batch, seed)
  with np.load(npz_path) as f:
    exported = {k: f[k] for k in f.files}
  loaded = timm_lib.to_ours(
      {k: v.detach().numpy() for k, v in model.state_dict().items()}, kwargs)
  diffs["params"] = params_diff(exported, loaded)
  check(diffs, tol, "timm export")
  return diffs


def load_timm_dir(out_dir):
  """`timm.create_model("local-dir:" + out_dir, pretrained=True)`: timm's own loading."""
  import timm  # pylint: disable=g-import-not-at-top
  return timm.create_model(f"local-dir:{out_dir}", pretrained=True).eval()


def verify_timm_dir(out_dir, params, cfg, batch=2, seed=0, tol=TOL):
  """Loads a timm model directory the way timm users do and compares it with ours.

  Returns:
    {quantity: max |Δ|}: `logits` (or `features` without a head) and `params`
    (what timm's loader put in the model vs the file, both mapped to our names:
    a tensor it skipped keeps timm's random init and shows up).
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  cfg = core.full_config(cfg)
  model = load_timm_dir(out_dir)
  diffs = _outputs_vs_timm(model, params, cfg, batch, seed)
  kw = timm_lib.hub_dir_config(str(out_dir))["model_args"]
  exported = timm_lib.to_ours(load_file(f"{out_dir}/model.safetensors"), kw)
  loaded = timm_lib.to_ours(
      {k: v.detach().numpy() for k, v in model.state_dict().items()}, kw)
  diffs["params"] = params_diff(exported, loaded)
  check(diffs, tol, "timm model directory")
  return diffs


def verify_timm_source(source, params, cfg, batch=2, seed=0, tol=TOL):
  """Compares our import of a timm state dict with timm running that state dict.

  `source` is the `timm.Source` the import read: the timm model built from the same
  kwargs (or name) gets the file's tensors with `load_state_dict(strict=True)`.

  Returns:
    {quantity: max |Δ|}: `logits` (or `features` without a head) and `params`
    (what the timm model holds after loading, mapped again, vs our parameters).
  """
  torch = _torch()
  cfg = core.full_config(cfg)
  model = source.model
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in source.sd.items()}, strict=True)
  model.eval()
  diffs = _outputs_vs_timm(model, params, cfg, batch, seed)
  loaded = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  diffs["params"] = params_diff(npz.flatten(npz.unflatten(core.flat_params(params))),
                                timm_lib.import_params(loaded, model, cfg, "timm model"))
  check(diffs, tol, "timm state dict import")
  return diffs
