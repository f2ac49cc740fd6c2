"""The examples run end to end (with fewer steps) and do what their READMEs say."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
  qualified = f"lora_jax_examples.{name}"
  if qualified not in sys.modules:
    spec = importlib.util.spec_from_file_location(qualified, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses (flax modules) look their module up here
    spec.loader.exec_module(module)
  return sys.modules[qualified]


def test_digits_lora():
  out = _load("digits_lora").main(pretrain_steps=150, adapt_steps=100, verbose=False)
  assert out["source_acc"] > 0.9  # the base model learned the source task
  assert out["frozen_acc"] < 0.4  # ... which does not transfer to rotated digits
  assert out["before_acc"] == out["frozen_acc"]  # fresh adapters change nothing
  assert out["after_acc"] > out["frozen_acc"] + 0.3
  assert out["trainable"] < 0.1 * out["base"]
  assert out["merged_same_predictions"] and out["merged_max_logit_diff"] < 1e-4


def test_many_adapters():
  out = _load("many_adapters").main(pretrain_steps=150, adapt_steps=120, verbose=False)
  assert out["upright digits"][0] > 0.9  # the base alone serves its own task
  for task in ("rotated 90 degrees", "mirrored"):
    right, wrong = out[task]
    assert right > wrong + 0.3, (task, right, wrong)  # each row got its own adapter
  assert out["max_diff_vs_alone"] <= 1e-4 * out["logit_scale"]
