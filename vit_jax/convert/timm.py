"""timm `VisionTransformer`: export as a local pretrained model (a directory) or as an
`.npz` its `load_pretrained` reads; import of its state dict (`read`, `read_dir`).

A directory (`export_dir`) is what timm reads for a local pretrained model:
`model.safetensors` (timm's state-dict names) and `config.json` with `architecture`
(a registered timm name, `architecture_name`), `num_classes`, `label_names`,
`model_args` (the `VisionTransformer` kwargs that build exactly this model; they
override the named architecture's) and `pretrained_cfg`: the input contract of the
project's evaluation (`input_size`, bilinear `interpolation`, `mean` = `std` = 0.5,
`crop_pct` 1.0, `crop_mode` "center"). `timm.create_model("local-dir:DIR",
pretrained=True)` builds and loads it, and `timm.data.resolve_data_config({},
model=model)` + `create_transform` preprocess images as the project's evaluation
does (`vit_jax.data.preprocess.eval_batch`: the central crop of the model's aspect
ratio, resized bilinearly, to [-1, 1]).

timm's npz loader (`timm.models.vision_transformer._load_weights`) reads the original
layout: `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `head` (only when its
size matches the model's, silently skipped otherwise) and `MAPHead_0/...` for
`global_pool='map'`. It ignores `pre_logits`, so a representation layer is refused,
and it always copies q/k/v biases, so a model without them is written with zero
biases (exact; the directory form builds `qkv_bias=False` instead). The kwargs that
build the matching model are returned and saved as JSON beside the file:
`VisionTransformer(**kwargs).load_pretrained(path)`.

Import (`read`) takes a timm state dict (`.safetensors`, or a torch file that
`torch.load(weights_only=True)` reads: nothing is unpickled) and the model it belongs
to (a timm name, or VisionTransformer kwargs such as the JSON the export writes);
`read_dir` takes a directory as `export_dir` writes it (the name and kwargs from its
config.json). The
timm model is built (without its random init), checked for what our VisionTransformer
can express (anything else is refused by name: register tokens, layer scale,
pre_norm, qk_norm, fc_norm after avg / MAP pooling, ...), and the tensors are mapped
by the inverse of the export: qkv split into query / key / value, `attn_pool.*` to
`MAPHead_0`, `fc_norm` of token pooling to `encoder_norm` (a per-token norm),
`no_embed_class` to a zero cls row in the position table. Every tensor must be used.
"""

import json
import math
import os
import pickle
import re

import numpy as np

from vit_jax import errors
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
  core.refuse_relative(cfg, "timm VisionTransformer")
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


def _exported_flat(params, cfg, notes):
  """Our parameters as the model timm runs: fixed tables written, qk_scale folded."""
  cfg = core.full_config(cfg)
  check(cfg)
  flat = core.fold_qk_scale(core.flat_params(params), cfg, notes)
  flat[npz.POSEMB] = core.position_table(flat, cfg)
  for key in (npz.POSEMB_ROW, npz.POSEMB_COL):  # learn2d: now in the table.
    flat.pop(key, None)
  if cfg["posemb"] != "learn":
    notes.append(f"posemb={cfg['posemb']!r} written as the values of pos_embed "
                 "it adds")
  if "mask_token" in flat:
    del flat["mask_token"]
    notes.append("mask_token dropped: timm VisionTransformer has none")
  return flat


def npz_params(params, cfg, notes=None):
  """Our parameters -> the flat dict written to the timm `.npz`."""
  notes = [] if notes is None else notes
  cfg = core.full_config(cfg)
  flat = _exported_flat(params, cfg, notes)
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


# Registered timm names of plain VisionTransformers: (width, depth, heads, patch,
# image size) -> name. `architecture_name` picks the one that describes the model.
ARCHITECTURES = {
    (192, 12, 3, 16, 224): "vit_tiny_patch16_224",
    (192, 12, 3, 16, 384): "vit_tiny_patch16_384",
    (384, 12, 6, 8, 224): "vit_small_patch8_224",
    (384, 12, 6, 16, 224): "vit_small_patch16_224",
    (384, 12, 6, 16, 384): "vit_small_patch16_384",
    (384, 12, 6, 32, 224): "vit_small_patch32_224",
    (384, 12, 6, 32, 384): "vit_small_patch32_384",
    (768, 12, 12, 8, 224): "vit_base_patch8_224",
    (768, 12, 12, 16, 224): "vit_base_patch16_224",
    (768, 12, 12, 16, 384): "vit_base_patch16_384",
    (768, 12, 12, 32, 224): "vit_base_patch32_224",
    (768, 12, 12, 32, 384): "vit_base_patch32_384",
    (1024, 24, 16, 14, 224): "vit_large_patch14_224",
    (1024, 24, 16, 16, 224): "vit_large_patch16_224",
    (1024, 24, 16, 16, 384): "vit_large_patch16_384",
    (1024, 24, 16, 32, 224): "vit_large_patch32_224",
    (1024, 24, 16, 32, 384): "vit_large_patch32_384",
    (1280, 32, 16, 14, 224): "vit_huge_patch14_224",
}


