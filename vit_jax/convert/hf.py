"""Hugging Face `transformers` ViT: export (config.json + model.safetensors +
preprocessor_config.json) and import.

Three classes can hold our models (docs/design.md §5):
  * `ViTForImageClassification`: token pooling with a head (`classifier`);
  * `ViTModel`: no head; with our representation layer as its tanh pooler, or
    without a pooler (load with `add_pooling_layer=False`);
  * `ViTForMaskedImageModeling`: mask token + SimMIM decoder (1x1 conv + pixel shuffle).
Files use the 4.x parameter names, which transformers 4.x and 5.x both load. HF ViT
has a cls token and N+1 positions hard-wired and no hybrid stem: gap / MAP pooling
and hybrids are refused (timm, or the .npz, can take them). Import reads directories
whose config.json says `model_type: vit`, weights from model.safetensors or a
weights-only pytorch_model.bin (nothing is unpickled); another model type (DeiT,
BEiT, ...) and a damaged or pickled weights file are one-line errors.

`preprocessor_config.json` holds the project's evaluation preprocessing for
`ViTImageProcessor` (and so for `transformers.pipeline("image-classification",
model=DIR)`): resize to the model's (height, width) with PIL's bilinear filter
(`resample` 2), then `(x / 255 - 0.5) / 0.5`, i.e. `(x - 127.5) / 127.5`, per
channel. For images of the model's aspect ratio that is what
`vit_jax.data.preprocess.eval_batch` computes (which crops the central box of that
aspect ratio first: other images are squashed here, cropped there). A 1-channel
model gets one mean and std; transformers' pipeline turns PIL images and paths into
RGB, so such a model takes uint8 arrays (H, W, 1) there.
"""

import json
import os
import pickle
import re
import warnings

import numpy as np

from vit_jax import errors
from vit_jax import npz
from vit_jax import sizes
from vit_jax.convert import core

CLASSIFICATION = "ViTForImageClassification"
MODEL = "ViTModel"
MIM = "ViTForMaskedImageModeling"
ARCHITECTURES = (CLASSIFICATION, MODEL, MIM)

ACTS = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
# HF activation names -> ours ("gelu_new" is the same tanh formula).
ACTS_FROM_HF = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu": "gelu"}

# transformers 5.x in-memory names -> the 4.x names used in files.
_V5_RENAMES = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
)

_BLOCK = "Transformer/encoderblock_{i}/"
_ATTN = _BLOCK + "MultiHeadDotProductAttention_1/"


def architecture(cfg):
  """The HF class for model fields `cfg`, or `core.Unsupported` saying why none fits."""
  core.refuse_relative(cfg, "transformers ViTModel")
  if cfg.get("resnet"):
    raise core.Unsupported(
        "HF ViT has no hybrid ResNet stem (ViTHybrid is a different model): a "
        "hybrid cannot be expressed there; keep the .npz (--to=npz)")
  if cfg["classifier"] in ("gap", "map"):
    raise core.Unsupported(
        f"HF ViT has a cls token and N+1 positions hard-wired: "
        f"{cfg['classifier']} pooling cannot be expressed there; use --to=timm")
  if cfg["decoder"]:
    if cfg["classifier"] != "token":
      raise core.Unsupported(
          "HF ViTForMaskedImageModeling has a cls token hard-wired: a MIM model "
          f"with classifier={cfg['classifier']!r} cannot be expressed; keep the .npz")
    h, w = core.grid(cfg)
    ph, pw = sizes.pair(cfg["patch_size"])
    if h != w or ph != pw:
      raise core.Unsupported(
          "HF ViTForMaskedImageModeling reshapes the tokens to a square grid: a "
          f"{h}x{w} patch grid (patch {ph}x{pw}) cannot be expressed there; keep "
          "the .npz (--to=npz)")
    return MIM
  if cfg["classifier"] == "unpooled":
    if cfg["representation_size"]:
      raise core.Unsupported(
          "HF ViTModel's pooler reads the cls token only: a representation layer "
          "over unpooled tokens cannot be expressed; keep the .npz")
    return MODEL
  if cfg["representation_size"]:
    return MODEL
  return CLASSIFICATION if cfg["num_classes"] else MODEL


