"""Throughput: images/s, XLA FLOPs per image and MFU, timm and Hugging Face beside.

  python -m vit_jax.bench throughput [--model=B/16 --batch=32 --image_size=224
      --dtype=float32 --steps=10 --repeats=3 --peers --peak_tflops=T --json]

Images per second of a variant's jitted inference and training step (AdamW,
donated buffers) on all local devices (data parallel), the FLOPs per image from
XLA's cost analysis and, where the device's peak is known (or `--peak_tflops`
is given), the model FLOPs utilisation (MFU). `--peers` times the same model's
inference in timm and Hugging Face `transformers` (PyTorch, on the GPU when JAX
runs on one, else on the CPU) beside it. The peers are built from the export
mappings of `vit_jax/convert/timm.py` (`kwargs`) and `vit_jax/convert/hf.py`
(`architecture`, `config_dict`), i.e. they are the models our checkpoints
convert to; a variant one of them cannot express (a hybrid) is skipped with
the converter's reason.

Every rate is the best of `--repeats` runs of `--steps` calls, which is robust
against other load on the machine.
"""

import time

from absl import flags

from vit_jax import bench

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "B/16", "Model variant (vit_jax.models.VARIANTS).",
                    flag_values=FLAGS)
flags.DEFINE_integer("batch", 32, "Global batch size (divisible by the number "
                     "of local devices).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("image_size", 224, "Image height and width.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype (parameters stay float32).", flag_values=FLAGS)
flags.DEFINE_integer("steps", 10, "Timed calls per measurement.",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("peers", False, "Also time timm and Hugging Face inference "
                  "(needs the torch extra).", flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for the "
                   "MFU (default: known for H100/H200/A100/TPU v4, v5 in "
                   "bfloat16; none on CPU).", flag_values=FLAGS)
bench.define_output_flags(FLAGS, "Measurements per rate; the best counts.")

# Dense bf16 peak TFLOP/s of one device, by `device_kind` substring.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5p": 459.0,
               "v5 lite": 197.0, "v4": 275.0}

NUM_CLASSES = 1000


def from_flags(f):
  """Keyword arguments of `run` from the parsed flags `f`."""
  return dict(model=f.model, batch=f.batch, image_size=f.image_size,
              dtype=f.dtype, steps=f.steps, repeats=f.repeats, peers=f.peers,
              peak_tflops=f.peak_tflops)


def _peak_tflops(given, device_kind, dtype):
  if given:
    return given
  for name, peak in PEAK_TFLOPS.items():
    if name in device_kind:
      return peak if dtype == "bfloat16" else None
  return None


def _block(out):
  if hasattr(out, "detach"):  # torch
    out.sum().item()
  else:
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(out)


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


def run(*, model, batch, image_size, dtype, steps, repeats, peers,
        peak_tflops):
  """Inference and training images/s of variant `model` on all local devices.

  Returns:
    {"setup", "gflops_per_image", "images_per_second", "mfu"} and, with
    `peers`, "peers_skipped" ({peer: reason}) for peers that cannot express
    the model. Raises ValueError for bad input.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  for name, value in (("batch", batch), ("image_size", image_size),
                      ("steps", steps), ("repeats", repeats)):
    if value < 1:
      raise ValueError(f"--{name} must be positive, got {value}")
  if peak_tflops is not None and peak_tflops <= 0:
    raise ValueError(f"--peak_tflops must be positive, got {peak_tflops}")
  # The model's fields (the peers are built from them); an unknown variant
  # raises ValueError here, before jax starts.
  overrides = dict(num_classes=NUM_CLASSES, image_size=image_size)
  cfg = models.get_config(model)
  cfg.update(overrides)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import
  from vit_jax import losses  # pylint: disable=g-import-not-at-top

  devices = jax.local_devices()
  if batch % len(devices):
    raise ValueError(f"--batch={batch} is not divisible by the "
                     f"{len(devices)} local devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  net = models.create(model, dtype=dtype, **overrides)
  images = jax.device_put(
      np.random.default_rng(0).uniform(
          -1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
      data_sh)
  labels = jax.device_put(np.arange(batch) % NUM_CLASSES, data_sh)
  params = jax.jit(lambda x: net.init(jax.random.PRNGKey(0), x)["params"],
                   out_shardings=repl)(images)
  tx = optax.adamw(1e-4, weight_decay=0.1)
  opt_state = jax.jit(tx.init, out_shardings=repl)(params)

  infer = jax.jit(lambda p, x: net.apply({"params": p}, x)[0],
                  in_shardings=(repl, data_sh), out_shardings=data_sh)

  def step(p, s, x, y):
    def loss_fn(p):
      logits, _ = net.apply({"params": p}, x, train=True)
      return jnp.mean(losses.softmax_xent(
          logits, jax.nn.one_hot(y, NUM_CLASSES)))
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
  rates = {
      "vit_jax inference": _best_rate(lambda: infer(state["p"], images),
                                      steps, repeats, batch),
      "vit_jax train step": _best_rate(train_once, steps, repeats, batch),
  }
  skipped = {}
  if peers:
    peer_rates, skipped = _peer_rates(cfg, batch, image_size, dtype, steps,
                                      repeats, jax.default_backend())
    rates.update(peer_rates)
  kind = devices[0].device_kind
  peak = _peak_tflops(peak_tflops, kind, dtype)
  mfu = {}
  if peak:
    total_peak = peak * 1e12 * len(devices)
    mfu = {"inference": rates["vit_jax inference"] * infer_flops / total_peak,
           "train step": rates["vit_jax train step"] * train_flops / total_peak}
  result = {
      "setup": dict(model=model, batch=batch, image_size=image_size,
                    dtype=dtype, backend=jax.default_backend(),
                    device_kind=kind, devices=len(devices), steps=steps,
                    repeats=repeats, peak_tflops_per_device=peak),
      "gflops_per_image": {"inference": infer_flops / 1e9,
                           "train step": train_flops / 1e9},
      "images_per_second": rates,
      "mfu": mfu,
  }
  if peers:
    result["peers_skipped"] = skipped
  return result


def peer_models(cfg):
  """The PyTorch models our export of model fields `cfg` converts to.

  Returns:
    ({"timm": VisionTransformer, "transformers": ViT...}, {peer: reason}) with
    the settings of the converters (`convert/timm.py` kwargs, `convert/hf.py`
    config); a peer that cannot express the model is left out with the
    converter's reason.
  """
  try:
    from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"--peers needs timm, transformers and torch ({e}): "
                     "pip install -e \".[torch]\"") from e
  from vit_jax.convert import core  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import hf as hf_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.convert import timm as timm_lib  # pylint: disable=g-import-not-at-top

  nets, skipped = {}, {}
  try:
    nets["timm"] = vision_transformer.VisionTransformer(
        **timm_lib.kwargs(cfg))
  except core.Unsupported as e:
    skipped["timm"] = str(e)
  try:
    full = core.full_config(cfg)
    arch = hf_lib.architecture(full)
    config = transformers.ViTConfig(**hf_lib.config_dict(full, arch))
    config._attn_implementation = "sdpa"  # pylint: disable=protected-access
    nets["transformers"] = getattr(transformers, arch)(config)
  except core.Unsupported as e:
    skipped["transformers"] = str(e)
  return nets, skipped


def _peer_rates(cfg, batch, image_size, dtype, steps, repeats, backend):
  """Inference images/s of the same model in timm and transformers."""
  nets, skipped = peer_models(cfg)
  import torch  # pylint: disable=g-import-not-at-top

  device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  x = torch.rand(batch, 3, image_size, image_size,
                 device=device, dtype=torch_dtype) * 2 - 1
  rates = {}
  for name, net in nets.items():
    net = net.to(device=device, dtype=torch_dtype).eval()

    def call(net=net):
      with torch.inference_mode():
        out = net(x)
      return out if torch.is_tensor(out) else out.logits

    call()
    rates[f"{name} inference ({device})"] = _best_rate(call, steps, repeats,
                                                       batch)
  return rates, skipped


def report(r):
  """Prints the result of `run` as a table."""
  s = r["setup"]
  print(f"throughput: {s['model']}, batch {s['batch']}, {s['image_size']} px, "
        f"{s['dtype']}, {s['devices']} x {s['device_kind']} "
        f"({s['backend']}), best of {s['repeats']} x {s['steps']} steps")
  g = r["gflops_per_image"]
  print(f"  GFLOPs per image (XLA): inference {g['inference']:.3g}, "
        f"train step {g['train step']:.3g}")
  for name, rate in r["images_per_second"].items():
    print(f"  {name:34s} {rate:10.1f} img/s")
  for name, reason in r.get("peers_skipped", {}).items():
    print(f"  {name}: skipped: {reason}")
  for name, value in r["mfu"].items():
    print(f"  MFU {name}: {100 * value:.1f}% of "
          f"{s['peak_tflops_per_device']} TFLOP/s per device")
