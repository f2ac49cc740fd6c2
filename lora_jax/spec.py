"""LoraSpec: which kernels get adapters, with which rank, alpha and axis layout."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax.numpy as jnp
import numpy as np

from lora_jax._paths import leaves_with_paths, nearby
from lora_jax.kinds import Adapter, LoraFactors, kind_named

Targets = Union[str, Sequence[str], Callable[[str, Any], bool]]
LayoutRule = Union[Mapping[str, str], Callable[[str, Any], Union[str, None]], None]

ALL_LINEAR = "all-linear"
_WEIGHT_NAMES = ("kernel", "embedding")
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
    targets: ``"all-linear"`` (every ``kernel`` of Dense/DenseGeneral/Einsum layers, not
      embeddings, convolutions or a final vocabulary projection ``lm_head``), a list of short
      module names (``["query", "value"]`` adapts the ``kernel``/``embedding`` of every module
      named so; ``"attn/query"`` names a module within a parent), a regular expression that
      must fullmatch the '/'-joined path of each adapted leaf, or a callable
      ``(path, leaf) -> bool``.
    rank: default rank ``r``.
    alpha: default ``lora_alpha``; the update is scaled by ``alpha / r``.
    rank_pattern: regex → rank overrides, matched like PEFT's (``(.*/)?(key)`` fullmatching
      the module path or the leaf path); first match wins.
    alpha_pattern: regex → alpha overrides, matched the same way.
    rslora: scale by ``alpha / sqrt(r)`` instead (rank-stabilised LoRA).
    layout: how each kernel axis splits into ``'l'`` (a leading axis kept on both factors,
      e.g. the layer axis of ``nn.scan``), ``'i'`` (fan-in) and ``'o'`` (fan-out). A mapping of
      regex → layout string (e.g. ``{"layers/.*": "lio"}``) or a callable
      ``(path, leaf) -> str | None``. By default a kernel is ``'i' * (ndim - 1) + 'o'``
      (Dense ``(in, out)``, Conv ``(kh, kw, cin, cout)``, DenseGeneral ``(heads, dim, out)``)
      and an embedding is ``'io'``. :func:`lora_jax.infer_layout` reads layouts off a model.
    dtype: dtype of the factors (float32 by default; ``None`` uses each kernel's dtype).
    kind: the adapter kind to create (:class:`lora_jax.LoraFactors`, plain LoRA, by default;
      any registered :class:`lora_jax.kinds.Adapter` subclass).

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
  kind: type[Adapter] = LoraFactors

  def __post_init__(self):
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

  def resolve(self, params: Any) -> list[Target]:
    """The adapted leaves of ``params``, in tree order, with rank, alpha, scale and layout.

    Raises:
      ValueError: a target, rank or alpha pattern that matches nothing, a rank larger than
        ``min(fan_in, fan_out)``, or a bad layout; the message names the path or pattern.
      TypeError: a targeted leaf that is not a floating-point array.
    """
    leaves = leaves_with_paths(params)
    chosen = _select(self.targets, leaves)
    used_rank, used_alpha = set(), set()
    out = []
    for path, leaf in leaves:
      if path not in chosen:
        continue
      _check_adaptable(path, leaf)
      rank = _first_match(self.rank_pattern, path, used_rank, self.rank)
      alpha = _first_match(self.alpha_pattern, path, used_alpha, self.alpha)
      layout = _layout_for(self.layout, path, leaf)
      target = Target(
          path=path,
          shape=tuple(leaf.shape),
          dtype=leaf.dtype,
          rank=int(rank),
          alpha=float(alpha),
          scale=self.scale_for(int(rank), alpha),
          layout=layout,
          is_embedding=path.split("/")[-1] == "embedding",
          rslora=bool(self.rslora),
      )
      limit = min(target.fan_in, target.fan_out)
      if target.rank > limit:
        hint = (
            " If this kernel's axes split differently into fan-in and fan-out (e.g. a "
            "DenseGeneral query kernel (embed, heads, head_dim) is 'ioo'), pass "
            f"layout={{{_module(path)!r}: ...}}."
            if len(target.shape) > 2
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


def _is_weight(path: str, leaf: Any) -> bool:
  return path.split("/")[-1] in _WEIGHT_NAMES and getattr(leaf, "ndim", 0) >= 2


def _select(targets: Targets, leaves: list[tuple[str, Any]]) -> set[str]:
  paths = [p for p, _ in leaves]
  weights = [p for p, leaf in leaves if _is_weight(p, leaf)]
  if isinstance(targets, str) and targets == ALL_LINEAR:
    vocab = {leaf.shape[0] for p, leaf in leaves if p.split("/")[-1] == "embedding" and _is_weight(p, leaf)}
    last = _last_kernel(leaves)
    chosen = {
        p
        for p, leaf in leaves
        if p.split("/")[-1] == "kernel"
        and getattr(leaf, "ndim", 0) >= 2
        and not any(part in _HEAD_NAMES for part in p.split("/"))
        and not any("conv" in part.lower() for part in p.split("/")[:-1])
        and not (vocab and leaf.shape[-1] in vocab and p == last)
    }
    if not chosen:
      raise ValueError(
          "LoraSpec(targets='all-linear') matched no kernel: it adapts leaves named 'kernel' "
          f"with ndim >= 2 outside conv modules and the vocabulary head. Paths: {nearby('kernel', paths)}."
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
  chosen = set()
  for name in targets:
    parts = name.strip("/").split("/")
    hits = {p for p in weights if _contains(p.split("/")[:-1], parts)}
    if not hits:
      modules = sorted({_module(p) for p in weights})
      raise ValueError(
          f"LoraSpec(targets=[..., {name!r}, ...]): no module named {name!r} holds a kernel or "
          f"embedding. Modules near it: {nearby(name, modules)}."
      )
    chosen |= hits
  return chosen


def _last_kernel(leaves: list[tuple[str, Any]]) -> str | None:
  kernels = [p for p, leaf in leaves if p.split("/")[-1] == "kernel" and getattr(leaf, "ndim", 0) >= 2]
  return kernels[-1] if kernels else None


def _contains(seq: list[str], sub: list[str]) -> bool:
  n = len(sub)
  return any(seq[i : i + n] == sub for i in range(len(seq) - n + 1))


def _check_adaptable(path: str, leaf: Any) -> None:
  shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(
        f"{path!r}: targeted leaf is a {type(leaf).__name__}, not an array; only array kernels "
        "can be adapted. Narrow the targets so they select kernels only."
    )
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{path!r}: targeted kernel has dtype {dtype}; LoRA needs a floating-point kernel "
        "(quantised/integer kernels are not supported yet)."
    )
  if path.split("/")[-1] == "bias":
    raise ValueError(
        f"{path!r}: targeted leaf is a bias of shape {tuple(shape)}; LoRA adapts kernels, not "
        f"biases. Narrow the target so it selects '{_module(path)}/kernel' only."
    )
  if len(shape) < 2:
    raise ValueError(
        f"{path!r}: targeted leaf has shape {tuple(shape)}; LoRA adapts kernels with at least "
        f"2 axes. Did the target also select a norm scale or bias? Target "
        f"'{_module(path)}/kernel' instead."
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
  """The layout used when the spec names none: fan-out is the last axis."""
  return "i" * (ndim - 1) + "o"


def _layout_for(rule: LayoutRule, path: str, leaf: Any) -> str:
  ndim = leaf.ndim
  layout = None
  if callable(rule):
    layout = rule(path, leaf)
  elif rule:
    for key, value in rule.items():
      if path == key or _matches(key, path):
        layout = value
        break
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
