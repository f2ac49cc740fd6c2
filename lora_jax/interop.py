"""Hugging Face PEFT interop: export adapters to a PEFT LoRA directory, import one back.

A PEFT directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<torch module>.lora_A.weight`` ``(r, in)`` and ``...lora_B.weight``
``(out, r)`` (embeddings: ``lora_embedding_A`` ``(r, vocab)``, ``lora_embedding_B``
``(dim, r)``; DoRA adds ``...lora_magnitude_vector`` ``(out,)``). A Flax kernel is
``(in, out)``, so ``a = lora_A.weight.T``, ``b = lora_B.weight.T`` and ``m`` is the magnitude
vector; a kernel stacked by ``nn.scan`` (layout ``'lio'``) becomes one torch module per layer.
A :class:`NameMap` says which torch module each Flax path is.

Supported: plain LoRA (:class:`~lora_jax.LoraFactors`) on Linear and Embedding modules, and
DoRA (:class:`~lora_jax.DoraFactors`, PEFT's ``use_dora``) on Linear modules, with
``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` and ``lora_dropout``. PEFT's ``use_dora``
and ``lora_dropout`` are one setting per directory, so a mix of LoRA and DoRA adapters, or of
dropout rates, is refused on export (``lora_dropout=`` picks one rate). Importing DoRA needs
the base kernels' values (``DoraFactors.base_norm`` is their column norm). LoRA biases, conv
LoRA and conv DoRA, DoRA on embeddings, adapters made for a rewritten base (PiSSA, OLoRA,
...) and other PEFT methods are refused with a message rather than converted wrongly.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax._paths import leaves_with_paths, nearby
from lora_jax._regex import MAX_NAME, PeftPatterns, SafeRegex, UnsafePattern
from lora_jax.files.adapters import flatten_adapters
from lora_jax.kinds import DoraFactors, LoraFactors
from lora_jax.kinds.dora import dense_column_norm
from lora_jax.io import (
    AdapterFileError,
    _alpha,
    _refuse_pickle,
    _to_numpy,
    _write_json,
    adapters_to_tree,
    read_json,
    read_safetensors,
    write_safetensors,
)

PyTree = Any
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."
_KINDS = {
    "lora_A.weight": ("A", False),
    "lora_B.weight": ("B", False),
    "lora_embedding_A": ("A", True),
    "lora_embedding_B": ("B", True),
}
_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m: (out,), no ".weight" (PEFT strips it on save)
_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)")


# ----------------------------------------------------------------------------------------------
# Name maps.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NameMap:
  """Maps Flax '/'-joined leaf paths to torch module names, by ``(regex, template)`` rules.

  The first rule whose regex fullmatches the leaf path wins; the template is filled with the
  regex's named groups (``'/'`` in a group becomes ``'.'``) and, for a kernel stacked by
  ``nn.scan``, with ``{layer}``: the index along the kernel's ``'l'`` axis, one torch module
  per layer. A path no rule matches has no torch counterpart (exporting an adapter there is
  an error).

  Args:
    rules: ``(regex, template)`` pairs.
    prefix: prepended to every torch name (e.g. ``"bert."`` for a
      ``BertForSequenceClassification`` whose encoder is ``model.bert``).

  >>> m = NameMap([(r"layers/(?P<module>.+)/kernel", "model.layers.{layer}.{module}")])
  >>> m("layers/self_attn/q_proj/kernel", 3)
  'model.layers.3.self_attn.q_proj'
  >>> m("lm_head/kernel") is None
  True
  """

  rules: Sequence[tuple[str, str]]
  prefix: str = ""

  def __post_init__(self):
    rules = tuple((str(rx), str(t)) for rx, t in self.rules)
    for rx, template in rules:
      try:
        re.compile(rx)
      except re.error as e:
        raise ValueError(f"NameMap rule {rx!r}: not a valid regex ({e}).") from None
      names = set(re.findall(r"{(\w*)}", template)) - {"layer"}
      missing = names - set(re.compile(rx).groupindex)
      if missing:
        raise ValueError(
            f"NameMap rule ({rx!r}, {template!r}): the template uses {sorted(missing)} which the "
            "regex does not capture; name them with (?P<name>...) groups."
        )
    object.__setattr__(self, "rules", rules)

  def _rule(self, path: str) -> tuple[re.Match, str] | None:
    for rx, template in self.rules:
      m = re.fullmatch(rx, path)
      if m:
        return m, template
    return None

  def stacked(self, path: str) -> bool:
    """Whether ``path`` maps to one torch module per layer (its template has ``{layer}``)."""
    hit = self._rule(path)
    return hit is not None and "{layer}" in hit[1]

  def __call__(self, path: str, layer: int | None = None) -> str | None:
    hit = self._rule(path)
    if hit is None:
      return None
    m, template = hit
    if ("{layer}" in template) != (layer is not None):
      raise ValueError(
          f"NameMap: {path!r} matches a rule with template {template!r}, which "
          + ("needs a layer index: the kernel must be stacked (layout with 'l')." if layer is None
             else "has no {layer}: the kernel must not be stacked.")
      )
    groups = {k: v.replace("/", ".") for k, v in m.groupdict().items() if v is not None}
    return self.prefix + template.format(layer=layer, **groups)

  def module_pattern(self, path: str) -> str | None:
    """A regex for the torch names of ``path`` (all layers of a stacked kernel), for PEFT's
    ``rank_pattern`` / ``alpha_pattern``; ``None`` if no rule matches."""
    hit = self._rule(path)
    if hit is None:
      return None
    m, template = hit
    groups = {k: re.escape(v.replace("/", ".")) for k, v in m.groupdict().items() if v is not None}
    pieces = re.split(r"({\w*})", template)
    out = []
    for piece in pieces:
      if piece == "{layer}":
        out.append(r"\d+")
      elif re.fullmatch(r"{\w*}", piece):
        out.append(groups[piece[1:-1]])
      else:
        out.append(re.escape(piece))
    return re.escape(self.prefix) + "".join(out)

  def with_prefix(self, prefix: str) -> "NameMap":
    """The same rules with ``prefix`` before every torch name (e.g. ``"bert."``)."""
    return NameMap(self.rules, prefix)


_P = r"(?:params/)?"  # linen params may be passed with or without the "params" collection

LLAMA = NameMap(
    (
        (_P + r"layers/(?P<module>.+)/kernel", "model.layers.{layer}.{module}"),
        (_P + r"layers_(?P<i>\d+)/(?P<module>.+)/kernel", "model.layers.{i}.{module}"),
        (_P + r"embed_tokens/embedding", "model.embed_tokens"),
        (_P + r"lm_head/kernel", "lm_head"),
    )
)
"""Name map for :mod:`lora_jax.models.llama` <-> ``transformers.LlamaForCausalLM``."""

BERT = NameMap(
    (
        (_P + r"encoder/layer_(?P<i>\d+)/(?P<module>.+)/kernel", "encoder.layer.{i}.{module}"),
        (_P + r"encoder/layer/(?P<module>.+)/kernel", "encoder.layer.{layer}.{module}"),
        (_P + r"embeddings/(?P<module>\w+)/embedding", "embeddings.{module}"),
        (_P + r"pooler/dense/kernel", "pooler.dense"),
    )
)
"""Name map for :mod:`lora_jax.models.bert` <-> ``transformers.BertModel`` (PEFT keys of a bare
``BertModel`` are ``base_model.model.encoder.layer.0...``); use ``BERT.with_prefix("bert.")``
for ``BertForSequenceClassification`` and other heads that hold the encoder as ``.bert``."""

NAME_MAPS: dict[str, NameMap] = {"llama": LLAMA, "bert": BERT}

NameMapLike = Union[NameMap, str, Sequence[tuple[str, str]], Callable[..., Union[str, None]]]


def _as_name_map(name_map: NameMapLike) -> Any:
  if isinstance(name_map, NameMap):
    return name_map
  if isinstance(name_map, str):
    if name_map not in NAME_MAPS:
      raise ValueError(f"name_map={name_map!r}: known maps are {sorted(NAME_MAPS)}; or pass a NameMap.")
    return NAME_MAPS[name_map]
  if callable(name_map):
    return name_map
  if isinstance(name_map, Sequence):
    return NameMap(name_map)
  raise TypeError(
      f"name_map: expected a NameMap, 'llama'/'bert', a list of (regex, template) rules, or a "
      f"callable (path, layer) -> torch module name; got {type(name_map).__name__}."
  )


def _names(name_map: Any, path: str, n_layers: int | None) -> list[str] | None:
  """Torch names of ``path``: one per layer when ``n_layers`` is given; None if unmapped."""
  if n_layers is None:
    name = name_map(path, None)
    return None if name is None else [name]
  names = [name_map(path, i) for i in range(n_layers)]
  if any(n is None for n in names):
    return None
  if len(set(names)) != n_layers:
    raise ValueError(
        f"name map: the {n_layers} layers of stacked kernel {path!r} map to {len(set(names))} "
        "distinct torch names; the name needs a {layer} placeholder."
    )
  return names


# ----------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------


def _linear_axes(path: str, f: Any) -> int:
  """Number of stacked axes (0 or 1); refuses layouts that have no torch Linear equivalent."""
  nl, ni, no = f.layout.count("l"), f.layout.count("i"), f.layout.count("o")
  if nl > 1 or ni != 1 or no != 1:
    if isinstance(f, DoraFactors):
      raise ValueError(
          f"{path!r}: layout {f.layout!r} has no PEFT equivalent that export_peft writes: DoRA "
          "is exported for Linear kernels only ('io' or 'lio'), not for conv or multi-axis "
          "kernels (PEFT's conv DoRA keeps a (1, out_channels, 1, ...) magnitude of a conv "
          "module). Merge it into the base instead (lora_jax.merge)."
      )
    raise ValueError(
        f"{path!r}: layout {f.layout!r} has no PEFT equivalent: PEFT interop covers Linear and "
        "Embedding kernels, i.e. one fan-in axis, one fan-out axis and at most one stacked "
        "layer axis ('io' or 'lio'). Reshape multi-axis kernels (DenseGeneral, conv) to 2-D first."
    )
  return nl


def _patterns(modules: Mapping[str, tuple[Any, str | None]], default: Any) -> dict[str, Any]:
  """rank_pattern / alpha_pattern entries: {regex: value} for modules whose value != default."""
  out: dict[str, Any] = {}
  for name, (value, group_rx) in modules.items():
    if value == default:
      continue
    key = group_rx if group_rx is not None else re.escape(name)
    out[key] = value
  return out


def _json_number(x: float) -> int | float:
  """An integral alpha as a JSON integer (PEFT's ``lora_alpha: int``), others as floats."""
  return int(x) if float(x).is_integer() else float(x)


def _rslora_of(f: Any) -> bool:
  """Whether an adapter was made with rsLoRA (``scale = alpha / sqrt(r)``)."""
  return bool(getattr(f, "rslora", False))


def _most_common(values: list[Any]) -> Any:
  return collections.Counter(values).most_common(1)[0][0]


def _check_dropout_arg(p: Any) -> float:
  if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
    raise TypeError(f"export_peft(lora_dropout={p!r}): expected a float in [0, 1) or None (as the adapters were made).")
  if not 0.0 <= float(p) < 1.0:
    raise ValueError(f"export_peft(lora_dropout={p!r}): a dropout rate is in [0, 1).")
  return float(p)


def _peft_settings(flat: Mapping[str, Any], lora_dropout: Any) -> tuple[bool, float]:
  """``(use_dora, lora_dropout)`` for one PEFT config, refusing adapters it cannot describe."""
  kinds: dict[type, str] = {}
  for path, f in flat.items():
    if not isinstance(f, (LoraFactors, DoraFactors)):
      raise TypeError(
          f"export_peft: adapters[{path!r}] is a {type(f).__name__} (kind {getattr(f, 'KIND', '?')!r}); "
          "PEFT's LoRA format holds plain LoRA (LoraFactors) and DoRA (DoraFactors) only. Merge "
          "it into the base (lora_jax.merge) or save it with lora_jax.save."
      )
    if f.base_digest is not None:
      raise ValueError(
          f"export_peft: {path!r} was made by an init that rewrote its base kernel (PiSSA / "
          "OLoRA: base_digest is set), so its factors fit the residual base W - scale*a0@b0, "
          "not the Hugging Face model's weights, which PEFT would load them onto. Convert them "
          "for the original base first: lora_jax.to_original_base(adapters, initial_adapters), "
          "with initial_adapters the adapters as lora_jax.init returned them."
      )
    if isinstance(f, DoraFactors) and f.prepared:
      raise ValueError(
          f"export_peft: {path!r} is a DoRA adapter prepared for one call (its m holds the "
          "rescale m / ||W + s*a@b||); export the adapters themselves."
      )
    kinds.setdefault(type(f), path)
  if len(kinds) > 1:
    raise ValueError(
        f"export_peft: {kinds[LoraFactors]!r} is plain LoRA but {kinds[DoraFactors]!r} is DoRA; "
        "PEFT's use_dora is one switch for a whole adapter directory, so one directory cannot "
        "hold both. Export each kind to its own directory (export_peft(dir, {path: adapter for "
        "the paths of one kind}, ...)), or make all of them DoRA."
    )
  use_dora = DoraFactors in kinds
  if lora_dropout is not None:
    return use_dora, _check_dropout_arg(lora_dropout)
  rates: dict[float, str] = {}
  for path, f in flat.items():
    rates.setdefault(float(f.dropout), path)
  if len(rates) > 1:
    (r1, p1), (r2, p2) = list(rates.items())[:2]
    raise ValueError(
        f"export_peft: {p1!r} has dropout {r1} but {p2!r} has dropout {r2}; PEFT's lora_dropout "
        "is one rate for a whole adapter directory. Pass export_peft(..., lora_dropout=rate) to "
        "write one rate for all (dropout acts only in training: outputs are the same)."
    )
  return use_dora, next(iter(rates))


def export_peft(
    directory: str | os.PathLike,
    adapters: PyTree,
    name_map: NameMapLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "CAUSAL_LM",
    rslora: bool | None = None,
    lora_dropout: float | None = None,
    dtype: Any = None,
) -> str:
  """Writes adapters as a PEFT LoRA directory that ``peft.PeftModel.from_pretrained`` loads.

  Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
  ``{"format": "pt"}``), atomically, tensors first. ``r`` and ``lora_alpha`` are the most
  common rank and alpha; modules that differ get ``rank_pattern`` / ``alpha_pattern`` entries
  (one regex per stacked kernel), checked against PEFT's own matching before writing.
  ``target_modules`` lists the full torch name of every adapted module, so PEFT adapts
  exactly these. DoRA adapters (:class:`~lora_jax.DoraFactors`) are written with
  ``use_dora: true`` and their magnitude ``m`` as ``...lora_magnitude_vector`` ``(out,)``;
  ``base_norm`` is not written (PEFT computes norms from the base weights it loads onto).

  Args:
    directory: output directory (created if needed).
    adapters: a tree from :func:`lora_jax.init` or a flat ``{path: adapter}`` dict of
      :class:`~lora_jax.LoraFactors`, or of :class:`~lora_jax.DoraFactors` (not both: PEFT's
      ``use_dora`` is one switch per directory).
    name_map: a :class:`NameMap`, ``"llama"`` / ``"bert"``, a list of ``(regex, template)``
      rules, or a callable ``(path, layer) -> torch module name | None``.
    base_model_name_or_path: recorded in the config (the hub id or path of the base model).
    task_type: PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"FEATURE_EXTRACTION"``,
      ``None``); PeftModel.from_pretrained builds the matching PeftModel class.
    rslora: express scales as ``lora_alpha / sqrt(r)`` (``use_rslora=True``) or as
      ``lora_alpha / r``. By default, as the adapters were made: ``use_rslora`` when every
      adapter was made with ``LoraSpec(rslora=True)`` (its ``rslora`` field), so the config
      carries the spec's alphas. Either way PEFT's scale equals each adapter's ``scale``.
    lora_dropout: the ``lora_dropout`` to write. By default the adapters' own ``dropout``
      (``LoraSpec(dropout=...)``), which must then be one rate for all of them.
    dtype: cast the tensors (default: keep them, usually float32).

  Returns:
    ``directory``.

  Raises:
    ValueError: an adapted path the name map does not cover, two paths mapping to one torch
      module, a layout with no Linear/Embedding equivalent (conv DoRA included), plain LoRA
      and DoRA adapters together, different dropout rates (without ``lora_dropout=``), or
      adapters made for a rewritten base (``base_digest`` set: PiSSA, OLoRA).
    TypeError: an adapter kind PEFT's LoRA format cannot hold.

  >>> import tempfile, jax, lora_jax
  >>> params = {"layers_0": {"mlp": {"up_proj": {"kernel": jnp.ones((4, 8))}}}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["up_proj"], rank=2))
  >>> d = export_peft(tempfile.mkdtemp(), ad, "llama")
  >>> sorted(read_safetensors(d + "/adapter_model.safetensors")[0])
  ['base_model.model.model.layers.0.mlp.up_proj.lora_A.weight', 'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight']
  """
  nm = _as_name_map(name_map)
  flat = flatten_adapters(adapters)
  if not flat:
    raise ValueError("export_peft: the adapters hold no LoraFactors or DoraFactors; nothing to export.")
  if rslora is None:  # as made; a mix is written as plain LoRA, with exact (non-integer) alphas
    rslora = all(_rslora_of(f) for f in flat.values())
  elif not isinstance(rslora, bool):
    raise TypeError(f"export_peft(rslora={rslora!r}): expected True, False or None (as the adapters were made).")
  use_dora, dropout = _peft_settings(flat, lora_dropout)
  tensors: dict[str, np.ndarray] = {}
  ranks: dict[str, tuple[int, str | None]] = {}
  alphas: dict[str, tuple[float, str | None]] = {}
  owner: dict[str, str] = {}
  for path, f in flat.items():
    nl = _linear_axes(path, f)
    a, b = _to_numpy(f.a), _to_numpy(f.b)
    m = _to_numpy(f.m) if use_dora else None
    if dtype is not None:
      a, b = a.astype(dtype), b.astype(dtype)
      m = None if m is None else m.astype(dtype)
    if m is not None and m.shape != b.shape[:-2] + b.shape[-1:]:
      raise ValueError(
          f"export_peft: {path!r}: DoRA magnitude m has shape {m.shape}, but its factor b "
          f"{b.shape} needs {b.shape[:-2] + b.shape[-1:]} (one value per output feature, per layer)."
      )
    n_layers = a.shape[0] if nl else None
    names = _names(nm, path, n_layers)
    if names is None:
      raise ValueError(
          f"export_peft: no name-map rule gives a torch module for adapted path {path!r}. Add "
          "a rule, e.g. NameMap([(r'...regex fullmatching the path...', 'torch.module.{layer}'), "
          "...]), or drop this adapter."
      )
    group_rx = nm.module_pattern(path) if isinstance(nm, NameMap) else None
    embedding = path.split("/")[-1] == "embedding"
    if embedding and use_dora:
      raise ValueError(
          f"export_peft: {path!r} is an embedding with DoRA factors; lora_jax's DoRA adapts "
          "matmul kernels, not embeddings. Use plain LoRA (kind='lora') for embeddings, "
          "exported to a directory of its own."
      )
    kind_a, kind_b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
    alpha = _json_number(_alpha(f.scale, f.rank, rslora))
    for i, name in enumerate(names):
      if name in owner:
        raise ValueError(f"export_peft: {path!r} and {owner[name]!r} both map to torch module {name!r}.")
      owner[name] = path
      ai, bi = (a[i], b[i]) if nl else (a, b)
      tensors[f"{_PREFIX}{name}.{kind_a}"] = np.ascontiguousarray(ai.T)
      tensors[f"{_PREFIX}{name}.{kind_b}"] = np.ascontiguousarray(bi.T)
      if m is not None:
        tensors[f"{_PREFIX}{name}.{_MAGNITUDE}"] = np.ascontiguousarray(m[i] if nl else m)
      ranks[name] = (f.rank, group_rx)
      alphas[name] = (alpha, group_rx)
  r = _most_common([v for v, _ in ranks.values()])
  alpha = _most_common([v for v, _ in alphas.values()])
  rank_pattern = _patterns(ranks, r)
  alpha_pattern = _patterns(alphas, alpha)
  rank_keys, alpha_keys = PeftPatterns(rank_pattern), PeftPatterns(alpha_pattern)
  for name in owner:  # every module must resolve, under PEFT's rules, to its own r and alpha
    rk, ak = rank_keys.first(name), alpha_keys.first(name)
    got = (rank_pattern[rk] if rk is not None else r, alpha_pattern[ak] if ak is not None else alpha)
    if got != (ranks[name][0], alphas[name][0]):
      raise ValueError(
          f"export_peft: PEFT would give {name!r} (r, alpha) = {got}, not "
          f"{(ranks[name][0], alphas[name][0])}: the rank/alpha pattern keys overlap. Use a "
          "name map whose torch names are not suffixes of one another."
      )
  config = {
      "peft_type": "LORA",
      "task_type": task_type,
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(r),
      "lora_alpha": alpha,
      "lora_dropout": dropout,
      "target_modules": sorted(owner),
      "use_rslora": bool(rslora),
      "use_dora": use_dora,
      "fan_in_fan_out": False,
      "bias": "none",
      "lora_bias": False,
      "rank_pattern": rank_pattern,
      "alpha_pattern": alpha_pattern,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "init_lora_weights": True,
      "inference_mode": True,
      "target_parameters": None,
      "revision": None,
  }
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  write_safetensors(os.path.join(directory, PEFT_WEIGHTS), tensors, {"format": "pt"})
  _write_json(os.path.join(directory, PEFT_CONFIG), config)
  return directory


# ----------------------------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PeftModule:
  """One LoRA module of a PEFT file: torch name, kind, factors in PEFT layout, r, alpha, scale
  and, for DoRA, the magnitude vector."""

  name: str
  embedding: bool
  A: np.ndarray  # (r, in)
  B: np.ndarray  # (out, r)
  r: int
  alpha: float
  scale: float
  magnitude: np.ndarray | None = None  # DoRA's lora_magnitude_vector (out,); None for plain LoRA


@dataclasses.dataclass(frozen=True)
class PeftAdapter:
  """A validated PEFT LoRA directory: its config, modules and the keys that were ignored;
  ``use_dora`` and ``dropout`` (``lora_dropout``) as the config says."""

  config: dict[str, Any]
  modules: dict[str, PeftModule]
  ignored: tuple[str, ...]
  use_dora: bool = False
  dropout: float = 0.0


# PEFT 0.21.2 LoraConfig options that change what the factors mean (or add tensors): refused
# by name, never imported as plain LoRA.
_UNSUPPORTED = {
    "lora_bias": "LoRA biases (lora_bias=true)",
    "target_parameters": "LoRA on nn.Parameter targets (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "BD-LoRA, block-diagonal lora_A/lora_B factors (use_bdlora)",
    "kasa_config": "KaSA, a learned diagonal between lora_A and lora_B on an SVD-truncated base (kasa_config)",
    "monteclora_config": "MonteCLoRA, Monte Carlo sampled LoRA weights (monteclora_config)",
    "arrow_config": "Arrow routing between several LoRA experts (arrow_config)",
    "megatron_config": "Megatron-LM tensor-parallel LoRA layers (megatron_config)",
}
# Initialisations after which the adapter only fits a base model PEFT changed (W - s·BA, or a
# quantised W): the directory is not an adapter for the original base.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# Every other option of PEFT 0.21.2's LoraConfig: selection, training or metadata only.
_KNOWN = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout",
    "fan_in_fan_out", "bias", "use_rslora", "use_dora", "modules_to_save", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "megatron_core",
    "trainable_token_indices", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "qalora_group_size", "runtime_config", "ensure_weight_tying",
} | set(_UNSUPPORTED)
_MAX_RANK = 2**31 - 1