def has_pooler(cfg, arch):
  return arch == MODEL and bool(cfg["representation_size"])


def load_kwargs(cfg, arch):
  """Keyword arguments `from_pretrained` needs to load the export exactly."""
  if arch == MODEL and not has_pooler(cfg, arch):
    return {"add_pooling_layer": False}
  return {}


def _size(value):
  h, w = sizes.pair(value)
  return h if h == w else [h, w]


def config_dict(cfg, arch, labels=None):
  """The config.json contents for model fields `cfg`."""
  act = cfg["hidden_act"]
  if act not in ACTS:
    raise core.Unsupported(f"hidden_act {act!r} has no HF equivalent")
  stride = sizes.pair(cfg["patch_size"])[0]
  config = dict(
      architectures=[arch],
      model_type="vit",
      hidden_size=cfg["hidden_size"],
      num_hidden_layers=cfg["num_layers"],
      num_attention_heads=cfg["num_heads"],
      intermediate_size=cfg["mlp_dim"],
      hidden_act=ACTS[act],
      hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
      initializer_range=0.02,
      layer_norm_eps=float(cfg["layer_norm_eps"]),
      image_size=_size(cfg["image_size"]),
      patch_size=_size(cfg["patch_size"]),
      num_channels=cfg["num_channels"],
      qkv_bias=bool(cfg["qkv_bias"]),
      encoder_stride=stride,
      pooler_output_size=cfg["representation_size"] or cfg["hidden_size"],
      pooler_act="tanh",
      torch_dtype="float32",
  )
  if arch == CLASSIFICATION:
    k = cfg["num_classes"]
    if labels is not None and len(labels) != k:
      raise ValueError(f"{len(labels)} labels given for a head of {k} classes")
    names = [str(l) for l in labels] if labels is not None else [
        f"LABEL_{i}" for i in range(k)]
    config["id2label"] = {str(i): n for i, n in enumerate(names)}
    config["label2id"] = {n: i for i, n in enumerate(names)}
    if k == 1:
      config["problem_type"] = "regression"
  return config


# PIL.Image.BILINEAR: the filter `vit_jax.data.preprocess.resize` reproduces.
PIL_BILINEAR = 2


def preprocessor_config(cfg):
  """preprocessor_config.json contents: the project's evaluation preprocessing."""
  h, w = sizes.pair(cfg["image_size"])
  c = cfg["num_channels"]
  return dict(
      image_processor_type="ViTImageProcessor",
      do_resize=True,
      size=dict(height=h, width=w),
      resample=PIL_BILINEAR,
      do_rescale=True,
      rescale_factor=1 / 255,
      do_normalize=True,
      image_mean=[0.5] * c,
      image_std=[0.5] * c,
      do_convert_rgb=c == 3,
  )


def preprocessor_notes(cfg):
  """What a user of the exported processor needs to know about its inputs."""
  c = cfg["num_channels"]
  if c == 3:
    return []
  example = ("np.array(PIL.Image.open(f).convert('L'))[..., None]" if c == 1
             else f"uint8 arrays (H, W, {c})")
  return [f"a {c}-channel model: transformers' pipeline converts PIL images and "
          f"paths to RGB; give it {example}"]


