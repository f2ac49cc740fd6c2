"""Named adapter sets: save_set / load_set, PEFT's multi-adapter directories, atomic
replacement, hostile directories, and switching adapters under one jit."""

import copy
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.files import flatten_adapters, sets
from lora_jax.files.atomic import _HOST
from lora_jax.kinds import DoraFactors, LoraFactors
from _util import assert_close, assert_far, random_adapters

RTOL = 1e-4  # torch vs JAX in float32 (see test_interop.py)
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = np.array([[1, 5, 9, 33, 2, 77, 100, 3], [4, 4, 8, 15, 16, 23, 42, 127]])


def _params():
  rng = np.random.default_rng(0)
  return {
      "layers": {"q": {"kernel": jnp.asarray(rng.standard_normal((3, 6, 8)), jnp.float32)}},
      "out": {"kernel": jnp.asarray(rng.standard_normal((8, 5)), jnp.float32), "bias": jnp.zeros(5)},
  }


SPEC = lora_jax.LoraSpec(["q", "out"], rank=2, alpha=4, layout={"layers/.*": "lio"})


def _set(params, seed=0):
  """Three adapters of different kinds, dtypes and static fields."""
  rng = np.random.default_rng(seed + 100)
  dora = lora_jax.init(jax.random.key(seed), params, lora_jax.LoraSpec(["out"], rank=3, alpha=5, kind="dora"))
  dora = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype), dora)
  return {
      "default": random_adapters(params, SPEC, seed=seed),
      "sql": random_adapters(params, lora_jax.LoraSpec(["q"], rank=4, rslora=True, layout={"layers/.*": "lio"}),
                             seed=seed + 1, dtype=jnp.bfloat16),
      "math": dora,
  }


def _assert_identical(got, want):
  """Same adapters, kinds and static fields; every leaf bit for bit (trees or flat dicts)."""
  fg, fw = flatten_adapters(got), flatten_adapters(want)
  assert list(fg) == list(fw)
  for k in fw:
    assert type(fg[k]) is type(fw[k]) and fg[k].static() == fw[k].static(), k
    for leaf, x in fw[k].leaves().items():
      y = fg[k].leaves()[leaf]
      assert y.dtype == x.dtype and y.shape == x.shape, (k, leaf)
      np.testing.assert_array_equal(np.asarray(y).view(np.uint8), np.asarray(x).view(np.uint8), err_msg=f"{k}/{leaf}")


def _assert_sets_identical(got, want):
  assert list(got) == list(want)
  for name in want:
    _assert_identical(got[name], want[name])


def _leftovers(directory):
  parent, base = os.path.split(os.path.realpath(directory))
  return [n for n in os.listdir(parent) if n.startswith(f".{base}.")]


# ----------------------------------------------------------------------------------------------
# save_set / load_set
# ----------------------------------------------------------------------------------------------


def test_round_trip_bit_exact_with_static_fields(tmp_path):
  params = _params()
  named = _set(params)
  d = tmp_path / "run"
  assert lora_jax.save_set(d, named, params, metadata={"sql": {"step": 3}}) == str(d)
  assert sorted(os.listdir(d)) == ["adapters.safetensors", "lora_jax_set.json", "math", "sql"]
  assert os.listdir(d / "sql") == ["adapters.safetensors"]
  index = json.loads((d / "lora_jax_set.json").read_text())
  assert (index["format"], index["format_version"], index["default"]) == ("lora_jax.adapter_set", 1, "default")
  assert list(index["adapters"]) == ["default", "sql", "math"]  # the order given
  back = lora_jax.load_set(d, params)
  _assert_sets_identical(back, named)
  f = flatten_adapters(back["sql"])["layers/q/kernel"]
  assert f.rslora and f.a.dtype == jnp.bfloat16 and f.layout == "lio"
  assert isinstance(flatten_adapters(back["math"])["out/kernel"], DoraFactors)
  # Each entry is a normal lora_jax save.
  _assert_identical(lora_jax.load(d, params), named["default"])
  _assert_identical(lora_jax.load(d / "math", params), named["math"])
  assert lora_jax.load_config(d / "sql")["metadata"] == {"step": 3}
  # Flat dicts without params; a subset, in the order asked.
  flat = lora_jax.load_set(d, names=["math", "sql"])
  assert list(flat) == ["math", "sql"] and list(flat["sql"]) == ["layers/q/kernel"]
  assert _leftovers(d) == []


