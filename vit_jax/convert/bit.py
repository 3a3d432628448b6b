"""BiT ResNets (`models.BiT`) <-> timm's `ResNetV2` state dicts.

timm builds the same network with `ResNetV2(layers=..., width_factor=...,
stem_type='fixed', conv_layer=partial(StdConv2d, eps=1e-8))` (what
`timm.create_model("resnetv2_50x1_bit")` does). Names and layouts:

| ours | timm | how the array changes |
|---|---|---|
| `conv_root/kernel` (7,7,C,W) | `stem.conv.weight` | HWIO -> OIHW |
| `block{s}/unit{uu}/gn{k}/{scale,bias}` | `stages.{s-1}.blocks.{u-1}.norm{k}.{weight,bias}` | unchanged |
| `block{s}/unit{uu}/conv{k}/kernel` | `stages.{s-1}.blocks.{u-1}.conv{k}.weight` | HWIO -> OIHW |
| `block{s}/unit01/conv_proj/kernel` | `stages.{s-1}.blocks.0.downsample.conv.weight` | HWIO -> OIHW |
| `norm-pre-head/{scale,bias}` | `norm.{weight,bias}` | unchanged |
| `head/kernel` (F,K), `head/bias` | `head.fc.weight` (K,F,1,1), `head.fc.bias` | 1x1 conv |

`to_timm(params)` and `from_timm(state_dict)` map numpy arrays both ways;
`timm_kwargs(model)` gives the JSON constructor arguments and `create_timm`
the timm module. `convert_workdir` is what `python -m vit_jax.convert
--from=WORKDIR` runs for a BiT workdir.
"""

import collections
import json
import os
import re

import numpy as np

from vit_jax import npz

_UNIT = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_UNIT_NAMES = (("norm1", "gn1"), ("norm2", "gn2"), ("norm3", "gn3"))
_CONVS = ("conv1", "conv2", "conv3")
NORM = "norm-pre-head"
STD_CONV_EPS = 1e-8  # timm's BiT models: partial(StdConv2d, eps=1e-8).


def _oihw(kernel):
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def _hwio(weight):
  return np.ascontiguousarray(np.asarray(weight).transpose(2, 3, 1, 0))


def to_timm(params):
  """Our BiT parameters (nested or `/`-flat) -> timm state dict (numpy)."""
  flat = npz.flatten(params) if any(
      hasattr(v, "items") for v in params.values()) else dict(params)
  sd = collections.OrderedDict()
  sd["stem.conv.weight"] = _oihw(flat["conv_root/kernel"])
  units = sorted({tuple(k.split("/")[:2]) for k in flat
                  if k.startswith("block")},
                 key=lambda bu: (int(bu[0][5:]), int(bu[1][4:])))
  for block, unit in units:
    ours = f"{block}/{unit}/"
    theirs = f"stages.{int(block[5:]) - 1}.blocks.{int(unit[4:]) - 1}."
    if ours + "conv_proj/kernel" in flat:
      sd[theirs + "downsample.conv.weight"] = _oihw(
          flat[ours + "conv_proj/kernel"])
    for (norm, gn), conv in zip(_UNIT_NAMES, _CONVS):  # timm's order.
      sd[f"{theirs}{norm}.weight"] = np.asarray(flat[f"{ours}{gn}/scale"])
      sd[f"{theirs}{norm}.bias"] = np.asarray(flat[f"{ours}{gn}/bias"])
      sd[f"{theirs}{conv}.weight"] = _oihw(flat[f"{ours}{conv}/kernel"])
  sd["norm.weight"] = np.asarray(flat[f"{NORM}/scale"])
  sd["norm.bias"] = np.asarray(flat[f"{NORM}/bias"])
  if "head/kernel" in flat:
    kernel = np.asarray(flat["head/kernel"])
    sd["head.fc.weight"] = np.ascontiguousarray(kernel.T[:, :, None, None])
    sd["head.fc.bias"] = np.asarray(flat["head/bias"])
  return sd


def from_timm(state_dict):
  """timm ResNetV2 (BiT) state dict -> our nested BiT parameters (numpy).

  ValueError naming the tensors it does not know (another timm model).
  """
  flat, unknown = {}, []
  for key, value in state_dict.items():
    value = _numpy(value)
    name = _our_name(key)
    if name is None:
      unknown.append(key)
      continue
    if key == "head.fc.weight":
      value = value.reshape(value.shape[0], value.shape[1]).T
    elif value.ndim == 4:
      value = _hwio(value)
    flat[name] = np.ascontiguousarray(value)
  if unknown:
    raise ValueError(f"not a timm BiT ResNetV2 state dict: unknown tensors "
                     f"{', '.join(sorted(unknown)[:5])}")
  return npz.unflatten(flat)