def _short(x: Any, n: int = 80) -> str:
  try:
    text = repr(x)
  except ValueError:  # an int too long for a decimal repr
    text = f"<an int of {x.bit_length()} bits>"
  return text if len(text) <= n else text[: n - 3] + "..."


def _is_rank(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= _MAX_RANK


def _is_finite(v: Any) -> bool:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return False
  try:
    return math.isfinite(float(v))
  except OverflowError:  # an int beyond float range, e.g. 10**400
    return False


def _check_config(cfg: dict[str, Any], bad: Callable[[str], AdapterFileError]) -> dict[str, Any]:
  """Validates a PEFT LoRA config; returns what the reader uses (r, alpha, patterns, ...)."""
  if cfg.get("peft_type") != "LORA":
    raise bad(
        f"peft_type is {_short(cfg.get('peft_type'))}; lora_jax imports plain LoRA adapters only "
        "(peft_type 'LORA')."
    )
  for key, what in _UNSUPPORTED.items():
    if cfg.get(key) not in (None, False, [], {}):
      raise bad(f"{what} is not supported by lora_jax; merge it in PEFT (merge_and_unload) instead.")
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise bad(
        f"init_lora_weights={init!r:.40}: this initialisation changes the base weights, so the "
        "adapter only fits the base model PEFT modified, not the original. Save it with PEFT's "
        "save_pretrained(..., path_initial_model_for_weight_conversion=...), which converts it "
        "to plain LoRA, or merge it in PEFT (merge_and_unload)."
    )
  for key, value in cfg.items():  # options of a newer PEFT that switch on a variant
    if key not in _KNOWN and (key.startswith("use_") or key.endswith("_config")) and value not in (None, False, [], {}):
      raise bad(
          f"{key}={_short(value, 40)} is a PEFT option lora_jax does not know (a newer PEFT "
          "variant?); refusing rather than importing it as plain LoRA."
      )
  r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
  rslora = cfg.get("use_rslora", False)
  if not _is_rank(r):
    raise bad(f"r must be a positive integer, found {_short(r)}.")
  if not _is_finite(alpha):
    raise bad(f"lora_alpha must be a finite number within float range, found {_short(alpha)}.")
  if not isinstance(rslora, bool):
    raise bad(f"use_rslora must be true or false, found {_short(rslora)}.")
  use_dora = cfg.get("use_dora", False)
  if use_dora is None:
    use_dora = False
  if not isinstance(use_dora, bool):
    raise bad(f"use_dora must be true or false, found {_short(use_dora)}.")
  dropout = cfg.get("lora_dropout", 0.0)
  if dropout is None:
    dropout = 0.0
  if not _is_finite(dropout) or not 0.0 <= float(dropout) < 1.0:
    raise bad(f"lora_dropout must be a number in [0, 1) (a dropout rate), found {_short(dropout)}.")
  if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
    raise bad(f"bias must be 'none', 'all' or 'lora_only', found {_short(cfg.get('bias'))}.")
  patterns = {}
  for pname, ok, what in (
      ("rank_pattern", _is_rank, "positive integers"),
      ("alpha_pattern", _is_finite, "finite numbers"),
  ):
    pattern = cfg.get(pname) or {}
    if not isinstance(pattern, dict):
      raise bad(f"{pname} must map regexes to {what}, found a {type(pattern).__name__}.")
    for key, value in pattern.items():
      if not ok(value):
        raise bad(f"{pname}[{_short(key)}] must be one of {what}, found {_short(value)}.")
    try:
      patterns[pname] = PeftPatterns(pattern)
    except UnsafePattern as e:
      key = getattr(e, "key", None)
      raise bad(
          f"{pname} key {_short(key)} is refused: {e}. Pattern keys from files are matched with "
          "a safe subset of Python regexes (no backreferences, lookaround or inline flags; at "
          "most 1000 characters, 32 nested groups, {m,n} counts up to 1000)."
          if key is not None else f"{pname}: {e}."
      ) from None
  targets = cfg.get("target_modules")
  if isinstance(targets, str):
    try:
      SafeRegex(targets)
    except UnsafePattern as e:
      raise bad(f"target_modules regex {_short(targets)} is refused: {e}.") from None
  elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
    raise bad(f"target_modules must be a regex string or a list of module names, found {_short(targets)}.")
  return dict(r=r, alpha=alpha, rslora=rslora, use_dora=use_dora, dropout=float(dropout),
              rank_pattern=cfg.get("rank_pattern") or {},
              alpha_pattern=cfg.get("alpha_pattern") or {}, patterns=patterns)


def read_peft(directory: str | os.PathLike) -> PeftAdapter:
  """Reads and validates a PEFT LoRA or DoRA directory (never unpickling anything).

  Raises:
    FileNotFoundError: no ``adapter_config.json`` in ``directory``.
    AdapterFileError: a ``.bin`` pickle only, a malformed config or tensor file, a method
      other than plain LoRA and DoRA (LoRA bias, BD-LoRA, LoHa, ...: named), factor shapes
      that contradict the config's ranks, pattern keys outside the safe regex subset, a DoRA
      magnitude missing, of the wrong shape or dtype, or present without ``use_dora``, DoRA
      on an embedding, or non-finite values.

  >>> import tempfile, lora_jax
  >>> f = LoraFactors(a=jnp.ones((4, 2)), b=jnp.ones((2, 3)), scale=0.5, layout="io")
  >>> d = export_peft(tempfile.mkdtemp(), {"lm_head/kernel": f}, "llama")
  >>> m = read_peft(d).modules["lm_head"]
  >>> m.A.shape, m.B.shape, m.r, m.alpha, m.scale
  ((2, 4), (3, 2), 2, 1.0, 0.5)
  """
  directory = os.fspath(directory)
  cfg_path = os.path.join(directory, PEFT_CONFIG)
  if not os.path.isfile(cfg_path):
    subdirs = [d for d in sorted(os.listdir(directory)) if os.path.isfile(os.path.join(directory, d, PEFT_CONFIG))] if os.path.isdir(directory) else []
    raise FileNotFoundError(
        f"{directory}: no {PEFT_CONFIG}; not a PEFT adapter directory."
        + (f" Named adapters found in sub-directories: {subdirs}; read them all with "
           "lora_jax.import_peft_set(dir, params, name_map)." if subdirs else "")
    )
  weights = os.path.join(directory, PEFT_WEIGHTS)
  if not os.path.exists(weights):
    pickle = os.path.join(directory, PEFT_PICKLE)
    if os.path.exists(pickle):
      _refuse_pickle(pickle)
    raise FileNotFoundError(f"{directory}: no {PEFT_WEIGHTS}.")
  cfg = read_json(cfg_path)

  def bad(what: str) -> AdapterFileError:
    return AdapterFileError(f"{cfg_path}: {what}")

  c = _check_config(cfg, bad)
  r, alpha, rslora = c["r"], c["alpha"], c["rslora"]
  rank_pattern, alpha_pattern = c["rank_pattern"], c["alpha_pattern"]

  tensors, _, _ = read_safetensors(weights)
  parts: dict[str, dict[str, Any]] = collections.defaultdict(dict)
  ignored = []
  for key, value in tensors.items():
    inner = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    m = _KEY.fullmatch(inner)
    if m is not None and m["kind"] == _MAGNITUDE:
      if not c["use_dora"]:
        raise AdapterFileError(
            f"{weights}: {_short(key)} is a DoRA magnitude, but {PEFT_CONFIG} does not set "
            "use_dora: true; refusing a file and config that disagree."
        )
      parts[m["module"]]["M"] = (key, value)
      continue
    if m is None:
      if "lora_" in key:
        raise AdapterFileError(
            f"{weights}: {key!r} is a LoRA tensor lora_jax does not understand (LoRA bias, a "
            "named adapter, or a newer PEFT feature); refusing a partial import."
        )
      ignored.append(key)
      continue
    which, embedding = _KINDS[m["kind"]]
    slot = parts[m["module"]]
    slot.setdefault("embedding", embedding)
    if slot["embedding"] != embedding:
      raise AdapterFileError(f"{weights}: module {m['module']!r} mixes Linear and Embedding LoRA keys.")
    slot[which] = value
  modules = {}
  for name, slot in parts.items():
    if "A" not in slot and "B" not in slot:
      raise AdapterFileError(f"{weights}: module {_short(name)} has a {_MAGNITUDE} but no lora_A / lora_B factors.")
    if "A" not in slot or "B" not in slot:
      raise AdapterFileError(f"{weights}: module {name!r} has only lora_{'A' if 'A' in slot else 'B'}; both factors are needed.")
    A, B = slot["A"], slot["B"]
    if A.ndim != 2 or B.ndim != 2:
      raise AdapterFileError(
          f"{weights}: module {name!r} has factors of shapes {A.shape} and {B.shape}; only Linear "
          "and Embedding LoRA (2-D factors) are supported, not conv LoRA."
      )
    if not (jnp.issubdtype(A.dtype, jnp.floating) and jnp.issubdtype(B.dtype, jnp.floating)):
      raise AdapterFileError(f"{weights}: module {name!r} has non-float factors ({A.dtype}, {B.dtype}).")
    rank = A.shape[0]
    if B.shape[1] != rank:
      raise AdapterFileError(
          f"{weights}: module {name!r}: lora_A has rank {rank} but lora_B {B.shape} has "
          f"{B.shape[1]}; plain LoRA factors are (r, in) and (out, r). A PEFT variant with other "
          "factor shapes (e.g. BD-LoRA's block-diagonal factors) or a damaged file."
      )
    if len(name) > MAX_NAME:
      raise AdapterFileError(f"{weights}: module name {_short(name)} is longer than {MAX_NAME} characters.")
    rk, ak = c["patterns"]["rank_pattern"].first(name), c["patterns"]["alpha_pattern"].first(name)
    want_r = rank_pattern[rk] if rk is not None else r
    mod_alpha = float(alpha_pattern[ak] if ak is not None else alpha)
    if rank != want_r:
      raise AdapterFileError(
          f"{weights}: module {name!r} has rank {rank} but the config gives r={want_r} "
          f"({'rank_pattern key ' + repr(rk) if rk is not None else 'r'}); the pair is inconsistent."
      )
    for label, x in (("lora_A", A), ("lora_B", B)):
      if not np.isfinite(x.astype(np.float32)).all():
        raise AdapterFileError(f"{weights}: {name}.{label} holds NaN or Inf; refusing a non-finite adapter.")
    magnitude = _magnitude(weights, name, slot, B.shape[0]) if c["use_dora"] else None
    scale = mod_alpha / (math.sqrt(rank) if rslora else rank)
    modules[name] = PeftModule(name, slot["embedding"], A, B, rank, mod_alpha, scale, magnitude)
  if not modules:
    raise AdapterFileError(f"{weights}: holds no LoRA tensors (keys: {[_short(k) for k in sorted(tensors)[:5]]}).")
  biases = [k for k in ignored if k.endswith(".bias")]
  if cfg.get("bias", "none") != "none" and biases:
    raise AdapterFileError(
        f"{weights}: bias={cfg['bias']!r} (in {PEFT_CONFIG}) trained base-model biases, saved as "
        f"{_short(biases[0])}...; lora_jax imports LoRA factors only, and leaving the biases out "
        "would change the model. Merge the adapter in PEFT (merge_and_unload) instead."
    )
  return PeftAdapter(cfg, dict(sorted(modules.items())), tuple(ignored), c["use_dora"], c["dropout"])


def _magnitude(weights: str, name: str, slot: Mapping[str, Any], out: int) -> np.ndarray:
  """The DoRA magnitude of module ``name`` (a Linear with ``out`` features), validated."""
  if slot["embedding"]:
    raise AdapterFileError(
        f"{weights}: module {name!r} is a DoRA embedding (use_dora with lora_embedding_A/B); "
        "lora_jax's DoRA adapts matmul kernels, not embeddings. Merge it in PEFT "
        "(merge_and_unload) instead."
    )
  if "M" not in slot:
    raise AdapterFileError(
        f"{weights}: module {name!r} has no {_PREFIX}{name}.{_MAGNITUDE}, which DoRA "
        "(use_dora: true) needs for every module; a damaged or partial file."
    )
  key, m = slot["M"]
  if tuple(m.shape) != (out,):
    raise AdapterFileError(
        f"{weights}: {_short(key)} has shape {tuple(m.shape)}, expected ({out},): one magnitude "
        f"per output feature of {name!r}, whose lora_B is ({out}, r)."
    )
  if not jnp.issubdtype(m.dtype, jnp.floating):
    raise AdapterFileError(f"{weights}: {_short(key)} has dtype {m.dtype}; a DoRA magnitude is a float tensor.")
  if not np.isfinite(m.astype(np.float32)).all():
    raise AdapterFileError(f"{weights}: {_short(key)} holds NaN or Inf; refusing a non-finite DoRA magnitude.")
  return m


def _common_dtype(dtypes: list[Any]) -> np.dtype:
  """The factors' dtype when a file mixes them: float32, or float64 if any factor is
  (bfloat16, float16 and float8 do not promote to one another)."""
  dtypes = [np.dtype(d) for d in dtypes]
  if len(set(dtypes)) == 1:
    return dtypes[0]
  return np.dtype(np.float64 if np.dtype(np.float64) in dtypes else np.float32)


def _base_norm(directory: Any, name: str, path: str, leaf: Any, layout: str) -> jax.Array:
  """``||W||`` per output feature of the kernel ``leaf`` (DoraFactors.base_norm), in float32
  or wider; raises when ``params`` holds only its shape."""
  if isinstance(leaf, jax.ShapeDtypeStruct) or not hasattr(leaf, "__array__"):
    raise ValueError(
        f"import_peft({os.fspath(directory)}): {name!r} is DoRA (use_dora: true), and DoRA "
        f"adapters keep the column norms of their base kernel (DoraFactors.base_norm, which "
        f"unmerge needs), but params[{path!r}] is a {type(leaf).__name__} without values. Pass "
        "the params themselves (arrays, e.g. lora_jax.load_params(...)), not their shapes."
    )
  w = jnp.asarray(leaf)
  return dense_column_norm(w.astype(jnp.promote_types(w.dtype, jnp.float32)), layout)


def import_peft(
    directory: str | os.PathLike,
    params: PyTree,
    name_map: NameMapLike,
    *,
    dtype: Any = None,
) -> PyTree:
  """Reads a PEFT LoRA directory (as ``save_pretrained`` writes it) into lora_jax adapters.

  Each torch module in the file is located in ``params`` through ``name_map``; per-layer
  modules of a stacked kernel (a 3-D leaf whose rule has ``{layer}``) are stacked back into
  one ``'lio'`` adapter, 2-D kernels get ``'io'``. The scale is PEFT's exactly:
  ``lora_alpha / r`` (or ``/ sqrt(r)`` with ``use_rslora``) with per-module ``r`` and alpha
  from ``rank_pattern`` / ``alpha_pattern``. Keys that are not LoRA factors (``base_layer``
  or ``modules_to_save`` weights, trainable tokens) are not imported: a ``UserWarning`` lists
  them. Layers of a stack missing from the file get zero factors (an exact no-op), also
  with a warning. ``lora_dropout`` becomes every adapter's ``dropout``.

  A DoRA directory (``use_dora: true``) gives :class:`~lora_jax.DoraFactors`: ``m`` is the
  file's ``lora_magnitude_vector``, and ``base_norm`` (which PEFT does not store) is the
  column norm of the kernel in ``params``, so DoRA needs ``params`` with values, not shapes.

  Args:
    directory: the PEFT adapter directory.
    params: the Flax params the adapters are for (arrays or ``jax.ShapeDtypeStruct`` s; arrays
      for DoRA).
    name_map: as for :func:`export_peft`.
    dtype: cast the factors (default: keep the file's dtype, usually float32; factors of
      mixed dtypes become float32, or float64 if one is; float64 is float32 in JAX unless
      ``jax_enable_x64``).

  Returns:
    Adapters mirroring ``params``: ``LoraFactors``, or ``DoraFactors`` for a DoRA directory.

  Raises:
    AdapterFileError: see :func:`read_peft`.
    ValueError: a torch module the name map does not locate in ``params``, factor shapes
      that do not fit the kernel (names the module, expected vs found), or a DoRA directory
      with ``params`` that hold shapes only; never a partial result.

  >>> import tempfile, jax, lora_jax
  >>> params = {"lm_head": {"kernel": jnp.ones((4, 8))}}
  >>> ad = lora_jax.init(jax.random.key(0), params, lora_jax.LoraSpec(["lm_head"], rank=2))
  >>> d = export_peft(tempfile.mkdtemp(), ad, "llama")
  >>> import_peft(d, params, "llama")["lm_head"]["kernel"].scale
  8.0
  >>> f = lora_jax.DoraFactors(a=jnp.ones((4, 1)), b=jnp.ones((1, 8)), m=jnp.full(8, 3.0),
  ...                          base_norm=jnp.full(8, 2.0), scale=0.5, layout="io")
  >>> d = export_peft(tempfile.mkdtemp(), {"lm_head/kernel": f}, "llama")  # writes use_dora: true
  >>> g = import_peft(d, params, "llama")["lm_head"]["kernel"]
  >>> type(g).__name__, g.m[:2], g.base_norm[:2]  # base_norm: ||W|| per column of params' kernel
  ('DoraFactors', Array([3., 3.], dtype=float32), Array([2., 2.], dtype=float32))
  """
  nm = _as_name_map(name_map)
  adapter = read_peft(directory)
  rslora = adapter.config.get("use_rslora", False)
  where: dict[str, tuple[str, int | None]] = {}
  leaves = {}
  for path, leaf in leaves_with_paths(params):
    shape = getattr(leaf, "shape", None)
    if shape is None or len(shape) not in (2, 3) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      continue
    stacked = nm.stacked(path) if isinstance(nm, NameMap) else len(shape) == 3
    if stacked != (len(shape) == 3):
      continue
    try:
      names = _names(nm, path, shape[0] if stacked else None)
    except ValueError:
      continue
    for i, name in enumerate(names or []):
      where[name] = (path, i if stacked else None)
    leaves[path] = leaf
  groups: dict[str, dict[int | None, PeftModule]] = collections.defaultdict(dict)
  for name, mod in adapter.modules.items():
    if name not in where:
      raise ValueError(
          f"import_peft({os.fspath(directory)}): torch module {name!r} has no counterpart in params under this name "
          f"map. Torch names the map produces near it: {nearby(name, list(where))}. Check the "
          "name map (e.g. NameMap.with_prefix('bert.') for a model with a task head)."
      )
    path, layer = where[name]
    groups[path][layer] = mod
  flat: dict[str, LoraFactors] = {}
  notes = []
  for path, layers in groups.items():
    leaf = leaves[path]
    shape = tuple(leaf.shape)
    kin, kout = shape[-2], shape[-1]
    for layer, mod in layers.items():
      if mod.A.shape[1] != kin or mod.B.shape[0] != kout:
        raise ValueError(
            f"import_peft({os.fspath(directory)}): {mod.name!r} has lora_A {mod.A.shape} and lora_B {mod.B.shape}, but "
            f"{path!r}{'' if layer is None else f'[{layer}]'} is a kernel (in={kin}, out={kout}): "
            f"expected lora_A (r, {kin}) and lora_B ({kout}, r). Wrong name map or wrong model."
        )
    mods = list(layers.values())
    if len({(m.r, m.scale) for m in mods}) != 1:
      raise ValueError(
          f"import_peft({os.fspath(directory)}): the layers of stacked kernel {path!r} have different (r, scale): "
          f"{sorted({(m.r, m.scale) for m in mods})}; a stacked adapter has one rank and scale. "
          "Load the model with scan_layers=False (one kernel per layer) instead."
      )
    rank, scale = mods[0].r, mods[0].scale
    dtypes = [x.dtype for m in mods for x in (m.A, m.B, m.magnitude) if x is not None]
    out_dtype = dtype if dtype is not None else _common_dtype(dtypes)
    if len(shape) == 2:
      a, b = mods[0].A.T, mods[0].B.T
      layout = "io"
    else:
      missing = [i for i in range(shape[0]) if i not in layers]
      if missing:
        notes.append(
            f"{path}: layers {missing} have no adapter in the file; their factors are zero"
            + (" and their DoRA magnitudes the base's column norms (a no-op)" if adapter.use_dora else "")
        )
      a = np.zeros((shape[0], kin, rank), out_dtype)
      b = np.zeros((shape[0], rank, kout), out_dtype)
      for i, mod in layers.items():
        a[i], b[i] = mod.A.T, mod.B.T
      layout = "lio"
    a, b = jnp.asarray(np.asarray(a).astype(out_dtype)), jnp.asarray(np.asarray(b).astype(out_dtype))
    if not adapter.use_dora:
      flat[path] = LoraFactors(a=a, b=b, scale=float(scale), layout=layout, rslora=rslora, dropout=adapter.dropout)
      continue
    base_norm = _base_norm(directory, mods[0].name, path, leaf, layout)
    if len(shape) == 2:
      m = mods[0].magnitude
    else:
      m = np.array(base_norm, np.float64)  # a layer missing from the file: m = ||W||, a no-op
      for i, mod in layers.items():
        m[i] = mod.magnitude
    flat[path] = DoraFactors(
        a=a, b=b, m=jnp.asarray(np.asarray(m).astype(out_dtype)), base_norm=base_norm.astype(out_dtype),
        scale=float(scale), layout=layout, rslora=rslora, dropout=adapter.dropout,
    )
  ordered = {p: flat[p] for p, _ in leaves_with_paths(params) if p in flat}
  tree = adapters_to_tree(ordered, params)
  if adapter.ignored:
    notes.append(f"ignored non-LoRA keys (not imported): {list(adapter.ignored)}")
  if notes:
    warnings.warn(f"import_peft({os.fspath(directory)}): " + "; ".join(notes), UserWarning, stacklevel=2)
  return tree


__all__ = [
    "BERT",
    "LLAMA",
    "NAME_MAPS",
    "NameMap",
    "PeftAdapter",
    "PeftModule",
    "export_peft",
    "import_peft",
    "read_peft",
]
