"""Throughput: training and inference images/s beside the peers, MFU.

  python -m vit_jax.bench throughput [--model=B/16 --batch=32 --image_size=224
      --dtype=float32 --steps=3 --repeats=5 --peers --peak_tflops=T --json]

Times, on all local devices (data parallel), the same model's jitted training
step (forward, backward and AdamW, donated buffers) and inference in:

- `vit_jax`: our model with our XLA options (`vit_jax/xla_options.py`);
  `--ablate` adds it without them ("vit_jax, default XLA options");
- `vision_transformer`: the official code's architecture under JAX
  (`reference.py`: flax's stock modules, the same parameters), jitted the
  same way with XLA's defaults;
- with `--peers`, timm and Hugging Face `transformers` (PyTorch, on the GPU
  when JAX runs on one, else on the CPU, its default threads), built from the
  export mappings of `vit_jax/convert/timm.py` and `convert/hf.py`: the
  models our checkpoints convert to. A peer that cannot express the variant
  is skipped with the converter's reason.

The contenders are interleaved (A B C A B C ...): `--repeats` rounds of
`--steps` calls each, so that the load of a shared machine falls on all of
them; every rate is reported as the median and the min-max over the rounds,
and `ratios` divides our median by the peers'. FLOPs per image come from
XLA's cost analysis of our step; the MFU divides the achieved FLOP/s by the
device's peak (known for H100/H200/A100/TPU v4, v5 in bfloat16, or
`--peak_tflops`); on a CPU it is reported against the best rate of a large
jitted float32 matrix multiplication measured in the same run
(`gemm_tflops`), the practical limit of the matrix units there.
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
flags.DEFINE_integer("steps", 3, "Timed calls per round.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_bool("peers", False, "Also time timm and Hugging Face training "
                  "and inference (needs the torch extra).", flag_values=FLAGS)
flags.DEFINE_bool("ablate", False, "Also time our model without our XLA "
                  "options.", flag_values=FLAGS)
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for the "
                   "MFU (default: known for H100/H200/A100/TPU v4, v5 in "
                   "bfloat16; on CPU the measured GEMM rate).",
                   flag_values=FLAGS)
bench.define_output_flags(FLAGS, "Interleaved rounds; medians and min-max "
                          "over them are reported.", default=5)

# Dense bf16 peak TFLOP/s of one device, by `device_kind` substring.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "v5p": 459.0,
               "v5 lite": 197.0, "v4": 275.0}

NUM_CLASSES = 1000
OURS = "vit_jax"
OFFICIAL = "vision_transformer"


def from_flags(f):
  """Keyword arguments of `run` from the parsed flags `f`."""
  return dict(model=f.model, batch=f.batch, image_size=f.image_size,
              dtype=f.dtype, steps=f.steps, repeats=f.repeats, peers=f.peers,
              ablate=f.ablate, peak_tflops=f.peak_tflops)


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


def _rate(fn, steps, batch):
  """Images/s of `steps` calls of `fn` (results awaited at the end)."""
  start = time.perf_counter()
  for _ in range(steps):
    out = fn()
  _block(out)
  return steps * batch / (time.perf_counter() - start)


def _gemm_tflops(steps, repeats):
  """TFLOP/s of a jitted 2048^3 float32 matmul on one device (the best of
  `repeats` rounds: the practical peak, which other load only lowers)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  _block(matmul(a))
  rates = [_rate(lambda: matmul(a), steps, 1) for _ in range(repeats)]
  return max(rates) * 2 * n**3 / 1e12