def test_default_at_root_or_none(tmp_path):
  params = _params()
  named = _set(params)
  named = {"chat": named["default"], "sql": named["sql"]}
  d = tmp_path / "a"
  lora_jax.save_set(d, named, params)  # no adapter named "default": all in sub-folders, as PEFT
  assert sorted(os.listdir(d)) == ["chat", "lora_jax_set.json", "sql"]
  assert json.loads((d / "lora_jax_set.json").read_text())["default"] is None
  _assert_sets_identical(lora_jax.load_set(d, params), named)
  d = tmp_path / "b"
  lora_jax.save_set(d, named, params, default="sql")
  assert sorted(os.listdir(d)) == ["adapters.safetensors", "chat", "lora_jax_set.json"]
  _assert_identical(lora_jax.load(d, params), named["sql"])
  _assert_sets_identical(lora_jax.load_set(d, params), named)
  with pytest.raises(ValueError, match=r"save_set\(default='nope'\): the set has no adapter of that name; its names are \['chat', 'sql'\]"):
    lora_jax.save_set(tmp_path / "c", named, params, default="nope")
  assert not (tmp_path / "c").exists()


def test_per_adapter_spec_and_arguments(tmp_path):
  params = _params()
  named = {"a": random_adapters(params, SPEC), "b": random_adapters(params, SPEC, seed=1)}
  d = tmp_path / "s"
  lora_jax.save_set(d, named, params, spec={"a": SPEC})
  assert lora_jax.load_config(d / "a")["spec"]["rank"] == 2 and lora_jax.load_config(d / "b")["spec"] is None
  with pytest.raises(ValueError, match=r"save_set\(metadata=...\): \['c'\] are not adapters of the set"):
    lora_jax.save_set(tmp_path / "t", named, params, metadata={"c": {}})
  with pytest.raises(TypeError, match=r"save_set: expected a dict \{name: adapters\}, found a list"):
    lora_jax.save_set(tmp_path / "t", [named["a"]], params)
  with pytest.raises(ValueError, match="save_set: the set is empty"):
    lora_jax.save_set(tmp_path / "t", {}, params)
  with pytest.raises(ValueError, match=r"load_set\(.*\): no adapters named \['c'\]; the set holds \['a', 'b'\]"):
    lora_jax.load_set(d, params, names=["c"])
  with pytest.raises(TypeError, match=r"load_set\(names='a'\): expected a list of adapter names \(names=\['a'\] for one\)"):
    lora_jax.load_set(d, params, names="a")
  # An adapter that does not fit: refused, naming it.
  with pytest.raises(ValueError, match="save_set: adapter 'b': .*out/kernel"):
    lora_jax.save_set(tmp_path / "t", {"a": named["a"], "b": {"out/kernel": flatten_adapters(named["a"])["layers/q/kernel"]}}, params)
  assert not (tmp_path / "t").exists() and _leftovers(tmp_path / "t") == []


@pytest.mark.parametrize("name, match", [
    ("a/b", r"'a/b' contains '/': a name becomes one sub-folder"),
    ("..", r"'\.\.' is '\.\.', which names a directory"),
    (".", r"'\.' is '\.', which names a directory"),
    ("", r"'' is empty"),
    ("x" * 129, r"'xxx.*\(129 characters\) has 129 characters, more than 128"),
    ("a\nb", r"'a\\nb' contains a control character"),
    ("a\u202eb", r"'a\\u202eb' contains an invisible format character \('\\u202e'\)"),
    ("a\\b", r"'a\\\\b' contains '\\\\'"),
    (".hidden", r"'\.hidden' starts with '\.'"),
    ("Lora_jax_set.json", r"'Lora_jax_set\.json' is the name of a file the set directory holds"),
    ("\u00e9" * 128, r"'\u00e9+'\.\.\. \(128 characters\) takes 256 bytes of UTF-8, more than a file name may \(255\)"),
    (3, r"3 is a int, not a string"),
])
def test_hostile_names_refused_on_save(tmp_path, name, match):
  params = _params()
  ad = random_adapters(params, SPEC)
  with pytest.raises(ValueError, match="save_set: adapter name " + match):
    lora_jax.save_set(tmp_path / "s", {"ok": ad, name: ad}, params)
  assert os.listdir(tmp_path) == []


