"""`python -m vit_jax.bench {throughput,fewshot,pipeline} [--flags] [--json]`.

  python -m vit_jax.bench throughput [--model=B/16 --batch=32 --image_size=224
      --dtype=float32 --steps=10 --repeats=3 --peers --peak_tflops=T --json]
  python -m vit_jax.bench fewshot [--classes=100 --dim=768 --shots=1,5,10,25
      --seeds=5 --l2_exponents=-2,1,4,7,10,13,16,19 --test_per_class=10
      --repeats=3 --json]
  python -m vit_jax.bench pipeline [--config=configs/digits.py
      --datasets=config,folder --folder_images=1000 --folder_size=64
      --batches=20 --steps=10 --repeats=3 --json]

The subcommand picks the benchmark; its flags follow it (`python -m vit_jax.bench
BENCHMARK --help` lists them). Without `--json` the results are printed as a
table; with `--json` they are printed instead as one JSON object on stdout (and
nothing else is written there), e.g. `... fewshot --json > fewshot.json`.

Exit status: 0 on success; 1 with a one-line `error: ...` on stderr for bad
input (no or unknown subcommand, unknown flag or model variant, a non-positive
size, a batch not divisible by the local devices, `--peers` without the torch
extra).
"""

import json
import sys

from absl import flags

from vit_jax import cli_help
from vit_jax.bench import fewshot
from vit_jax.bench import pipeline
from vit_jax.bench import throughput

BENCHMARKS = {"throughput": throughput, "fewshot": fewshot,
              "pipeline": pipeline}
USAGE = ("usage: python -m vit_jax.bench {" + ",".join(BENCHMARKS) +
         "} [--flags] [--json]  (BENCHMARK --help lists its flags)")


def _error(message):
  print(f"error: {message}", file=sys.stderr)
  return 1


def main(argv=None):
  """Runs the benchmark named by `argv[1]`; returns the exit status."""
  argv = sys.argv if argv is None else list(argv)
  if len(argv) < 2:
    return _error(f"name a benchmark; {USAGE}")
  if argv[1] == "help" or cli_help.requested(argv[:2]):
    return cli_help.write(f"{__doc__.strip()}\n")
  name, args = argv[1], argv[2:]
  if name not in BENCHMARKS:
    return _error(f"unknown benchmark {name!r}: choose one of "
                  f"{', '.join(BENCHMARKS)}")
  module = BENCHMARKS[name]
  f = module.FLAGS
  if cli_help.requested(argv[1:]):
    return cli_help.show(argv[1:], module.__doc__, f)
  f.unparse_flags()
  try:
    rest = f([f"{argv[0]} {name}"] + args)
  except flags.Error as e:
    return _error(e)
  if len(rest) > 1:
    return _error(f"unexpected argument(s) {' '.join(rest[1:])!r}: flags are "
                  "--name=value")
  try:
    result = module.run(**module.from_flags(f))
  except ValueError as e:
    return _error(e)
  if f.json:
    print(json.dumps(result))
  else:
    module.report(result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