def _numpy(value):
  if hasattr(value, "detach"):  # A torch tensor.
    return value.detach().cpu().numpy()
  return np.asarray(value)


def _our_name(key):
  """Our flat name of a timm tensor name, or None."""
  fixed = {"stem.conv.weight": "conv_root/kernel",
           "norm.weight": f"{NORM}/scale", "norm.bias": f"{NORM}/bias",
           "head.fc.weight": "head/kernel", "head.fc.bias": "head/bias"}
  if key in fixed:
    return fixed[key]
  m = _UNIT.match(key)
  if not m:
    return None
  prefix = f"block{int(m.group(1)) + 1}/unit{int(m.group(2)) + 1:02d}/"
  rest = m.group(3)
  if rest == "downsample.conv.weight":
    return prefix + "conv_proj/kernel"
  for norm, gn in _UNIT_NAMES:
    for theirs, ours in (("weight", "scale"), ("bias", "bias")):
      if rest == f"{norm}.{theirs}":
        return f"{prefix}{gn}/{ours}"
  for conv in _CONVS:
    if rest == f"{conv}.weight":
      return f"{prefix}{conv}/kernel"
  return None


def model_fields(state_dict):
  """BiT fields (resnet, num_classes, num_channels) read off a timm state dict.

  The width factor is the first stage's output channels / 256, which timm's
  rounding inverts exactly for the widths BiT uses (1 to 4, and halves).
  """
  counts = collections.Counter()
  for key in state_dict:
    m = _UNIT.match(key)
    if m and m.group(3) == "conv1.weight":
      counts[int(m.group(1))] += 1
  layers = tuple(counts[i] for i in range(len(counts)))
  stage1 = np.shape(state_dict["stages.0.blocks.0.conv3.weight"])[0]
  width = stage1 / 256
  head = state_dict.get("head.fc.weight")
  return dict(
      resnet=dict(num_layers=layers,
                  width_factor=int(width) if width == int(width) else width),
      num_classes=int(np.shape(head)[0]) if head is not None else 0,
      num_channels=int(np.shape(state_dict["stem.conv.weight"])[1]))


# (depth, width) of the BiT models timm registers as resnetv2_{d}x{w}_bit.
TIMM_NAMED = ((50, 1), (50, 3), (101, 1), (101, 3), (152, 2), (152, 4))


def timm_name(model):
  """`resnetv2_{depth}x{width}_bit` when timm registers the model, else None."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  layers = tuple(model.resnet["num_layers"])
  width = model.resnet["width_factor"]
  for depth, stages in models.BIT_DEPTHS.items():
    if stages == layers and (depth, width) in TIMM_NAMED:
      return f"resnetv2_{depth}x{int(width)}_bit"
  return None


def check_expressible(model):
  """ValueError unless timm's ResNetV2 can build `model` (32 groups)."""
  from vit_jax.models import resnet  # pylint: disable=g-import-not-at-top
  root, stages = model.widths
  narrow = sorted({c for c in (root,) + tuple(x for s in stages for x in s)
                   if resnet.num_groups(c) != 32})
  if narrow:
    raise ValueError(
        f"timm's ResNetV2 has 32 GroupNorm groups everywhere, but width_factor="
        f"{model.resnet['width_factor']} gives layers of {narrow} channels: use "
        "a width_factor whose widths are multiples of 32 (e.g. >= 0.5)")


def timm_kwargs(model):
  """JSON kwargs of timm's ResNetV2 for our BiT model (without conv_layer:
  `create_timm` adds `partial(StdConv2d, eps=1e-8)` and stem_type='fixed')."""
  layers = [int(n) for n in model.resnet["num_layers"]]
  kw = dict(layers=layers, width_factor=model.resnet["width_factor"],
            num_classes=int(model.num_classes),
            in_chans=int(model.num_channels), stem_type="fixed")
  if len(layers) > 4:  # timm's default channels and stride cover 4 stages.
    kw["channels"] = [256 * 2**i for i in range(len(layers))]
    kw["output_stride"] = int(model.encoder_stride[0])
  return kw


def describe(kwargs):
  """The timm constructor call, as text."""
  args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
  return (f"timm.models.resnetv2.ResNetV2({args}, conv_layer=partial("
          f"StdConv2d, eps={STD_CONV_EPS:g}))")


def create_timm(kwargs):
  """timm's ResNetV2 for `timm_kwargs` (BiT construction), in eval mode."""
  import functools  # pylint: disable=g-import-not-at-top
  from timm.layers import StdConv2d  # pylint: disable=g-import-not-at-top
  from timm.models.resnetv2 import ResNetV2  # pylint: disable=g-import-not-at-top
  kw = dict(kwargs)
  kw.setdefault("stem_type", "fixed")
  return ResNetV2(conv_layer=functools.partial(StdConv2d, eps=STD_CONV_EPS),
                  **kw).eval()


