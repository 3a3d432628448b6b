"""`python -m vit_jax.bench fewshot` at a tiny size: runs and agrees."""

import json
import subprocess
import sys

import pytest

from vit_jax.bench import __main__ as bench

TINY = ["--classes=4", "--dim=12", "--shots=1,5", "--seeds=2",
        "--test_per_class=5", "--l2_exponents=-2,4,10", "--repeats=1"]


def test_fewshot_bench_agrees_with_sklearn(capsys):
  assert bench.main(["bench", "fewshot"] + TINY + ["--json"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result["setup"]["fits"] == 2 * 2 * 3
  assert result["setup"]["eigendecompositions"] == 2 * 2
  assert result["setup"]["l2s"] == [0.25, 16.0, 1024.0]
  assert result["accuracies_agree"]
  assert result["speedup"] > 0
  assert set(result["loo_l2_per_shots"]) == {"1", "5"}
  assert all(len(v) == 2 for v in result["loo_l2_per_shots"].values())


def test_fewshot_bench_prints_a_table(capsys):
  assert bench.main(["bench", "fewshot"] + TINY) == 0
  out = capsys.readouterr().out
  assert "speedup" in out and "accuracies agree: True" in out


@pytest.mark.parametrize("args, message", [
    (["fewshot", "--shots=1,x"], "--shots takes comma-separated numbers"),
    (["fewshot", "--shots=0"], "--shots must be positive"),
    (["fewshot", "--classes=1"], "classes"),
    (["fewshot", "--fewshot_classes=4"], "fewshot_classes"),
    (["speed"], "unknown benchmark 'speed'"),
])
def test_bad_input_is_one_error_line(args, message, capsys):
  assert bench.main(["bench"] + args) == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ")
  assert message in lines[0]


def test_command_line_without_subcommand_prints_usage():
  proc = subprocess.run([sys.executable, "-m", "vit_jax.bench"],
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 1
  assert proc.stderr.startswith(
      "error: name a benchmark; usage: python -m vit_jax.bench {throughput,")
  assert "Traceback" not in proc.stderr


def test_subcommand_help_lists_its_own_flags(capsys):
  assert bench.main(["bench", "fewshot", "--help"]) == 0
  out = capsys.readouterr().out
  assert "--classes" in out and "--l2_exponents" in out
  assert "--batch" not in out
