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
    entries.append(LoraFactors(a=a, b=b, scale=t.scale, layout=t.layout))
  return tree_from_entries(params, entries)
