"""The command line: python -m lora_jax {inspect,merge,convert}."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.__main__ import main
from lora_jax.kinds import LoraFactors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def files(tmp_path):
  rng = np.random.default_rng(0)
  params = {
      "embed_tokens": {"embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)},
      "layers": {"self_attn": {"q_proj": {"kernel": jnp.asarray(rng.standard_normal((2, 8, 8)), jnp.float32)}}},
      "lm_head": {"kernel": jnp.asarray(rng.standard_normal((8, 16)), jnp.float32)},
      "norm": {"scale": jnp.ones(8, jnp.float32)},
  }
  adapters = jax.tree.map(lambda _: None, params)
  adapters["layers"]["self_attn"]["q_proj"]["kernel"] = LoraFactors(
      a=jnp.asarray(rng.standard_normal((2, 8, 2)), jnp.float32), b=jnp.asarray(rng.standard_normal((2, 2, 8)), jnp.float32),
      scale=2.0, layout="lio")
  adapters["lm_head"]["kernel"] = LoraFactors(
      a=jnp.asarray(rng.standard_normal((8, 3)), jnp.float32), b=jnp.asarray(rng.standard_normal((3, 16)), jnp.float32),
      scale=0.5, layout="io")
  base = lora_jax.save_params(tmp_path / "base.safetensors", params)
  ad = lora_jax.save(tmp_path / "ad", adapters, params=params, metadata={"step": 5})
  return tmp_path, params, adapters, str(base), str(ad)


def _run(capsys, *argv):
  code = main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_inspect(files, capsys):
  tmp, _, _, base, ad = files
  code, out, err = _run(capsys, "inspect", ad)
  assert code == 0, err
  assert "layers/self_attn/q_proj/kernel" in out and "(2, 8, 8)" in out and "lio" in out
  assert "total: 136 adapter parameters" in out and '"step": 5' in out
  code, out, _ = _run(capsys, "inspect", base)
  assert code == 0 and "embed_tokens/embedding" in out and "total: 392 parameters" in out


def test_merge(files, capsys, tmp_path):
  tmp, params, adapters, base, ad = files
  code, out, err = _run(capsys, "merge", "--base", base, "--adapters", ad, "--out", str(tmp / "m.safetensors"))
  assert code == 0, err
  assert "merged 2 adapted kernels" in out
  got = lora_jax.load_params(tmp / "m.safetensors", like=params)
  want = lora_jax.merge(params, adapters)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(x, y)
  code, _, _ = _run(capsys, "merge", "--base", base, "--adapters", ad, "--out", str(tmp / "h.safetensors"), "--dtype", "bfloat16")
  assert code == 0 and lora_jax.load_params(tmp / "h.safetensors")["lm_head"]["kernel"].dtype == jnp.bfloat16


def test_convert_round_trip(files, capsys):
  tmp, params, adapters, base, ad = files
  code, out, err = _run(capsys, "convert", "--to", "peft", ad, str(tmp / "peft"), "--name-map", "llama")
  assert code == 0, err
  code, out, _ = _run(capsys, "inspect", str(tmp / "peft"))
  assert code == 0 and "PEFT LoRA adapter" in out and "model.layers.1.self_attn.q_proj" in out and "lm_head" in out
  code, out, err = _run(capsys, "convert", "--to", "lora_jax", str(tmp / "peft"), str(tmp / "back"), "--name-map", "llama", "--base", base)
  assert code == 0, err
  back = lora_jax.load(tmp / "back", params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(x, y)
  code, _, err = _run(capsys, "merge", "--base", base, "--adapters", str(tmp / "peft"), "--out", str(tmp / "m.safetensors"), "--name-map", "llama")
  assert code == 0, err
  np.testing.assert_array_equal(
      lora_jax.load_params(tmp / "m.safetensors")["lm_head"]["kernel"], lora_jax.merge(params, adapters)["lm_head"]["kernel"])


def test_errors(files, capsys):
  tmp, _, _, base, ad = files
  (tmp / "adapter_model.bin").write_bytes(b"\x80\x04.")
  code, _, err = _run(capsys, "inspect", str(tmp / "adapter_model.bin"))
  assert code == 1 and "refusing to read a pickle-based file" in err
  code, _, err = _run(capsys, "inspect", str(tmp / "missing"))
  assert code == 1 and "not a lora_jax adapter directory" in err
  _run(capsys, "convert", "--to", "peft", ad, str(tmp / "peft"), "--name-map", "llama")
  with pytest.raises(SystemExit, match="pass --name-map llama\\|bert"):
    main(["merge", "--base", base, "--adapters", str(tmp / "peft"), "--out", str(tmp / "m.safetensors")])
  with pytest.raises(SystemExit, match="needs --base"):
    main(["convert", "--to", "lora_jax", str(tmp / "peft"), str(tmp / "x"), "--name-map", "llama"])
  with pytest.raises(SystemExit):
    main(["frobnicate"])
  assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m(files):
  _, _, _, _, ad = files
  r = subprocess.run([sys.executable, "-m", "lora_jax", "inspect", ad], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "lm_head/kernel" in r.stdout
