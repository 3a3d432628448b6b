"""Every command line answers `--help` with its usage and flags, exit 0.

The absl ones (main, fewshot, analyze, sweep, bench) also answer `-h`,
`--helpshort` and `--helpfull`; `main --show_config` prints the config's
fields. The modules run in-process (`run(argv)` / `main(argv)`); the
experiment scripts, which are files rather than modules, as subprocesses.
"""

import os
import re
import subprocess
import sys

from absl import flags
import pytest

from vit_jax import analyze
from vit_jax import config_utils
from vit_jax import fewshot
from vit_jax import main
from vit_jax import sweep
from vit_jax.bench import __main__ as bench
from vit_jax.bench import fewshot as bench_fewshot
from vit_jax.bench import pipeline as bench_pipeline
from vit_jax.bench import throughput as bench_throughput
from vit_jax.convert import cli as convert

from test_cli_errors import one_error_line  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (run, argv before the help flag, its flags, the usage line's start).
ABSL = {
    "main": (main.run, ["main"], flags.FLAGS,
             "python -m vit_jax.main --config=configs/digits.py --workdir="),
    "fewshot": (fewshot.run, ["fewshot"], fewshot.FLAGS,
                "python -m vit_jax.fewshot --workdir=DIR"),
    "analyze": (analyze.run, ["analyze"], analyze.FLAGS,
                "python -m vit_jax.analyze --workdir=DIR"),
    "sweep": (sweep.run, ["sweep"], sweep.FLAGS,
              "python -m vit_jax.sweep --config=experiments/<name>/sweep.py"),
    "bench throughput": (bench.main, ["bench", "throughput"],
                         bench_throughput.FLAGS,
                         "python -m vit_jax.bench throughput [--model=B/16"),
    "bench fewshot": (bench.main, ["bench", "fewshot"], bench_fewshot.FLAGS,
                      "python -m vit_jax.bench fewshot [--classes=100"),
    "bench pipeline": (bench.main, ["bench", "pipeline"],
                       bench_pipeline.FLAGS,
                       "python -m vit_jax.bench pipeline [--config="),
}


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
  monkeypatch.chdir(ROOT)


def _own_flags(name):
  """The flags `name --help` must list: the module's own."""
  run, _, flag_values, _ = ABSL[name]
  if run is main.run:  # The global FLAGS: main's among absl's.
    return [flag_values[n] for n in main.FLAG_NAMES]
  return list({id(flag_values[n]): flag_values[n] for n in flag_values}
              .values())


def _squeezed(text):
  return " ".join(text.split())


@pytest.mark.parametrize("name", ABSL)
@pytest.mark.parametrize("option", ["--help", "-h", "--helpshort"])
def test_absl_help_lists_the_usage_and_every_own_flag(name, option, capsys):
  run, argv, _, usage = ABSL[name]
  assert run([*argv, option]) == 0
  out, err = capsys.readouterr()
  assert not err
  module = sys.modules[run.__module__]
  if name.startswith("bench "):
    module = sys.modules[f"vit_jax.bench.{name.split()[1]}"]
  # The module docstring first: its summary, then its usage lines.
  assert out.startswith(module.__doc__.strip().splitlines()[0])
  assert f"\n  {usage}" in out
  listing = out[out.index("\nflags:\n"):]
  for flag in _own_flags(name):
    entry = f"--[no]{flag.name}: " if flag.boolean else f"--{flag.name}: "
    assert f"\n  {entry}" in listing, entry
    help_words = re.sub(r"; repeat this option.*$", "", _squeezed(flag.help))
    assert help_words[:40] in _squeezed(listing), flag.name
  # Only the command's own flags: none of absl's.
  for noise in ("--flagfile", "--undefok", "--verbosity", "--logtostderr",
                "absl.logging"):
    assert noise not in listing
  assert listing.count("\n  --") == len(_own_flags(name))


@pytest.mark.parametrize("name", ABSL)
def test_absl_helpfull_lists_absl_flags_too(name, capsys):
  run, argv, _, usage = ABSL[name]
  assert run([*argv, "--helpfull"]) == 0
  out, err = capsys.readouterr()
  assert not err
  assert f"\n  {usage}" in out
  assert "--flagfile" in out and "--undefok" in out
  for flag in _own_flags(name):
    assert re.search(rf"--(\[no\])?{re.escape(flag.name)}: ", out), flag.name
  if name == "main":
    assert "--verbosity" in out  # absl.logging's, which main accepts.


def test_main_flags_are_all_listed():
  # A flag added to main must be added to FLAG_NAMES too.
  own = {f.name for f in flags.FLAGS.flags_by_module_dict()["vit_jax.main"]}
  assert own == set(main.FLAG_NAMES)


def test_main_help_says_how_to_list_the_config_fields(capsys):
  assert main.run(["main", "--help"]) == 0
  out = _squeezed(capsys.readouterr().out)
  assert "--show_config" in out.split(" flags: ")[0]  # In the usage text.
  for field in ("total_steps", "batch_size", "optim.lr", "model_name", "init",
                "progress"):
    assert f"`{field}`" in out, field
    assert field in config_utils.default_config() or (
        field.split(".")[1] in config_utils.default_config().optim)
  assert "`progress` (True: a progress bar on a terminal" in out


def test_bench_help_lists_the_benchmarks(capsys):
  for option in ("--help", "-h", "--helpfull", "help"):
    assert bench.main(["bench", option]) == 0
    out, err = capsys.readouterr()
    assert not err and out.startswith("`python -m vit_jax.bench {")
    for name in bench.BENCHMARKS:
      assert f"\n  python -m vit_jax.bench {name} [--" in out


def test_convert_help(capsys):
  with pytest.raises(SystemExit) as exit_:
    convert.main(["--help"])
  assert exit_.value.code == 0
  out, err = capsys.readouterr()
  assert not err
  assert out.startswith("usage: python -m vit_jax.convert [-h] --from SRC "
                        "--to {hf,timm,npz} --out OUT")
  assert "\n`python -m vit_jax.convert --from=SRC --to=" in out  # Docstring.
  options = out[out.index("\noptions:\n"):]
  for action in convert.parser()._actions:  # pylint: disable=protected-access
    assert action.help, action.option_strings  # Every flag has its help.
    assert f"\n  {action.option_strings[0]}" in options
    assert _squeezed(action.help.replace("%(default)g", ""))[:30] in (
        _squeezed(options))


@pytest.mark.parametrize("script, usage, flag", [
    ("experiments/simmim_digits/run.py",
     "python experiments/simmim_digits/run.py --root=/tmp/simmim_digits",
     "--seeds SEEDS"),
    ("experiments/fewshot_digits/random_init_npz.py",
     "python experiments/fewshot_digits/random_init_npz.py /tmp/", "path"),
])
def test_experiment_script_help(script, usage, flag, tmp_path):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                        cwd=tmp_path, env=env, capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"usage: python {script}")
  assert f"\n  {usage}" in proc.stdout
  assert f"\n  {flag}" in proc.stdout
  assert not list(tmp_path.iterdir())  # --help wrote nothing.


