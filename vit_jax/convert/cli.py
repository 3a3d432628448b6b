"""`python -m vit_jax.convert --from=SRC --to={hf,timm,npz} --out=PATH [--verify]`.

SRC is a training workdir (newest checkpoint + DIR/config.json), a `.npz` checkpoint
(original or big_vision layout; the model is inferred from the shapes), a Hugging
Face ViT directory (config.json + model.safetensors / pytorch_model.bin), a timm
model directory (what --to=timm --out=DIR writes) or a timm VisionTransformer state
dict (FILE.safetensors / .pth / .pt / .bin, read without unpickling) with
--timm_model=NAME or --timm_kwargs=FILE.json. --to=timm writes a directory that
`timm.create_model("local-dir:DIR", pretrained=True)` loads, or with --out=FILE.npz
the .npz timm's `load_pretrained` reads plus its kwargs. A workdir of a BiT
ResNet converts to timm's ResNetV2 only (--to=timm: a state dict, .pth or
.safetensors; `vit_jax.convert.bit`).

Exit status: 0 on success; 1 after one line `error: ...` when --verify finds a
difference above the tolerance, the target cannot express the model, or the input
is wrong.
"""

import argparse
import json
import os

import jax
import numpy as np

from vit_jax import errors
from vit_jax import npz
from vit_jax import paths
from vit_jax import sizes
from vit_jax.convert import bit as bit_lib
from vit_jax.convert import core
from vit_jax.convert import hf as hf_lib
from vit_jax.convert import infer
from vit_jax.convert import timm as timm_lib

# Fields that the parameter shapes decide.
STRUCTURAL = ("hidden_size", "num_layers", "num_heads", "mlp_dim", "patch_size",
              "num_channels", "num_classes", "representation_size", "qkv_bias",
              "use_mask_token", "decoder", "resnet", "image_size")


def _size(text):
  parts = [int(p) for p in text.replace("x", ",").split(",") if p]
  if len(parts) == 1:
    return parts[0]
  if len(parts) == 2:
    return tuple(parts)
  raise argparse.ArgumentTypeError(f"image size is N or H,W, got {text!r}")


def parser():
  p = _Parser(
      prog="python -m vit_jax.convert", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--from", dest="src", required=True,
                 help="training workdir, FILE.npz, a Hugging Face ViT directory, a "
                      "timm model directory (config.json + model.safetensors), or a "
                      "timm VisionTransformer state dict (.safetensors, or .pth/.pt/"
                      ".bin loadable with weights_only=True)")
  p.add_argument("--to", required=True, choices=("hf", "timm", "npz"),
                 help="target: Hugging Face ViT, timm VisionTransformer or our "
                      ".npz layout")
  p.add_argument("--out", required=True,
                 help="hf: a directory (config.json, model.safetensors, "
                      "preprocessor_config.json); timm: a directory (model.safetensors "
                      "+ config.json: timm.create_model('local-dir:DIR', "
                      "pretrained=True)) or FILE.npz (kwargs go to FILE.json); "
                      "npz: FILE.npz (model fields go to FILE.json)")
  p.add_argument("--verify", action="store_true",
                 help="run ours and theirs on the same batch; fail above --tol")
  p.add_argument("--tol", type=float, default=1e-4,
                 help="--verify: largest allowed absolute difference of the "
                      "outputs (default: %(default)g)")
  p.add_argument("--model", help="variant (e.g. B/16) whose fields are the defaults "
                 "for what the shapes do not say")
  p.add_argument("--hidden_act", choices=("gelu_tanh", "gelu"),
                 help="MLP activation, which the shapes do not show")
  p.add_argument("--layer_norm_eps", type=float,
                 help="LayerNorm epsilon, which the shapes do not show")
  p.add_argument("--image_size", type=_size, help="N or H,W")
  p.add_argument("--posemb", choices=("learn", "learn2d", "sincos2d", "sincos1d", "none",
                                      "relative"),
                 help="position embedding of a checkpoint without a learned table")
  p.add_argument("--classifier", choices=("token", "gap", "map", "unpooled"),
                 help="pooling, where the shapes leave it open")
  p.add_argument("--labels", help="class names: comma-separated, or @FILE with one a line")
  p.add_argument("--timm_model", help="timm state dict: the timm model name it "
                 "belongs to (timm.create_model(NAME, pretrained=False))")
  p.add_argument("--timm_kwargs", help="timm state dict: JSON of VisionTransformer "
                 "kwargs (what --to=timm writes); over --timm_model's defaults if both")
  p.add_argument("--use_ema", action="store_true",
                 help="workdir: take the Polyak-averaged parameters")
  return p


