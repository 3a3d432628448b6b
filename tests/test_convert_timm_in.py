"""Import of timm VisionTransformer state dicts: `--from=FILE.safetensors|.pth`.

The checkpoints are built by timm itself (tiny models: width 32, 2 layers, 4 heads,
patch 4), every tensor perturbed with noise so that no zero initialisation hides a
mapping error, and saved with `safetensors.torch.save_file` and `torch.save`. Each
case converts with `--verify --tol=1e-5`: timm runs the file, we run the import, on
the same batch in fp32.
"""

import json
import os
import re

import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import npz
from vit_jax import sizes
from vit_jax.convert import cli
from vit_jax.convert import core

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
save_file = pytest.importorskip("safetensors.torch").save_file
vt = pytest.importorskip("timm.models.vision_transformer")

TOL = 1e-5
BASE = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=5)

CASES = {
    "token": {},
    "gap": dict(class_token=False, global_pool="avg", fc_norm=False,
                act_layer="gelu_tanh"),
    "map": dict(class_token=False, global_pool="map"),
    "token_nonsquare_nobias": dict(img_size=(16, 24), qkv_bias=False),
    # Expressible, so not refused: the cls token gets a zero position row.
    "no_embed_class": dict(no_embed_class=True),
    # The norm after selecting the cls token is the same as the norm before.
    "token_fc_norm": dict(fc_norm=True),
}
CLASSIFIER = {"token": "token", "gap": "gap", "map": "map",
              "token_nonsquare_nobias": "token", "no_embed_class": "token",
              "token_fc_norm": "token"}


