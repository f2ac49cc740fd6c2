"""Small models several test files share."""

import flax.linen as nn
import jax.numpy as jnp


class Block(nn.Module):
  features: int = 8

  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(self.features, name="mlp")(h)), None


class Stack(nn.Module):
  """Three ``nn.scan``'d Dense layers: one stacked ``(3, features, features)`` kernel at
  ``params/layers/mlp/kernel``."""

  features: int = 8

  @nn.compact
  def __call__(self, x):
    layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return layers(self.features, name="layers")(x, None)[0]


def oi_apply(params, x):
  """A torch-style ``(out, in)`` weight at ``lin/weight``: ``x @ W.T``."""
  return x @ params["lin"]["weight"].T