def state_dict(params, cfg, arch, notes=None):
  """Our parameters -> {HF file name: numpy array} for class `arch`."""
  notes = [] if notes is None else notes
  flat = core.fold_qk_scale(core.flat_params(params), cfg, notes)
  d = cfg["hidden_size"]
  p = "" if arch == MODEL else "vit."
  sd = {
      p + "embeddings.patch_embeddings.projection.weight":
          flat["embedding/kernel"].transpose(3, 2, 0, 1),
      p + "embeddings.patch_embeddings.projection.bias": flat["embedding/bias"],
      p + "embeddings.cls_token": flat["cls"],
      p + "embeddings.position_embeddings": core.position_table(flat, cfg),
      p + "layernorm.weight": flat["Transformer/encoder_norm/scale"],
      p + "layernorm.bias": flat["Transformer/encoder_norm/bias"],
  }
  if cfg["posemb"] != "learn":
    notes.append(f"posemb={cfg['posemb']!r} written as the values of "
                 "position_embeddings it adds")
  if arch == MIM:
    sd[p + "embeddings.mask_token"] = flat["mask_token"]
  elif "mask_token" in flat:
    notes.append(f"mask_token dropped: {arch} has none")
  for i in range(cfg["num_layers"]):
    a, b = _ATTN.format(i=i), _BLOCK.format(i=i)
    t = f"{p}encoder.layer.{i}."
    for name in ("query", "key", "value"):
      sd[f"{t}attention.attention.{name}.weight"] = flat[f"{a}{name}/kernel"].reshape(d, -1).T
      if cfg["qkv_bias"]:
        sd[f"{t}attention.attention.{name}.bias"] = flat[f"{a}{name}/bias"].reshape(-1)
    sd[t + "attention.output.dense.weight"] = flat[a + "out/kernel"].reshape(-1, d).T
    sd[t + "attention.output.dense.bias"] = flat[a + "out/bias"]
    for ours, theirs in (("LayerNorm_0", "layernorm_before"),
                         ("LayerNorm_2", "layernorm_after")):
      sd[f"{t}{theirs}.weight"] = flat[f"{b}{ours}/scale"]
      sd[f"{t}{theirs}.bias"] = flat[f"{b}{ours}/bias"]
    for ours, theirs in (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")):
      sd[f"{t}{theirs}.weight"] = flat[f"{b}MlpBlock_3/{ours}/kernel"].T
      sd[f"{t}{theirs}.bias"] = flat[f"{b}MlpBlock_3/{ours}/bias"]
  if has_pooler(cfg, arch):
    sd["pooler.dense.weight"] = flat["pre_logits/kernel"].T
    sd["pooler.dense.bias"] = flat["pre_logits/bias"]
  if arch == CLASSIFICATION:
    sd["classifier.weight"] = flat["head/kernel"].T
    sd["classifier.bias"] = flat["head/bias"]
  elif "head/kernel" in flat:
    notes.append(f"head ({flat['head/kernel'].shape[1]} classes) dropped: {arch} "
                 "has no classifier")
  if arch == MIM:
    sd["decoder.0.weight"] = flat["decoder/kernel"].transpose(3, 2, 0, 1)
    sd["decoder.0.bias"] = flat["decoder/bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def export(params, cfg, out_dir, labels=None):
  """Writes `out_dir/config.json`, `model.safetensors`, `preprocessor_config.json`.

  Returns:
    (architecture, notes): the HF class to load with and what the export changed.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg = core.full_config(cfg)
  arch = architecture(cfg)
  notes = []
  sd = state_dict(params, cfg, arch, notes)
  config = config_dict(cfg, arch, labels)
  notes += preprocessor_notes(cfg)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(preprocessor_config(cfg), f, indent=2)
  save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  return arch, notes


def _read_safetensors(path, directory):
  """{name: numpy array} of model.safetensors; a damaged file is an Error."""
  import safetensors  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except (safetensors.SafetensorError, OSError) as e:
    raise errors.Error(
        f"model.safetensors in {directory} is damaged "
        f"({errors.first_line(e, 200)}): "
        "write it again, e.g. model.save_pretrained(DIR)") from None


def _read_torch(path, directory):
  """{name: float32 numpy} of pytorch_model.bin, read weights-only.

  `torch.load(weights_only=True)` refuses anything but tensors and plain
  containers, so nothing is unpickled; a file it refuses or cannot read is an
  Error.
  """
  import torch  # pylint: disable=g-import-not-at-top
  fix = ("if you trust it, load it with transformers and save it as "
         "safetensors: model.save_pretrained(DIR, safe_serialization=True)")
  try:
    with warnings.catch_warnings():  # E.g. about the pickle protocol.
      warnings.simplefilter("ignore")
      sd = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    name = re.search(r"GLOBAL ([\w.]+)", str(e))
    opcode = re.search(r"Unsupported operand (\d+)", str(e))
    what = (f" (it refers to {name.group(1)})" if name else
            f" (pickle opcode {opcode.group(1)})" if opcode else "")
    raise errors.Error(
        f"{directory} holds pytorch_model.bin, a pickle that is not a "
        f"weights-only PyTorch file{what} and is never unpickled here; "
        f"{fix}") from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise errors.Error(
        f"pytorch_model.bin in {directory} is damaged "
        f"({errors.first_line(e, 200)}): "
        "download it again, or write it as safetensors from where it loads: "
        "model.save_pretrained(DIR, safe_serialization=True)") from None
  if not isinstance(sd, dict) or not all(
      torch.is_tensor(v) for v in sd.values()):
    raise errors.Error(
        f"pytorch_model.bin in {directory} is not a state dict ({{name: "
        f"tensor}}); {fix}")
  return {k: v.float().numpy() for k, v in sd.items()}


def read(path):
  """Reads an HF ViT directory -> ({name: numpy array}, config dict).

  The weights come from model.safetensors, else from pytorch_model.bin read
  weights-only (nothing is unpickled); a damaged or refused file is one
  `errors.Error`.
  """
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  st = os.path.join(path, "model.safetensors")
  if os.path.exists(st):
    return _read_safetensors(st, path), config
  bin_path = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(bin_path):
    return _read_torch(bin_path, path), config
  raise FileNotFoundError(
      f"{path} has config.json but neither model.safetensors nor pytorch_model.bin")


def model_type(path):
  """The `model_type` of DIR/config.json, or None (no such file or field: a
  training workdir's config.json has none)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    return None
  with open(cfg_path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError:
      return None
  return config.get("model_type") if isinstance(config, dict) else None


def is_hf_dir(path):
  """True for a directory holding an HF ViT config.json."""
  return model_type(path) == "vit"


def check_model_type(path):
  """An Error for a Hugging Face directory of another model type than ViT."""
  found = model_type(path)
  if found is None or found == "vit":
    return
  with open(os.path.join(path, "config.json")) as f:
    archs = json.load(f).get("architectures") or ()
  arch = f" ({', '.join(map(str, archs))})" if archs else ""
  raise errors.Error(
      f"{path} is a Hugging Face {found!r} model{arch}; convert reads 'vit' "
      f"({', '.join(ARCHITECTURES)}) directories")


def _canonical_names(sd):
  """Drops the `vit.` prefix and maps 5.x names to 4.x names."""
  out = {}
  for name, value in sd.items():
    if name.startswith("vit."):
      name = name[len("vit."):]
    for pattern, repl in _V5_RENAMES:
      name = re.sub(pattern, repl, name)
    out[name] = np.asarray(value, np.float32)
  return out


def _labels(config):
  id2label = config.get("id2label") or {}
  names = [id2label[k] for k in sorted(id2label, key=int)]
  if all(re.fullmatch(r"LABEL_\d+", n) for n in names):
    return None
  return names


def to_ours(sd, config):
  """HF state dict + config -> (our nested params, model fields, labels or None)."""
  sd = _canonical_names(sd)
  if CLASSIFICATION in config.get("architectures", ()):
    # ViTForImageClassification never applies a pooler: its weights, if any, are unused.
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
  d = config.get("hidden_size", 768)
  heads = config.get("num_attention_heads", 12)
  depth = config.get("num_hidden_layers", 12)
  act = config.get("hidden_act", "gelu")
  if act not in ACTS_FROM_HF:
    raise core.Unsupported(
        f"HF hidden_act {act!r} has no equivalent here: use 'gelu' or "
        "'gelu_pytorch_tanh'")
  if config.get("pooler_act", "tanh") != "tanh" and "pooler.dense.weight" in sd:
    raise core.Unsupported(
        f"HF pooler_act {config['pooler_act']!r}: our representation layer is tanh")
  used = set()

  def take(name):
    if name not in sd:
      raise ValueError(f"HF checkpoint has no {name!r} (names seen: "
                       f"{', '.join(sorted(sd)[:8])}, ...)")
    used.add(name)
    return sd[name]

  flat = {
      "embedding/kernel": take("embeddings.patch_embeddings.projection.weight").transpose(2, 3, 1, 0),
      "embedding/bias": take("embeddings.patch_embeddings.projection.bias"),
      "cls": take("embeddings.cls_token"),
      npz.POSEMB: take("embeddings.position_embeddings"),
      "Transformer/encoder_norm/scale": take("layernorm.weight"),
      "Transformer/encoder_norm/bias": take("layernorm.bias"),
  }
  qkv_bias = "encoder.layer.0.attention.attention.query.bias" in sd
  for i in range(depth):
    a, b, t = _ATTN.format(i=i), _BLOCK.format(i=i), f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      flat[f"{a}{name}/kernel"] = take(
          f"{t}attention.attention.{name}.weight").T.reshape(d, heads, d // heads)
      if qkv_bias:
        flat[f"{a}{name}/bias"] = take(
            f"{t}attention.attention.{name}.bias").reshape(heads, d // heads)
    flat[a + "out/kernel"] = take(t + "attention.output.dense.weight").T.reshape(
        heads, d // heads, d)
    flat[a + "out/bias"] = take(t + "attention.output.dense.bias")
    for ours, theirs in (("LayerNorm_0", "layernorm_before"),
                         ("LayerNorm_2", "layernorm_after")):
      flat[f"{b}{ours}/scale"] = take(f"{t}{theirs}.weight")
      flat[f"{b}{ours}/bias"] = take(f"{t}{theirs}.bias")
    for ours, theirs in (("Dense_0", "intermediate.dense"), ("Dense_1", "output.dense")):
      flat[f"{b}MlpBlock_3/{ours}/kernel"] = take(f"{t}{theirs}.weight").T
      flat[f"{b}MlpBlock_3/{ours}/bias"] = take(f"{t}{theirs}.bias")
  optional = (("embeddings.mask_token", "mask_token", None),
              ("pooler.dense.weight", "pre_logits/kernel", "T"),
              ("pooler.dense.bias", "pre_logits/bias", None),
              ("classifier.weight", "head/kernel", "T"),
              ("classifier.bias", "head/bias", None),
              ("decoder.0.weight", "decoder/kernel", "conv"),
              ("decoder.0.bias", "decoder/bias", None))
  for theirs, ours, how in optional:
    if theirs in sd:
      v = take(theirs)
      flat[ours] = v.T if how == "T" else v.transpose(2, 3, 1, 0) if how == "conv" else v
  unused = sorted(set(sd) - used)
  if unused:
    raise ValueError(f"HF checkpoint has parameters that are not part of a ViT: "
                     f"{', '.join(unused)}")
  cfg = dict(
      hidden_size=d, num_layers=depth, num_heads=heads,
      mlp_dim=config.get("intermediate_size", 3072),
      patch_size=_size(config.get("patch_size", 16)),
      image_size=_size(config.get("image_size", 224)),
      num_channels=config.get("num_channels", 3),
      classifier="token", posemb="learn",
      representation_size=(flat["pre_logits/kernel"].shape[1]
                           if "pre_logits/kernel" in flat else None),
      num_classes=flat["head/kernel"].shape[1] if "head/kernel" in flat else 0,
      qkv_bias=qkv_bias,
      hidden_act=ACTS_FROM_HF[act],
      layer_norm_eps=config.get("layer_norm_eps", 1e-12),
      use_mask_token="mask_token" in flat,
      decoder="decoder/kernel" in flat,
  )
  for key in ("image_size", "patch_size"):
    if isinstance(cfg[key], list):
      cfg[key] = tuple(cfg[key])
  return npz.unflatten(flat), cfg, _labels(config)