def architecture_name(cfg):
  """The timm name for `config.json`'s `architecture`.

  The name of the same variant, patch and size when timm has one, else the
  nearest: same variant, then patch, then size, then the closest width. Only the
  name's entry point is used: `model_args` override all of its kwargs.
  """
  d, depth, heads = cfg["hidden_size"], cfg["num_layers"], cfg["num_heads"]
  patch, size = sizes.pair(cfg["patch_size"]), sizes.pair(cfg["image_size"])

  def distance(key):
    kd, kdepth, kheads, kpatch, ksize = key
    return ((kd, kdepth, kheads) != (d, depth, heads), patch != (kpatch, kpatch),
            size != (ksize, ksize), abs(math.log(kd / d)), kpatch, ksize)

  return ARCHITECTURES[min(ARCHITECTURES, key=distance)]


def state_dict(params, cfg, notes=None):
  """Our parameters -> {timm `VisionTransformer` state-dict name: numpy array}.

  The model of `dir_kwargs(cfg)`; the inverse of `to_ours`.
  """
  notes = [] if notes is None else notes
  cfg = core.full_config(cfg)
  flat = _exported_flat(params, cfg, notes)
  d = cfg["hidden_size"]
  used = set()

  def take(name):
    used.add(name)
    return flat[name]

  def rows(*names):  # (D, H, hd) kernels -> torch Linear rows, concatenated
    return np.concatenate([take(n).reshape(d, -1).T for n in names])

  def bias(*names):
    return np.concatenate([take(n).reshape(-1) for n in names])

  sd = {
      "patch_embed.proj.weight": take("embedding/kernel").transpose(3, 2, 0, 1),
      "patch_embed.proj.bias": take("embedding/bias"),
      "pos_embed": take(npz.POSEMB),
      "norm.weight": take("Transformer/encoder_norm/scale"),
      "norm.bias": take("Transformer/encoder_norm/bias"),
  }
  if "cls" in flat:
    sd["cls_token"] = take("cls")
  if "head/kernel" in flat:
    sd["head.weight"] = take("head/kernel").T
    sd["head.bias"] = take("head/bias")
  for i in range(cfg["num_layers"]):
    a, b, t = _ATTN.format(i=i), _BLOCK.format(i=i), f"blocks.{i}."
    qkv = [f"{a}{name}/" for name in ("query", "key", "value")]
    sd[t + "attn.qkv.weight"] = rows(*(n + "kernel" for n in qkv))
    if cfg["qkv_bias"]:
      sd[t + "attn.qkv.bias"] = bias(*(n + "bias" for n in qkv))
    sd[t + "attn.proj.weight"] = take(a + "out/kernel").reshape(-1, d).T
    sd[t + "attn.proj.bias"] = take(a + "out/bias")
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      sd[f"{t}{theirs}.weight"] = take(f"{b}{ours}/scale")
      sd[f"{t}{theirs}.bias"] = take(f"{b}{ours}/bias")
    for r in range(2):
      sd[f"{t}mlp.fc{r + 1}.weight"] = take(f"{b}MlpBlock_3/Dense_{r}/kernel").T
      sd[f"{t}mlp.fc{r + 1}.bias"] = take(f"{b}MlpBlock_3/Dense_{r}/bias")
  if cfg["classifier"] == "map":
    p = "attn_pool."
    sd[p + "latent"] = take(_MAP + "probe")
    sd[p + "q.weight"] = rows(_MAP_ATTN + "query/kernel")
    sd[p + "q.bias"] = bias(_MAP_ATTN + "query/bias")
    sd[p + "kv.weight"] = rows(_MAP_ATTN + "key/kernel", _MAP_ATTN + "value/kernel")
    sd[p + "kv.bias"] = bias(_MAP_ATTN + "key/bias", _MAP_ATTN + "value/bias")
    sd[p + "proj.weight"] = take(_MAP_ATTN + "out/kernel").reshape(-1, d).T
    sd[p + "proj.bias"] = take(_MAP_ATTN + "out/bias")
    sd[p + "norm.weight"] = take(_MAP + "LayerNorm_0/scale")
    sd[p + "norm.bias"] = take(_MAP + "LayerNorm_0/bias")
    for r in range(2):
      sd[f"{p}mlp.fc{r + 1}.weight"] = take(f"{_MAP}MlpBlock_0/Dense_{r}/kernel").T
      sd[f"{p}mlp.fc{r + 1}.bias"] = take(f"{_MAP}MlpBlock_0/Dense_{r}/bias")
  unused = sorted(set(flat) - used)
  if unused:  # Every parameter of a model `check` accepts has a place in timm.
    raise core.Unsupported(f"no timm VisionTransformer tensor for {_listing(unused)}")
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def dir_kwargs(cfg):
  """`kwargs(cfg)` with the model's own `qkv_bias` (no zero biases to carry)."""
  return dict(kwargs(cfg), qkv_bias=bool(core.full_config(cfg)["qkv_bias"]))