def test_names_equal_but_for_case_and_too_many(tmp_path, monkeypatch):
  params = _params()
  ad = random_adapters(params, SPEC)
  with pytest.raises(ValueError, match=r"adapter names 'Sql' and 'sql' differ only in case \(or Unicode form\)"):
    lora_jax.save_set(tmp_path / "s", {"Sql": ad, "sql": ad}, params)
  with pytest.raises(ValueError, match=r"adapter names 'caf\u00e9' and 'cafe\u0301' differ only in case \(or Unicode form\)"):
    lora_jax.save_set(tmp_path / "s", {"caf\u00e9": ad, "cafe\u0301": ad}, params)
  monkeypatch.setattr(sets, "MAX_SET_SIZE", 3)
  with pytest.raises(ValueError, match="save_set: 4 adapters, more than 3 in one set"):
    lora_jax.save_set(tmp_path / "s", {str(i): ad for i in range(4)}, params)
  assert os.listdir(tmp_path) == []


def _edit_index(d, edit):
  path = d / "lora_jax_set.json"
  index = json.loads(path.read_text())
  edit(index)
  path.write_text(json.dumps(index))


def _entry(index):
  return next(iter(index["adapters"].values()))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["adapters"].update({"../x": _entry(c)}), r"adapter name '\.\./x' contains '/'"),
    (lambda c: c["adapters"].update({"..": _entry(c)}), r"adapter name '\.\.' is '\.\.'"),
    (lambda c: c["adapters"].update({"y" * 5000: _entry(c)}), r"adapter name 'yyy.*has 5000 characters, more than 128"),
    (lambda c: c["adapters"].update({str(i): _entry(c) for i in range(1100)}), r"'adapters' lists 1103 adapters, more than 1024"),
    (lambda c: c["adapters"].update({"SQL": _entry(c)}), r"adapter names 'sql' and 'SQL' differ only in case"),
    (lambda c: c.update(default="other"), r"'default' is 'other', which is not one of the adapters \['default', 'sql', 'math'\]"),
    (lambda c: c.update(format_version=2), r"'format_version' 2: written by a newer lora_jax .* upgrade lora_jax"),
    (lambda c: c.update(format="x"), r"'format' is 'x', expected 'lora_jax.adapter_set'"),
    (lambda c: c.update(extra=1), r"unexpected fields \['extra'\]"),
    (lambda c: c.update(adapters=[]), r"'adapters' must be a non-empty object"),
    (lambda c: c["adapters"]["sql"].update(sha256="00"), r"adapters\['sql'\] must be \{\"sha256\": <64 hex digits>\}"),
    (lambda c: c["adapters"]["sql"].update(sha256="0" * 64), r"sql.adapters\.safetensors: is not the file .*lora_jax_set\.json records for adapters\['sql'\]"),
])
def test_hostile_index_refused(tmp_path, edit, match):
  params = _params()
  d = tmp_path / "s"
  lora_jax.save_set(d, _set(params), params)
  _edit_index(d, edit)
  with pytest.raises(lora_jax.AdapterFileError, match=match):
    lora_jax.load_set(d, params)