def _perturb(model, scale=0.05, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return model


def _timm_vit(seed=0, **kwargs):
  torch.manual_seed(seed)
  return _perturb(vt.VisionTransformer(**kwargs), seed=seed)


def _save(model, path):
  sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  if str(path).endswith(".safetensors"):
    save_file(sd, str(path))
  else:
    torch.save(sd, str(path))
  return path


def _kwargs_file(path, kwargs):
  path.write_text(json.dumps({k: list(v) if isinstance(v, tuple) else v
                              for k, v in kwargs.items()}))
  return path


def _convert(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def _parity(out):
  line = [l for l in out.splitlines() if l.startswith("parity")][-1]
  return {k: float(v) for k, v in re.findall(r"(\w+) (\S+?)(?:,|$)", line.split(": ", 1)[1])}


def _one_line_error(rc, err):
  assert rc == 1, err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err
  return err


def _assert_init_accepts(npz_path):
  """The .npz is what `--config.init` of training reads, for the fields beside it."""
  fields = json.loads(open(timm_kwargs_path(npz_path)).read())["model"]
  model = core.create(fields)
  h, w = sizes.pair(fields["image_size"])
  shapes = jax.eval_shape(lambda: model.init(
      {"params": jax.random.PRNGKey(0)},
      np.zeros((1, h, w, fields["num_channels"]), np.float32)))["params"]
  init = jax.tree.map(lambda s: np.full(s.shape, np.nan, np.float32), shapes)
  report = {}
  config = ml_collections.ConfigDict(dict(init=str(npz_path), init_head=True,
                                          resample_posemb=False, dont_load=()))
  out = npz.flatten(checkpoint.load_init(init, config, model.grid_size((h, w)),
                                         log=lambda *_: None, report=report))
  assert report == dict(kept=[], mim_dropped=[], ignored=[]), report
  written = npz.flatten(npz.load_npz(npz_path))
  assert sorted(out) == sorted(written)
  for k in out:
    np.testing.assert_array_equal(out[k], written[k], err_msg=k)


def timm_kwargs_path(npz_path):
  return str(npz_path)[:-len(".npz")] + ".json"


@pytest.mark.parametrize("name", list(CASES))
def test_import_verifies(tmp_path, capsys, name):
  kwargs = dict(BASE, **CASES[name])
  model = _timm_vit(**kwargs)
  kw_file = _kwargs_file(tmp_path / "kwargs.json", kwargs)
  outs, figures = {}, {}
  for fmt in ("safetensors", "pth"):
    src = _save(model, tmp_path / f"model.{fmt}")
    outs[fmt] = tmp_path / f"ours_{fmt}.npz"
    rc, out, err = _convert(capsys, f"--from={src}", "--to=npz", f"--out={outs[fmt]}",
                            f"--timm_kwargs={kw_file}", "--verify", f"--tol={TOL}")
    assert rc == 0, err
    diffs = _parity(out)
    assert diffs["logits"] <= TOL, diffs
    assert diffs["params"] == 0 and diffs["npz_params"] == 0, diffs
    figures[fmt] = diffs
  print(f"{name}: {figures}")  # shown with -s
  a, b = (npz.flatten(npz.load_npz(outs[f])) for f in ("safetensors", "pth"))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  fields = json.loads(open(timm_kwargs_path(outs["pth"])).read())["model"]
  assert fields["classifier"] == CLASSIFIER[name]
  assert fields["hidden_act"] == ("gelu_tanh" if name == "gap" else "gelu")
  assert fields["qkv_bias"] == (name != "token_nonsquare_nobias")
  assert sizes.pair(fields["image_size"]) == sizes.pair(kwargs["img_size"])
  assert fields["layer_norm_eps"] == 1e-6
  _assert_init_accepts(outs["pth"])


def test_timm_model_name(tmp_path, capsys):
  """A real timm name; the image size (32, not its 224) is read off pos_embed."""
  model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3,
                            img_size=32, weight_init="skip")  # timm's init is slow
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(0.02 * torch.randn(p.shape, generator=gen)
              + (1.0 if "norm" in name and name.endswith(".weight") else 0.0))
  src = _save(model, tmp_path / "tiny.safetensors")
  out_npz = tmp_path / "tiny.npz"
  rc, out, err = _convert(capsys, f"--from={src}", "--timm_model=vit_tiny_patch16_224",
                          "--to=npz", f"--out={out_npz}", "--verify", f"--tol={TOL}")
  assert rc == 0, err
  diffs = _parity(out)
  assert diffs["logits"] <= TOL and diffs["params"] == 0, diffs
  print(f"vit_tiny_patch16_224: {diffs}")
  fields = json.loads(open(timm_kwargs_path(out_npz)).read())["model"]
  assert (fields["hidden_size"], fields["num_layers"], fields["num_heads"],
          fields["patch_size"], fields["image_size"], fields["num_classes"]) == (
              192, 12, 3, 16, 32, 3)


def test_kwargs_json_of_our_timm_export(tmp_path, capsys):
  """timm -> ours -> `--to=timm` (npz + kwargs JSON) -> timm state dict -> ours."""
  kwargs = dict(BASE, **CASES["map"])
  first = tmp_path / "first.npz"
  src = _save(_timm_vit(**kwargs), tmp_path / "m.safetensors")
  rc, _, err = _convert(capsys, f"--from={src}", f"--timm_kwargs="
                        f"{_kwargs_file(tmp_path / 'kwargs.json', kwargs)}",
                        "--to=npz", f"--out={first}")
  assert rc == 0, err
  rc, _, err = _convert(capsys, f"--from={first}", "--to=timm",
                        f"--out={tmp_path / 'exported.npz'}")
  assert rc == 0, err
  exported_kw = json.loads((tmp_path / "exported.json").read_text())
  model = vt.VisionTransformer(**exported_kw)
  model.load_pretrained(str(tmp_path / "exported.npz"))
  again = tmp_path / "again.npz"
  rc, _, err = _convert(capsys, f"--from={_save(model, tmp_path / 'back.pth')}",
                        f"--timm_kwargs={tmp_path / 'exported.json'}", "--to=npz",
                        f"--out={again}")
  assert rc == 0, err
  a, b = npz.flatten(npz.load_npz(first)), npz.flatten(npz.load_npz(again))
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("kwargs,feature", [
    (dict(reg_tokens=2), "register tokens"),
    (dict(init_values=0.1), "layer scale"),
    (dict(pre_norm=True), "pre_norm"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(class_token=False, global_pool="avg", fc_norm=True), "fc_norm=True"),
    (dict(global_pool="map"), "class_token=True"),
])
def test_refused_by_name(tmp_path, capsys, kwargs, feature):
  kwargs = dict(BASE, **kwargs)
  src = _save(_timm_vit(**kwargs), tmp_path / "m.safetensors")
  kw_file = _kwargs_file(tmp_path / "kwargs.json", kwargs)
  rc, _, err = _convert(capsys, f"--from={src}", f"--timm_kwargs={kw_file}", "--to=npz",
                        f"--out={tmp_path / 'o.npz'}")
  assert feature in _one_line_error(rc, err)
  assert "cannot be expressed" in err
  assert not os.path.exists(tmp_path / "o.npz")


def test_layer_scale_keys_refused_without_init_values(tmp_path, capsys):
  """The file's `ls1.gamma` names the feature even when the kwargs leave it out."""
  src = _save(_timm_vit(**dict(BASE, init_values=0.1)), tmp_path / "m.pth")
  kw_file = _kwargs_file(tmp_path / "kwargs.json", BASE)
  rc, _, err = _convert(capsys, f"--from={src}", f"--timm_kwargs={kw_file}", "--to=npz",
                        f"--out={tmp_path / 'o.npz'}")
  assert "layer scale" in _one_line_error(rc, err) and "ls1.gamma" in err


def test_unknown_keys_listed(tmp_path, capsys):
  sd = {k: v.contiguous() for k, v in _timm_vit(**BASE).state_dict().items()}
  sd["extra.weight"] = torch.zeros(3)
  save_file(sd, str(tmp_path / "m.safetensors"))
  kw_file = _kwargs_file(tmp_path / "kwargs.json", BASE)
  rc, _, err = _convert(capsys, f"--from={tmp_path / 'm.safetensors'}",
                        f"--timm_kwargs={kw_file}", "--to=npz",
                        f"--out={tmp_path / 'o.npz'}")
  assert "extra.weight" in _one_line_error(rc, err)


def test_not_a_weights_file(tmp_path, capsys):
  text = tmp_path / "notes.pth"
  text.write_text("these are notes, not weights\n")
  rc, _, err = _convert(capsys, f"--from={text}", "--timm_model=vit_tiny_patch16_224",
                        "--to=npz", f"--out={tmp_path / 'o.npz'}")
  assert "neither a safetensors file nor a PyTorch file" in _one_line_error(rc, err)
  assert str(text) in err


class _Payload:
  """Unpickling this would create a directory: it must never happen."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.makedirs, (self.marker,))


def test_pickled_objects_are_never_unpickled(tmp_path, capsys):
  marker = tmp_path / "unpickled"
  src = tmp_path / "evil.pth"
  torch.save({"patch_embed.proj.weight": _Payload(str(marker))}, str(src))
  rc, _, err = _convert(capsys, f"--from={src}", "--timm_model=vit_tiny_patch16_224",
                        "--to=npz", f"--out={tmp_path / 'o.npz'}")
  assert "not a weights-only PyTorch file" in _one_line_error(rc, err)
  assert not marker.exists()


def test_state_dict_needs_the_timm_model(tmp_path, capsys):
  src = _save(_timm_vit(**BASE), tmp_path / "m.pth")
  rc, _, err = _convert(capsys, f"--from={src}", "--to=npz", f"--out={tmp_path / 'o.npz'}")
  assert "--timm_model" in _one_line_error(rc, err)


def test_text_file_as_npz(tmp_path):
  text = tmp_path / "notes.npz"
  text.write_text("these are notes\n")
  with pytest.raises(ValueError) as e:
    npz.load_npz(text)
  message = str(e.value)
  assert "not an .npz archive" in message and str(text) in message
  assert "pickle" not in message.lower()
