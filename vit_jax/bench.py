"""Benchmarks of vit_jax against its peers, printed side by side.

  python -m vit_jax.bench --fewshot [--fewshot_classes=100 --fewshot_dim=768]
      [--repeats=3] [--json=FILE]
  python -m vit_jax.bench --throughput [--throughput_model=B/16
      --throughput_batch=32 --throughput_image_size=224
      --throughput_dtype=bfloat16 --throughput_peers]

Each mode is a function `(flags) -> dict` registered in `MODES` under the name
of its boolean flag; `main` runs every mode whose flag is set, prints its
report and, with `--json=FILE`, writes all results there.

Modes:
  --fewshot  closed-form few-shot ridge (`evaluators/ridge.py`: one
             eigendecomposition per (shots, seed) serving every L2 value,
             jitted, warm) against scikit-learn's `RidgeClassifier(alpha=l2)`
             fitted once per (shots, seed, l2), on synthetic class-clustered
             features. Checks that the test accuracies agree.
  --throughput  images per second of a variant's jitted inference and
             training step (AdamW, donated buffers) on all local devices
             (data parallel), the FLOPs per image from XLA's cost analysis and,
             where the device's peak is known (or `--peak_tflops` given), the
             model FLOPs utilisation (MFU). `--throughput_peers` times the same
             model's inference in timm and Hugging Face (PyTorch, same
             device kind when it has one, else CPU) beside it.

Timings are the best of `--repeats` runs (the two sides interleaved), which is
robust against other load on the machine.
"""

import functools
import json
import sys
import time
import warnings

from absl import flags

# Own flag namespace: importable beside other command-line modules.
FLAGS = flags.FlagValues()
_FEWSHOT = flags.DEFINE_bool(
    "fewshot", False, "Few-shot ridge against scikit-learn RidgeClassifier.",
    flag_values=FLAGS)
_CLASSES = flags.DEFINE_integer(
    "fewshot_classes", 100, "Few-shot: number of classes.", flag_values=FLAGS)
_DIM = flags.DEFINE_integer(
    "fewshot_dim", 768, "Few-shot: feature dimension.", flag_values=FLAGS)
_SHOTS = flags.DEFINE_list(
    "fewshot_shots", ["1", "5", "10", "25"], "Few-shot: shots per class.",
    flag_values=FLAGS)
_SEEDS = flags.DEFINE_integer(
    "fewshot_seeds", 5, "Few-shot: seeds per shot count.", flag_values=FLAGS)
_L2S = flags.DEFINE_list(
    "fewshot_l2_exponents", ["-2", "1", "4", "7", "10", "13", "16", "19"],
    "Few-shot: the L2 values are 2 to these powers.", flag_values=FLAGS)
_TEST_PER_CLASS = flags.DEFINE_integer(
    "fewshot_test_per_class", 10, "Few-shot: test examples per class.",
    flag_values=FLAGS)
_THROUGHPUT = flags.DEFINE_bool(
    "throughput", False, "Images/s, FLOPs and MFU of inference and training.",
    flag_values=FLAGS)
flags.DEFINE_string(
    "throughput_model", "B/16", "Throughput: model variant.",
    flag_values=FLAGS)
flags.DEFINE_integer(
    "throughput_batch", 32, "Throughput: global batch size.",
    flag_values=FLAGS)
flags.DEFINE_integer(
    "throughput_image_size", 224, "Throughput: image size.",
    flag_values=FLAGS)
flags.DEFINE_enum(
    "throughput_dtype", "float32", ["float32", "bfloat16"],
    "Throughput: compute dtype (parameters stay float32).", flag_values=FLAGS)
flags.DEFINE_integer(
    "throughput_steps", 10, "Throughput: timed steps per measurement.",
    flag_values=FLAGS)
flags.DEFINE_bool(
    "throughput_peers", False, "Throughput: also time timm and Hugging Face "
    "inference (needs the torch extra).", flag_values=FLAGS)
