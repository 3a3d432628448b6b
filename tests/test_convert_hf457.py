"""The HF export also loads in transformers 4.57.x (and 4.57's own files convert back).

transformers 4.57 is installed with pip into a cached directory (not the test
environment): `pip install --no-deps --target DIR "transformers==4.57.*"
"huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<0.23"`; the rest of its dependencies
(torch, numpy, safetensors, regex, ...) come from the running environment. DIR is
$VIT_JAX_HF457_DIR, default ~/.cache/vit_jax/transformers-4.57. A subprocess with
DIR first on PYTHONPATH loads our exports with `from_pretrained(...,
output_loading_info=True)`, runs them on our batch and saves them again with 4.57.
Skipped (with the reason) only when the package registry cannot be reached.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax.convert import core
from vit_jax.convert import hf
from vit_jax.convert import parity
from tests.test_convert import BASE, make_params, _assert_params_equal  # pylint: disable=g-bad-import-order

# Our side of the parity check exports safetensors and runs the subprocess
# on this environment's torch.
pytest.importorskip("torch")
pytest.importorskip("safetensors")

REQUIREMENTS = ("transformers==4.57.*", "huggingface_hub>=0.34,<1.0",
                "tokenizers>=0.22,<0.23")
_OFFLINE = ("No matching distribution", "Could not find a version",
            "Failed to establish a new connection", "Temporary failure in name",
            "Network is unreachable", "ConnectionError", "Max retries exceeded")

CASES = {
    "classification": dict(qkv_bias=False, hidden_act="gelu", image_size=(16, 24)),
    "pooler": dict(representation_size=24, num_classes=0),
    "mim": dict(decoder=True, use_mask_token=True, num_classes=0),
}

SCRIPT = r"""
import json, sys
import numpy as np
import torch
import transformers
assert transformers.__version__.startswith("4.57."), transformers.__version__
root = sys.argv[1]
report = {"version": transformers.__version__}
for name, spec in json.load(open(f"{root}/cases.json")).items():
  cls = getattr(transformers, spec["arch"])
  model, info = cls.from_pretrained(f"{root}/{name}", output_loading_info=True,
                                    attn_implementation="eager", **spec["kwargs"])
  model.eval()
  x = torch.from_numpy(np.load(f"{root}/{name}_images.npy"))
  with torch.no_grad():
    if spec["arch"] == "ViTForMaskedImageModeling":
      mask = torch.from_numpy(np.load(f"{root}/{name}_mask.npy"))
      res = model(x, bool_masked_pos=mask)
      outs = {"reconstruction": res.reconstruction, "loss": res.loss}
    elif spec["arch"] == "ViTForImageClassification":
      outs = {"logits": model(x).logits}
    else:
      res = model(x)
      outs = {"last_hidden_state": res.last_hidden_state, "pooler_output": res.pooler_output}
  for k, v in outs.items():
    np.save(f"{root}/{name}_{k}.npy", v.numpy())
  model.save_pretrained(f"{root}/{name}_saved")
  report[name] = {k: list(v) for k, v in info.items()}
json.dump(report, open(f"{root}/report.json", "w"))
"""


def _target_dir():
  default = os.path.join(os.path.expanduser("~"), ".cache", "vit_jax", "transformers-4.57")
  return os.environ.get("VIT_JAX_HF457_DIR", default)


@pytest.fixture(scope="module")
def hf457():
  target = _target_dir()
  if os.path.exists(os.path.join(target, "transformers", "__init__.py")):
    return target
  os.makedirs(target, exist_ok=True)
  proc = subprocess.run(
      [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
       "--disable-pip-version-check", "--target", target, *REQUIREMENTS],
      capture_output=True, text=True, timeout=600)
  if proc.returncode:
    if any(s in proc.stderr for s in _OFFLINE):
      pytest.skip(f"package registry unreachable, cannot install {REQUIREMENTS[0]}: "
                  f"{proc.stderr.strip().splitlines()[-1]}")
    raise RuntimeError(f"pip install of {REQUIREMENTS} failed:\n{proc.stderr}")
  return target


def test_export_loads_in_transformers_457(tmp_path, hf457):
  specs, expected = {}, {}
  for name, overrides in CASES.items():
    cfg = core.full_config(dict(BASE, **overrides))
    params = make_params(cfg, seed=3)
    arch, _ = hf.export(params, cfg, tmp_path / name)
    specs[name] = {"arch": arch, "kwargs": hf.load_kwargs(cfg, arch)}
    images, mask = parity.inputs(cfg)
    np.save(tmp_path / f"{name}_images.npy", images.transpose(0, 3, 1, 2).copy())
    np.save(tmp_path / f"{name}_mask.npy", mask)
    output, out = parity.ours(params, cfg, images, mask if cfg["decoder"] else None)
    if arch == hf.MIM:
      from vit_jax import losses  # pylint: disable=g-import-not-at-top
      expected[name] = {
          "reconstruction": output.transpose(0, 3, 1, 2),
          "loss": np.asarray(losses.masked_l1(images, output, mask, cfg["patch_size"]))}
    elif arch == hf.CLASSIFICATION:
      expected[name] = {"logits": output}
    else:
      expected[name] = {"last_hidden_state": out["encoded"],
                        "pooler_output": out["pre_logits"]}
    expected[name]["params"] = params
  (tmp_path / "cases.json").write_text(json.dumps(specs))
  env = dict(os.environ, PYTHONPATH=hf457)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["version"].startswith("4.57.")
  for name in CASES:
    assert not any(report[name].values()), (name, report[name])
    for k, want in expected[name].items():
      if k == "params":
        continue
      got = np.load(tmp_path / f"{name}_{k}.npy")
      assert np.max(np.abs(got - want)) <= 1e-4, (name, k)
    # What 4.57 saves converts back to the same parameters.
    back, _, _ = hf.to_ours(*hf.read(tmp_path / f"{name}_saved"))
    _assert_params_equal(expected[name]["params"], back)
