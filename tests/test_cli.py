"""The command line: python -m lora_jax {inspect,merge,convert}."""

import json
import os
import re
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
  assert "format 2, written by lora_jax" in out and re.search(r"lm_head/kernel\s+lora\s+\(8, 16\)\s+io\s+3\s+1.5\s+0.5\s+a\+b", out), out
  code, out2, _ = _run(capsys, "inspect", os.path.join(ad, "adapters.safetensors"))  # the file itself
  assert code == 0 and out2.splitlines()[1:] == out.splitlines()[1:]
  code, out, _ = _run(capsys, "inspect", base)
  assert code == 0 and "embed_tokens/embedding" in out and "total: 392 parameters" in out
  code, out, err = _run(capsys, "inspect", _v1_dir(tmp))
  assert code == 0 and "format 1, written by lora_jax 0.1.0" in out and "w/kernel" in out, err


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
  assert code == 2 and "refusing to read a pickle-based file" in err and err.count("\n") == 1
  code, _, err = _run(capsys, "inspect", str(tmp / "missing"))
  assert code == 2 and "missing: no such file or directory" in err
  _run(capsys, "convert", "--to", "peft", ad, str(tmp / "peft"), "--name-map", "llama")
  code, _, err = _run(capsys, "merge", "--base", base, "--adapters", str(tmp / "peft"), "--out", str(tmp / "m.safetensors"))
  assert code == 2 and "is a PEFT directory; pass --name-map llama|bert" in err
  code, _, err = _run(capsys, "convert", "--to", "lora_jax", str(tmp / "peft"), str(tmp / "x"), "--name-map", "llama")
  assert code == 2 and "needs --base" in err
  code, _, err = _run(capsys, "convert", "--to", "peft", str(tmp / "peft"), str(tmp / "y"), "--name-map", "llama")
  assert code == 2 and "is already a PEFT directory" in err
  with pytest.raises(SystemExit) as e:
    main(["frobnicate"])
  assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def _v1_dir(tmp, edit=None, raw=None):
  from test_io import _save_v1

  flat = {"w/kernel": LoraFactors(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), scale=2.0, layout="io")}
  d = _save_v1(tmp / "v1", flat, spec=lora_jax.LoraSpec(["w"], rank=2, alpha=4))
  cfg_path = tmp / "v1" / "lora_jax.json"
  if edit is not None:
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))
  if raw is not None:
    cfg_path.write_text(raw(cfg_path.read_text()))
  return d