class _JaxContender:
  """Jitted training step and inference of a flax model on the mesh;
  `train_kwargs` are the model's keyword arguments in training mode."""

  def __init__(self, net, images, labels, mesh, compiler_options,
               train_kwargs, flops=False):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import
    from vit_jax import losses  # pylint: disable=g-import-not-at-top

    data_sh, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    apply = lambda p, x, **kw: net.apply({"params": p}, x, **kw)  # pylint: disable=unnecessary-lambda-assignment
    params = jax.jit(lambda x: net.init(jax.random.PRNGKey(0), x)["params"],
                     out_shardings=repl)(images)
    tx = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = jax.jit(tx.init, out_shardings=repl)(params)

    def logits_of(p, x, **kw):
      out = apply(p, x, **kw)
      return out[0] if isinstance(out, tuple) else out

    def step(p, s, x, y):
      def loss_fn(p):
        logits = logits_of(p, x, **train_kwargs)
        return jnp.mean(losses.softmax_xent(
            logits, jax.nn.one_hot(y, NUM_CLASSES)))
      grads = jax.grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    jit = lambda f, **kw: jax.jit(f, compiler_options=compiler_options, **kw)  # pylint: disable=unnecessary-lambda-assignment
    # Compiled once; XLA's cost analysis of the same executables.
    self._infer = jit(logits_of, in_shardings=(repl, data_sh),
                      out_shardings=data_sh).lower(params, images).compile()
    self._train = jit(step, in_shardings=(repl, repl, data_sh, data_sh),
                      out_shardings=(repl, repl), donate_argnums=(0, 1)).lower(
                          params, opt_state, images, labels).compile()
    self.flops = None
    if flops:
      def per_image(compiled):
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return (float(cost.get("flops", 0.0)) * len(mesh.devices.flat)
                / images.shape[0])
      self.flops = {"inference": per_image(self._infer),
                    "train": per_image(self._train)}
    self._images, self._labels = images, labels
    self._state = [params, opt_state]
    _block(self.train())
    _block(self.infer())

  def train(self):
    self._state = list(self._train(*self._state, self._images, self._labels))
    return self._state[0]

  def infer(self):
    return self._infer(self._state[0], self._images)


def run(*, model, batch, image_size, dtype, steps, repeats, peers, ablate,
        peak_tflops):
  """Training and inference images/s of `model` and its peers, interleaved.

  Returns:
    {"setup", "gflops_per_image", "images_per_second": {contender: {"train",
    "inference"}: {"median", "min", "max"}}, "ratios", "mfu", "gemm_tflops"}
    and "peers_skipped" ({peer: reason}). Raises ValueError for bad input.
  """
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax import xla_options  # pylint: disable=g-import-not-at-top
  from vit_jax.bench import reference  # pylint: disable=g-import-not-at-top
  for name, value in (("batch", batch), ("image_size", image_size),
                      ("steps", steps), ("repeats", repeats)):
    if value < 1:
      raise ValueError(f"--{name} must be positive, got {value}")
  if peak_tflops is not None and peak_tflops <= 0:
    raise ValueError(f"--peak_tflops must be positive, got {peak_tflops}")
  # The model's fields (the peers are built from them); an unknown variant
  # raises ValueError here, before jax starts.
  overrides = dict(num_classes=NUM_CLASSES, image_size=image_size)
  if models.is_bit(model):
    raise ValueError(f"{model} is a ResNet: the throughput benchmark times "
                     "ViT variants")
  cfg = models.get_config(model)
  cfg.update(overrides)

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,g-multiple-import

  devices = jax.local_devices()
  if batch % len(devices):
    raise ValueError(f"--batch={batch} is not divisible by the "
                     f"{len(devices)} local devices")
  mesh = jax.sharding.Mesh(np.array(devices), ("data",))
  data_sh = NamedSharding(mesh, P("data"))
  images = jax.device_put(
      np.random.default_rng(0).uniform(
          -1, 1, (batch, image_size, image_size, 3)).astype(np.float32),
      data_sh)
  labels = jax.device_put(np.arange(batch) % NUM_CLASSES, data_sh)
  options = xla_options.for_backend()
  contenders = {OURS: _JaxContender(models.create(model, dtype=dtype,
                                                  **overrides),
                                    images, labels, mesh, options,
                                    {"train": True}, flops=True)}
  if ablate:
    contenders[f"{OURS}, default XLA options"] = _JaxContender(
        models.create(model, dtype=dtype, **overrides), images, labels, mesh,
        {}, {"train": True})
  skipped = {}
  try:
    contenders[OFFICIAL] = _JaxContender(reference.from_fields(cfg, dtype),
                                         images, labels, mesh, {}, {})
  except ValueError as e:
    skipped[OFFICIAL] = str(e)
  if peers:
    torch_peers, peers_skipped = _torch_contenders(
        cfg, batch, image_size, dtype, jax.default_backend())
    contenders.update(torch_peers)
    skipped.update(peers_skipped)

  samples = {name: {"train": [], "inference": []} for name in contenders}
  for _ in range(repeats):
    for name, c in contenders.items():
      for mode in ("train", "inference"):
        fn = c.train if mode == "train" else c.infer
        samples[name][mode].append(_rate(fn, steps, batch))
  rates = {name: {mode: bench.spread(v) for mode, v in modes.items()}
           for name, modes in samples.items()}

  kind = devices[0].device_kind
  backend = jax.default_backend()
  gemm = _gemm_tflops(steps, repeats) if backend == "cpu" else None
  peak = _peak_tflops(peak_tflops, kind, dtype)
  flops = contenders[OURS].flops
  mfu = {}
  peak_used = peak or gemm
  if peak_used:
    total = peak_used * 1e12 * len(devices)
    mfu = {mode: rates[OURS][mode]["median"] * flops[mode] / total
           for mode in ("train", "inference")}
  result = {
      "setup": dict(model=model, batch=batch, image_size=image_size,
                    dtype=dtype, backend=backend, device_kind=kind,
                    devices=len(devices), steps=steps, repeats=repeats,
                    peak_tflops_per_device=peak,
                    xla_options=xla_options.describe(options)),
      "gflops_per_image": {mode: v / 1e9 for mode, v in flops.items()},
      "images_per_second": rates,
      "ratios": _ratios(rates),
      "mfu": mfu,
      "mfu_basis": ("peak" if peak else "measured GEMM" if gemm else None),
      "gemm_tflops": gemm,
      "peers_skipped": skipped,
  }
  return result


