"""Where a command line's model comes from: a training workdir or an .npz.

    define_flags(FLAGS, "evaluate")   # --workdir --init --model --override --use_ema
    params, model, name = load(FLAGS, image_size=None)

A workdir gives its newest checkpoint and the model it trained
(`checkpoint.model_from_workdir`). A published-layout .npz gives its
parameters and a model whose structure is read off their shapes
(`convert.infer.model_config`: width, depth, heads, patch, pooling, head,
representation, mask token, decoder, hybrid stem, the training image size from
a square position table); `--model` names the variant for what shapes do not
show, and `--override=name=value` wins over both (e.g. the training
`image_size` of a non-square table, `hidden_act`). With an `image_size` to run
at, a learned position table is resampled to it (`scipy.ndimage.zoom`, as
fine-tuning does). BiT ResNets have no .npz layout: they load from their
training workdir.
"""

import ast
import os

from absl import flags
import numpy as np

from vit_jax import errors


def define_flags(flag_values, verb):
  """Defines --workdir, --init, --model, --override and --use_ema."""
  flags.DEFINE_string(
      "workdir", None, f"Training workdir to {verb} (newest checkpoint); "
      "results are written there unless --output_dir is given.",
      flag_values=flag_values)
  flags.DEFINE_string(
      "init", None, f"{verb.capitalize()} this published-layout .npz instead "
      "of a workdir's checkpoint (needs --model).", flag_values=flag_values)
  flags.DEFINE_string("model", None, "Variant for --init, e.g. B/16.",
                      flag_values=flag_values)
  flags.DEFINE_multi_string(
      "override", [], "Model field for --init, as name=value (Python literal "
      "or string), e.g. --override=classifier=gap.", flag_values=flag_values)
  flags.DEFINE_bool(
      "use_ema", False, "Use the Polyak-averaged parameters of the "
      "checkpoint.", flag_values=flag_values)


def _literal(text):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_overrides(items):
  """["a=1", "b=gap"] -> {"a": 1, "b": "gap"}."""
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise errors.Error(f"--override={item!r} is not name=value, e.g. "
                         "--override=classifier=gap")
    out[name.strip()] = _literal(value.strip())
  return out


def _one_line(e):
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return "; ".join(lines[:4]) if lines else type(e).__name__


def check_params(params, model, what):
  """errors.Error (one line) unless `params` fit `model` exactly."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import npz  # pylint: disable=g-import-not-at-top
  h, w = model.grid_size(model.image_size)
  sh, sw = model.encoder_stride
  images = jax.ShapeDtypeStruct((1, h * sh, w * sw, model.num_channels),
                                jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  try:
    npz.check_tree(params, expected["params"], what=what)
  except ValueError as e:
    raise errors.Error(f"{_one_line(e)}: pass the fields it was trained with "
                       "as --override=name=value") from None


def load_npz_model(path, model_name, overrides=None, image_size=None):
  """(params, model) of a published-layout .npz (see the module doc)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax import npz  # pylint: disable=g-import-not-at-top
  from vit_jax import posemb  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import infer  # pylint: disable=g-import-not-at-top
  overrides = dict(overrides or {})
  if not os.path.exists(path):
    raise errors.Error(f"--init={path} does not exist")
  if not model_name:
    raise errors.Error("--init needs --model=<variant>, e.g. B/16")
  if model_name in models.VARIANTS and models.is_bit(model_name):
    raise errors.Error(f"--model={model_name} is a BiT ResNet, which has no "
                       ".npz layout: pass its training --workdir instead")
  try:
    params = npz.load_npz(path)
    if not _has_position_params(npz.flatten(params)) and (
        "posemb" not in overrides or "image_size" not in overrides):
      raise errors.Error(
          f"{path} has no learned position table: pass the position "
          "embeddings and image size it was trained with, e.g. "
          "--override=posemb=sincos2d (or sincos1d, none) "
          "--override=image_size=224")
    fields = models.get_config(model_name)
    fields.update(infer.model_config(
        params, image_size=overrides.get("image_size"),
        posemb=overrides.get("posemb"), what=f"--init={path}"))
    fields.update(overrides)
    model = models.create(model_name, **fields)
    if image_size is not None:
      trained = model.grid_size(model.image_size)
      model = model.clone(image_size=image_size)
      grid = model.grid_size(image_size)
      table = params.get("Transformer", {}).get("posembed_input", {}).get(
          "pos_embedding")
      if table is not None and grid != trained:
        params["Transformer"]["posembed_input"]["pos_embedding"] = np.asarray(
            posemb.resample(np.asarray(table), trained, grid,
                            model.num_prefix_tokens, "zoom"))
  except errors.Error:
    raise
  except (ValueError, OSError) as e:
    raise errors.Error(f"cannot use --init={path}: {_one_line(e)}") from None
  if model.scan:
    params = npz.stack_blocks(params)
  check_params(params, model, f"--init={path}")
  return params, model


def _has_position_params(flat):
  """Whether the tree learns its positions (a 1-D or 2-D table, or relative
  bias tables): then their shapes tell the kind and the grid."""
  from vit_jax import npz  # pylint: disable=g-import-not-at-top
  return (npz.POSEMB in flat or npz.POSEMB_ROW in flat
          or any(k.endswith(npz.RELATIVE_BIAS) for k in flat))


def _refuse_bit(model, name):
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  if isinstance(model, models.BiT):
    raise errors.Error(
        f"{name} is a BiT ResNet: the analyses (attention, position "
        "embeddings, patch filters) need a VisionTransformer; evaluate it "
        "with python -m vit_jax.fewshot instead")


def load(flag_values, image_size=None):
  """(params, model, name) from the flags of `define_flags`.

  The model is a VisionTransformer, what the analyses need; a BiT ResNet is
  a one-line Error.
  """
  f = flag_values
  overrides = parse_overrides(f.override)
  if f.init:
    params, model = load_npz_model(f.init, f.model, overrides, image_size)
    name = f"{f.model} ({os.path.basename(f.init)})"
    _refuse_bit(model, name)
    return params, model, name
  if overrides or f.model:
    raise errors.Error("--model and --override apply to --init; a workdir's "
                       "model comes from its config.json")
  if not f.workdir:
    raise errors.Error("pass --workdir=DIR (a training workdir) or "
                       "--init=FILE.npz --model=VARIANT")
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  params, model, config = checkpoint.model_from_workdir(f.workdir, f.use_ema)
  name = f"{config.get('model_name', 'model')} " + (
      f"({os.path.basename(os.path.normpath(f.workdir))})")
  _refuse_bit(model, name)
  return params, model, name
