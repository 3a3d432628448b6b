"""Benchmarks of vit_jax beside its peers: `python -m vit_jax.bench BENCHMARK`.

  throughput.py  images/s of jitted training and inference, XLA FLOPs per image
                 and MFU, interleaved with the official vision_transformer model
                 (reference.py) and, with `--peers`, timm and Hugging Face.
  fewshot.py     the closed-form few-shot ridge (`vit_jax/evaluators/ridge.py`)
                 against scikit-learn's RidgeCV (eigen, svd) and RidgeClassifier,
                 big_vision's solve and a Cholesky solve per L2.
  pipeline.py    the input pipeline of a config (its dataset and a folder of
                 image files): decode and augmentation cost per image and the
                 training loader's images/s beside the training step's.

Each benchmark module holds its own flags (`FLAGS`, an `absl.flags.FlagValues`,
so that it can be imported beside other command-line modules), `from_flags(FLAGS)`
(the keyword arguments of `run`), `run(**kwargs) -> dict` and `report(dict)`,
which prints the table. The command line is in `__main__.py`.
"""

from absl import flags


def define_output_flags(flag_values, repeats_help, default=3):
  """`--repeats` and `--json`, which every benchmark takes."""
  flags.DEFINE_integer("repeats", default, repeats_help, lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_bool("json", False, "Print the results as one JSON object on "
                    "stdout instead of the table.", flag_values=flag_values)


def spread(values):
  """{"median", "min", "max"} of measurements: how every benchmark reports
  its repeated runs."""
  ordered = sorted(float(v) for v in values)
  n = len(ordered)
  median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
  return {"median": median, "min": ordered[0], "max": ordered[-1]}