def _labels(text):
  if text is None:
    return None
  if text.startswith("@"):
    with open(text[1:]) as f:
      return [l.strip() for l in f if l.strip()]
  return text.split(",")


def _flag_overrides(args):
  out = {}
  for key in ("hidden_act", "layer_norm_eps", "image_size", "posemb", "classifier"):
    value = getattr(args, key)
    if value is not None:
      out[key] = value
  return out


def _workdir_labels(config):
  if config.get("labels"):
    return list(config.labels)
  resolved = config.get("resolved") or {}
  if resolved.get("class_names"):  # The training split's, kept by the run.
    return list(resolved["class_names"])
  try:
    from vit_jax import data  # pylint: disable=g-import-not-at-top
    src = data.get_source(config.dataset, config.get("train_split", "train"),
                          data_dir=config.get("data_dir"))
    names = getattr(src, "class_names", None)
    return list(names) if names else None
  except Exception:  # pylint: disable=broad-except
    return None


def _merge(base, inferred):
  """Config fields + what the shapes say (shapes win for structure)."""
  cfg = dict(base)
  cfg.update({k: inferred[k] for k in STRUCTURAL})
  if inferred["posemb"] in ("learn", "relative"):
    cfg["posemb"] = inferred["posemb"]
  elif cfg.get("posemb", "learn") == "learn":
    cfg["posemb"] = inferred["posemb"]
  classifier = cfg.get("classifier", "token")
  compatible = {"token": ("token",), "map": ("map",), "gap": ("gap", "unpooled")}
  if classifier not in compatible[inferred["classifier"]]:
    cfg["classifier"] = inferred["classifier"]
  return cfg


def _load_timm(args, log):
  """A timm state-dict file -> (params, model fields, labels, kind, timm_lib.Source)."""
  if args.timm_kwargs and args.to in ("npz", "timm") and os.path.abspath(
      args.timm_kwargs) == os.path.abspath(timm_lib.kwargs_path(args.out)):
    raise errors.Error(f"--out={args.out} would overwrite --timm_kwargs="
                       f"{args.timm_kwargs} with its JSON: choose another --out")
  for flag in ("posemb", "classifier", "hidden_act", "layer_norm_eps", "model"):
    if getattr(args, flag) is not None:
      raise errors.Error(f"--{flag} does not apply to a timm state dict: the timm "
                         "model (--timm_model / --timm_kwargs) decides it")
  flat, cfg, notes, source = timm_lib.read(
      args.src, model_name=args.timm_model, kwargs_file=args.timm_kwargs,
      image_size=args.image_size)
  for note in notes:
    log(f"note: {note}")
  name = f"{args.timm_model} " if args.timm_model else ""
  log(f"timm {name}kwargs: {json.dumps(_jsonable(source.kwargs))}")
  return npz.unflatten(flat), cfg, None, "timm", source


def _load_timm_dir(args, log):
  """A timm model directory -> (params, model fields, labels, kind, timm_lib.Source)."""
  for flag in ("posemb", "classifier", "hidden_act", "layer_norm_eps", "model"):
    if getattr(args, flag) is not None:
      raise errors.Error(f"--{flag} does not apply to a timm model directory: its "
                         "config.json (architecture, model_args) decides it")
  flat, cfg, notes, source, labels = timm_lib.read_dir(args.src,
                                                       image_size=args.image_size)
  for note in notes:
    log(f"note: {note}")
  log(f"timm {source.model_name} model_args: {json.dumps(_jsonable(source.kwargs))}")
  return npz.unflatten(flat), cfg, labels, "timm", source