# The command line (`python -m vit_jax.convert --from=WORKDIR`).


def is_workdir(path):
  """Whether `path` is a training workdir of a BiT model."""
  if not os.path.isfile(os.path.join(str(path), "config.json")):
    return False
  try:
    with open(os.path.join(path, "config.json")) as f:
      name = json.load(f).get("model_name")
    from vit_jax import models  # pylint: disable=g-import-not-at-top
    return bool(name) and name in models.VARIANTS and models.is_bit(name)
  except (OSError, ValueError):
    return False


def _save_state_dict(sd, path):
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32))
             for k, v in sd.items()}
  if str(path).endswith(".safetensors"):
    from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, str(path))
  else:
    torch.save(tensors, str(path))


def _load_state_dict(path):
  """The tensors of a written state dict, as numpy."""
  if str(path).endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(str(path))
  import torch  # pylint: disable=g-import-not-at-top
  return {k: v.numpy() for k, v in torch.load(
      str(path), map_location="cpu", weights_only=True).items()}


def kwargs_path(path):
  return os.path.splitext(str(path))[0] + ".json"


def verify(model, params, sd, kwargs, batch=2, seed=0, tol=1e-4):
  """timm's ResNetV2 loading `sd` (strict; e.g. the written file) vs ours
  (`params`) on the same random batch.

  Returns:
    {"logits" (or "features" without a head), "params": max |Δ|}; raises
    `parity.ParityError` above `tol`.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vit_jax import sizes  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import parity  # pylint: disable=g-import-not-at-top
  theirs = create_timm(kwargs)
  theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in
                          sd.items()}, strict=True)
  h, w = sizes.pair(model.image_size)
  images = np.random.default_rng(seed).uniform(
      -1, 1, (batch, h, w, model.num_channels)).astype(np.float32)
  model = model.clone(dtype="float32", param_dtype="float32")
  output, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(
      params, images)
  with torch.no_grad():
    ref = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  ours = np.asarray(output if model.num_classes else out["pre_logits"])
  name = "logits" if model.num_classes else "features"
  diffs = {name: float(np.abs(ours.astype(np.float64) - ref).max())}
  loaded = {k: v.numpy() for k, v in theirs.state_dict().items()}
  diffs["params"] = parity.params_diff(
      npz.flatten(params), npz.flatten(from_timm(loaded)))
  parity.check(diffs, tol, "timm ResNetV2 export")
  return diffs


def convert_workdir(args, log=print):
  """`--from=WORKDIR` of a BiT model: --to=timm (state dict + kwargs JSON);
  hf and npz are refused. Returns the parity figures of --verify (or {})."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import core  # pylint: disable=g-import-not-at-top
  if args.to != "timm":
    what = {"hf": "the Hugging Face ViT classes cannot express it",
            "npz": "the .npz layout is the ViT one"}[args.to]
    raise core.Unsupported(
        f"--from={args.src} holds a BiT ResNet and {what}: use --to=timm "
        "(timm's ResNetV2)")
  params, model, _ = checkpoint.model_from_workdir(args.src,
                                                   use_ema=args.use_ema)
  params = npz.unflatten({k: np.asarray(v, np.float32)
                          for k, v in npz.flatten(params).items()})
  log(f"model (workdir): BiT {json.dumps(_fields(model))}")
  check_expressible(model)
  if os.path.abspath(kwargs_path(args.out)) == os.path.abspath(args.out):
    raise ValueError(f"--out={args.out} would be overwritten by its kwargs "
                     "JSON: write the state dict to FILE.pth or .safetensors")
  sd = to_timm(params)
  kw = timm_kwargs(model)
  _save_state_dict(sd, args.out)
  with open(kwargs_path(args.out), "w") as f:
    json.dump(kw, f, indent=2)
  name = timm_name(model)
  how = (f"timm.create_model({name!r}, pretrained=False, num_classes="
         f"{model.num_classes}) or " if name and model.num_channels == 3
         else "")
  load = ("safetensors.torch.load_file" if str(args.out).endswith(
      ".safetensors") else "torch.load")
  log(f"wrote {args.out} and {kwargs_path(args.out)}: {how}{describe(kw)}, "
      f"then .load_state_dict({load}({args.out!r}))")
  if not args.verify:
    return {}
  diffs = verify(model, params, _load_state_dict(args.out), kw, tol=args.tol)
  log("parity (max |Δ|, fp32): " +
      ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
  log("verify: OK")
  return diffs


def _fields(model):
  return dict(resnet=dict(num_layers=list(model.resnet["num_layers"]),
                          width_factor=model.resnet["width_factor"]),
              num_classes=model.num_classes,
              image_size=model.image_size, num_channels=model.num_channels)


__all__ = ["to_timm", "from_timm", "model_fields", "timm_kwargs",
           "create_timm", "convert_workdir"]