flags.DEFINE_float(
    "peak_tflops", None, "Peak TFLOP/s of one device for MFU (default: "
    "known for H100/H200/A100; none on CPU).", flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer(
    "repeats", 3, "Timed runs per side; the best counts.", flag_values=FLAGS)
_JSON = flags.DEFINE_string(
    "json", None, "Write the results to this file.", flag_values=FLAGS)


def _timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def _clustered_features(rng, num_classes, dim, per_class, spread=0.3):
  """Class means ~ N(0, spread²), examples = mean + N(0, 1); float32."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  means = rng.normal(size=(num_classes, dim)).astype(np.float32) * spread

  def sample(n):
    labels = np.repeat(np.arange(num_classes), n)
    x = means[labels] + rng.normal(size=(len(labels), dim)).astype(np.float32)
    return x, labels

  return sample(per_class), sample


def fewshot(f):
  """Few-shot ridge (ours) against scikit-learn, same features and splits."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  from sklearn import linear_model  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluators import ridge  # pylint: disable=g-import-not-at-top

  k, d, seeds = f.fewshot_classes, f.fewshot_dim, f.fewshot_seeds
  shots = [int(s) for s in f.fewshot_shots]
  l2s = np.array([2.0**float(e) for e in f.fewshot_l2_exponents], np.float32)
  rng = np.random.default_rng(0)
  pool_size = max(shots)
  (pool, pool_y), sample = _clustered_features(rng, k, d, pool_size)
  test, test_y = sample(f.fewshot_test_per_class)
  # Nested shot sets: one permutation per class and seed, prefixes per shots.
  order = {s: np.stack([rng.permutation(pool_size) for _ in range(k)])
           for s in range(seeds)}
  rows = {(n, s): (np.arange(k)[:, None] * pool_size
                   + order[s][:, :n]).reshape(-1)
          for n in shots for s in range(seeds)}

  def ours_fn(loo):
    ev = jax.jit(jax.vmap(
        functools.partial(ridge.evaluate, num_classes=k, loo=loo),
        in_axes=(0, 0, None, None, None)))

    def run():
      out, per_shots = {}, {}
      for n in shots:
        start = time.perf_counter()
        idx = np.stack([rows[n, s] for s in range(seeds)])
        out[n] = jax.device_get(ev(pool[idx], pool_y[idx], test, test_y, l2s))
        per_shots[n] = time.perf_counter() - start
      return out, per_shots

    return run

  def sklearn_run():
    # Tiny L2 values on centred 1-shot features (kernel of rank N - 1) make
    # scikit-learn warn about ill-conditioning; its answers are still used.
    warnings.simplefilter("ignore", category=scipy.linalg.LinAlgWarning)
    acc = np.zeros((len(shots), seeds, len(l2s)))
    per_shots = {}
    for i, n in enumerate(shots):
      start = time.perf_counter()
      for s in range(seeds):
        x, y = pool[rows[n, s]], pool_y[rows[n, s]]
        mean, std = x.mean(0), x.std(0) + 1e-5
        xw, tw = (x - mean) / std, (test - mean) / std
        for j, l2 in enumerate(l2s):
          clf = linear_model.RidgeClassifier(alpha=float(l2)).fit(xw, y)
          acc[i, s, j] = np.mean(clf.predict(tw) == test_y)
      per_shots[n] = time.perf_counter() - start
    return acc, per_shots

  ours, ours_fit = ours_fn(loo=True), ours_fn(loo=False)
  compile_s, _ = _timed(ours)
  ours_fit()
  times = {"ours": [], "ours_no_loo": [], "sklearn": []}
  shot_times = {"ours": [], "sklearn": []}
  for _ in range(f.repeats):
    t, (out, per_shots) = _timed(ours)
    times["ours"].append(t)
    shot_times["ours"].append(per_shots)
    times["ours_no_loo"].append(_timed(ours_fit)[0])
    t, (sk_acc, per_shots) = _timed(sklearn_run)
    times["sklearn"].append(t)
    shot_times["sklearn"].append(per_shots)
  shot_best = {name: {str(n): min(p[n] for p in v) for n in shots}
               for name, v in shot_times.items()}
  ours_acc = np.stack([out[n]["accuracy"] for n in shots])
  # Differences in numbers of correctly classified test examples.
  diff = np.rint(np.abs(ours_acc - sk_acc) * len(test_y)).astype(int)
  best = {name: min(v) for name, v in times.items()}
  chosen = np.stack([l2s[out[n]["best"]] for n in shots])
  result = {
      "setup": dict(classes=k, dim=d, shots=shots, seeds=seeds,
                    l2s=l2s.tolist(), test_examples=len(test_y),
                    fits=len(shots) * seeds * len(l2s),
                    eigendecompositions=len(shots) * seeds,
                    backend=jax.default_backend(),
                    devices=jax.device_count(), repeats=f.repeats),
      "seconds": best,
      "all_seconds": times,
      "seconds_per_shots": shot_best,
      "compile_and_first_run_seconds": compile_s,
      "speedup": best["sklearn"] / best["ours"],
      "speedup_no_loo": best["sklearn"] / best["ours_no_loo"],
      "max_difference_in_test_examples": int(diff.max()),
      "fits_that_differ": int((diff > 0).sum()),
      # Float32 against scikit-learn's solver: a near-tie may flip.
      "accuracies_agree": bool(diff.max() <= 1),
      "mean_accuracy": {str(n): float(ours_acc[i].mean())
                        for i, n in enumerate(shots)},
      "loo_l2_per_shots": {str(n): chosen[i].tolist()
                           for i, n in enumerate(shots)},
  }
  return result


def _print_fewshot(r):
  s = r["setup"]
  print(f"few-shot ridge: {s['classes']} classes, D={s['dim']}, shots "
        f"{s['shots']}, {s['seeds']} seeds, {len(s['l2s'])} L2 values, "
        f"{s['test_examples']} test examples ({s['backend']}, best of "
        f"{s['repeats']})")
  sec = r["seconds"]
  print(f"  ours, {s['eigendecompositions']} eigendecompositions, all L2 + "
        f"leave-one-out choice: {sec['ours']:.3f} s")
  print("  ours, same without leave-one-out:        "
        f"{sec['ours_no_loo']:.3f} s")
  print(f"  scikit-learn RidgeClassifier, {s['fits']} fits:  "
        f"{sec['sklearn']:.3f} s")
  print(f"  speedup: {r['speedup']:.1f}x (without leave-one-out "
        f"{r['speedup_no_loo']:.1f}x)")
  per = r["seconds_per_shots"]
  print("  per shot count (ours incl. leave-one-out / scikit-learn): " +
        ", ".join(f"{n}-shot {per['ours'][n]:.3f}/{per['sklearn'][n]:.3f} s"
                  for n in per["ours"]))
  print(f"  accuracies agree: {r['accuracies_agree']} ({r['fits_that_differ']}"
        f" of {s['fits']} fits differ, by at most "
        f"{r['max_difference_in_test_examples']} test example(s))")
  means = ", ".join(f"{n}-shot {v:.3f}" for n, v in r["mean_accuracy"].items())
  print(f"  mean test accuracy over seeds and L2: {means}")


# Dense bf16 peak TFLOP/s of one device, by `device_kind` substring.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5p": 459.0,
               "v5 lite": 197.0, "v4": 275.0}