def _user_errors(tmp, base, ad):
  """(name, argv, what stderr must say) for each refused input; built lazily in the test."""
  out = []
  out.append(("no library_version", ["inspect", _v1_dir(tmp / "a", edit=lambda c: c.pop("library_version"))],
              r"lora_jax.json: the config lacks the fields \['library_version'\]. The file was edited or corrupted: save the adapters again"))
  out.append(("partial spec", ["inspect", _v1_dir(tmp / "b", edit=lambda c: c.update(spec={"targets": ["w"], "rank": 2}))],
              r"lora_jax.json: spec must be null or an object with \['alpha', 'alpha_pattern', 'rank', 'rank_pattern', 'rslora', 'targets'\]"))
  out.append(("400-digit alpha", ["inspect", _v1_dir(tmp / "c", raw=lambda t: t.replace('"alpha": 4.0', '"alpha": 1' + "0" * 400, 1))],
              r"lora_jax.json: spec\['alpha'\]: <number 100000000000... of 401 characters, out of range>; numbers must fit in 64 bits"))
  d = _v1_dir(tmp / "d")
  os.unlink(os.path.join(d, "lora_jax.json"))
  os.makedirs(os.path.join(d, "lora_jax.json"))
  out.append(("a directory where the config should be", ["inspect", d], r"v1/lora_jax.json: is a directory, expected a file"))
  os.makedirs(tmp / "e" / "adapters.safetensors")
  out.append(("a directory where the tensors should be", ["inspect", str(tmp / "e")], r"e/adapters.safetensors: is a directory, expected a file"))
  os.makedirs(tmp / "f")
  out.append(("merge --out at an existing directory", ["merge", "--base", base, "--adapters", ad, "--out", str(tmp / "f")],
              r"--out .*/f is a directory; name the file to write, e.g. .*/f/merged.safetensors"))
  out.append(("merge --out under a file", ["merge", "--base", base, "--adapters", ad, "--out", base + "/m.safetensors"],
              r"--out .*base.safetensors/m.safetensors: .*base.safetensors is not a directory"))
  if os.geteuid() != 0:
    os.makedirs(tmp / "ro")
    os.chmod(tmp / "ro", 0o555)
    ro = str(tmp / "ro" / "m.safetensors")
  else:  # root writes anywhere chmod allows: use a place the kernel refuses
    ro = "/sys/m.safetensors" if os.path.isdir("/sys") else "/proc/m.safetensors"
  out.append(("merge --out at a read-only place", ["merge", "--base", base, "--adapters", ad, "--out", ro],
              r"--out .*m.safetensors: cannot write (in .* \(permission denied\)|it \()"))
  out.append(("merge --dtype int8", ["merge", "--base", base, "--adapters", ad, "--out", str(tmp / "m.safetensors"), "--dtype", "int8"],
              r"--dtype int8: not a floating-point dtype; merged weights would be truncated"))
  out.append(("merge --dtype floot", ["merge", "--base", base, "--adapters", ad, "--out", str(tmp / "m.safetensors"), "--dtype", "floot"],
              r"--dtype 'floot' is not a dtype"))
  (tmp / "g").mkdir()
  os.mkfifo(tmp / "g" / "x.safetensors")
  out.append(("a FIFO", ["inspect", str(tmp / "g" / "x.safetensors")], r"x.safetensors: is a FIFO \(named pipe\), not a regular file"))
  return out


def test_user_errors_are_one_line_and_exit_2(files, capsys):
  tmp, _, _, base, ad = files
  for name, argv, match in _user_errors(tmp / "cases", base, ad):
    code, out, err = _run(capsys, *argv)
    assert code == 2, (name, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith(f"lora-jax {argv[0]}: "), (name, err)
    assert re.search(match, err), (name, err)
  assert not os.path.exists(tmp / "cases" / "m.safetensors")


def test_forged_adapters_file_is_refused(files, capsys):
  tmp, params, adapters, base, ad = files
  from test_io import _edit_config

  _edit_config(ad, lambda c: c["adapters"]["lm_head/kernel"].update(alpha=10**400), forge=True)
  code, _, err = _run(capsys, "inspect", ad)
  assert code == 2 and re.search(r"adapters.safetensors: adapters\['lm_head/kernel'\]\['alpha'\]: <number", err), err
  code, _, err = _run(capsys, "merge", "--base", base, "--adapters", ad, "--out", str(tmp / "m.safetensors"))
  assert code == 2 and "['alpha']: <number" in err and not os.path.exists(tmp / "m.safetensors")


def test_internal_errors_keep_their_traceback(files, monkeypatch):
  _, _, _, _, ad = files
  import lora_jax.__main__ as cli

  def broken(path):
    raise KeyError("a bug")

  monkeypatch.setattr(cli, "_inspect_lora_jax", broken)
  with pytest.raises(KeyError, match="a bug"):
    main(["inspect", ad])


def test_inspect_escapes_control_characters(tmp_path, capsys):
  p = lora_jax.save_params(tmp_path / "p.safetensors", {"evil\x1b[2J": jnp.ones(2)})
  code, out, _ = _run(capsys, "inspect", str(p))
  assert code == 0 and "\x1b" not in out and "evil\\x1b[2J" in out


def test_python_dash_m(files):
  _, _, _, _, ad = files
  r = subprocess.run([sys.executable, "-m", "lora_jax", "inspect", ad], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "lm_head/kernel" in r.stdout
