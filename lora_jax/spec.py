"""LoraSpec: which kernels get adapters, with which rank, alpha and axis layout."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np

from lora_jax._paths import leaves_with_paths, nearby
from lora_jax.kinds import Adapter, LoraFactors, kind_named, registered_kinds
from lora_jax.kinds.inits import check_init_name, check_init_target
from lora_jax.layout import KernelUses

Targets = Union[str, Sequence[str], Callable[[str, Any], bool]]
LayoutRule = Union[Mapping[str, str], Callable[[str, Any], Union[str, None]], None]

ALL_LINEAR = "all-linear"
# Leaf names that module-name targets select (with 2 or more axes): linen/NNX/HF Flax
# 'kernel' and 'embedding', equinox/torch-style 'weight', haiku/Gemma-style 'w'; penzai's
# '.../weights/value/data_array' and '.../embeddings/value/data_array' are matched by _PENZAI_WEIGHTS.
WEIGHT_NAMES = ("kernel", "embedding", "weight", "w")
_PENZAI_WEIGHTS = ("weights", "embeddings")
_EMBEDDING_NAMES = ("embedding",)
_HEAD_NAMES = ("lm_head", "output_embeddings")
_MAX_RANK = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Target:
  """One adapted kernel as resolved from a spec against concrete params."""

  path: str
  shape: tuple[int, ...]
  dtype: Any
  rank: int
  alpha: float
  scale: float
  layout: str
  is_embedding: bool
  rslora: bool = False
  init: str = "peft"
  dropout: float = 0.0

  @property
  def fan_in(self) -> int:
    return int(np.prod([d for d, c in zip(self.shape, self.layout) if c == "i"]))

  @property
  def fan_out(self) -> int:
    return int(np.prod([d for d, c in zip(self.shape, self.layout) if c == "o"]))


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Which parameters get LoRA adapters, and how.

  Args:
    targets: which leaves get adapters.

      * ``"all-linear"``: with the function (``lora_jax.init(rng, params, spec, apply_fn,
        *args)``), every leaf the function consumes as a matmul weight (``dot_general``:
        Dense, DenseGeneral, Einsum, ``x @ W.T``), except embeddings (leaves it looks up rows
        of) and the output layer (the last matmul that every path to an output of the
        function passes through: a vocabulary or classifier head, whatever its name; none
        when a residual bypasses the last matmul). Convolutions are not "linear". Without
        the function: every leaf named ``kernel`` with 2 or more axes, except under a module
        whose name contains ``conv``, under ``lm_head``/``output_embeddings``, and the last
        kernel in tree order when its fan-out equals an embedding's vocabulary size.
      * a list of module names (``["query", "value"]``; ``"attn/query"`` names a module within
        a parent): the weight leaves under every module of that name. A weight leaf has 2 or
        more axes and is named ``kernel`` or ``embedding`` (linen, NNX, Hugging Face Flax),
        ``weight`` (equinox, torch style), ``w`` (haiku/Gemma style) or is penzai's
        ``.../weights/value/data_array``; with the function, also any leaf it reads as a
        matmul, convolution or lookup operand.
      * a regular expression that must fullmatch the '/'-joined path of each adapted leaf,
        or a callable ``(path, leaf) -> bool``. These select exactly what they match: a
        selected leaf with fewer than 2 axes (a norm scale, a bias) is an error naming it,
        never skipped.

      ``"all-linear"`` and module-name lists never select a leaf with fewer than 2 axes.
    rank: default rank ``r``.
    alpha: default ``lora_alpha``; the update is scaled by ``alpha / r``.
    rank_pattern: regex → rank overrides, matched like PEFT's (``(.*/)?(key)`` fullmatching
      the module path or the leaf path); first match wins.
    alpha_pattern: regex → alpha overrides, matched the same way.
    rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
    layout: how each kernel axis splits into ``'l'`` (a leading axis kept on both factors,
      e.g. the layer axis of ``nn.scan``), ``'i'`` (fan-in) and ``'o'`` (fan-out). A mapping of
      regex → layout string (e.g. ``{"layers/.*": "lio"}``) or a callable
      ``(path, leaf) -> str | None``; entries here win over inferred layouts. With the
      function, every other layout is read off the trace (:func:`lora_jax.infer_layout`);
      without it, a 2-D kernel is ``'io'`` and a kernel of more axes must be stated.
    dtype: dtype of the factors (float32 by default; ``None`` uses each kernel's dtype).
    kind: the adapter kind to create: :class:`lora_jax.LoraFactors` (plain LoRA, the
      default), :class:`lora_jax.DoraFactors` (DoRA), any registered
      :class:`lora_jax.kinds.Adapter` subclass, or its registered name (``"lora"``, ``"dora"``).
    init: how the factors start (PEFT's ``init_lora_weights``): ``"peft"`` (kaiming-uniform
      ``a``, zero ``b``; for embeddings zero ``a``, normal ``b``), ``"gaussian"`` (normal
      ``a`` with std ``1/r``, zero ``b``), ``"pissa"`` (the top-``r`` singular vectors of each
      kernel; the base becomes the residual), ``"pissa_niter_K"`` (the same from a randomized
      SVD with ``K`` power iterations), ``"olora"`` (QR-based; also changes the base) or LoftQ:
      ``"loftq"`` / ``"loftq_iter_K"`` / ``"loftq_int8"`` / ``"loftq_int8_iter_K"`` (the base
      becomes a :class:`lora_jax.QuantizedKernel`, NF4 or int8, and the factors start at the
      top-``r`` part of its quantization error, alternating ``K`` times; see
      :mod:`lora_jax.kinds.loftq`). Inits that change the base need :func:`lora_jax.split`,
      which returns the new base.
    dropout: PEFT's ``lora_dropout``: the probability of zeroing an input element of the
      adapter path (``dropout(x) @ a @ b``; the base path is untouched) when the wrapped call
      is given ``lora_dropout_rng=key``; in ``[0, 1)``.

  >>> spec = LoraSpec(["query", "value"], rank=4, alpha=8)
  >>> spec.rank, spec.alpha
  (4, 8)
  """

  targets: Targets
  rank: int = 8
  alpha: float = 16
  rank_pattern: Mapping[str, int] | None = None
  alpha_pattern: Mapping[str, float] | None = None
  rslora: bool = False
  layout: LayoutRule = None
  dtype: Any = jnp.float32
  kind: type[Adapter] | str = LoraFactors
  init: str = "peft"
  dropout: float = 0.0

  def __post_init__(self):
    if isinstance(self.kind, str):
      found = kind_named(self.kind)
      if found is None:
        raise ValueError(
            f"LoraSpec(kind={_short(self.kind)}): no adapter kind of that name; registered kinds: "
            f"{sorted(registered_kinds())}."
        )
      object.__setattr__(self, "kind", found)
    check_init_name(f"LoraSpec(init={_short(self.init)})", self.init)
    _check_dropout(f"dropout={_short(self.dropout)}", self.dropout)
    if not (isinstance(self.kind, type) and issubclass(self.kind, Adapter) and kind_named(self.kind.KIND) is self.kind):
      raise TypeError(
          f"LoraSpec(kind={self.kind!r}): expected an adapter kind registered with "
          "lora_jax.kinds.register_kind, e.g. lora_jax.LoraFactors."
      )
    _check_rank(f"rank={_short(self.rank)}", self.rank)
    _check_alpha(f"alpha={_short(self.alpha)}", self.alpha)
    if not isinstance(self.rslora, (bool, np.bool_)):
      raise TypeError(f"LoraSpec(rslora={_short(self.rslora)}): expected True or False.")
    for name in ("rank_pattern", "alpha_pattern", "layout"):
      _check_pattern_keys(name, getattr(self, name))
    if not callable(self.rank_pattern):
      for key, r in (self.rank_pattern or {}).items():
        _check_rank(f"rank_pattern={{{key!r}: {_short(r)}}}", r)
    if not callable(self.alpha_pattern):
      for key, a in (self.alpha_pattern or {}).items():
        _check_alpha(f"alpha_pattern={{{key!r}: {_short(a)}}}", a)
    if isinstance(self.targets, str) or callable(self.targets):
      return
    if not isinstance(self.targets, Sequence) or not self.targets:
      raise TypeError(
          f"LoraSpec(targets={self.targets!r}): expected 'all-linear', a regex string, a "
          "non-empty list of module names, or a callable (path, leaf) -> bool."
      )
    for t in self.targets:
      if not isinstance(t, str) or not t:
        raise TypeError(f"LoraSpec(targets=...): entry {t!r} is not a non-empty module name.")

  def rank_for(self, path: str) -> int:
    """The rank this spec gives the kernel at ``path`` (``rank_pattern``, first match wins)."""
    return int(_first_match(self.rank_pattern, path, set(), self.rank))

  def alpha_for(self, path: str) -> float:
    """The alpha this spec gives the kernel at ``path`` (``alpha_pattern``, first match wins)."""
    return float(_first_match(self.alpha_pattern, path, set(), self.alpha))

  def scale_for(self, rank: int, alpha: float) -> float:
    return float(alpha) / (math.sqrt(rank) if self.rslora else rank)

  def resolve(self, params: Any, trace: KernelUses | None = None) -> list[Target]:
    """The adapted leaves of ``params``, in tree order, with rank, alpha, scale and layout.

    Args:
      params: the params pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
      trace: what :func:`lora_jax.layout.trace_uses` read off the function that uses
        ``params`` (``lora_jax.init(rng, params, spec, apply_fn, *args)`` passes it). With
        it, every layout the spec does not state comes from the trace, ``"all-linear"`` is
        decided from the trace, and a leaf a lookup reads is an embedding. Without it, a
        kernel of more than 2 axes needs a ``layout=`` entry.

    Raises:
      ValueError: a target, rank or alpha pattern that matches nothing, a rank larger than
        ``min(fan_in, fan_out)``, a missing or bad layout; the message names the path or
        pattern and the fix.
      TypeError: a targeted leaf that is not a floating-point array.
    """
    leaves = leaves_with_paths(params)
    if trace is not None and tuple(p for p, _ in leaves) != tuple(trace.paths):
      raise ValueError(
          "LoraSpec.resolve(params, trace=...): the trace was read off other params (its "
          f"{len(trace.paths)} paths differ from these {len(leaves)}). Trace the function with "
          "the same params tree."
      )
    chosen = _select(self.targets, leaves, trace)
    weights = _weights_by_module(leaves, trace)
    used_rank, used_alpha = set(), set()
    out = []
    for path, leaf in leaves:
      if path not in chosen:
        continue
      _check_adaptable(path, leaf, weights)
      rank = _first_match(self.rank_pattern, path, used_rank, self.rank)
      alpha = _first_match(self.alpha_pattern, path, used_alpha, self.alpha)
      layout = _layout_for(self.layout, path, leaf, trace)
      target = Target(
          path=path,
          shape=tuple(leaf.shape),
          dtype=leaf.dtype,
          rank=int(rank),
          alpha=float(alpha),
          scale=self.scale_for(int(rank), alpha),
          layout=layout,
          is_embedding=(path in trace.embeddings) if trace is not None else _leaf_name(path) in _EMBEDDING_NAMES,
          rslora=bool(self.rslora),
          init=self.init,
          dropout=float(self.dropout),
      )
      self.kind.check_target(target)
      check_init_target(target)
      limit = min(target.fan_in, target.fan_out)
      if target.rank > limit:
        hint = (
            " If this kernel's axes split differently into fan-in and fan-out (e.g. a "
            "DenseGeneral query kernel (embed, heads, head_dim) is 'ioo'), pass the function "
            "to lora_jax.init so it reads the layout, or "
            f"layout={{{_module(path)!r}: ...}}."
            if len(target.shape) > 2 and trace is None
            else ""
        )
        raise ValueError(
            f"{path!r}: rank {target.rank} exceeds min(fan_in, fan_out) = "
            f"min({target.fan_in}, {target.fan_out}) = {limit} for a kernel of shape "
            f"{target.shape} with layout {layout!r}. Use a smaller rank, or a rank_pattern "
            f"entry for this path, e.g. rank_pattern={{{_module(path)!r}: {limit}}}.{hint}"
        )
      out.append(target)
    for name, pattern, used in (
        ("rank_pattern", self.rank_pattern, used_rank),
        ("alpha_pattern", self.alpha_pattern, used_alpha),
    ):
      for key in (pattern or {}):
        if key not in used:
          raise ValueError(
              f"LoraSpec({name}=...): key {key!r} matches no adapted path. Adapted paths: "
              f"{nearby(key, [t.path for t in out])}."
          )
    return out