def _peak_tflops(f, device_kind, dtype):
  if f.peak_tflops:
    return f.peak_tflops
  for name, peak in PEAK_TFLOPS.items():
    if name in device_kind:
      return peak if dtype == "bfloat16" else None
  return None


def _best_rate(fn, steps, repeats, batch):
  """Best images/s over `repeats` runs of `steps` calls of `fn`."""
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      out = fn()
    _block(out)
    best = max(best, steps * batch / (time.perf_counter() - start))
  return best


def _block(out):
  import jax  # pylint: disable=g-import-not-at-top
  if hasattr(out, "detach"):  # torch
    out.sum().item()
  else:
    jax.block_until_ready(out)


def throughput(f):
  """Inference and training images/s of one variant on all local devices."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import
  from vit_jax import losses, models  # pylint: disable=g-import-not-at-top,g-multiple-import

  size, batch = f.throughput_image_size, f.throughput_batch
  devices = jax.local_devices()
  if batch % len(devices):
    raise ValueError(f"--throughput_batch={batch} is not divisible by the "
                     f"{len(devices)} local devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  model = models.create(f.throughput_model, num_classes=1000,
                        image_size=(size, size), dtype=f.throughput_dtype)
  images = jax.device_put(
      np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(
          np.float32), data_sh)
  labels = jax.device_put(np.arange(batch) % 1000, data_sh)
  params = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x)["params"],
                   out_shardings=repl)(images)
  tx = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)

  infer = jax.jit(lambda p, x: model.apply({"params": p}, x)[0],
                  in_shardings=(repl, data_sh), out_shardings=data_sh)

  def step(p, s, x, y):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x, train=True)
      return jnp.mean(losses.softmax_xent(logits, jax.nn.one_hot(y, 1000)))
    grads = jax.grad(loss_fn)(p)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  train = jax.jit(step, in_shardings=(repl, repl, data_sh, data_sh),
                  out_shardings=(repl, repl), donate_argnums=(0, 1))

  def flops_per_image(jitted, *args):
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) * len(devices) / batch

  infer_flops = flops_per_image(infer, params, images)
  train_flops = flops_per_image(train, params, opt_state, images, labels)
  _block(infer(params, images))
  state = {"p": params, "s": opt_state}

  def train_once():
    state["p"], state["s"] = train(state["p"], state["s"], images, labels)
    return state["p"]

  _block(train_once())
  steps, repeats = f.throughput_steps, f.repeats
  rates = {
      "vit_jax inference": _best_rate(lambda: infer(state["p"], images),
                                      steps, repeats, batch),
      "vit_jax train step": _best_rate(train_once, steps, repeats, batch),
  }
  if f.throughput_peers:
    rates.update(_peer_rates(model, f, steps, repeats, jax.default_backend()))
  kind = devices[0].device_kind
  peak = _peak_tflops(f, kind, f.throughput_dtype)
  mfu = {}
  if peak:
    total_peak = peak * 1e12 * len(devices)
    mfu = {"inference": rates["vit_jax inference"] * infer_flops / total_peak,
           "train step": rates["vit_jax train step"] * train_flops / total_peak}
  return {
      "setup": dict(model=f.throughput_model, batch=batch, image_size=size,
                    dtype=f.throughput_dtype, backend=jax.default_backend(),
                    device_kind=kind, devices=len(devices), steps=steps,
                    repeats=repeats, peak_tflops_per_device=peak),
      "gflops_per_image": {"inference": infer_flops / 1e9,
                           "train step": train_flops / 1e9},
      "images_per_second": rates,
      "mfu": mfu,
  }


def _peer_rates(model, f, steps, repeats, backend):
  """Inference images/s of the same architecture in timm and transformers."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if f.throughput_dtype == "bfloat16" else torch.float32
  size, batch = f.throughput_image_size, f.throughput_batch
  ph = model.patch_size if isinstance(model.patch_size, int) else model.patch_size[0]
  peers = {
      "timm": vision_transformer.VisionTransformer(
          img_size=size, patch_size=ph, embed_dim=model.hidden_size,
          depth=model.num_layers, num_heads=model.num_heads,
          mlp_ratio=model.mlp_dim / model.hidden_size, num_classes=1000,
          act_layer="gelu_tanh"),
      "transformers": transformers.ViTForImageClassification(
          transformers.ViTConfig(
              image_size=size, patch_size=ph, hidden_size=model.hidden_size,
              num_hidden_layers=model.num_layers,
              num_attention_heads=model.num_heads,
              intermediate_size=model.mlp_dim, num_labels=1000,
              hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
              attn_implementation="sdpa")),
  }
  x = torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1
  rates = {}
  for name, net in peers.items():
    net = net.to(device=device, dtype=dtype).eval()

    def run(net=net):
      with torch.inference_mode():
        out = net(x)
      return out if torch.is_tensor(out) else out.logits

    run()
    rates[f"{name} inference ({device})"] = _best_rate(run, steps, repeats,
                                                       batch)
  return rates