def _ratios(rates):
  """Our median rate over each peer's, per mode; and over the best PyTorch."""
  ours = rates[OURS]
  ratios = {}
  for mode in ("train", "inference"):
    torch_best = None
    for name, r in rates.items():
      if name == OURS:
        continue
      ratios[f"{mode}: {OURS} / {name}"] = (ours[mode]["median"]
                                             / r[mode]["median"])
      if name.split(" ")[0] in ("timm", "transformers"):
        best = r[mode]["median"]
        torch_best = best if torch_best is None else max(torch_best, best)
    if torch_best:
      ratios[f"{mode}: {OURS} / best PyTorch"] = (ours[mode]["median"]
                                                   / torch_best)
  return ratios


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


class _TorchContender:
  """Training step (AdamW) and inference of a PyTorch model."""

  def __init__(self, net, x, y):
    import torch  # pylint: disable=g-import-not-at-top
    self._torch, self._net, self._x, self._y = torch, net, x, y
    self._opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.1)
    _block(self.train())
    _block(self.infer())

  def _logits(self):
    out = self._net(self._x)
    return out if self._torch.is_tensor(out) else out.logits

  def train(self):
    self._net.train()
    self._opt.zero_grad(set_to_none=True)
    loss = self._torch.nn.functional.cross_entropy(
        self._logits().float(), self._y)
    loss.backward()
    self._opt.step()
    return loss.detach()

  def infer(self):
    self._net.eval()
    with self._torch.inference_mode():
      return self._logits()


def _torch_contenders(cfg, batch, image_size, dtype, backend):
  """timm and transformers contenders of the same model, and those skipped."""
  nets, skipped = peer_models(cfg)
  import torch  # pylint: disable=g-import-not-at-top

  device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
  torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  x = torch.rand(batch, 3, image_size, image_size,
                 device=device, dtype=torch_dtype) * 2 - 1
  y = torch.arange(batch, device=device) % NUM_CLASSES
  contenders = {}
  for name, net in nets.items():
    net = net.to(device=device, dtype=torch_dtype)
    contenders[f"{name} ({device})"] = _TorchContender(net, x, y)
  return contenders, skipped


def report(r):
  """Prints the result of `run` as a table."""
  s = r["setup"]
  print(f"throughput: {s['model']}, batch {s['batch']}, {s['image_size']} px, "
        f"{s['dtype']}, {s['devices']} x {s['device_kind']} "
        f"({s['backend']}); {s['repeats']} interleaved rounds of "
        f"{s['steps']} steps; our XLA options: {s['xla_options']}")
  g = r["gflops_per_image"]
  print(f"  GFLOPs per image (XLA): inference {g['inference']:.3g}, "
        f"train step {g['train']:.3g}")
  print(f"  {'img/s: median (min-max)':38s} {'train':>22s} {'inference':>22s}")
  for name, modes in r["images_per_second"].items():
    cells = [f"{m['median']:8.2f} ({m['min']:.2f}-{m['max']:.2f})"
             for m in (modes["train"], modes["inference"])]
    print(f"  {name:38s} {cells[0]:>22s} {cells[1]:>22s}")
  for name, reason in r.get("peers_skipped", {}).items():
    print(f"  {name}: skipped: {reason}")
  for name, value in r["ratios"].items():
    print(f"  ratio {name}: {value:.2f}x")
  basis = (f"{s['peak_tflops_per_device']} TFLOP/s per device"
           if r["mfu_basis"] == "peak" else
           f"the measured float32 GEMM rate, {r['gemm_tflops']:.3f} TFLOP/s")
  for name, value in r["mfu"].items():
    print(f"  MFU {name}: {100 * value:.1f}% of {basis}")
