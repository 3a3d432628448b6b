"""Reading and writing ViT checkpoints in the published `.npz` layout.

A checkpoint is a flat mapping from `/`-joined parameter paths to arrays (docs/design.md
§3). Two layouts exist in the wild and both are read here:

* the original one (`Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/...`,
  `Transformer/posembed_input/pos_embedding` with a cls position when there is a cls
  token), which is also the layout of our parameter tree and the one `save_npz` writes;
* big_vision's: optionally everything under `params/`, the encoder blocks optionally
  stacked on a leading depth axis under `Transformer/encoderblock/`, block modules named
  `LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0`, and the position
  table at the top level as `pos_embedding` without a cls position (the cls token then
  carries its position folded in).

`load_npz` maps both onto our layout (per-block `encoderblock_{i}`, original module
names, cls position explicit and zero when it was folded into `cls`).
"""

import re
import zipfile

import numpy as np

from vit_jax import errors

SEP = "/"
POSEMB = "Transformer/posembed_input/pos_embedding"
# posemb="learn2d": row [1, h, D/2] and column [1, w, D/2] tables.
POSEMB_ROW = POSEMB + "_row"
POSEMB_COL = POSEMB + "_col"
# posemb="relative": per block [(2h - 1) * (2w - 1) + 3 with cls token, heads].
RELATIVE_BIAS = "MultiHeadDotProductAttention_1/relative_position_bias"

# Prefixes under which checkpoints of other codebases keep the image model.
_PREFIXES = ("params/img/", "opt/target/", "params/")

# big_vision's module names inside an encoder block -> the original ones.
_BLOCK_RENAMES = (
    ("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"),
    ("LayerNorm_1", "LayerNorm_2"),
    ("MlpBlock_0", "MlpBlock_3"),
)

_STACKED = re.compile(r"^(.*Transformer/)encoderblock/(.*)$")
_PER_BLOCK = re.compile(r"^(.*Transformer/)encoderblock_(\d+)/(.*)$")
_BLOCK_MODULE = re.compile(r"^(Transformer/encoderblock(?:_\d+)?/)([^/]+)(/.*)$")

# Every name our models use (docs/design.md §3); anything else in a checkpoint is an
# error.
KNOWN_KEYS = tuple(re.compile(p) for p in (
    r"cls",
    r"mask_token",
    r"embedding/(kernel|bias)",
    r"Transformer/posembed_input/pos_embedding",
    r"Transformer/posembed_input/pos_embedding_(row|col)",
    r"Transformer/encoderblock_\d+/LayerNorm_[02]/(scale|bias)",
    r"Transformer/encoderblock_\d+/MultiHeadDotProductAttention_1/"
    r"(query|key|value|out)/(kernel|bias)",
    r"Transformer/encoderblock_\d+/" + RELATIVE_BIAS,
    r"Transformer/encoderblock_\d+/MlpBlock_3/Dense_[01]/(kernel|bias)",
    r"Transformer/encoder_norm/(scale|bias)",
    r"pre_logits/(kernel|bias)",
    r"head/(kernel|bias)",
    r"MAPHead_0/probe",
    r"MAPHead_0/MultiHeadDotProductAttention_0/(query|key|value|out)/(kernel|bias)",
    r"MAPHead_0/LayerNorm_0/(scale|bias)",
    r"MAPHead_0/MlpBlock_0/Dense_[01]/(kernel|bias)",
    r"decoder/.+",
    r"conv_root/kernel",
    r"gn_root/(scale|bias)",
    r"block\d+/unit\d+/(conv[123]|conv_proj)/kernel",
    r"block\d+/unit\d+/(gn[123]|gn_proj)/(scale|bias)",
))


def flatten(params, prefix=""):
  """Nested dict of arrays -> {"a/b/c": array}."""
  flat = {}
  for key, value in params.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items"):
      flat.update(flatten(value, path + SEP))
    else:
      flat[path] = value
  return flat


def unflatten(flat):
  """{"a/b/c": array} -> nested dict of arrays."""
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split(SEP)
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
      if not isinstance(node, dict):
        raise ValueError(f"parameter {path!r} nests under a leaf {name!r}")
    node[leaf] = value
  return tree


def _as_flat(params):
  """Accepts a nested or flat tree and returns a flat dict (a copy)."""
  if any(hasattr(v, "items") for v in params.values()):
    return flatten(params)
  return dict(params)


def _restore_like(flat, like):
  """Returns `flat` nested when `like` was nested."""
  if any(hasattr(v, "items") for v in like.values()):
    return unflatten(flat)
  return flat


def stack_blocks(params):
  """Per-block `encoderblock_{i}` -> one `encoderblock` with a leading depth axis."""
  flat = _as_flat(params)
  out, blocks = {}, {}
  for path, value in flat.items():
    m = _PER_BLOCK.match(path)
    if m:
      blocks.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = value
    else:
      out[path] = value
  for (head, tail), by_index in blocks.items():
    depth = len(by_index)
    if sorted(by_index) != list(range(depth)):
      raise ValueError(
          f"cannot stack {head}encoderblock_*/{tail}: block indices "
          f"{sorted(by_index)} are not 0..{depth - 1}")
    out[f"{head}encoderblock/{tail}"] = np.stack(
        [np.asarray(by_index[i]) for i in range(depth)])
  return _restore_like(out, params)


def unstack_blocks(params):
  """One `encoderblock` with a leading depth axis -> per-block `encoderblock_{i}`."""
  flat = _as_flat(params)
  out = {}
  for path, value in flat.items():
    m = _STACKED.match(path)
    if m:
      value = np.asarray(value)
      for i in range(value.shape[0]):
        out[f"{m.group(1)}encoderblock_{i}/{m.group(2)}"] = value[i]
    else:
      out[path] = value
  return _restore_like(out, params)