def test_hostile_directories_refused(tmp_path):
  params = _params()
  named = _set(params)
  d, other = tmp_path / "s", tmp_path / "other"
  lora_jax.save_set(d, named, params)
  lora_jax.save_set(other, _set(params, seed=5), params)
  (d / "lora_jax_set.json").write_text("{" * 2 * 10**6)  # bounded: refused without parsing a huge file
  with pytest.raises(lora_jax.AdapterFileError, match=r"lora_jax_set\.json: JSON file larger than 1048576 bytes"):
    lora_jax.load_set(d, params)
  lora_jax.save_set(d, named, params)
  # A sub-folder that is a symbolic link: refused by name, even to a valid adapter.
  os.rename(d / "sql", tmp_path / "moved")
  os.symlink(other / "sql", d / "sql")
  with pytest.raises(lora_jax.AdapterFileError, match=r"s.sql: adapter 'sql' is a symbolic link; a set's sub-folders must be real directories"):
    lora_jax.load_set(d, params)
  os.unlink(d / "sql")
  with pytest.raises(lora_jax.AdapterFileError, match=r"s.sql: missing, but .*lora_jax_set\.json lists adapter 'sql'; the set was damaged"):
    lora_jax.load_set(d, params)
  assert list(lora_jax.load_set(d, params, names=["math"])) == ["math"]  # the others still load
  os.mkdir(d / "sql")
  with pytest.raises(lora_jax.AdapterFileError, match=r"sql.adapters\.safetensors: missing, but .* lists adapter 'sql'"):
    lora_jax.load_set(d, params)
  # An entry from another set, or replaced by lora_jax.save: its checksum is not the index's.
  os.rmdir(d / "sql")
  os.rename(other / "sql", d / "sql")
  with pytest.raises(lora_jax.AdapterFileError, match=r"is not the file .* records for adapters\['sql'\].*comes from another set"):
    lora_jax.load_set(d, params)
  lora_jax.save(d, named["sql"], params=params)
  with pytest.raises(lora_jax.AdapterFileError, match=r"s.adapters\.safetensors: is not the file .* records for adapters\['default'\]"):
    lora_jax.load_set(d, params, names=["default"])
  # No index: said what the directory is instead.
  os.unlink(d / "lora_jax_set.json")
  with pytest.raises(FileNotFoundError, match=r"no set index here; not a set written by lora_jax.save_set. It holds one adapter: read it with lora_jax.load"):
    lora_jax.load_set(d, params)
  with pytest.raises(FileNotFoundError, match="There is no such directory"):
    lora_jax.load_set(tmp_path / "nothing", params)
  # Killed between the two renames of a swap without renameat2: the set is in a temp directory.
  left = tmp_path / f".gone.{_HOST}.{2**30}.0123abcd.tmp"
  lora_jax.save_set(left, named, params)
  with pytest.raises(FileNotFoundError, match=r"An interrupted save_set left .*\.gone\..*\.tmp: if it holds lora_jax_set\.json, it is a whole set; rename it"):
    lora_jax.load_set(tmp_path / "gone", params)


def test_failure_midway_leaves_the_old_set(tmp_path, monkeypatch):
  params = _params()
  old = _set(params)
  d = tmp_path / "s"
  lora_jax.save_set(d, old, params)
  new = _set(params, seed=7)
  bad = dict(new)
  f = flatten_adapters(bad["math"])["out/kernel"]
  bad["math"] = {"out/kernel": f.replace(a=f.a.at[0, 0].set(jnp.nan))}  # refused after "default" and "sql" were written
  with pytest.raises(ValueError, match=r"save_set: adapter 'math': 'out/kernel': factor a holds NaN or Inf"):
    lora_jax.save_set(d, bad, params)
  _assert_sets_identical(lora_jax.load_set(d, params), old)
  assert _leftovers(d) == []
  # Killed (a BaseException) while writing the index, the last file: the same.
  def interrupted(*args):
    raise KeyboardInterrupt
  monkeypatch.setattr(sets, "write_json", interrupted)
  with pytest.raises(KeyboardInterrupt):
    lora_jax.save_set(d, new, params)
  _assert_sets_identical(lora_jax.load_set(d, params), old)
  assert _leftovers(d) == []
  monkeypatch.undo()
  # Without an atomic exchange (not Linux): two renames; the old set is back if the second fails.
  monkeypatch.setattr(sets, "_exchange", lambda a, b: False)
  rename, calls = os.rename, []
  def failing(src, dst):
    calls.append((src, dst))
    if len(calls) == 2:
      raise OSError(28, "No space left on device")
    rename(src, dst)
  monkeypatch.setattr(sets.os, "rename", failing)
  with pytest.raises(OSError, match="No space left"):
    lora_jax.save_set(d, new, params)
  monkeypatch.setattr(sets.os, "rename", rename)
  _assert_sets_identical(lora_jax.load_set(d, params), old)
  assert _leftovers(d) == []
  lora_jax.save_set(d, new, params)  # and when it works
  _assert_sets_identical(lora_jax.load_set(d, params), new)
  assert _leftovers(d) == []


@pytest.mark.skipif(sets._renameat2() is None, reason="needs Linux renameat2")
def test_atomic_exchange_swaps_directories(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "x").write_text("a")
  assert sets._exchange(str(tmp_path / "a"), str(tmp_path / "b"))
  assert os.listdir(tmp_path / "b") == ["x"] and os.listdir(tmp_path / "a") == []


