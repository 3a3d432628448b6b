"""timm `VisionTransformer`: export as an `.npz` its `load_pretrained` reads, plus kwargs.

timm's npz loader (`timm.models.vision_transformer._load_weights`) reads the original
layout: `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `head` (only when its
size matches the model's, silently skipped otherwise) and `MAPHead_0/...` for
`global_pool='map'`. It ignores `pre_logits`, so a representation layer is refused,
and it always copies q/k/v biases, so a model without them is written with zero
biases (exact). The kwargs that build the matching model are returned and saved as
JSON beside the file: `VisionTransformer(**kwargs).load_pretrained(path)`.
"""

import json

import numpy as np

from vit_jax import npz
from vit_jax import sizes
from vit_jax.convert import core

ACTS = {"gelu_tanh": "gelu_tanh", "gelu": "gelu"}
EPS = 1e-6  # timm's LayerNorm default; the kwargs (JSON) cannot carry another.

_BLOCK = "Transformer/encoderblock_{i}/"
_ATTN = _BLOCK + "MultiHeadDotProductAttention_1/"
_MAP = "MAPHead_0/"
_MAP_ATTN = _MAP + "MultiHeadDotProductAttention_0/"


def check(cfg):
  """Raises `core.Unsupported` for what timm's VisionTransformer cannot express."""
  if cfg.get("resnet"):
    raise core.Unsupported(
        "hybrid ResNet stems are not exported to timm (its hybrid models need a "
        "ResNetV2 backbone built separately): keep the .npz (--to=npz)")
  if cfg["representation_size"]:
    raise core.Unsupported(
        "timm VisionTransformer has no representation layer: pre_logits "
        f"(Dense {cfg['representation_size']} + tanh) cannot be expressed there; "
        "use --to=hf (ViTModel with a tanh pooler)")
  if cfg["decoder"]:
    raise core.Unsupported(
        "timm VisionTransformer has no mask token or MIM decoder: use --to=hf "
        "(ViTForMaskedImageModeling)")
  if cfg["classifier"] == "unpooled":
    raise core.Unsupported(
        "classifier='unpooled' (all tokens out) is not a timm global_pool: keep "
        "the .npz, or use --to=hf (ViTModel)")
  if float(cfg["layer_norm_eps"]) != EPS:
    raise core.Unsupported(
        f"layer_norm_eps={cfg['layer_norm_eps']} cannot be written in timm's JSON "
        f"kwargs (its LayerNorm eps is {EPS}): use --to=hf")
  if cfg["hidden_act"] not in ACTS:
    raise core.Unsupported(f"hidden_act {cfg['hidden_act']!r} has no timm equivalent")


def _size(value):
  h, w = sizes.pair(value)
  return h if h == w else [h, w]


def kwargs(cfg):
  """`VisionTransformer(**kwargs)` for model fields `cfg` (JSON-serialisable)."""
  cfg = core.full_config(cfg)
  check(cfg)
  out = dict(
      img_size=_size(cfg["image_size"]),
      patch_size=_size(cfg["patch_size"]),
      in_chans=cfg["num_channels"],
      num_classes=cfg["num_classes"],
      embed_dim=cfg["hidden_size"],
      depth=cfg["num_layers"],
      num_heads=cfg["num_heads"],
      mlp_ratio=core.mlp_ratio(cfg),
      qkv_bias=True,
      act_layer=ACTS[cfg["hidden_act"]],
      class_token=cfg["classifier"] == "token",
      global_pool={"token": "token", "gap": "avg", "map": "map"}[cfg["classifier"]],
      fc_norm=False,
      no_embed_class=False,
      pos_embed="learn",
      drop_rate=0.0,
      drop_path_rate=0.0,
  )
  return out


def npz_params(params, cfg, notes=None):
  """Our parameters -> the flat dict written to the timm `.npz`."""
  notes = [] if notes is None else notes
  cfg = core.full_config(cfg)
  check(cfg)
  flat = core.fold_qk_scale(core.flat_params(params), cfg, notes)
  flat[npz.POSEMB] = core.position_table(flat, cfg)
  if cfg["posemb"] != "learn":
    notes.append(f"posemb={cfg['posemb']!r} written as the (fixed) values of pos_embed")
  if "mask_token" in flat:
    del flat["mask_token"]
    notes.append("mask_token dropped: timm VisionTransformer has none")
  if not cfg["qkv_bias"]:
    h, hd = cfg["num_heads"], cfg["hidden_size"] // cfg["num_heads"]
    for i in range(cfg["num_layers"]):
      for name in ("query", "key", "value"):
        flat[f"{_ATTN.format(i=i)}{name}/bias"] = np.zeros((h, hd), np.float32)
    notes.append("qkv_bias=False written as zero q/k/v biases (timm's loader "
                 "always copies them)")
  return flat


