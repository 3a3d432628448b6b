r"""Command line: the ViT paper's analysis figures for a checkpoint, and
training curves.

  python -m vit_jax.analyze --workdir=DIR [--what=distance,posemb,rollout,filters,curves]
  python -m vit_jax.analyze --workdir=ROOT --what=curves   # a sweep's points
  python -m vit_jax.analyze --workdir=A,B --what=curves --output_dir=OUT
  python -m vit_jax.analyze --init=ViT-B_16.npz --model=B/16 [--image_size=224] \
      [--dataset=digits --split=test --num_images=128] [--output_dir=OUT]

The first form analyses the newest checkpoint of a training workdir (model
rebuilt from DIR/config.json); the second a published-layout .npz with the
variant `--model`. For an .npz the architecture is read off the parameter
tree where it shows (patch size, width, depth, heads, MLP width, channels,
head, cls token or not, hybrid stem, and the image size from a square
position table); `--override=name=value` sets any other field and wins over
what was inferred.

Analyses (`--what`, default: all that apply to the model, and curves when
the workdir has a metrics.jsonl):
  distance  mean attention distance per layer and head over `--num_images`
            images of `--dataset`/`--split`: attention_distance.{png,json}
  posemb    cosine similarity of the position embeddings (learned, or the
            fixed sincos table): posemb_similarity.png
  rollout   attention rollout maps of the first `--num_show` images:
            rollout.png
  filters   principal components of the patch-embedding filters: filters.png
            (not for hybrids, whose patch embedding sees ResNet features)
  curves    training loss, learning rate and every evaluator's metrics over
            steps, from DIR/metrics.jsonl alone (no checkpoint is read):
            curves.png (`vit_jax.analysis.curves`). `--workdir` may list
            several workdirs (comma-separated) or name a sweep ROOT (a
            directory whose subdirectories hold metrics.jsonl): their curves
            are overlaid, one colour per run (per setting for a sweep's
            `<setting>_s<seed>` points). Several workdirs draw curves only.

Figures go to `--output_dir`, else `--workdir` (a sweep ROOT for its
overlay; a list of workdirs needs `--output_dir`), else
`<npz without .npz>_analysis/`.
A short summary is printed. Problems the user can fix are printed as one line
`error: <message>` and the exit status is 1.
"""

import ast
import json
import os
import sys

from absl import flags
from absl import logging

from vit_jax import cli_help
from vit_jax import errors
from vit_jax import model_source
from vit_jax import paths
from vit_jax.analysis import curves

# The analyses of a checkpoint, and the one of a run's metrics.jsonl.
ANALYSES = ("distance", "posemb", "rollout", "filters")
CURVES = "curves"

# Own flag namespace: importable beside other command-line modules.
FLAGS = flags.FlagValues()
model_source.define_flags(FLAGS, "analyse")
FLAGS["workdir"].help += (" For --what=curves also several, comma-separated, "
                          "or a sweep ROOT: their curves overlaid.")
_IMAGE_SIZE = flags.DEFINE_string(
    "image_size", None, "Image size to analyse at, e.g. 224 or '(224, 160)'. "
    "--init: the model is built for it (position table resampled); "
    "--workdir: the position embeddings are interpolated to it. Default: the "
    "checkpoint's own.", flag_values=FLAGS)
_WHAT = flags.DEFINE_string(
    "what", None, "Comma-separated analyses among "
    f"{', '.join(ANALYSES + (CURVES,))} (default: all that apply; curves "
    "when the workdir has a metrics.jsonl).", flag_values=FLAGS)
_DATASET = flags.DEFINE_string(
    "dataset", None, "Images for distance and rollout: digits, a tfds "
    "name or folder:/root (default: the --workdir run's dataset, else "
    "digits).", flag_values=FLAGS)
_SPLIT = flags.DEFINE_string("split", "test", "Split of --dataset.",
                             flag_values=FLAGS)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory.",
                                flag_values=FLAGS)
_NUM_IMAGES = flags.DEFINE_integer(
    "num_images", 128, "Images the attention distance is averaged over (the "
    "paper: 128).", flag_values=FLAGS)
_NUM_SHOW = flags.DEFINE_integer(
    "num_show", 6, "Images shown with their attention rollout.",
    flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.",
                                   flag_values=FLAGS)
_NUM_COMPONENTS = flags.DEFINE_integer(
    "num_components", 28, "Principal components of the filters to show (the "
    "paper: 28).", flag_values=FLAGS)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where to write the figures (default: --workdir, "
    "else <npz without .npz>_analysis).", flag_values=FLAGS)