def test_replacing_a_set(tmp_path):
  params = _params()
  d = tmp_path / "s"
  lora_jax.save_set(d, _set(params), params)
  smaller = {"default": random_adapters(params, SPEC, seed=3), "new": random_adapters(params, SPEC, seed=4)}
  lora_jax.save_set(d, smaller, params)  # the old set's other adapters go with it
  assert sorted(os.listdir(d)) == ["adapters.safetensors", "lora_jax_set.json", "new"]
  _assert_sets_identical(lora_jax.load_set(d, params), smaller)
  # A symlinked set directory: what it points to is replaced; the link stays.
  os.symlink(d, tmp_path / "link")
  lora_jax.save_set(tmp_path / "link", {"x": smaller["new"]}, params)
  assert os.path.islink(tmp_path / "link") and sorted(os.listdir(d)) == ["lora_jax_set.json", "x"]
  # A directory with one lora_jax.save (or empty) may become a set.
  one = tmp_path / "one"
  lora_jax.save(one, smaller["new"], params=params)
  lora_jax.save_set(one, smaller, params)
  _assert_sets_identical(lora_jax.load_set(one, params), smaller)
  # A stale temp directory of a killed save (a dead writer) is removed by the next save.
  stale = tmp_path / f".s.{_HOST}.{2**30}.0123abcd.tmp"
  stale.mkdir()
  (stale / "adapters.safetensors").write_bytes(b"partial")
  lora_jax.save_set(d, smaller, params)
  assert not stale.exists() and _leftovers(d) == []


def test_refuses_to_replace_other_files(tmp_path):
  params = _params()
  named = {"default": random_adapters(params, SPEC)}
  d = tmp_path / "s"
  lora_jax.save_set(d, named, params)
  (d / "notes.txt").write_text("keep me")
  with pytest.raises(ValueError, match=r"save_set: .*notes\.txt exists, which is not part of an adapter set; saving replaces the "
                                       r"whole directory .* so it would be lost. Move it out"):
    lora_jax.save_set(d, named, params)
  assert (d / "notes.txt").read_text() == "keep me"
  os.unlink(d / "notes.txt")
  (d / "ckpt").mkdir()
  (d / "ckpt" / "opt_state.msgpack").write_bytes(b"x")
  with pytest.raises(ValueError, match=r"ckpt.opt_state\.msgpack exists, which is not part of an adapter set"):
    lora_jax.save_set(d, named, params)
  lora_jax.export_peft(tmp_path / "peft", random_adapters({"lm_head": {"kernel": jnp.ones((4, 8))}},
                                                          lora_jax.LoraSpec(["lm_head"], rank=2)), "llama")
  with pytest.raises(ValueError, match=r"peft.adapter_(config\.json|model\.safetensors) exists, which is not part of an adapter set"):
    lora_jax.save_set(tmp_path / "peft", named, params)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match=r"save_set: .*file exists and is not a directory"):
    lora_jax.save_set(tmp_path / "file", named, params)


# ----------------------------------------------------------------------------------------------
# Switching adapters under one jit.
# ----------------------------------------------------------------------------------------------


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="out")(jnp.tanh(nn.Dense(8, name="hidden")(x)))


def test_switching_adapters_compiles_once(tmp_path):
  model = _Mlp()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6)), jnp.float32)
  params = model.init(jax.random.key(0), x)
  spec = lora_jax.LoraSpec(["hidden", "out"], rank=2, alpha=4)
  named = {n: random_adapters(params, spec, seed=i) for i, n in enumerate(["default", "sql", "math"])}
  lora_jax.save_set(tmp_path / "s", named, params)
  loaded = lora_jax.load_set(tmp_path / "s", params)
  lora_apply = lora_jax.wrap(model.apply)
  traces = []

  @jax.jit
  def serve(params, adapters, x):
    traces.append(1)  # runs once per trace
    return lora_apply(params, adapters, x)

  outs = {name: serve(params, loaded[name], x) for name in loaded}
  assert len(traces) == 1  # equal shapes and static fields: one compilation serves the whole set
  for name, y in outs.items():
    assert_close(y, model.apply(lora_jax.merge(params, named[name]), x), 1e-5)
  assert_far(outs["sql"], outs["default"], 1e-5)
  # A static field is part of the tree structure: an adapter with another scale compiles anew.
  other = jax.tree.map(lambda f: f.replace(scale=f.scale * 2), named["sql"], is_leaf=lora_jax.kinds.is_adapter)
  serve(params, other, x)
  assert len(traces) == 2


# ----------------------------------------------------------------------------------------------
# PEFT's multi-adapter directories: without torch.
# ----------------------------------------------------------------------------------------------


