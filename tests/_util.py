"""Helpers shared by the tests."""

import jax.numpy as jnp
import numpy as np

from lora_jax import LoraFactors
from lora_jax._paths import leaves_with_paths, tree_from_entries
from lora_jax.kinds import factor_shapes


def random_adapters(params, spec, *, seed=0, std=1.0, dtype=jnp.float32):
  """Non-zero adapters for ``spec`` (numpy draws, so no compilation)."""
  rng = np.random.default_rng(seed)
  targets = {t.path: t for t in spec.resolve(params)}
  entries = []
  for path, _ in leaves_with_paths(params):
    t = targets.get(path)
    if t is None:
      entries.append(None)
      continue
    a_shape, b_shape = factor_shapes(t.shape, t.layout, t.rank)
    a, b = (jnp.asarray(rng.standard_normal(s) * std, dtype) for s in (a_shape, b_shape))
    entries.append(LoraFactors(a=a, b=b, scale=t.scale, layout=t.layout, rslora=t.rslora))
  return tree_from_entries(params, entries)


def _f64(x):
  return np.asarray(x, np.float64)


def tolerance(expected, rtol, *, scale=None):
  """The absolute tolerance :func:`assert_close` uses: ``rtol * scale``, ``scale = max|expected|``."""
  if scale is None:
    e = _f64(expected)
    scale = float(np.max(np.abs(e))) if e.size else 0.0
  return rtol * scale


def assert_close(actual, expected, rtol, *, scale=None, err_msg=""):
  """``|actual - expected| <= rtol * scale`` everywhere, ``scale = max|expected|`` by default.

  An absolute tolerance scaled to the values compared. Float results summed in another order
  (another framework, a factored matmul, another BLAS, another CPU) differ by a few ulps of
  the *largest* terms, so a bare ``atol`` fails on large values on some machine and means
  nothing on tiny ones, and an elementwise ``rtol`` fails near zero. ``rtol`` is therefore
  "relative to the largest value compared": 1e-4 allows 1e-4 * max|expected| everywhere.
  Compared in float64, so the test itself adds no rounding.
  """
  actual, expected = _f64(actual), _f64(expected)
  assert actual.shape == expected.shape, f"{err_msg} shapes differ: {actual.shape} vs {expected.shape}"
  atol = tolerance(expected, rtol, scale=scale)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=f"{err_msg} (atol = {rtol} * scale = {atol:.3g})")


def assert_trees_close(actual, expected, rtol, *, err_msg=""):
  """:func:`assert_close` leaf by leaf (same structure), each leaf scaled by its own magnitude."""
  import jax  # noqa: PLC0415 - keep the helpers importable without initialising jax

  assert jax.tree.structure(actual) == jax.tree.structure(expected), err_msg
  for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    assert_close(a, e, rtol, err_msg=f"{err_msg} {jax.tree_util.keystr(path)}")


def assert_far(actual, other, rtol, *, factor=100.0):
  """``actual`` differs from ``other`` by at least ``factor`` times the tolerance
  ``assert_close(actual, ..., rtol)`` allows: the effect under test (an adapter, a patch) is
  far above the comparison's noise, so the comparison can fail when the effect is wrong."""
  diff = float(np.max(np.abs(_f64(actual) - _f64(other))))
  tol = tolerance(actual, rtol)
  assert diff >= factor * tol, f"the effect ({diff:.3g}) is not {factor}x the tolerance ({tol:.3g})"


def random_params(init_fn, *args, seed=0, **kwargs):
  """``init_fn(key, *args, **kwargs)``'s tree (e.g. a Flax ``model.init``), traced abstractly
  and filled with NumPy draws: no compilation per parameter shape, which a model's own
  initializers (a jitted truncated normal per shape) cost. Each float leaf is drawn with std
  ``1/sqrt(fan_in)`` (all axes but the last); other leaves are zeros."""
  import jax  # noqa: PLC0415

  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda k: init_fn(k, *args, **kwargs), jax.random.key(0))

  def fill(s):
    if not jnp.issubdtype(s.dtype, jnp.floating):
      return jnp.zeros(s.shape, s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

  return jax.tree.map(fill, shapes)


def normal(seed, shape, dtype=jnp.float32):
  """Standard-normal test data from NumPy (a ``jax.random.normal`` compiles once per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)