def parse_what(text):
  """"distance,rollout" -> ["distance", "rollout"]; None -> None (all)."""
  if text is None:
    return None
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in ANALYSES + (CURVES,)]
  if unknown or not names:
    raise errors.Error(
        f"unknown analysis {', '.join(map(repr, unknown)) or repr(text)} in "
        f"--what: use some of {','.join(ANALYSES + (CURVES,))}")
  return list(dict.fromkeys(names))


def parse_image_size(text):
  """"224" or "(224, 160)" -> 224 or (224, 160); None -> None."""
  if text is None:
    return None
  from vit_jax.sizes import pair  # pylint: disable=g-import-not-at-top
  try:
    h, w = pair(ast.literal_eval(text.strip()), "--image_size")
  except (ValueError, SyntaxError, TypeError):
    raise errors.Error(f"--image_size={text} is not a positive int or "
                       "(height, width), e.g. 224 or '(224, 160)'") from None
  return h if h == w else (h, w)


def _one_line(e):
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if len(lines) <= 1:
    return lines[0] if lines else type(e).__name__
  more = f" (+{len(lines) - 4} more)" if len(lines) > 4 else ""
  return f"{lines[0]} {'; '.join(lines[1:4])}{more}"


def applicable(model, what=None):
  """(analyses to run, {skipped analysis: why}) for a model.

  With `what` given, an analysis that cannot apply is an `errors.Error`;
  without, it is skipped with the reason.
  """
  reasons = {}
  if model.posemb == "none":
    reasons["posemb"] = ("the model has no position embeddings "
                         "(posemb='none'): there is no position-embedding "
                         "similarity to show; leave posemb out of --what")
  if model.posemb == "relative":
    reasons["posemb"] = ("the model has no position embeddings on its tokens "
                         "(posemb='relative': a bias per relative offset in "
                         "each block's attention): there is no per-patch "
                         "similarity to show; leave posemb out of --what")
  if model.resnet is not None:
    reasons["filters"] = ("the model is a hybrid: its patch embedding sees "
                          "ResNet features, not pixels, so its filters are "
                          "not images; leave filters out of --what")
  if what is None:
    return [a for a in ANALYSES if a not in reasons], reasons
  for name in what:
    if name in reasons:
      raise errors.Error(reasons[name])
  return list(what), {}


def _images(dataset, split, data_dir, count, batch_size, image_size,
            num_channels, class_names=None):
  """Yields (images [b, H, W, C], mask [b]) with `count` valid images in all."""
  from vit_jax import data  # pylint: disable=g-import-not-at-top
  try:
    source = data.get_source(dataset, split, data_dir=data_dir,
                             class_names=class_names)
  except (ValueError, FileNotFoundError) as e:
    raise errors.Error(f"cannot read --dataset={dataset} --split={split}: "
                       f"{_one_line(e)}") from None
  if not len(source):
    raise errors.Error(f"--dataset={dataset} --split={split} has no images")
  batch = max(1, min(batch_size, count, len(source)))
  left = count
  for b in data.eval_batches(source, batch, image_size,
                             num_channels=num_channels):
    mask = b["mask"].copy()
    mask[left:] = False
    left -= int(mask.sum())
    if mask.any():
      yield b["image"], mask
    if left <= 0:
      return