def _strip_prefix(flat):
  """Drops `params/`, `opt/target/` or `params/img/` prefixes."""
  for prefix in _PREFIXES:
    if f"{prefix}embedding/kernel" in flat or f"{prefix}conv_root/kernel" in flat:
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return flat


def _rename_block_modules(flat):
  """big_vision's encoder-block module names -> the original ones."""
  out = {}
  for path, value in flat.items():
    m = _BLOCK_MODULE.match(path)
    if m:
      name = dict(_BLOCK_RENAMES).get(m.group(2), m.group(2))
      path = m.group(1) + name + m.group(3)
    out[path] = value
  return out


def _unfold_posemb(flat):
  """Top-level `pos_embedding` (no cls position) -> `Transformer/posembed_input/...`.

  When there is a cls token its position is folded into `cls`; the table gets an
  explicit zero position for it so that `cls + pos[0]` is unchanged.
  """
  if "pos_embedding" not in flat:
    return flat
  if POSEMB in flat:
    raise ValueError(
        f"checkpoint has both `pos_embedding` and `{POSEMB}`: cannot tell which "
        "position table is the model's")
  flat = dict(flat)
  posemb = np.asarray(flat.pop("pos_embedding"))
  if posemb.ndim == 2:
    posemb = posemb[None]
  if "cls" in flat:
    zero = np.zeros((1, 1, posemb.shape[-1]), posemb.dtype)
    posemb = np.concatenate([zero, posemb], axis=1)
  flat[POSEMB] = posemb
  return flat


def normalize(flat):
  """Any supported checkpoint layout (flat dict) -> our flat layout."""
  flat = _strip_prefix(dict(flat))
  flat = unstack_blocks(flat)
  flat = _rename_block_modules(flat)
  flat = _unfold_posemb(flat)
  unknown = sorted(k for k in flat if not any(p.fullmatch(k) for p in KNOWN_KEYS))
  if unknown:
    listing = "\n  ".join(f"{k} {tuple(np.shape(flat[k]))}" for k in unknown)
    raise ValueError(
        f"checkpoint has {len(unknown)} parameter(s) that are not part of a ViT "
        f"(original or big_vision layout):\n  {listing}")
  return flat


def check_tree(params, expected, what="checkpoint"):
  """Raises ValueError listing keys missing, unexpected or of a different shape."""
  got = {k: tuple(np.shape(v)) for k, v in _as_flat(params).items()}
  want = {k: tuple(np.shape(v)) for k, v in _as_flat(expected).items()}
  lines = [f"missing from {what}: {k} {want[k]}" for k in sorted(want.keys() - got.keys())]
  lines += [f"unexpected in {what}: {k} {got[k]}" for k in sorted(got.keys() - want.keys())]
  lines += [f"shape differs: {k} {what} {got[k]} vs model {want[k]}"
            for k in sorted(got.keys() & want.keys()) if got[k] != want[k]]
  if lines:
    raise ValueError(
        f"{what} does not match the model ({len(lines)} difference(s)):\n  "
        + "\n  ".join(lines))


def _not_npz(path, what):
  return errors.Error(f"{path} is not an .npz archive (the zip of .npy arrays that "
                      f"numpy.savez writes): {what}")


def _read_archive(path):
  """{name: array} of an .npz; `errors.Error` naming the path when it is not one.

  Never unpickles (`allow_pickle=False`): object arrays are refused.
  """
  if hasattr(path, "read"):
    pos = path.tell()
    head = path.read(4)
    path.seek(pos)
  else:
    with open(path, "rb") as f:
      head = f.read(4)
  if head[:2] != b"PK":
    if not head:
      raise _not_npz(path, "the file is empty")
    if head.startswith(b"\x93NUM"):
      raise _not_npz(path, "it is a single .npy array")
    raise _not_npz(path, f"it starts with {head!r}, not a zip header")
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise _not_npz(path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
  with data:
    others = [n for n in data.zip.namelist() if not n.endswith(".npy")]
    if others:
      raise _not_npz(path, f"a zip holding {', '.join(others[:3])}"
                     + (", ..." if len(others) > 3 else ""))
    try:
      return {k: data[k] for k in data.files}
    except ValueError:  # object arrays, which are never unpickled
      raise errors.Error(
          f"{path} holds object (pickled) arrays, which are never loaded: a ViT "
          "checkpoint holds numeric arrays only") from None


def load_npz(path, target=None):
  """Reads a ViT `.npz` (original or big_vision layout) into our nested layout.

  Args:
    path: file name (or file object) of the `.npz`.
    target: optional parameter tree (arrays or shape structs, nested or flat); when
      given, the loaded tree must have exactly its keys and shapes.

  Returns:
    Nested dict of numpy arrays, per-block `encoderblock_{i}`.
  """
  flat = _read_archive(path)
  flat = normalize(flat)
  if target is not None:
    target_flat = unstack_blocks(_as_flat(target))
    check_tree(flat, target_flat, what=f"checkpoint {path}")
  return unflatten(flat)


def _to_numpy(value):
  value = np.asarray(value)
  if value.dtype.kind == "V" or value.dtype.name == "bfloat16":
    value = value.astype(np.float32)
  return value


def save_npz(path, params):
  """Writes a parameter tree (nested or flat, per-block or stacked) in the original layout."""
  flat = unstack_blocks(_as_flat(params))
  flat = {k: _to_numpy(v) for k, v in flat.items()}
  with open(path, "wb") as f:
    np.savez(f, **flat)