def hub_config(cfg, kw, labels=None):
  """The `config.json` timm reads for a local pretrained model (see the module doc)."""
  cfg = core.full_config(cfg)
  c, (h, w), k = cfg["num_channels"], sizes.pair(cfg["image_size"]), cfg["num_classes"]
  config = dict(
      architecture=architecture_name(cfg),
      num_classes=k,
      num_features=cfg["hidden_size"],
      global_pool=kw["global_pool"],
  )
  if labels is not None:
    if len(labels) != k:
      raise ValueError(f"{len(labels)} labels given for a head of {k} classes")
    config["label_names"] = [str(n) for n in labels]
  config["model_args"] = kw
  config["pretrained_cfg"] = dict(
      input_size=[c, h, w],
      fixed_input_size=True,
      interpolation="bilinear",
      crop_pct=1.0,
      crop_mode="center",
      mean=[0.5] * c,
      std=[0.5] * c,
      num_classes=k,
      first_conv="patch_embed.proj",
      classifier="head",
      custom_load=False,
  )
  return config


def export_dir(params, cfg, out_dir, labels=None):
  """Writes `out_dir/model.safetensors` + `out_dir/config.json` (see the module doc).

  Returns:
    (kwargs, config, notes).
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  notes = []
  cfg = core.full_config(cfg)
  kw = dir_kwargs(cfg)
  sd = state_dict(params, cfg, notes)
  config = hub_config(cfg, kw, labels)
  os.makedirs(out_dir, exist_ok=True)
  save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  return kw, config, notes


def hub_dir_config(path):
  """config.json of a timm local pretrained model directory, or None (not one)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    return None
  try:
    with open(cfg_path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  if isinstance(config, dict) and "architecture" in config and (
      "pretrained_cfg" in config or "model_args" in config):
    return config
  return None


def _to_flat(take, has, d, heads, depth, norm="norm"):
  """timm names -> our flat parameters; `take(name)` reads (and marks) a tensor."""
  hd = d // heads
  flat = {
      "embedding/kernel": take("patch_embed.proj.weight").transpose(2, 3, 1, 0),
      "embedding/bias": take("patch_embed.proj.bias"),
      "Transformer/encoder_norm/scale": take(f"{norm}.weight"),
      "Transformer/encoder_norm/bias": take(f"{norm}.bias"),
  }
  if has("pos_embed"):
    flat[npz.POSEMB] = take("pos_embed")
  if has("cls_token"):
    flat["cls"] = take("cls_token")
  if has("head.weight"):
    flat["head/kernel"] = take("head.weight").T
    flat["head/bias"] = take("head.bias")
  for i in range(depth):
    a, b, t = _ATTN.format(i=i), _BLOCK.format(i=i), f"blocks.{i}."
    qkv_w = take(t + "attn.qkv.weight")
    qkv_b = take(t + "attn.qkv.bias") if has(t + "attn.qkv.bias") else None
    for j, name in enumerate(("query", "key", "value")):
      flat[f"{a}{name}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
      if qkv_b is not None:
        flat[f"{a}{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(heads, hd)
    flat[a + "out/kernel"] = take(t + "attn.proj.weight").T.reshape(heads, hd, d)
    flat[a + "out/bias"] = take(t + "attn.proj.bias")
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
      flat[f"{b}{ours}/scale"] = take(f"{t}{theirs}.weight")
      flat[f"{b}{ours}/bias"] = take(f"{t}{theirs}.bias")
    for r in range(2):
      flat[f"{b}MlpBlock_3/Dense_{r}/kernel"] = take(f"{t}mlp.fc{r + 1}.weight").T
      flat[f"{b}MlpBlock_3/Dense_{r}/bias"] = take(f"{t}mlp.fc{r + 1}.bias")
  if has("attn_pool.latent"):
    p = "attn_pool."
    flat[_MAP + "probe"] = take(p + "latent")
    flat[_MAP_ATTN + "query/kernel"] = take(p + "q.weight").T.reshape(d, heads, hd)
    flat[_MAP_ATTN + "query/bias"] = take(p + "q.bias").reshape(heads, hd)
    kv_w, kv_b = take(p + "kv.weight"), take(p + "kv.bias")
    for j, name in enumerate(("key", "value")):
      flat[f"{_MAP_ATTN}{name}/kernel"] = kv_w[j * d:(j + 1) * d].T.reshape(d, heads, hd)
      flat[f"{_MAP_ATTN}{name}/bias"] = kv_b[j * d:(j + 1) * d].reshape(heads, hd)
    flat[_MAP_ATTN + "out/kernel"] = take(p + "proj.weight").T.reshape(heads, hd, d)
    flat[_MAP_ATTN + "out/bias"] = take(p + "proj.bias")
    flat[_MAP + "LayerNorm_0/scale"] = take(p + "norm.weight")
    flat[_MAP + "LayerNorm_0/bias"] = take(p + "norm.bias")
    for r in range(2):
      flat[f"{_MAP}MlpBlock_0/Dense_{r}/kernel"] = take(f"{p}mlp.fc{r + 1}.weight").T
      flat[f"{_MAP}MlpBlock_0/Dense_{r}/bias"] = take(f"{p}mlp.fc{r + 1}.bias")
  return flat


def to_ours(sd, kw):
  """timm state dict (numpy) -> our flat parameters (to check what timm holds)."""
  return _to_flat(sd.__getitem__, sd.__contains__, kw["embed_dim"], kw["num_heads"],
                  kw["depth"])


# ---------------------------------------------------------------------------------
# Import: a timm VisionTransformer state dict (.safetensors / weights-only torch file)
# ---------------------------------------------------------------------------------

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# State-dict names of timm features our VisionTransformer cannot express, with why.
_REFUSED_KEYS = (
    (r"^reg_token$", "register tokens (reg_tokens > 0, `reg_token`)",
     "our VisionTransformer has one prefix (cls) token at most"),
    (r"\.ls[12]\.gamma$", "layer scale (init_values, `blocks.i.ls1.gamma`)",
     "our blocks have no per-channel scale on the residual branches"),
    (r"^norm_pre\.", "pre_norm=True (`norm_pre`)",
     "our encoder has no LayerNorm before the blocks"),
    (r"\.attn\.[qk]_norm\.", "qk_norm=True (`attn.q_norm`)",
     "our attention does not normalise queries and keys"),
    (r"\.attn\.norm\.", "scale_attn_norm=True (`attn.norm`)",
     "our attention has no norm before its output projection"),
    (r"\.mlp\.norm\.", "scale_mlp_norm=True (`mlp.norm`)",
     "our MLP has no norm inside"),
    (r"\.attn\.gate\.", "gated attention (`attn.gate`)", "our attention has no gate"),
    (r"^patch_embed\.norm\.", "a patch-embedding norm (`patch_embed.norm`)",
     "our patch embedding is a convolution only"),
    (r"^patch_embed\.backbone\.", "a hybrid CNN stem (`patch_embed.backbone`)",
     "timm's hybrid stems are not our BiT stem"),
    (r"^(dist_token|head_dist\.)", "a distillation token (`dist_token`, DeiT distilled)",
     "our VisionTransformer has one prefix (cls) token at most"),
    (r"^attn_pool\.pos_embed$", "a MAP head position table (`attn_pool.pos_embed`)",
     "our MAPHead has none"),
)


def is_weights_file(path):
  """True for a file that `--from` reads as a timm state dict (by its suffix)."""
  return os.path.isfile(path) and str(path).lower().endswith(WEIGHT_SUFFIXES)


def _refuse(feature, reason):
  raise core.Unsupported(f"{feature} cannot be expressed by our VisionTransformer: "
                         f"{reason}; keep the model in timm")


def _sniff(path):
  """'safetensors', 'torch' (zip or pickle written by torch.save) or None."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(16)
  if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
    return "safetensors", head
  if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
    return "torch", head
  return None, head


def _to_numpy(sd, path):
  import torch  # pylint: disable=g-import-not-at-top
  if isinstance(sd, dict) and not any(torch.is_tensor(v) for v in sd.values()):
    for key in ("state_dict", "model"):
      if isinstance(sd.get(key), dict):
        sd = sd[key]
        break
  if not isinstance(sd, dict) or not sd:
    raise errors.Error(f"{path} holds a {type(sd).__name__}, not a state dict "
                       "({name: tensor}, e.g. model.state_dict())")
  bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
  if bad:
    raise errors.Error(f"{path} is not a state dict: {', '.join(map(str, bad[:5]))} "
                       "are not tensors")
  return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in sd.items()}


def read_state_dict(path):
  """{name: float32 numpy} of a .safetensors file or a weights-only torch file.

  Nothing is unpickled: torch files go through `torch.load(weights_only=True)`,
  safetensors through `safetensors`.
  """
  kind, head = _sniff(path)
  if kind == "safetensors":
    from safetensors.torch import load_file  # pylint: disable=g-import-not-at-top
    try:
      sd = load_file(str(path), device="cpu")
    except Exception as e:  # pylint: disable=broad-except
      raise errors.Error(f"{path} is not a readable safetensors file "
                         f"({errors.first_line(e)})") from None
  elif kind == "torch":
    import torch  # pylint: disable=g-import-not-at-top
    try:
      sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
      what = f" such as {found.group(1)}" if found else ""
      raise errors.Error(
          f"{path} is not a weights-only PyTorch file: it holds Python objects{what} "
          "besides tensors, and is never unpickled; save model.state_dict() with "
          "torch.save or safetensors") from None
    except Exception as e:  # pylint: disable=broad-except
      reason = re.split(r"(?<=[.])\s", str(e).strip(), maxsplit=1)[0]
      raise errors.Error(f"{path} is not a readable PyTorch file written by torch.save "
                         f"({type(e).__name__}: {reason})") from None
  else:
    raise errors.Error(
        f"{path} is neither a safetensors file nor a PyTorch file written by "
        f"torch.save (it starts with {head[:12]!r})")
  return _to_numpy(sd, path)


def _read_kwargs(path):
  try:
    with open(path) as f:
      kw = json.load(f)
  except json.JSONDecodeError as e:
    raise errors.Error(f"--timm_kwargs={path} is not JSON ({e})") from None
  if not isinstance(kw, dict):
    raise errors.Error(f"--timm_kwargs={path} holds a {type(kw).__name__}, not a "
                       "JSON object of VisionTransformer kwargs")
  if "model" in kw and isinstance(kw["model"], dict):
    raise errors.Error(
        f"--timm_kwargs={path} is the model-fields JSON of --to=npz, not timm "
        "VisionTransformer kwargs (those are written by --to=timm)")
  return kw


def _check_kwargs(kw, model_name, what):
  import inspect  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as vt  # pylint: disable=g-import-not-at-top
  valid = set(inspect.signature(vt.VisionTransformer.__init__).parameters) - {"self"}
  unknown = sorted(set(kw) - valid)
  if unknown:
    raise errors.Error(f"{what}: unknown VisionTransformer kwarg(s) {unknown}")
  default_pool = None if model_name else "token"  # a named model has its own default
  if kw.get("class_token") is False and kw.get("global_pool", default_pool) == "token":
    _refuse("class_token=False with global_pool='token'",
            "token pooling needs the cls token (use global_pool 'avg' or 'map')")
  if kw.get("reg_tokens"):
    _refuse(f"register tokens (reg_tokens={kw['reg_tokens']})",
            "our VisionTransformer has one prefix (cls) token at most")
  if kw.get("init_values"):  # timm adds layer scale for a non-zero value
    _refuse(f"layer scale (init_values={kw['init_values']})",
            "our blocks have no per-channel scale on the residual branches")
  for flag, reason in (("pre_norm", "our encoder has no LayerNorm before the blocks"),
                       ("qk_norm", "our attention does not normalise queries and keys"),
                       ("dynamic_img_size", "our model is built for one image size "
                        "and resamples its position table differently"),
                       ("dynamic_img_pad", "our patch embedding does not pad")):
    if kw.get(flag):
      _refuse(f"{flag}=True", reason)


def _create(model_name, kw, what):
  _check_kwargs(kw, model_name, what)
  # The file's tensors replace every parameter: skip timm's (slow) random init.
  build_kw = dict(kw, weight_init=kw.get("weight_init", "skip"))
  try:
    if model_name:
      import timm  # pylint: disable=g-import-not-at-top
      return timm.create_model(model_name, pretrained=False, **build_kw)
    from timm.models import vision_transformer as vt  # pylint: disable=g-import-not-at-top
    return vt.VisionTransformer(**build_kw)
  except (RuntimeError, TypeError, AssertionError, ValueError, KeyError) as e:
    raise errors.Error(f"timm could not build {what} with {kw}: "
                       f"{errors.first_line(e)}") from None


def _is_identity(module):
  import torch  # pylint: disable=g-import-not-at-top
  return module is None or isinstance(module, torch.nn.Identity)


def _exactly(module, cls):
  """The class itself: a subclass may compute something else."""
  return type(module) is cls  # pylint: disable=unidiomatic-typecheck


def _act(module):
  import torch  # pylint: disable=g-import-not-at-top
  from timm.layers import activations  # pylint: disable=g-import-not-at-top
  if isinstance(module, activations.GELUTanh):
    return "gelu_tanh"
  if isinstance(module, activations.GELU):
    return "gelu"
  if isinstance(module, torch.nn.GELU):
    return "gelu_tanh" if module.approximate == "tanh" else "gelu"
  _refuse(f"act_layer {type(module).__name__}", "our MLPs use GELU (exact or tanh)")


def _eps(module, name):
  import torch  # pylint: disable=g-import-not-at-top
  if (not isinstance(module, torch.nn.LayerNorm) or not module.elementwise_affine
      or module.bias is None):
    _refuse(f"norm_layer {type(module).__name__} ({name})",
            "our norms are LayerNorms with scale and bias")
  return float(module.eps)


def model_fields(model, notes):
  """Our VisionTransformer fields for a timm VisionTransformer, or `core.Unsupported`."""
  from timm import layers  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer as vt  # pylint: disable=g-import-not-at-top
  if not _exactly(model, vt.VisionTransformer):
    _refuse(f"timm {type(model).__name__}", "only timm's VisionTransformer itself is read")
  if model.num_reg_tokens:
    _refuse(f"register tokens (reg_tokens={model.num_reg_tokens})",
            "our VisionTransformer has one prefix (cls) token at most")
  if not _is_identity(model.norm_pre):
    _refuse("pre_norm=True", "our encoder has no LayerNorm before the blocks")
  if model.dynamic_img_size:
    _refuse("dynamic_img_size=True", "our model is built for one image size and "
            "resamples its position table differently")
  pe = model.patch_embed
  if (not _exactly(pe, layers.PatchEmbed) or not _is_identity(pe.norm)
      or getattr(pe, "dynamic_img_pad", False) or pe.proj.bias is None
      or not pe.flatten):
    _refuse(f"patch embedding {type(pe).__name__} (norm, padding or no bias)",
            "ours is a strided convolution with bias")
  eps = {}
  acts = set()
  blocks = list(model.blocks)
  for i, blk in enumerate(blocks):
    if not _exactly(blk, vt.Block):
      _refuse(f"block_fn {type(blk).__name__}", "our blocks are pre-LN Blocks")
    if not (_is_identity(blk.ls1) and _is_identity(blk.ls2)):
      _refuse("layer scale (init_values)",
              "our blocks have no per-channel scale on the residual branches")
    attn, mlp = blk.attn, blk.mlp
    if not _exactly(attn, layers.Attention):
      _refuse(f"attn_layer {type(attn).__name__}", "ours is plain multi-head attention")
    if not (_is_identity(attn.q_norm) and _is_identity(attn.k_norm)):
      _refuse("qk_norm=True", "our attention does not normalise queries and keys")
    if not _is_identity(attn.norm):
      _refuse("scale_attn_norm=True", "our attention has no norm before its output")
    if getattr(attn, "gate", None) is not None:
      _refuse("gated attention", "our attention has no gate")
    if not _exactly(mlp, layers.Mlp) or not _is_identity(mlp.norm):
      _refuse(f"mlp_layer {type(mlp).__name__} (or scale_mlp_norm)",
              "ours is Dense -> GELU -> Dense")
    if attn.proj.bias is None or mlp.fc1.bias is None or mlp.fc2.bias is None:
      _refuse("proj_bias=False", "our output and MLP projections have biases")
    acts.add(_act(mlp.act))
    eps[f"blocks.{i}.norm1"] = _eps(blk.norm1, f"blocks.{i}.norm1")
    eps[f"blocks.{i}.norm2"] = _eps(blk.norm2, f"blocks.{i}.norm2")
  attn0 = blocks[0].attn
  qkv_bias = {blk.attn.qkv.bias is not None for blk in blocks}
  if len(qkv_bias) > 1:
    _refuse("qkv biases in some blocks only", "qkv_bias is one field of ours")

  # Pooling: which tokens, and where the final LayerNorm sits.
  pool, cls = model.global_pool, model.cls_token is not None
  final_norm, fc_norm = not _is_identity(model.norm), not _is_identity(model.fc_norm)
  if not final_norm and not fc_norm:
    _refuse("final_norm=False", "our encoder always ends with a LayerNorm")
  if pool == "token":
    classifier = "token"  # fc_norm on the cls token == the final norm on all tokens
  elif pool == "" and not cls:
    classifier = "unpooled"  # a per-token norm, before or after (no) pooling
  elif pool == "avg" and not cls and not fc_norm:
    classifier = "gap"
  elif pool == "map" and not cls and not fc_norm:
    classifier = "map"
  elif pool in ("avg", "map", "") and cls:
    _refuse(f"global_pool={pool!r} with class_token=True",
            f"our {'gap' if pool == 'avg' else pool or 'unpooled'} models have no cls token")
  elif pool in ("avg", "map") and fc_norm:
    _refuse(f"fc_norm=True with global_pool={pool!r} (the LayerNorm after pooling)",
            "ours normalises the tokens, then pools")
  else:
    _refuse(f"global_pool={pool!r}", "ours pools by 'token', 'avg' or 'map' (or not)")
  eps["norm" if final_norm else "fc_norm"] = _eps(
      model.norm if final_norm else model.fc_norm, "norm")
  if classifier == "map":
    ap = model.attn_pool
    if (not _exactly(ap, layers.AttentionPoolLatent) or ap.latent_len != 1
        or ap.pos_embed is not None or ap.pool != "token" or ap.mlp is None
        or not _is_identity(ap.q_norm) or ap.num_heads != attn0.num_heads
        or ap.latent.shape[-1] != model.embed_dim):
      _refuse(f"attention pooling {type(ap).__name__} (latent_len, pos_embed, "
              "qk_norm or heads)", "our MAPHead has one probe and the encoder's heads")
    if ap.mlp.fc1.out_features != blocks[0].mlp.fc1.out_features:
      _refuse("a MAP head MLP of another width", "our MAPHead uses the blocks' mlp_dim")
    acts.add(_act(ap.mlp.act))
    eps["attn_pool.norm"] = _eps(ap.norm, "attn_pool.norm")
  if len(acts) > 1:
    _refuse(f"activations {sorted(acts)} mixed", "hidden_act is one field of ours")
  if len(set(eps.values())) > 1:
    _refuse(f"LayerNorm eps {sorted(set(eps.values()))} mixed",
            "layer_norm_eps is one field of ours")
  head = model.head
  if not _is_identity(head) and (not hasattr(head, "weight") or head.bias is None):
    _refuse(f"head {type(head).__name__}", "ours is a Dense layer with bias")
  if model.pos_embed is None:
    posemb = "none"
  else:
    posemb = "learn"
    if model.no_embed_class and cls:
      notes.append("no_embed_class=True: the cls token has no position in timm; "
                   "written as a zero row for it in our position table (exact)")

  def size(value):
    h, w = sizes.pair(tuple(value))
    return h if h == w else (h, w)

  return dict(
      num_classes=0 if _is_identity(head) else head.out_features,
      patch_size=size(pe.patch_size),
      hidden_size=model.embed_dim,
      num_layers=len(blocks),
      num_heads=attn0.num_heads,
      mlp_dim=blocks[0].mlp.fc1.out_features,
      image_size=size(pe.img_size),
      num_channels=pe.proj.in_channels,
      classifier=classifier,
      posemb=posemb,
      representation_size=None,
      qkv_bias=qkv_bias.pop(),
      hidden_act=acts.pop(),
      layer_norm_eps=next(iter(eps.values())),
      use_mask_token=False,
      decoder=False,
      resnet=None,
  )


def _listing(names, n=5):
  names = sorted(names)
  more = f" and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def _refuse_keys(sd):
  for pattern, feature, reason in _REFUSED_KEYS:
    if any(re.search(pattern, k) for k in sd):
      _refuse(feature, reason)


def _check_against(sd, model, what):
  """The file must hold exactly the model's tensors, with its shapes."""
  theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  extra = set(sd) - set(theirs)
  if extra:
    raise errors.Error(
        f"{what} has {len(extra)} key(s) that {type(model).__name__} built from the "
        f"given kwargs does not have and that are not mapped: {_listing(extra)}")
  missing = set(theirs) - set(sd)
  if missing:
    raise errors.Error(f"{what} lacks {len(missing)} tensor(s) of the timm model: "
                       f"{_listing(missing)} (is it the model's state dict?)")
  shapes = [f"{k} {tuple(sd[k].shape)} vs model {theirs[k]}" for k in sorted(sd)
            if tuple(sd[k].shape) != theirs[k]]
  if shapes:
    raise errors.Error(f"{what}: {len(shapes)} shape(s) differ from the timm model "
                       f"built from the given kwargs: {'; '.join(shapes[:3])} (pass "
                       "--image_size, or the kwargs it was built with)")


def import_params(sd, model, cfg, what="state dict"):
  """timm state dict (numpy) -> our flat parameters; every tensor must be mapped."""
  used = set()

  def take(name):
    if name not in sd:
      raise errors.Error(f"{what} has no {name!r}")
    used.add(name)
    return np.asarray(sd[name], np.float32)

  norm = "fc_norm" if _is_identity(model.norm) else "norm"
  flat = _to_flat(take, sd.__contains__, cfg["hidden_size"], cfg["num_heads"],
                  cfg["num_layers"], norm=norm)
  unmapped = set(sd) - used
  if unmapped:
    raise errors.Error(f"{what} has {len(unmapped)} key(s) not mapped to our "
                       f"parameters: {_listing(unmapped)}")
  if npz.POSEMB in flat and model.no_embed_class and "cls" in flat:
    table = flat[npz.POSEMB]
    flat[npz.POSEMB] = np.concatenate(
        [np.zeros((1, 1, table.shape[-1]), np.float32), table], axis=1)
  return flat


class Source:
  """A timm checkpoint read for conversion: the model it was built as and its tensors."""

  def __init__(self, model, sd, kwargs, model_name):
    self.model, self.sd, self.kwargs, self.model_name = model, sd, kwargs, model_name


def read(path, model_name=None, kwargs_file=None, image_size=None, kwargs=None):
  """Reads a timm state-dict file.

  Args:
    path: .safetensors, or a torch file (.pth/.pt/.bin) loadable weights-only.
    model_name: timm name (`timm.create_model(name, pretrained=False, ...)`).
    kwargs_file: JSON of VisionTransformer kwargs (what `--to=timm` writes), applied
      over the named model's defaults when both are given.
    image_size: optional int or (h, w): `img_size` of the timm model. Without it the
      kwargs' size is used, or a square grid read off `pos_embed` when that differs.
    kwargs: VisionTransformer kwargs as a dict (a directory's `model_args`), in
      place of `kwargs_file`.

  Returns:
    (our flat params, our model fields, notes, Source).
  """
  if not model_name and not kwargs_file and kwargs is None:
    raise errors.Error(
        f"{path} is read as a timm state dict: name the timm model it belongs to with "
        "--timm_model=NAME (e.g. vit_small_patch16_224) or --timm_kwargs=FILE.json "
        "(a Hugging Face ViT is read from its directory)")
  sd = read_state_dict(path)
  _refuse_keys(sd)
  kw = _read_kwargs(kwargs_file) if kwargs_file else dict(kwargs or {})
  if image_size is not None:
    kw["img_size"] = _size(image_size)
  if "num_classes" not in kw:
    kw["num_classes"] = int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0
  what = f"model {model_name!r}" if model_name else "VisionTransformer"
  model = _create(model_name, kw, what)
  if ("img_size" not in kw and getattr(model, "pos_embed", None) is not None
      and "pos_embed" in sd and tuple(sd["pos_embed"].shape) != tuple(model.pos_embed.shape)):
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    n = sd["pos_embed"].shape[1] - prefix
    side = math.isqrt(max(n, 0))
    if side * side != n:
      raise errors.Error(f"{path}: pos_embed has {n} grid positions, not a square "
                         "grid: pass --image_size=H,W")
    ph, pw = sizes.pair(tuple(model.patch_embed.patch_size))
    kw["img_size"] = side * ph if ph == pw else [side * ph, side * pw]
    model = _create(model_name, kw, what)
  notes = []
  cfg = model_fields(model, notes)
  _check_against(sd, model, str(path))
  flat = import_params(sd, model, cfg, str(path))
  return flat, cfg, notes, Source(model, sd, kw, model_name)


# The weight files timm's `local-dir:` loader looks for first, in its order.
DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def read_dir(path, image_size=None):
  """Reads a timm local pretrained model directory (config.json + weights).

  The model is `config["architecture"]` built with `config["model_args"]`, as
  `timm.create_model("local-dir:" + path)` builds it.

  Returns:
    (our flat params, our model fields, notes, Source, labels or None).
  """
  config = hub_dir_config(path)
  if config is None:
    raise errors.Error(f"{path} is not a timm model directory (config.json with "
                       "`architecture`)")
  weights = [os.path.join(path, n) for n in DIR_WEIGHTS
             if os.path.isfile(os.path.join(path, n))]
  if not weights:
    raise errors.Error(f"{path} has a timm config.json but none of "
                       f"{', '.join(DIR_WEIGHTS)}")
  kw = config.get("model_args") or {}
  if not isinstance(kw, dict):
    raise errors.Error(f"{path}/config.json: model_args is not a JSON object")
  flat, cfg, notes, source = read(weights[0], model_name=config["architecture"],
                                  image_size=image_size, kwargs=kw)
  labels = config.get("label_names") or (config.get("pretrained_cfg") or {}).get(
      "label_names")
  if isinstance(labels, dict):
    labels = [labels[k] for k in sorted(labels, key=int)]
  if labels is not None and len(labels) != cfg["num_classes"]:
    labels = None
  return flat, cfg, notes, source, labels