def _head():
  params = {"lm_head": {"kernel": jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)), jnp.float32)}}
  spec = lora_jax.LoraSpec(["lm_head"], rank=2, alpha=4)
  return params, {n: random_adapters(params, spec, seed=i) for i, n in enumerate(["default", "chat", "sql"])}


def test_peft_set_layout_round_trip(tmp_path):
  params, named = _head()
  d = tmp_path / "p"
  lora_jax.export_peft_set(d, named, "llama", base_model_name_or_path="tiny")
  assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors", "chat", "sql"]
  assert sorted(os.listdir(d / "chat")) == ["adapter_config.json", "adapter_model.safetensors"]
  assert json.loads((d / "sql" / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
  _assert_identical(lora_jax.import_peft(d / "sql", params, "llama"), named["sql"])  # each entry is a PEFT directory
  back = lora_jax.import_peft_set(d, params, "llama")
  assert list(back) == ["default", "chat", "sql"]
  _assert_sets_identical(back, named)
  assert list(lora_jax.import_peft_set(d, params, "llama", default="base", names=["sql", "base"])) == ["sql", "base"]
  # Re-exported into the same directory: replaced whole; PEFT's model card is kept.
  (d / "README.md").write_text("card")
  lora_jax.export_peft_set(d, {"chat": named["chat"]}, "llama", default="chat")
  assert sorted(os.listdir(d)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
  assert (d / "README.md").read_text() == "card"
  _assert_sets_identical(lora_jax.import_peft_set(d, params, "llama", default="chat"), {"chat": named["chat"]})
  # Refusals name the adapter, or what would be lost.
  with pytest.raises(ValueError, match=r"export_peft_set: adapter 'x': export_peft: no name-map rule gives a torch module"):
    lora_jax.export_peft_set(tmp_path / "q", {"x": {"w/kernel": flatten_adapters(named["chat"])["lm_head/kernel"]}}, "llama")
  assert not (tmp_path / "q").exists()
  (d / "train.log").write_text("x")
  with pytest.raises(ValueError, match=r"export_peft_set: .*train\.log exists, which is not part of an adapter set"):
    lora_jax.export_peft_set(d, named, "llama")


def test_peft_set_hostile_directories(tmp_path, monkeypatch):
  params, named = _head()
  d = tmp_path / "p"
  lora_jax.export_peft_set(d, named, "llama")
  elsewhere = lora_jax.export_peft(tmp_path / "elsewhere", named["sql"], "llama")
  (d / "runs").mkdir()  # not adapters: ignored
  (d / ".git").mkdir()
  lora_jax.export_peft(d / ".git" / "x", named["sql"], "llama")  # not looked at: one level, not hidden
  (d / "dangling").symlink_to(tmp_path / "nothing")
  assert list(lora_jax.import_peft_set(d, params, "llama")) == ["default", "chat", "sql"]
  os.symlink(elsewhere, d / "linked")
  with pytest.raises(lora_jax.AdapterFileError, match=r"p.linked: adapter 'linked' is a symbolic link; a set's sub-folders must be real directories"):
    lora_jax.import_peft_set(d, params, "llama")
  os.unlink(d / "linked")
  os.unlink(d / "chat" / "adapter_config.json")
  with pytest.raises(lora_jax.AdapterFileError, match=r"chat.adapter_config\.json: missing: adapter_model\.safetensors is there but not its config"):
    lora_jax.import_peft_set(d, params, "llama")
  lora_jax.export_peft(d / "chat", named["chat"], "llama")
  os.unlink(d / "adapter_config.json")
  with pytest.raises(lora_jax.AdapterFileError, match=r"p.adapter_config\.json: missing: adapter_model\.safetensors is there"):
    lora_jax.import_peft_set(d, params, "llama")
  os.unlink(d / "adapter_model.safetensors")
  assert list(lora_jax.import_peft_set(d, params, "llama")) == ["chat", "sql"]  # no root adapter: fine, as PEFT saves without "default"
  lora_jax.export_peft(d / "default", named["default"], "llama")
  lora_jax.export_peft(d, named["default"], "llama")
  with pytest.raises(lora_jax.AdapterFileError, match=r"p.default: a sub-folder named 'default', as the root adapter is called"):
    lora_jax.import_peft_set(d, params, "llama")
  assert list(lora_jax.import_peft_set(d, params, "llama", default="base")) == ["base", "chat", "default", "sql"]
  with pytest.raises(ValueError, match=r"import_peft_set\(.*\): no adapters named \['math'\]; the set holds \['base', 'chat', 'default', 'sql'\]"):
    lora_jax.import_peft_set(d, params, "llama", default="base", names=["math"])
  with pytest.raises(ValueError, match=r"import_peft_set\(default='a/b'\): the name contains '/'"):
    lora_jax.import_peft_set(d, params, "llama", default="a/b")
  monkeypatch.setattr(sets, "MAX_SET_SIZE", 2)
  with pytest.raises(lora_jax.AdapterFileError, match=r"p: holds more than 2 adapters; refusing them"):
    lora_jax.import_peft_set(d, params, "llama", default="base")
  monkeypatch.setattr(sets, "MAX_LISTING", 3)
  with pytest.raises(lora_jax.AdapterFileError, match=r"p: holds more than 3 entries; refusing to look for adapters"):
    lora_jax.import_peft_set(d, params, "llama", default="base")
  with pytest.raises(FileNotFoundError, match="no PEFT adapter here"):
    lora_jax.import_peft_set(tmp_path / "p" / "runs", params, "llama")
  subs = lora_jax.export_peft_set(tmp_path / "subs", {"a": named["chat"]}, "llama")  # no root adapter
  with pytest.raises(FileNotFoundError, match=r"Named adapters found in sub-directories: \['a'\]; read them all with lora_jax.import_peft_set"):
    lora_jax.import_peft(subs, params, "llama")


# ----------------------------------------------------------------------------------------------
# PEFT's multi-adapter directories against PEFT itself.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
  torch = pytest.importorskip("torch")
  pytest.importorskip("peft")
  pytest.importorskip("transformers")
  from lora_jax.models import llama
  from _hf import tiny_hf_llama

  hf_config, torch_model, sd = tiny_hf_llama()
  config = llama.llama_config_from_hf(hf_config, remat=False, scan_layers=True)
  model = llama.LlamaForCausalLM(config)
  del torch
  return torch_model, config, jax.jit(lora_jax.wrap(model.apply)), llama.load_hf_llama(sd, config)


def _torch_logits(model):
  import torch

  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.interop
def test_exported_set_loads_into_peft(tmp_path, tiny_llama):
  import peft
  from lora_jax.models import llama

  torch_model, config, lora_apply, params = tiny_llama
  layout = llama.lora_layout(config)
  named = {
      "default": random_adapters(params, lora_jax.LoraSpec(MODULES, rank=4, alpha=8, layout=layout), seed=0, std=0.3),
      "sql": random_adapters(params, lora_jax.LoraSpec(["q_proj", "v_proj"], rank=2, alpha=4, layout=layout), seed=1, std=0.3),
  }
  lora_jax.export_peft_set(tmp_path, named, "llama")
  peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
  peft_model.load_adapter(tmp_path / "sql", adapter_name="sql")
  base = _torch_logits(torch_model)
  for name, adapters in named.items():
    peft_model.set_adapter(name)
    want = np.asarray(lora_apply(params, adapters, TOKENS))
    assert_far(want, base, RTOL)
    assert_close(_torch_logits(peft_model), want, RTOL, err_msg=name)
  _assert_sets_identical(lora_jax.import_peft_set(tmp_path, params, "llama"), named)


@pytest.mark.interop
def test_peft_saved_set_imports(tmp_path, tiny_llama):
  import peft
  import torch

  torch_model, _, lora_apply, params = tiny_llama
  torch.manual_seed(1)
  peft_model = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=MODULES, init_lora_weights=False, task_type="CAUSAL_LM")).eval()
  peft_model.add_adapter("sql", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False, task_type="CAUSAL_LM"))
  peft_model.save_pretrained(tmp_path)
  assert os.path.isfile(tmp_path / "adapter_config.json") and os.path.isfile(tmp_path / "sql" / "adapter_config.json")
  named = lora_jax.import_peft_set(tmp_path, params, "llama")
  assert list(named) == ["default", "sql"] and len(flatten_adapters(named["sql"])) == 2
  base = _torch_logits(torch_model)
  for name in ("default", "sql"):
    peft_model.set_adapter(name)
    want = _torch_logits(peft_model)
    assert_far(want, base, RTOL)
    assert_close(lora_apply(params, named[name], TOKENS), want, RTOL, err_msg=name)