def _attention_fn(model, grid, stride, interpolate):
  """jit: images -> (distances [L, B, H], rollout maps [B, h, w])."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import attention_distance  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import rollout  # pylint: disable=g-import-not-at-top
  prefix = model.num_prefix_tokens

  @jax.jit
  def fn(params, images):
    _, out = model.apply({"params": params}, images, train=False,
                         output_attentions=True,
                         interpolate_pos_encoding=interpolate)
    weights = [out[f"block{i}/attention"].astype(jnp.float32)
               for i in range(model.num_layers)]
    dist = jnp.stack([attention_distance.head_distances(a, grid, stride, prefix)
                      for a in weights])
    return dist, rollout.rollout_map(weights, grid, prefix)

  return fn


def _fmt(values):
  return ", ".join(f"{v:.2f}" for v in values)


def analyse(params, model, output_dir, what=None, name="model",
            dataset="digits", split="test", data_dir=None, num_images=128,
            num_show=6, batch_size=32, num_components=28, image_size=None,
            class_names=None, log=print):
  """Runs the analyses and writes their figures into `output_dir`.

  Args:
    params: the model's parameters (numpy or jax arrays).
    model: the VisionTransformer.
    output_dir: where the PNGs and the JSON go (created).
    what: list of analyses (`ANALYSES`), or None for all that apply.
    name: shown in titles and the summary.
    dataset, split, data_dir: images for distance and rollout.
    class_names: the training split's class names, when `dataset` is the
      one the model was trained on: an image folder's split is then read
      as the evaluators read it (a class training never saw is an error).
    num_images: images the attention distance is averaged over.
    num_show: images shown with their rollout maps.
    batch_size: images per forward pass.
    num_components: principal components of the filters.
    image_size: analyse at this size (default the model's); the position
      embeddings are interpolated when the patch grid differs.
    log: printing function for the summary.

  Returns:
    A summary dict: "ran", "skipped", "files" and per analysis its numbers
    ("distance": [layers][heads], "posemb_neighbour"/"posemb_other",
    "rollout_cls_mass", "filters_explained").
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import attention_distance  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import filters  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import posemb_similarity  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import rollout  # pylint: disable=g-import-not-at-top
  from vit_jax.sizes import pair  # pylint: disable=g-import-not-at-top
  for flag, value in (("num_images", num_images), ("num_show", num_show),
                      ("batch_size", batch_size),
                      ("num_components", num_components)):
    if value < 1:
      raise errors.Error(f"--{flag}={value} must be at least 1")
  todo, skipped = applicable(model, what)
  size = pair(image_size if image_size is not None else model.image_size,
              "image_size")
  try:
    grid = model.grid_size(size)
  except ValueError as e:
    raise errors.Error(str(e)) from None
  stride = model.encoder_stride
  prefix = model.num_prefix_tokens
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise errors.Error(f"cannot create --output_dir={output_dir}: "
                       f"{_one_line(e)}") from None
  summary = {"ran": todo, "skipped": skipped, "files": []}
  log(f"{name}: {model.num_layers} layer(s) x {model.num_heads} head(s), "
      f"width {model.hidden_size}, {stride[0]}x{stride[1]} px per patch, "
      f"grid {grid[0]}x{grid[1]} at {size[0]}x{size[1]} px, "
      f"{'cls token' if prefix else 'no cls token'}")
  for analysis, why in skipped.items():
    log(f"{analysis}: skipped, {why.split(':')[0]}")

  def wrote(path):
    summary["files"].append(path)

  if "distance" in todo or "rollout" in todo:
    count = num_images if "distance" in todo else 0
    if "rollout" in todo:
      count = max(count, num_show)
    fn = _attention_fn(model, grid, stride,
                       interpolate=tuple(grid) != tuple(
                           model.grid_size(model.image_size)))
    total = None
    seen = 0
    shown_images, shown_maps = [], []
    for images, mask in _images(dataset, split, data_dir, count, batch_size,
                                size, model.num_channels, class_names):
      try:
        dist, maps = fn(params, images)
      except ValueError as e:
        raise errors.Error(_one_line(e)) from None
      dist, maps = np.asarray(dist, np.float64), np.asarray(maps)
      part = dist[:, mask].sum(axis=1)
      total = part if total is None else total + part
      seen += int(mask.sum())
      room = num_show - sum(len(m) for m in shown_maps)
      if room > 0:
        shown_images.append(images[mask][:room])
        shown_maps.append(maps[mask][:room])
    source = f"{dataset}/{split}"
    if "distance" in todo:
      distances = total / seen
      summary["distance"] = distances.tolist()
      path = os.path.join(output_dir, "attention_distance.json")
      attention_distance.to_json(
          distances, path, model=name, patch_size=list(stride),
          grid=list(grid), image_size=list(size), num_images=seen,
          dataset=dataset, split=split, num_prefix_tokens=prefix,
          note="prefix (cls) tokens dropped from queries and keys, each "
               "query's row renormalised over the patch keys")
      wrote(path)
      path = os.path.join(output_dir, "attention_distance.png")
      attention_distance.plot(
          distances, path,
          title=f"{name}\nmean attention distance, {seen} images")
      wrote(path)
      layers = [0] if len(distances) == 1 else [0, len(distances) - 1]
      log(f"attention distance (px, {seen} {source} images; image diagonal "
          f"{float(np.hypot(*size)):.1f}): " + ", ".join(
              f"layer {i + 1} mean {distances[i].mean():.2f} (heads "
              f"{_fmt(distances[i])})" for i in layers))
    if "rollout" in todo:
      images = np.concatenate(shown_images)[:num_show]
      maps = np.concatenate(shown_maps)[:num_show]
      path = os.path.join(output_dir, "rollout.png")
      rollout.plot(images, maps, path, title=f"{name}: attention rollout")
      wrote(path)
      mass = maps.reshape(len(maps), -1).sum(axis=1)
      summary["rollout_cls_mass"] = float(mass.mean())
      peak = [np.unravel_index(int(np.argmax(m)), m.shape) for m in maps]
      how = (f"the cls token's rollout puts {mass.mean():.2f} of its mass on "
             "the patches" if prefix else "maps are the patch rows' mean")
      log(f"rollout: {len(maps)} {source} images; {how}; peak patch (row, col) "
          f"{', '.join(f'({r}, {c})' for r, c in peak)}")

  if "posemb" in todo:
    table, kind = posemb_similarity.position_table(params, model)
    built = model.grid_size(model.image_size)
    sim = posemb_similarity.cosine_similarity(table, built)
    path = os.path.join(output_dir, "posemb_similarity.png")
    posemb_similarity.plot(
        sim, path, title=f"{name}: {kind} position embedding similarity")
    wrote(path)
    flat = sim.reshape(built[0] * built[1], -1)
    rows, cols = np.divmod(np.arange(flat.shape[0]), built[1])
    step = np.abs(rows[:, None] - rows[None]) + np.abs(cols[:, None] -
                                                       cols[None])
    neighbour = float(flat[step == 1].mean()) if (step == 1).any() else float(
        "nan")
    other = float(flat[step > 1].mean()) if (step > 1).any() else float("nan")
    summary["posemb_neighbour"], summary["posemb_other"] = neighbour, other
    log(f"position embeddings ({kind}, {built[0]}x{built[1]}): mean cosine "
        f"{neighbour:.3f} to the 4-neighbours, {other:.3f} to the others")

  if "filters" in todo:
    kernel = np.asarray(params["embedding"]["kernel"])
    components, explained = filters.principal_components(kernel,
                                                         num_components)
    path = os.path.join(output_dir, "filters.png")
    filters.plot(components, path, explained=explained,
                 title=f"{name}: patch-embedding filters, principal components")
    wrote(path)
    summary["filters_explained"] = explained.tolist()
    ph, pw, c, d = kernel.shape
    log(f"filters: {len(components)} principal components of {d} filters "
        f"({ph}x{pw}x{c}); the first {min(3, len(explained))} explain "
        f"{', '.join(f'{100 * v:.1f}%' for v in explained[:3])} of the "
        "variance")

  log(f"wrote {', '.join(os.path.basename(f) for f in summary['files'])} "
      f"into {output_dir}")
  return summary


def _run_dataset(workdir, init):
  """(dataset, training class names) of a training workdir's run.

  ("digits", None) without a workdir's config.json. The class names are
  those config.json's "resolved" section keeps (None when not kept).
  """
  path = os.path.join(workdir or "", "config.json")
  if init or not workdir or not os.path.exists(path):
    return "digits", None
  with open(path) as f:
    run = json.load(f)
  resolved = run.get("resolved") or {}
  return run.get("dataset") or "digits", resolved.get("class_names")


def _no_metrics(workdir):
  return errors.Error(
      f"{workdir} has no metrics.jsonl (nor has any of its subdirectories): "
      "pass the --workdir of a training run, or a sweep ROOT whose points "
      "hold metrics.jsonl, for --what=curves")


def plan_curves(what, workdirs, init=None, log=print):
  """(checkpoint analyses, runs to draw curves of) for the command line.

  Args:
    what: `parse_what`'s list, or None for the default.
    workdirs: the absolute `--workdir` paths (comma-separated on the line).
    init: the `--init` .npz, if any.
    log: printing function for a skipped default.

  Returns:
    (analyses of the checkpoint: a list, [] for none, or None for all that
    apply; [(name, workdir)] whose curves to draw, [] for none). Several
    workdirs, or one sweep ROOT (a directory without metrics.jsonl whose
    subdirectories hold one), draw curves only.
  """
  model_what = None if what is None else [w for w in what if w != CURVES]
  asked = what is not None and CURVES in what
  if init or not workdirs:
    if asked:
      raise errors.Error("--what=curves draws a training run's metrics.jsonl: "
                         "pass --workdir=DIR instead of --init")
    return model_what, []
  first = workdirs[0]
  found = [curves.runs_of(workdir) for workdir in workdirs]
  if len(workdirs) == 1 and curves.has_metrics(first):
    return model_what, found[0] if asked or what is None else []
  if len(workdirs) == 1 and not found[0]:
    if asked:
      raise _no_metrics(first)
    if what is None:
      log(f"curves: skipped, {first} has no metrics.jsonl")
    return model_what, []
  if model_what:
    raise errors.Error(
        f"--what={','.join(model_what)} analyses one checkpoint: pass one "
        "--workdir (several workdirs, or a sweep ROOT, draw --what=curves "
        "only)")
  runs = []
  for workdir, runs_found in zip(workdirs, found):
    if not runs_found:
      raise _no_metrics(workdir)
    runs.extend(runs_found)
  names = [name for name, _ in runs]
  if len(set(names)) < len(names):  # e.g. a/run and b/run: name them so.
    common = os.path.commonpath([w for _, w in runs])
    runs = [(os.path.relpath(w, common), w) for _, w in runs]
  return [], runs


def draw_curves(runs, output_dir, title=None, log=print):
  """Writes OUTPUT_DIR/curves.png of `runs` ([(name, workdir)])."""
  try:
    os.makedirs(output_dir, exist_ok=True)
  except OSError as e:
    raise errors.Error(f"cannot create --output_dir={output_dir}: "
                       f"{_one_line(e)}") from None
  path = os.path.join(output_dir, curves.FILENAME)
  panels = curves.write(runs, path, title)
  shown = ", ".join(n for n, _ in runs[:6]) + (
      f", ... ({len(runs)} runs)" if len(runs) > 6 else "")
  log(f"curves of {shown}: {', '.join(panels) or 'no metrics yet'}; wrote "
      f"{path}")
  return path


@errors.command_line
def run(argv):
  """Runs the command line `argv`; returns the exit status."""
  if cli_help.requested(argv):
    return cli_help.show(argv, __doc__, FLAGS)
  FLAGS.unparse_flags()
  FLAGS(argv)
  what = parse_what(_WHAT.value)
  image_size = parse_image_size(_IMAGE_SIZE.value)
  logging.set_verbosity(logging.WARNING)
  workdirs = [paths.absolute(w.strip())
              for w in (FLAGS.workdir or "").split(",") if w.strip()]
  FLAGS["workdir"].value = workdirs[0] if workdirs else None
  for name in ("init", "output_dir", "data_dir"):
    FLAGS[name].value = paths.absolute(FLAGS[name].value)
  FLAGS["dataset"].value = paths.absolute_dataset(FLAGS["dataset"].value)
  if not FLAGS.init:
    for workdir in workdirs:
      if not os.path.isdir(workdir):
        raise errors.Error(f"--workdir={workdir} does not exist")
  model_what, runs = plan_curves(what, workdirs, FLAGS.init)
  if len(workdirs) > 1 and not _OUTPUT_DIR.value:
    raise errors.Error("several --workdir: pass --output_dir=DIR for the "
                       "curves.png that overlays them")
  if model_what != []:
    analyse_checkpoint(model_what, image_size)
  if runs:
    title = None
    if len(workdirs) == 1 and len(runs) > 1:  # A sweep ROOT.
      title = f"{os.path.basename(workdirs[0])}: {len(runs)} runs"
    draw_curves(runs, _OUTPUT_DIR.value or workdirs[0], title)


def analyse_checkpoint(what, image_size):
  """The checkpoint analyses `what` (None: all that apply) of the flags'
  model."""
  params, model, name = model_source.load(FLAGS, image_size)
  if FLAGS.init:
    output_dir = _OUTPUT_DIR.value or FLAGS.workdir or (
        os.path.splitext(FLAGS.init)[0] + "_analysis")
    image_size = None  # The model was built for it.
  else:
    output_dir = _OUTPUT_DIR.value or FLAGS.workdir
  run_dataset, class_names = _run_dataset(FLAGS.workdir, FLAGS.init)
  dataset = _DATASET.value or run_dataset
  analyse(params, model, output_dir, what=what, name=name,
          dataset=dataset, split=_SPLIT.value,
          class_names=class_names if dataset == run_dataset else None,
          data_dir=_DATA_DIR.value, num_images=_NUM_IMAGES.value,
          num_show=_NUM_SHOW.value, batch_size=_BATCH_SIZE.value,
          num_components=_NUM_COMPONENTS.value, image_size=image_size)


def main():
  sys.exit(run(sys.argv))


if __name__ == "__main__":
  main()
