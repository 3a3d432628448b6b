"""Benchmarks of vit_jax beside its peers: `python -m vit_jax.bench BENCHMARK`.

  throughput.py  images/s of jitted inference and training, XLA FLOPs per image
                 and MFU; timm and Hugging Face inference of the same model beside
                 them (`--peers`).
  fewshot.py     the closed-form few-shot ridge (`vit_jax/evaluators/ridge.py`)
                 against scikit-learn's RidgeClassifier.

Each benchmark module holds its own flags (`FLAGS`, an `absl.flags.FlagValues`,
so that it can be imported beside other command-line modules), `from_flags(FLAGS)`
(the keyword arguments of `run`), `run(**kwargs) -> dict` and `report(dict)`,
which prints the table. The command line is in `__main__.py`.
"""

from absl import flags


def define_output_flags(flag_values, repeats_help):
  """`--repeats` and `--json`, which every benchmark takes."""
  flags.DEFINE_integer("repeats", 3, repeats_help, lower_bound=1,
                       flag_values=flag_values)
  flags.DEFINE_bool("json", False, "Print the results as one JSON object on "
                    "stdout instead of the table.", flag_values=flag_values)