def _short(x: Any, n: int = 60) -> str:
  """``repr(x)``, cut to ``n`` characters; never fails (huge ints have no decimal repr)."""
  try:
    text = repr(x)
  except ValueError:
    text = f"<an int of {x.bit_length()} bits>"
  return text if len(text) <= n else text[: n - 3] + "..."


def _check_rank(shown: str, r: Any) -> None:
  """``shown`` is the argument as the user wrote it: ``rank=0``, ``rank_pattern={'fc': 0}``."""
  what = "rank must be a positive integer" if shown.startswith("rank=") else "ranks must be positive integers"
  if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
    raise TypeError(f"LoraSpec({shown}): {what} (int), found a {type(r).__name__}.")
  if r < 1 or r > _MAX_RANK:
    raise ValueError(f"LoraSpec({shown}): {what} (at most {_MAX_RANK}), found {_short(r)}.")


def _check_dropout(shown: str, p: Any) -> None:
  if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
    raise TypeError(f"LoraSpec({shown}): dropout must be a probability (a float in [0, 1)), found a {type(p).__name__}.")
  if not 0.0 <= float(p) < 1.0:
    raise ValueError(
        f"LoraSpec({shown}): dropout must be in [0, 1) (the probability of zeroing an input "
        "element of the adapter path; 1 would zero all of it)."
    )