def export(params, cfg, path):
  """Writes `path` (.npz) and the kwargs beside it (`path` with .json).

  Returns:
    (kwargs, kwargs_path, notes).
  """
  notes = []
  flat = npz_params(params, cfg, notes)
  kw = kwargs(cfg)
  npz.save_npz(path, flat)
  kw_path = kwargs_path(path)
  with open(kw_path, "w") as f:
    json.dump(kw, f, indent=2)
  return kw, kw_path, notes


def kwargs_path(path):
  path = str(path)
  return (path[:-4] if path.endswith(".npz") else path) + ".json"


def to_ours(sd, kw):
  """timm state dict (numpy) -> our flat parameters (to check what timm holds)."""
  d, heads = kw["embed_dim"], kw["num_heads"]
  hd = d // heads
  flat = {
      "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
      "embedding/bias": sd["patch_embed.proj.bias"],
      npz.POSEMB: sd["pos_embed"],
      "Transformer/encoder_norm/scale": sd["norm.weight"],
      "Transformer/encoder_norm/bias": sd["norm.bias"],
  }
  if "cls_token" in sd:
    flat["cls"] = sd["cls_token"]
  if "head.weight" in sd:
    flat["head/kernel"] = sd["head.weight"].T
    flat["head/bias"] = sd["head.bias"]
  for i in range(kw["depth"]):
    a, b, t = _ATTN.format(i=i), _BLOCK.format(i=i), f"blocks.{i}."
    qkv_w, qkv_b = sd[t + "attn.qkv.weight"], sd.get(t + "attn.qkv.bias")
    for j, name in enumerate(("query", "key", "value")):
      flat[f"{a}{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
      if qkv_b is not None:
        flat[f"{a}{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
    flat[a + "out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(heads, hd, d)
    flat[a + "out/bias"] = sd[t + "attn.proj.bias"]
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      flat[f"{b}{ours}/scale"] = sd[f"{t}{theirs}.weight"]
      flat[f"{b}{ours}/bias"] = sd[f"{t}{theirs}.bias"]
    for r in range(2):
      flat[f"{b}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{t}mlp.fc{r + 1}.weight"].T
      flat[f"{b}MlpBlock_3/Dense_{r}/bias"] = sd[f"{t}mlp.fc{r + 1}.bias"]
  if "attn_pool.latent" in sd:
    p = "attn_pool."
    flat[_MAP + "probe"] = sd[p + "latent"]
    flat[_MAP_ATTN + "query/kernel"] = sd[p + "q.weight"].T.reshape(d, heads, hd)
    flat[_MAP_ATTN + "query/bias"] = sd[p + "q.bias"].reshape(heads, hd)
    for j, name in enumerate(("key", "value")):
      flat[f"{_MAP_ATTN}{name}/kernel"] = sd[p + "kv.weight"][j * d:(j + 1) * d].T.reshape(
          d, heads, hd)
      flat[f"{_MAP_ATTN}{name}/bias"] = sd[p + "kv.bias"][j * d:(j + 1) * d].reshape(heads, hd)
    flat[_MAP_ATTN + "out/kernel"] = sd[p + "proj.weight"].T.reshape(heads, hd, d)
    flat[_MAP_ATTN + "out/bias"] = sd[p + "proj.bias"]
    flat[_MAP + "LayerNorm_0/scale"] = sd[p + "norm.weight"]
    flat[_MAP + "LayerNorm_0/bias"] = sd[p + "norm.bias"]
    for r in range(2):
      flat[f"{_MAP}MlpBlock_0/Dense_{r}/kernel"] = sd[f"{p}mlp.fc{r + 1}.weight"].T
      flat[f"{_MAP}MlpBlock_0/Dense_{r}/bias"] = sd[f"{p}mlp.fc{r + 1}.bias"]
  return flat
