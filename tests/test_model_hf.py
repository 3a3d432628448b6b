"""Our model against Hugging Face's ViTModel with the same weights.

Covers what HF defines and our reference tests do not tie to it directly:
interpolate_pos_encoding at a non-square resolution, bool_masked_pos, hidden
states and attention weights. The weights are mapped by hand here (docs/design.md
§5, the names of HF's files) so that this test depends on the model
only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

D, HEADS, LAYERS, MLP, PATCH, SIZE = 16, 2, 2, 32, 4, 8


def _hf_state_dict(params):
  """Our parameters under the names of HF's model.safetensors files."""
  sd = {
      "embeddings.cls_token": params["cls"],
      "embeddings.mask_token": params["mask_token"],
      "embeddings.position_embeddings":
          params["Transformer"]["posembed_input"]["pos_embedding"],
      "embeddings.patch_embeddings.projection.weight":
          params["embedding"]["kernel"].transpose(3, 2, 0, 1),
      "embeddings.patch_embeddings.projection.bias":
          params["embedding"]["bias"],
      "layernorm.weight": params["Transformer"]["encoder_norm"]["scale"],
      "layernorm.bias": params["Transformer"]["encoder_norm"]["bias"],
  }
  for i in range(LAYERS):
    p = params["Transformer"][f"encoderblock_{i}"]
    mha = p["MultiHeadDotProductAttention_1"]
    pre = f"encoder.layer.{i}."
    for name in ("query", "key", "value"):
      sd[f"{pre}attention.attention.{name}.weight"] = (
          mha[name]["kernel"].reshape(D, D).T)
      sd[f"{pre}attention.attention.{name}.bias"] = (
          mha[name]["bias"].reshape(D))
    sd[f"{pre}attention.output.dense.weight"] = mha["out"]["kernel"].reshape(
        D, D).T
    sd[f"{pre}attention.output.dense.bias"] = mha["out"]["bias"]
    for ours, theirs in (("LayerNorm_0", "layernorm_before"),
                         ("LayerNorm_2", "layernorm_after")):
      sd[f"{pre}{theirs}.weight"] = p[ours]["scale"]
      sd[f"{pre}{theirs}.bias"] = p[ours]["bias"]
    for ours, theirs in (("Dense_0", "intermediate.dense"),
                         ("Dense_1", "output.dense")):
      sd[f"{pre}{theirs}.weight"] = p["MlpBlock_3"][ours]["kernel"].T
      sd[f"{pre}{theirs}.bias"] = p["MlpBlock_3"][ours]["bias"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def pair_of_models(tmp_path_factory):
  model = models.create("testing", hidden_size=D, num_heads=HEADS,
                        num_layers=LAYERS, mlp_dim=MLP, patch_size=PATCH,
                        image_size=SIZE, use_mask_token=True, num_classes=0)
  shape = (1, SIZE, SIZE, 3)
  tree = jax.eval_shape(model.init, {"params": jax.random.PRNGKey(0)},
                        jax.ShapeDtypeStruct(shape, jnp.float32))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32), tree)
  config = transformers.ViTConfig(
      hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
      intermediate_size=MLP, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6, image_size=SIZE, patch_size=PATCH,
      num_channels=3, qkv_bias=True, encoder_stride=PATCH,
      hidden_dropout_prob=0., attention_probs_dropout_prob=0.)
  path = tmp_path_factory.mktemp("hf_vit")
  config.save_pretrained(path)
  safetensors_numpy.save_file(_hf_state_dict(params),
                              str(path / "model.safetensors"))
  hf, info = transformers.ViTModel.from_pretrained(
      path, add_pooling_layer=False, use_mask_token=True,
      attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  return model, params, hf.eval()


def test_interpolate_pos_encoding_masks_and_outputs_match_hf(pair_of_models):
  model, params, hf = pair_of_models
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 12, 20, 3)).astype(np.float32)  # 3 x 5.
  mask = rng.random((2, 15)) < 0.4
  fn = jax.jit(functools.partial(
      model.apply, interpolate_pos_encoding=True, output_attentions=True,
      output_hidden_states=True))
  _, out = fn({"params": params}, images, bool_masked_pos=mask)
  with torch.no_grad():
    res = hf(torch.from_numpy(images).permute(0, 3, 1, 2),
             bool_masked_pos=torch.from_numpy(mask),
             interpolate_pos_encoding=True, output_attentions=True,
             output_hidden_states=True)
  tol = dict(rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["embeddings"],
                             res.hidden_states[0].numpy(), **tol)
  for i in range(LAYERS):
    np.testing.assert_allclose(out[f"block{i}"],
                               res.hidden_states[i + 1].numpy(), **tol)
    np.testing.assert_allclose(out[f"block{i}/attention"],
                               res.attentions[i].numpy(), **tol)
  np.testing.assert_allclose(out["encoded"], res.last_hidden_state.numpy(),
                             **tol)