def _check_alpha(shown: str, alpha: Any) -> None:
  if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.integer, np.floating)):
    raise TypeError(f"LoraSpec({shown}): alpha must be a real number (int or float), found a {type(alpha).__name__}.")
  try:
    finite = math.isfinite(float(alpha))
  except OverflowError:  # an int beyond float range
    finite = False
  if not finite:
    raise ValueError(
        f"LoraSpec({shown}): alpha must be a finite number within float range; the scale "
        "alpha / r multiplies every update, so a NaN or infinite alpha makes every merged "
        "kernel NaN/Inf."
    )


def _check_pattern_keys(name: str, pattern: Any) -> None:
  if pattern is None or callable(pattern):
    return
  if not isinstance(pattern, Mapping):
    raise TypeError(
        f"LoraSpec({name}={pattern!r}): expected a mapping of regex -> value"
        + (" or a callable (path, leaf) -> layout." if name == "layout" else ".")
    )
  for key in pattern:
    if not isinstance(key, str):
      raise TypeError(f"LoraSpec({name}=...): key {key!r} is not a regex string.")
    try:
      re.compile(key)
    except re.error as e:
      raise ValueError(f"LoraSpec({name}=...): key {key!r} is not a valid regex: {e}") from None


def _module(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else path


def _leaf_name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


def _is_named_weight(path: str) -> bool:
  """A leaf named as a weight by a known convention (see ``WEIGHT_NAMES``)."""
  parts = path.split("/")
  if parts[-1] in WEIGHT_NAMES:
    return True
  return len(parts) >= 3 and parts[-2:] == ["value", "data_array"] and parts[-3] in _PENZAI_WEIGHTS


def _module_of(path: str) -> str:
  """The module that holds a weight leaf (penzai's ``.../weights/value/data_array`` too)."""
  parts = path.split("/")
  if len(parts) >= 3 and parts[-2:] == ["value", "data_array"] and parts[-3] in _PENZAI_WEIGHTS:
    return "/".join(parts[:-3])
  return "/".join(parts[:-1])


def _is_weight(path: str, leaf: Any, trace: KernelUses | None = None) -> bool:
  """A leaf that module-name targets select: at least 2 axes, and named as a weight by a
  known convention or (with a trace) read by a matmul, convolution or lookup."""
  if getattr(leaf, "ndim", 0) < 2:
    return False
  return _is_named_weight(path) or (trace is not None and bool(trace.uses.get(path)))


def _weights_by_module(leaves: list[tuple[str, Any]], trace: KernelUses | None) -> dict[str, list[str]]:
  out: dict[str, list[str]] = {}
  for p, leaf in leaves:
    if _is_weight(p, leaf, trace):
      out.setdefault(_module_of(p), []).append(p)
  return out


def _module_names(modules: list[str]) -> list[str]:
  """Every name a module-name target could use: each module's own name and its path."""
  names = {part for m in modules for part in m.split("/") if part and not part.isdigit()}
  return sorted(names) + sorted(set(modules) - names)


def _suggest(name: str, names: list[str], n: int = 8) -> str:
  """The names closest to ``name`` first, then others, up to ``n`` (for error messages)."""
  close = difflib.get_close_matches(name, names, n=n, cutoff=0.5)
  shown = close + [x for x in names if x not in close][: max(n - len(close), 0)]
  more = f" (of {len(names)})" if len(names) > len(shown) else ""
  return ", ".join(repr(x) for x in shown) + more


def _select(targets: Targets, leaves: list[tuple[str, Any]], trace: KernelUses | None = None) -> set[str]:
  paths = [p for p, _ in leaves]
  if isinstance(targets, str) and targets == ALL_LINEAR:
    if trace is not None:
      chosen = set(trace.linear())
      if not chosen:
        raise ValueError(
            "LoraSpec(targets='all-linear') matched no kernel: it adapts every leaf the function "
            "consumes as a matmul weight (dot_general), except embeddings (leaves it looks up "
            f"rows of: {sorted(trace.embeddings)}) and the output layer "
            f"({sorted(trace.output_layers)}). Name the targets instead, e.g. a list of module names."
        )
      return chosen
    vocab = {leaf.shape[0] for p, leaf in leaves if _leaf_name(p) == "embedding" and getattr(leaf, "ndim", 0) >= 2}
    last = _last_kernel(leaves)
    chosen = {
        p
        for p, leaf in leaves
        if _leaf_name(p) == "kernel"
        and getattr(leaf, "ndim", 0) >= 2
        and not any(part in _HEAD_NAMES for part in p.split("/"))
        and not any("conv" in part.lower() for part in p.split("/")[:-1])
        and not (vocab and leaf.shape[-1] in vocab and p == last)
    }
    if not chosen:
      raise ValueError(
          "LoraSpec(targets='all-linear') matched no kernel: without the function it adapts "
          "leaves named 'kernel' with ndim >= 2 outside conv modules and the vocabulary head. "
          "Pass the function and an example input, lora_jax.init(rng, params, spec, apply_fn, "
          f"*example_args), to decide it from the trace. Paths: {nearby('kernel', paths)}."
      )
    return chosen
  if isinstance(targets, str):
    try:
      rx = re.compile(targets)
    except re.error as e:
      raise ValueError(f"LoraSpec(targets={targets!r}) is not a valid regex: {e}") from None
    chosen = {p for p in paths if rx.fullmatch(p)}
    if not chosen:
      raise ValueError(
          f"LoraSpec(targets={targets!r}) matches no parameter path (the regex must fullmatch "
          f"the '/'-joined path). Paths near it: {nearby(targets, paths)}."
      )
    return chosen
  if callable(targets):
    chosen = {p for p, leaf in leaves if targets(p, leaf)}
    if not chosen:
      raise ValueError(f"LoraSpec(targets={targets!r}): the callable selected no parameter.")
    return chosen
  weights = [p for p, leaf in leaves if _is_weight(p, leaf, trace)]
  chosen = set()
  for name in targets:
    parts = name.strip("/").split("/")
    hits = {p for p in weights if _contains(_module_of(p).split("/"), parts)}
    if not hits:
      modules = sorted({_module_of(p) for p in weights})
      if modules:
        near = f"Module names that hold weights, nearest first: {_suggest(name, _module_names(modules))}."
      else:
        near = (
            "No leaf of these params is a weight by name (" + ", ".join(f"'{n}'" for n in WEIGHT_NAMES)
            + ", penzai's '.../weights/value/data_array') with 2 or more axes"
            + ("" if trace is not None else "; pass the function to lora_jax.init to find weights by use")
            + f". Paths: {nearby(name, paths)}."
        )
      raise ValueError(
          f"LoraSpec(targets=[..., {name!r}, ...]): no module named {name!r} holds a weight "
          f"(a kernel, embedding or weight leaf with 2 or more axes). {near}"
      )
    chosen |= hits
  return chosen


def _last_kernel(leaves: list[tuple[str, Any]]) -> str | None:
  kernels = [p for p, leaf in leaves if _leaf_name(p) == "kernel" and getattr(leaf, "ndim", 0) >= 2]
  return kernels[-1] if kernels else None


def _contains(seq: list[str], sub: list[str]) -> bool:
  n = len(sub)
  return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def _instead(path: str, weights: dict[str, list[str]]) -> str:
  """The fix for a targeted non-weight leaf: its module's weight leaves, if it has any."""
  siblings = weights.get(_module_of(path)) or weights.get(_module(path))
  if siblings:
    return f"Target {' or '.join(repr(s) for s in siblings)} instead."
  names = sorted({_leaf_name(p) for ps in weights.values() for p in ps})
  example = f" (here: {', '.join(repr(n) for n in names[:4])})" if names else ""
  return (
      "Narrow the targets to weight leaves with 2 or more axes, e.g. a regex that ends in the "
      f"weight leaf's name{example} or a module-name list."
  )


def _check_adaptable(path: str, leaf: Any, weights: dict[str, list[str]] | None = None) -> None:
  weights = weights or {}
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(
        f"{path!r}: targeted leaf is a {type(leaf).__name__}, not an array; only array kernels "
        "can be adapted. Narrow the targets so they select kernels only."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{path!r}: targeted kernel has dtype {dtype}; LoRA needs a floating-point kernel (to "
        "train on a quantized base, quantize the float kernel with lora_jax.quantize, which keeps "
        "it one leaf of the kernel's shape and dtype)."
    )
  if _leaf_name(path) == "bias":
    raise ValueError(
        f"{path!r}: targeted leaf is a bias of shape {tuple(shape)}; LoRA adapts kernels, not "
        f"biases. {_instead(path, weights)}"
    )
  if len(shape) < 2:
    raise ValueError(
        f"{path!r}: targeted leaf has shape {tuple(shape)}; LoRA adapts kernels with at least "
        f"2 axes (a regex or callable target must not select a norm scale or bias). "
        f"{_instead(path, weights)}"
    )


def _matches(key: str, path: str) -> bool:
  rx = rf"(?:.*/)?(?:{key})"
  return re.fullmatch(rx, path) is not None or re.fullmatch(rx, _module(path)) is not None


def _first_match(pattern: Mapping[str, Any] | None, path: str, used: set, default: Any) -> Any:
  for key, value in (pattern or {}).items():
    if _matches(key, path):
      used.add(key)
      return value
  return default


def default_layout(path: str, ndim: int) -> str:
  """The layout of a kernel the spec names none for, without the function: ``'io'`` for a
  2-D kernel (``(in, out)``, as Dense); a kernel of more axes has none (it is an error).

  >>> default_layout("dense/kernel", 2)
  'io'
  """
  if ndim != 2:
    raise ValueError(
        f"{path!r}: a kernel with {ndim} axes has no default layout: its leading (layer), "
        "fan-in and fan-out axes cannot be told apart without seeing how it is used. Pass the "
        "function and an example input, lora_jax.init(rng, params, spec, apply_fn, "
        "*example_args), to read it off the trace, or state it: "
        f"LoraSpec(..., layout={{{_module_of(path) or path!r}: ...}}), e.g. 'lio' for a "
        "stacked (layers, in, out) kernel, 'ioo' for a DenseGeneral (in, heads, dim) kernel, "
        "'iiio' for a linen Conv (h, w, in, out) kernel."
    )
  return "io"


def _layout_for(rule: LayoutRule, path: str, leaf: Any, trace: KernelUses | None = None) -> str:
  ndim = leaf.ndim
  layout = None
  if callable(rule):
    layout = rule(path, leaf)
  elif rule:
    for key, value in rule.items():
      # Also against the module of a penzai weight ('.../query' for '.../query/weights/value/data_array').
      if path == key or _matches(key, path) or re.fullmatch(rf"(?:.*/)?(?:{key})", _module_of(path)):
        layout = value
        break
  if layout is None and trace is not None:
    layout = trace.layouts.get(path)
    if layout is None:
      raise ValueError(
          f"{path!r}: its layout could not be read off the function: {trace.why_no_layout(path)}. "
          f"State it, LoraSpec(..., layout={{{_module_of(path) or path!r}: {'l' * (ndim - 2) + 'io'!r}}}) "
          "(one letter per axis: 'l' layer, 'i' fan-in, 'o' fan-out), or leave this leaf out "
          "of the targets."
      )
  if layout is None:
    layout = default_layout(path, ndim)
  if (
      not isinstance(layout, str)
      or len(layout) != ndim
      or set(layout) - set("lio")
      or "i" not in layout
      or "o" not in layout
  ):
    raise ValueError(
        f"{path!r}: layout {layout!r} does not fit a kernel of shape {tuple(leaf.shape)}: it "
        f"needs one letter per axis ({ndim}) from 'l' (leading/layer axis), 'i' (fan-in), "
        "'o' (fan-out), with at least one 'i' and one 'o', e.g. "
        f"{'l' * (ndim - 2) + 'io'!r} for a stacked Dense kernel."
    )
  return layout