def load_source(args, log=print):
  """-> (params, model fields, labels, kind, source) for --from.

  `source` is the `timm_lib.Source` of a timm state dict (for --verify), else None.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  src = args.src
  if not os.path.exists(src):
    raise FileNotFoundError(f"--from={src} does not exist")
  if (args.timm_model or args.timm_kwargs) and not timm_lib.is_weights_file(src):
    raise errors.Error(f"--timm_model / --timm_kwargs go with a timm state dict "
                       f"(--from=FILE{'|'.join(timm_lib.WEIGHT_SUFFIXES)}), not {src}")
  if timm_lib.is_weights_file(src):
    return _load_timm(args, log)
  flags = _flag_overrides(args)
  base = models.get_config(args.model) if args.model else {}
  if os.path.isdir(src):
    hf_lib.check_model_type(src)
  if os.path.isdir(src) and timm_lib.hub_dir_config(src) is not None:
    return _load_timm_dir(args, log)
  if os.path.isdir(src) and hf_lib.is_hf_dir(src):
    sd, config = hf_lib.read(src)
    params, cfg, labels = hf_lib.to_ours(sd, config)
    cfg.update(flags)
    return params, cfg, labels, "hf", None
  if os.path.isdir(src):
    from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
    params, model, config = checkpoint.model_from_workdir(
        src, use_ema=args.use_ema)
    params = npz.unflatten(npz.unstack_blocks(npz.flatten(params)))
    fields = {k: getattr(model, k) for k in models.FIELDS}
    if fields["resnet"] is not None:
      fields["resnet"] = dict(fields["resnet"])
    fields.update(flags)
    inferred = infer.model_config(params, image_size=fields["image_size"],
                                  posemb=fields.get("posemb"), what=src)
    cfg = _merge(fields, inferred)
    return params, cfg, _workdir_labels(config), "workdir", None
  if not os.path.exists(src):
    raise FileNotFoundError(f"--from={src} does not exist")
  params = npz.load_npz(src)
  inferred = infer.model_config(params, image_size=flags.get("image_size"),
                                posemb=flags.get("posemb"), what=src)
  cfg = _merge(base, inferred) if base else inferred
  for key in ("hidden_act", "layer_norm_eps", "classifier"):
    if key in flags:
      cfg[key] = flags[key]
  return params, cfg, None, "npz", None


def check_params(params, cfg):
  """The parameters must be exactly those of the model the fields describe."""
  model = core.create(dict(core.full_config(cfg), scan=False))
  h, w = sizes.pair(cfg["image_size"])
  shapes = jax.eval_shape(
      lambda: model.init({"params": jax.random.PRNGKey(0)},
                         np.zeros((1, h, w, cfg["num_channels"]), np.float32)))["params"]
  npz.check_tree(npz.flatten(params), npz.flatten(shapes), what="the parameters")


def _model_fields(cfg):
  full = core.full_config(cfg)
  keys = STRUCTURAL + ("classifier", "posemb", "hidden_act", "layer_norm_eps", "qk_scale")
  return {k: full[k] for k in keys}


def _jsonable(value):
  if isinstance(value, tuple):
    return list(value)
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  return value


def _flag_value(value):
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(str(v) for v in value) + ")"
  return str(value)


def _flags(fields):
  """`--config.model.K=V` for the fields that a flag can carry (not the resnet dict)."""
  return " ".join(f"--config.model.{k}={_flag_value(v)}"
                  for k, v in fields.items() if v is not None and not isinstance(v, dict))


def _timm_npz(out):
  return str(out).lower().endswith(".npz")


def _check_out(args):
  """--out must be a place this export may write: never a training workdir."""
  if args.to == "timm" and not _timm_npz(args.out) and str(args.out).lower().endswith(
      timm_lib.WEIGHT_SUFFIXES + (".json",)):
    raise errors.Error(f"--out={args.out}: --to=timm writes a directory "
                       "(model.safetensors + config.json) or FILE.npz")
  out = args.out
  if os.path.realpath(out) == os.path.realpath(args.src):
    raise errors.Error(f"--out={out} is --from, which it would replace: choose "
                       "another --out")
  if args.to == "npz" or (args.to == "timm" and _timm_npz(args.out)):
    return
  if os.path.exists(out) and not os.path.isdir(out):
    raise errors.Error(f"--out={out} is a file; --to={args.to} writes a directory")
  if not os.path.isfile(os.path.join(out, "config.json")):
    return
  kind = ("hf" if hf_lib.model_type(out) is not None else
          "timm" if timm_lib.hub_dir_config(out) is not None else None)
  if kind != args.to:
    what = {"hf": "a Hugging Face model's", "timm": "a timm model's",
            None: "not a model export's (a training workdir?)"}[kind]
    raise errors.Error(f"--out={out} holds a config.json, {what}, that --to={args.to} "
                       "would replace: choose another --out")


def run(args, log=print):
  """Performs the conversion; returns the parity figures (or {})."""
  from vit_jax.convert import parity  # pylint: disable=g-import-not-at-top
  for key in ("src", "out", "timm_kwargs"):
    setattr(args, key, paths.absolute(getattr(args, key)))
  if bit_lib.is_workdir(args.src):  # A BiT ResNet: timm's ResNetV2 only.
    return bit_lib.convert_workdir(args, log)
  _check_out(args)
  params, cfg, labels, kind, source = load_source(args, log)
  labels = _labels(args.labels) or labels
  cfg = core.full_config(cfg)
  check_params(params, cfg)
  fields = _model_fields(cfg)
  log(f"model ({kind}): {json.dumps(_jsonable(fields))}")
  diffs = {}
  if args.to == "hf":
    arch, notes = hf_lib.export(params, cfg, args.out, labels)
    for note in notes:
      log(f"note: {note}")
    kw = hf_lib.load_kwargs(cfg, arch)
    extra = "".join(f", {k}={v!r}" for k, v in kw.items())
    log(f"wrote {args.out}: transformers.{arch}.from_pretrained({args.out!r}{extra})")
    if arch == hf_lib.CLASSIFICATION and cfg["num_classes"] > 1:
      log(f"  or transformers.pipeline('image-classification', model={args.out!r})")
    if args.verify:
      diffs = parity.verify_hf(args.out, params, cfg, arch, tol=args.tol)
  elif args.to == "timm" and not _timm_npz(args.out):
    kw, config, notes = timm_lib.export_dir(params, cfg, args.out, labels)
    for note in notes:
      log(f"note: {note}")
    log(f"wrote {args.out}: timm.create_model('local-dir:{args.out}', pretrained=True)"
        f" ({config['architecture']} with model_args {json.dumps(kw)})")
    if args.verify:
      diffs = parity.verify_timm_dir(args.out, params, cfg, tol=args.tol)
  elif args.to == "timm":
    kw, kw_path, notes = timm_lib.export(params, cfg, args.out)
    for note in notes:
      log(f"note: {note}")
    log(f"wrote {args.out} and {kw_path}: timm.models.vision_transformer."
        f"VisionTransformer(**kwargs).load_pretrained({args.out!r}) with kwargs "
        f"{json.dumps(kw)}")
    if args.verify:
      diffs = parity.verify_timm(args.out, kw, params, cfg, tol=args.tol)
  else:
    npz.save_npz(args.out, params)
    side = timm_lib.kwargs_path(args.out)
    with open(side, "w") as f:
      json.dump({"model": _jsonable(fields), "labels": labels}, f, indent=2)
    log(f"wrote {args.out} and {side}")
    log(f"model overrides: {_flags(fields)}")
    if labels:
      log(f"labels: {labels}")
    if args.verify:
      if kind == "hf":
        with open(os.path.join(args.src, "config.json")) as f:
          arch = json.load(f)["architectures"][0]
        diffs = parity.verify_hf(args.src, params, cfg, arch, tol=args.tol)
      elif kind == "timm":
        diffs = parity.verify_timm_source(source, params, cfg, tol=args.tol)
      written = npz.flatten(npz.load_npz(args.out))
      ours_flat = npz.flatten(npz.unflatten(core.flat_params(params)))
      diffs["npz_params"] = parity.params_diff(ours_flat, written)
      parity.check(diffs, args.tol, "npz export")
  if diffs:
    log("parity (max |Δ|, fp32): " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
    log("verify: OK")
  return diffs


# The packages of the `torch` extra, imported only where a conversion needs
# them (loading an export back, reading a .pth).
TORCH_EXTRA = ("torch", "torchvision", "timm", "transformers", "safetensors")


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line `error: ...` (exit 1), like every other error."""

  def error(self, message):
    raise errors.Error(f"{message} (python -m vit_jax.convert --help)")


def main(argv=None):
  """The command line; returns 0, or 1 after one line `error: ...`."""
  from vit_jax.convert import parity  # pylint: disable=g-import-not-at-top
  try:
    run(parser().parse_args(argv))
  except parity.ParityError as e:
    return errors.fail(f"verify FAILED: {e}")
  except (core.Unsupported, ValueError, FileNotFoundError) as e:
    return errors.fail(e)
  except ModuleNotFoundError as e:
    if e.name not in TORCH_EXTRA:
      raise
    return errors.fail(f"{e.name} is not installed, and this conversion needs "
                       "it (--verify, or a PyTorch file): pip install -e "
                       "\".[torch]\"")
  return 0