def test_main_help_as_a_module():
  # `python -m` registers main's flags under the file's path, not its name.
  proc = subprocess.run([sys.executable, "-m", "vit_jax.main", "--help"],
                        cwd=ROOT, capture_output=True, text=True, check=False,
                        timeout=120)
  assert proc.returncode == 0 and not proc.stderr, proc.stderr
  listing = proc.stdout[proc.stdout.index("\nflags:\n"):]
  assert "\n  --config: " in listing and "\n  --workdir: " in listing
  assert listing.count("\n  --") == len(main.FLAG_NAMES)


def _config_lines(capsys, *args):
  assert main.run(["main", "--config=configs/digits.py", *args,
                   "--show_config"]) == 0
  out, err = capsys.readouterr()
  assert not err
  lines = out.splitlines()
  for line in lines:
    assert re.fullmatch(r"[a-z_0-9]+(\.[a-z_0-9]+)* = .+", line), line
  return lines


def test_show_config_prints_the_fields_with_the_overrides(capsys, tmp_path):
  lines = _config_lines(capsys, "--config.total_steps=7",
                        "--config.optim.lr=0.01", f"--workdir={tmp_path}/w",
                        "--config.evals.fewshot.l2_regs=(1.,2.)")
  assert "total_steps = 7" in lines and "optim.lr = 0.01" in lines
  # The few-shot grid, which its grid-edge warning says to widen.
  assert "evals.fewshot.l2_regs = (1.0, 2.0)" in lines
  # The config file's own values (configs/digits.py) beside them.
  for line in ("batch_size = 96", "dataset = 'digits'", "image_size = (16, 16)",
               "model.hidden_size = 64", "evals.fewshot.shots = (1, 5, 10)",
               "optim.kwargs = {}", "progress = True"):
    assert line in lines
  # Every field a config may set, and nothing else.
  assert ({line.split(".")[0].split(" ")[0] for line in lines}
          == set(config_utils.default_config()))
  assert not os.path.exists(tmp_path / "w")  # Nothing trained or written.


def test_show_config_of_a_config_argument(capsys):
  assert main.run(["main", "--config=configs/digits.py:runlocal",
                   "--show_config"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "total_steps = 20" in lines and "model.num_layers = 1" in lines


@pytest.mark.parametrize("args, message", [
    (["--config=configs/digits.py", "--config.total_stepz=7"],
     "unknown config field total_stepz (did you mean total_steps?): check the "
     "--config.<field> overrides against the config file (--show_config "
     "lists them)"),
    (["--config=configs/digits.py", "--config.total_steps=x"],
     "--config.total_steps=x"),
    ([], "pass --config=configs/<name>.py[:arg]"),
])
def test_show_config_bad_input_is_one_error_line(args, message, capfd):
  rc = main.run(["main", *args, "--show_config"])
  assert message in one_error_line(rc, capfd)