def _print_throughput(r):
  s = r["setup"]
  print(f"throughput: {s['model']}, batch {s['batch']}, {s['image_size']} px, "
        f"{s['dtype']}, {s['devices']} x {s['device_kind']} "
        f"({s['backend']}), best of {s['repeats']} x {s['steps']} steps")
  g = r["gflops_per_image"]
  print(f"  GFLOPs per image (XLA): inference {g['inference']:.2f}, "
        f"train step {g['train step']:.2f}")
  for name, rate in r["images_per_second"].items():
    print(f"  {name:34s} {rate:10.1f} img/s")
  for name, value in r["mfu"].items():
    print(f"  MFU {name}: {100 * value:.1f}% of "
          f"{s['peak_tflops_per_device']} TFLOP/s per device")


MODES = {"fewshot": (fewshot, _print_fewshot),
         "throughput": (throughput, _print_throughput)}


def main(argv=None):
  """Runs the selected benchmarks; returns the exit status."""
  f = FLAGS
  f.unparse_flags()
  try:
    f(sys.argv if argv is None else argv)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  selected = [name for name in MODES if f[name].value]
  if not selected:
    print("error: choose a benchmark: " +
          " ".join(f"--{name}" for name in MODES), file=sys.stderr)
    return 1
  results = {}
  for name in selected:
    run, show = MODES[name]
    try:
      results[name] = run(f)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    show(results[name])
  if _JSON.value:
    with open(_JSON.value, "w") as fp:
      json.dump(results, fp, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
