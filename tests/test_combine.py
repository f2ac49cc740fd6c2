"""lora_jax.combine against PEFT's add_weighted_adapter and float64 numpy references.

The adapters are random factors on a few kernels: plain ``'io'`` ones and a stacked ``'lio'``
one (3 layers). On the PEFT side each kernel is an ``nn.Linear`` (the stack is three of them,
``stack.0..2``: a layer of a stacked kernel is one PEFT module), with our factors copied in as
``lora_A = a.T``, ``lora_B = b.T``. Deltas are compared, ``scale * a @ b`` against PEFT's
``get_delta_weight`` of the new adapter.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import DoraFactors, LoraFactors, combine
from lora_jax.combination import keep_mask
from lora_jax.kinds import factor_shapes
from _util import assert_close, assert_far

SHAPES = {"q": (12, 10), "stack": (3, 8, 5)}
# PEFT module -> (our path, layer of the stacked kernel or None)
MODULES = {"q": ("q", None), **{f"stack.{l}": ("stack", l) for l in range(3)}}
WEIGHTS = [0.7, -0.4, 1.3]
EQUAL = dict(ranks=(4, 4, 4), alphas=(8, 4, 6))
MIXED = dict(ranks=(2, 4, 3), alphas=(4, 4, 9))
# float32 against float32 (PEFT in torch, or another order of the same sums): a few ulps of
# the largest value. Measured: <= 3e-7 for cat/linear/ties/dare/magnitude_prune.
RTOL = 1e-6
# A truncated SVD computed two ways (PEFT: torch.linalg.svd of the dense sum; ours: QR of the
# factors): the top-r subspace moves by ~eps * s_1 / (s_r - s_r+1). Measured: <= 2e-6.
RTOL_SVD = 2e-5


def layout(shape):
  return "io" if len(shape) == 2 else "lio"


def make_adapters(ranks, alphas, seed=0, missing=()):
  """One tree per rank: ``{name: {"kernel": LoraFactors | None}}``; ``(n, name)`` in
  ``missing`` leaves kernel ``name`` out of adapter ``n``."""
  rng = np.random.default_rng(seed)
  trees = []
  for n, (r, alpha) in enumerate(zip(ranks, alphas)):
    tree = {}
    for name, shape in SHAPES.items():
      a_shape, b_shape = factor_shapes(shape, layout(shape), r)
      a, b = (jnp.asarray(rng.standard_normal(s) * 0.5, jnp.float32) for s in (a_shape, b_shape))
      f = None if (n, name) in missing else LoraFactors(a=a, b=b, scale=alpha / r, layout=layout(shape))
      tree[name] = {"kernel": f}
    trees.append(tree)
  return trees


def matrices(f, layer):
  """``a``, ``b`` of one layer as float64 matrices."""
  a, b = np.asarray(f.a, np.float64), np.asarray(f.b, np.float64)
  return (a, b) if layer is None else (a[layer], b[layer])


def delta64(f, layer=None):
  a, b = matrices(f, layer)
  return f.scale * a @ b


def weighted_sum64(trees, weights, name, layer=None):
  fs = [(w, t[name]["kernel"]) for w, t in zip(weights, trees)]
  return sum(w * delta64(f, layer) for w, f in fs if f is not None)


def truncate64(d, r):
  u, s, vh = np.linalg.svd(d, full_matrices=False)
  return (u[:, :r] * s[:r]) @ vh[:r]


# ===================================================================================== PEFT side


@pytest.fixture(scope="module")
def torch_peft():
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  return torch, peft


def peft_model(torch_peft, trees, ranks, alphas):
  torch, peft = torch_peft

  class Tiny(torch.nn.Module):
    def __init__(self):
      super().__init__()
      for name, shape in SHAPES.items():
        if len(shape) == 2:
          setattr(self, name, torch.nn.Linear(*shape))
      self.stack = torch.nn.ModuleList([torch.nn.Linear(*SHAPES["stack"][1:]) for _ in range(3)])

  torch.manual_seed(0)
  model = None
  for n, tree in enumerate(trees):
    targets = [m for m, (p, _) in MODULES.items() if tree[p]["kernel"] is not None]
    cfg = peft.LoraConfig(r=ranks[n], lora_alpha=alphas[n], target_modules=targets)
    if model is None:
      model = peft.get_peft_model(Tiny(), cfg, adapter_name="a0")
    else:
      model.add_adapter(f"a{n}", cfg)
  with torch.no_grad():
    for m, (p, layer) in MODULES.items():
      lin = model.base_model.model.get_submodule(m)
      for n, tree in enumerate(trees):
        f = tree[p]["kernel"]
        if f is not None:
          a, b = (np.asarray(x, np.float32) for x in matrices(f, layer))
          lin.lora_A[f"a{n}"].weight.copy_(torch.from_numpy(a.T.copy()))
          lin.lora_B[f"a{n}"].weight.copy_(torch.from_numpy(b.T.copy()))
          assert lin.scaling[f"a{n}"] == f.scale
  return model


def peft_combine(model, name, ct, weights, n, **kw):
  """PEFT's combination ``name`` of adapters a0..a{n-1}; its delta per module, ``(in, out)``."""
  model.add_weighted_adapter([f"a{i}" for i in range(n)], list(weights), name, combination_type=ct, **kw)
  out = {}
  for m in MODULES:
    lin = model.base_model.model.get_submodule(m)
    out[m] = lin.get_delta_weight(name).detach().numpy().T.astype(np.float64)
  return out


def peft_factors(model, name, m):
  lin = model.base_model.model.get_submodule(m)
  return lin.lora_A[name].weight.detach().numpy().T, lin.lora_B[name].weight.detach().numpy().T, lin.scaling[name]


def ours_vs_peft(ours, want, rtol):
  """Max difference of our deltas to PEFT's, relative to each module's largest value."""
  worst = 0.0
  for m, (p, layer) in MODULES.items():
    got = delta64(ours[p]["kernel"], layer)
    assert_close(got, want[m], rtol, err_msg=m)
    worst = max(worst, float(np.max(np.abs(got - want[m])) / np.max(np.abs(want[m]))))
  return worst


PEFT_KW = {"density": 0.6, "majority_sign_method": "total"}


@pytest.mark.parametrize(
    "ct, cfg, kw",
    [
        ("cat", MIXED, {}),
        ("linear", EQUAL, {}),
        ("svd", MIXED, {"rank": 3}),
        ("ties", EQUAL, PEFT_KW),
        ("ties", EQUAL, {"density": 0.3, "majority_sign_method": "frequency"}),
        ("magnitude_prune", EQUAL, {"density": 0.5}),
        ("ties_svd", MIXED, {**PEFT_KW, "rank": 4}),
        ("magnitude_prune_svd", MIXED, {"density": 0.5, "rank": 3}),
    ],
)
def test_matches_peft(torch_peft, ct, cfg, kw):
  trees = make_adapters(**cfg, seed=1)
  model = peft_model(torch_peft, trees, **cfg)
  peft_kw = {("svd_rank" if k == "rank" else k): v for k, v in kw.items()}
  want = peft_combine(model, "mixed", ct, WEIGHTS, len(trees), **peft_kw)
  ours = combine(trees, WEIGHTS, ct, **kw)
  rtol = RTOL_SVD if ct.endswith("svd") else RTOL
  worst = ours_vs_peft(ours, want, rtol)
  print(f"{ct} {kw}: max |ours - PEFT| / max|PEFT| = {worst:.2g}")
  for m, (p, layer) in MODULES.items():
    f = ours[p]["kernel"]
    a, b, scale = peft_factors(model, "mixed", m)
    assert (f.scale, f.rank) == (scale, a.shape[1]), m  # PEFT: lora_alpha = r, so scale 1
    if not ct.endswith("svd"):  # deterministic factors, not only the delta
      got_a, got_b = matrices(f, layer)
      assert_close(got_a, a, RTOL, err_msg=m)
      assert_close(got_b, b, RTOL, err_msg=m)


def test_cat_and_svd_match_peft_with_partial_coverage(torch_peft):
  """An adapter that leaves a kernel out counts as zero there (PEFT skips it; its 'cat' pads
  the rank with zeros to the sum of all ranks, ours concatenates the ranks present)."""
  missing = {(1, "q"), (0, "stack")}
  trees = make_adapters(**MIXED, seed=2, missing=missing)
  model = peft_model(torch_peft, trees, **MIXED)
  for ct, kw in (("cat", {}), ("svd", {"rank": 2}), ("ties_svd", {"density": 0.5, "rank": 2})):
    want = peft_combine(model, ct, ct, WEIGHTS, 3, **{("svd_rank" if k == "rank" else k): v for k, v in kw.items()})
    ours = combine(trees, WEIGHTS, ct, **kw)
    ours_vs_peft(ours, want, RTOL_SVD if ct != "cat" else RTOL)
  assert ours["q"]["kernel"].rank == 2
  ours = combine(trees, WEIGHTS, "cat")
  assert (ours["q"]["kernel"].rank, ours["stack"]["kernel"].rank) == (5, 7)


def _masked_random_pruning(registry, density_seen):
  """PEFT's random_pruning with our masks: the tensor pruned is found in ``registry``
  (PEFT's tensor -> our mask in PEFT's orientation)."""
  import torch  # noqa: PLC0415

  def random_pruning(tensor, density, rescale):
    hits = [mask for t, mask in registry if t.shape == tensor.shape and torch.equal(t, tensor)]
    assert len(hits) == 1, "PEFT pruned a tensor this test does not know"
    density_seen.add(density)
    pruned = tensor * hits[0]
    return pruned / density if rescale else pruned

  return random_pruning


@pytest.mark.parametrize("ct", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_peft_on_our_masks(torch_peft, monkeypatch, ct):
  """DARE's masks come from JAX's PRNG, PEFT's from torch.bernoulli, so the streams cannot
  match. What must match is the merge given the masks: PEFT's random_pruning is patched to use
  the masks ``combine`` drew (``keep_mask``), found by the tensor PEFT prunes."""
  torch, _ = torch_peft
  from peft.utils import merge_utils  # noqa: PLC0415

  cfg = EQUAL if not ct.endswith("svd") else MIXED
  trees = make_adapters(**cfg, seed=3)
  model = peft_model(torch_peft, trees, **cfg)
  key, density = jax.random.key(7), 0.6
  registry = []
  for m, (p, layer) in MODULES.items():
    lin = model.base_model.model.get_submodule(m)
    for n, tree in enumerate(trees):
      f = tree[p]["kernel"]
      a, b = (x.reshape(-1, *x.shape[-2:]) for x in (f.a, f.b))  # (layers, fan_in, r), (layers, r, fan_out)
      shapes = [(a.shape[0], a.shape[1], b.shape[2])] if ct.endswith("svd") else [a.shape, b.shape]
      tensors = [lin.get_delta_weight(f"a{n}")] if ct.endswith("svd") else [lin.lora_A[f"a{n}"].weight, lin.lora_B[f"a{n}"].weight]
      sizes = [int(np.prod(sh)) for sh in shapes]
      drawn = np.asarray(keep_mask(key, f"{p}/kernel", n, sum(sizes), density), np.float32)
      for t, part, sh in zip(tensors, np.split(drawn, np.cumsum(sizes)[:-1]), shapes):
        mask = part.reshape(sh)[layer or 0].T  # PEFT's tensors are ours transposed
        registry.append((t.detach().clone(), torch.from_numpy(mask.copy())))
  seen = set()
  monkeypatch.setattr(merge_utils, "random_pruning", _masked_random_pruning(registry, seen))
  kw = {"density": density} | ({} if ct.startswith("dare_linear") else {"majority_sign_method": "frequency"})
  want = peft_combine(model, ct, ct, WEIGHTS, 3, **kw)
  assert seen == {density}  # the patch ran
  ours = combine(trees, WEIGHTS, ct, key=key, **kw)
  worst = ours_vs_peft(ours, want, RTOL_SVD if ct.endswith("svd") else RTOL)
  print(f"{ct}: max |ours - PEFT| / max|PEFT| = {worst:.2g}")
  if not ct.endswith("svd"):
    for m, (p, layer) in MODULES.items():
      a, b, _ = peft_factors(model, ct, m)
      got_a, got_b = matrices(ours[p]["kernel"], layer)
      assert_close(got_a, a, RTOL, err_msg=m)
      assert_close(got_b, b, RTOL, err_msg=m)


def test_peft_rslora_scale_differs():
  """PEFT copies use_rslora into the new adapter's config with lora_alpha = r, so its scale is
  r / sqrt(r) = sqrt(r), not 1, and its delta is sqrt(r) times the intended one. Ours keeps
  the delta: scale 1, rslora False."""
  trees = make_adapters(**MIXED, seed=4)
  trees = [jax.tree.map(lambda f: f.replace(rslora=True), t, is_leaf=lambda x: isinstance(x, LoraFactors)) for t in trees]
  f = combine(trees, WEIGHTS, "cat")["q"]["kernel"]
  assert (f.scale, f.rslora) == (1.0, False)
  assert_close(delta64(f), weighted_sum64(trees, WEIGHTS, "q"), RTOL)


# ===================================================================================== float64


@pytest.mark.parametrize("name, layer", [(m, l) for m, (_, l) in MODULES.items()])
def test_cat_and_svd_against_float64(name, layer):
  p = MODULES[name][0]
  trees = make_adapters(**MIXED, seed=5)
  want = weighted_sum64(trees, WEIGHTS, p, layer)
  cat = combine(trees, WEIGHTS, "cat")[p]["kernel"]
  assert cat.rank == sum(MIXED["ranks"])
  assert_close(delta64(cat, layer), want, RTOL)
  for r in (1, 3, 9):
    svd = combine(trees, WEIGHTS, "svd", rank=r)[p]["kernel"]
    assert svd.rank == r
    assert_close(delta64(svd, layer), truncate64(want, r), RTOL_SVD)
  assert_far(delta64(svd, layer), truncate64(want, 1), RTOL_SVD)  # the truncation does something


def test_layouts_beyond_io():
  """Kernels of several fan-in axes and a fan-out-first kernel: the combined kernel delta is
  the weighted sum of the inputs' kernel deltas (``LoraFactors.delta``, arranged by layout)."""
  rng = np.random.default_rng(6)
  for shape, lay in (((3, 4, 5), "iio"), ((6, 7), "oi"), ((2, 3, 4, 5), "lioo")):
    trees = []
    for r in (2, 3):
      a_shape, b_shape = factor_shapes(shape, lay, r)
      a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a_shape, b_shape))
      trees.append({"k": LoraFactors(a=a, b=b, scale=0.5, layout=lay)})
    want = sum(w * np.asarray(t["k"].delta(), np.float64) for w, t in zip(WEIGHTS, trees))
    got = combine(trees, WEIGHTS[:2], "cat")["k"]
    assert got.layout == lay
    assert_close(got.delta(), want, RTOL)
    full = combine(trees, WEIGHTS[:2], "svd", rank=5)["k"]  # rank 5 = the sum's rank: exact
    assert_close(full.delta(), want, RTOL_SVD)


def _largest_intermediate(jaxpr) -> int:
  """The largest array any equation of ``jaxpr`` (or of a jaxpr nested in it) produces."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      best = max(best, int(np.prod(getattr(v.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          best = max(best, _largest_intermediate(sub))
  return best


def test_svd_never_forms_the_dense_delta():
  """'svd' works from QR of the factors: nothing of fan_in x fan_out is formed (the pruning
  *_svd types must form it: they prune its entries)."""
  rng = np.random.default_rng(15)
  trees = [
      {"k": LoraFactors(a=jnp.asarray(rng.standard_normal((64, r)), jnp.float32),
                        b=jnp.asarray(rng.standard_normal((r, 48)), jnp.float32), scale=1.0, layout="io")}
      for r in (4, 6)
  ]
  svd = jax.make_jaxpr(lambda t: combine(t, WEIGHTS[:2], "svd", rank=3))(trees)
  assert _largest_intermediate(svd.jaxpr) < 64 * 48 // 4
  ties = jax.make_jaxpr(lambda t: combine(t, WEIGHTS[:2], "ties_svd", rank=3, density=0.5))(trees)
  assert _largest_intermediate(ties.jaxpr) >= 64 * 48  # the walk does see inside the computation


def test_rank_above_the_sums_rank_pads_with_zeros():
  trees = make_adapters(ranks=(1, 1), alphas=(1, 1), seed=7)
  f = combine(trees, WEIGHTS[:2], "svd", rank=4)["q"]["kernel"]
  assert f.a.shape == (12, 4) and f.b.shape == (4, 10)
  np.testing.assert_array_equal(f.b[2:], 0)
  assert_close(delta64(f), weighted_sum64(trees, WEIGHTS, "q"), RTOL_SVD)


def test_single_adapter_svd_truncates():
  """PEFT turns any combination of one adapter into 'linear'; ours does what was asked."""
  (tree,) = make_adapters(ranks=(4,), alphas=(8,), seed=8)
  f = combine([tree], [2.0], "svd", rank=2)["q"]["kernel"]
  assert_close(delta64(f), truncate64(2.0 * delta64(tree["q"]["kernel"]), 2), RTOL_SVD)


def test_svd_clamp_is_peft_s_formula(torch_peft):
  """svd_clamp on our (sign-normalised) factors is PEFT's clamp applied to them: the quantile
  of the signed entries of ``U S`` and ``Vh`` together, per module. (Compared with PEFT's own
  result it would differ: that depends on the signs its SVD routine picks.)"""
  torch, _ = torch_peft
  trees = make_adapters(**MIXED, seed=9)
  plain = combine(trees, WEIGHTS, "svd", rank=3)
  clamped = combine(trees, WEIGHTS, "svd", rank=3, svd_clamp=0.9)
  for p, layer in MODULES.values():
    a, b = (torch.from_numpy(np.asarray(x, np.float32)) for x in matrices(plain[p]["kernel"], layer))
    U, Vh = b.T, a.T  # PEFT's U @ diag(S) and Vh
    dist = torch.cat([U.flatten(), Vh.flatten()])
    hi = torch.quantile(dist, 0.9)
    got_a, got_b = matrices(clamped[p]["kernel"], layer)
    assert_close(got_a, Vh.clamp(-hi, hi).T.numpy(), RTOL)
    assert_close(got_b, U.clamp(-hi, hi).T.numpy(), RTOL)
    assert np.sum(np.abs(got_b) < np.abs(matrices(plain[p]["kernel"], layer)[1])) > 0  # it clamped


# ===================================================================================== DARE, jit


def test_dare_is_unbiased_and_keeps_density():
  """dare_linear keeps each entry of ``a``/``b`` with probability ``density`` and divides the
  kept ones by it: kept values are exactly linear's, the kept fraction is ``density`` (to 5
  sigma), and the mean over keys is linear's result (to 5 sigma). Under jit, key traced."""
  (tree,) = make_adapters(ranks=(4,), alphas=(8,), seed=10)
  tree = {"q": tree["q"]}
  density, n_keys = 0.3, 400
  lin = combine([tree], [1.5], "linear")["q"]["kernel"]
  dare = jax.jit(jax.vmap(lambda k: combine([tree], [1.5], "dare_linear", density=density, key=k)["q"]["kernel"].a))
  a = np.asarray(dare(jax.random.split(jax.random.key(0), n_keys)), np.float64)
  kept = a != 0
  frac, n = kept.mean(), kept.size
  assert abs(frac - density) < 5 * np.sqrt(density * (1 - density) / n), frac
  want = np.broadcast_to(np.asarray(lin.a, np.float64) / density, a.shape)
  assert_close(np.where(kept, a, 0), np.where(kept, want, 0), RTOL)
  se = np.abs(np.asarray(lin.a)) * np.sqrt((1 - density) / density / n_keys)
  assert np.all(np.abs(a.mean(0) - np.asarray(lin.a)) < 5 * se + 1e-6)
  # same key, same masks; another key, other masks
  one, again, other = (dare(jax.random.split(jax.random.key(k), 2))[0] for k in (1, 1, 2))
  np.testing.assert_array_equal(one, again)
  assert np.any(np.asarray(one) != np.asarray(other))


def test_density_one_prunes_nothing():
  trees = make_adapters(**EQUAL, seed=11)
  lin = combine(trees, WEIGHTS, "linear")
  for ct in ("magnitude_prune", "dare_linear"):
    got = combine(trees, WEIGHTS, ct, density=1.0, key=jax.random.key(0))
    np.testing.assert_array_equal(got["q"]["kernel"].a, lin["q"]["kernel"].a)


@pytest.mark.parametrize("ct, kw", [("svd", {"rank": 3}), ("ties_svd", {"density": 0.5}), ("dare_ties", {"density": 0.5})])
def test_jit_matches_eager(ct, kw):
  """Under jit, weights and key traced: one trace for new weights, the same result as eager
  (whose per-kernel computations are compiled on their own)."""
  trees = [{"stack": t["stack"]} for t in make_adapters(**EQUAL, seed=12)]
  traces = []

  def f(trees, w, key):
    traces.append(1)
    return combine(trees, w, ct, key=key, **kw)

  jitted = jax.jit(f)
  w = jnp.asarray(WEIGHTS, jnp.float32)
  got = jitted(trees, w, jax.random.key(3))["stack"]["kernel"]
  got2 = jitted(trees, w * 2, jax.random.key(3))["stack"]["kernel"]
  want = combine(trees, WEIGHTS, ct, key=jax.random.key(3), **kw)["stack"]["kernel"]
  assert len(traces) == 1
  assert (got.rank, got.scale, got.layout) == (want.rank, want.scale, want.layout)
  for layer in range(3):
    assert_close(delta64(got, layer), delta64(want, layer), RTOL_SVD if ct.endswith("svd") else RTOL)
  assert_far(delta64(got2, 0), delta64(got, 0), RTOL)


def test_mapping_input_and_named_weights():
  trees = make_adapters(**MIXED, seed=13)
  named = dict(zip("xyz", trees))
  by_list = combine(trees, WEIGHTS, "cat")
  for w in (WEIGHTS, dict(zip("zyx", WEIGHTS[::-1]))):
    got = combine(named, w, "cat")
    np.testing.assert_array_equal(got["q"]["kernel"].a, by_list["q"]["kernel"].a)


def test_keeps_dtype_dropout_and_digest():
  trees = make_adapters(**MIXED, seed=14)
  trees = [
      jax.tree.map(
          lambda f: f.replace(a=f.a.astype(jnp.bfloat16), dropout=0.1, base_digest="d1"),
          t, is_leaf=lambda x: isinstance(x, LoraFactors),
      ) for t in trees
  ]
  f = combine(trees, WEIGHTS, "svd")["q"]["kernel"]
  assert (f.a.dtype, f.b.dtype, f.dropout, f.base_digest, f.rank) == (jnp.bfloat16, jnp.float32, 0.1, "d1", 4)


# ===================================================================================== errors


def _lora(shape=(4, 3), r=2, lay="io", **kw):
  a_shape, b_shape = factor_shapes(shape, lay, r)
  return LoraFactors(a=jnp.ones(a_shape), b=jnp.ones(b_shape), scale=1.0, layout=lay, **kw)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"combination_type": "sum"}, r"unknown combination_type 'sum'; expected one of cat, linear"),
        ({"combination_type": "ties"}, r"'ties' needs density \(the fraction of values kept"),
        ({"combination_type": "ties", "density": 0.0}, r"density must be a Python float in \(0, 1\], got 0.0"),
        ({"combination_type": "dare_linear", "density": 1.5, "key": 0}, r"density must .* got 1.5"),
        ({"combination_type": "svd", "density": 0.5}, r"density is used by .*, not by 'svd'; leave it out"),
        ({"combination_type": "linear", "rank": 2}, r"rank is for the SVD types .* not 'linear' \('cat' gives the sum"),
        ({"combination_type": "cat", "svd_clamp": 0.9}, r"svd_clamp is for the SVD types"),
        ({"combination_type": "svd", "rank": 0}, r"rank must be a positive int, got 0"),
        ({"combination_type": "svd", "svd_clamp": 1.5}, r"svd_clamp is a quantile in \[0, 1\] \(a Python float\), got 1.5"),
        ({"combination_type": "dare_ties", "density": 0.5}, r"'dare_ties' drops values at random and needs key="),
        ({"combination_type": "ties", "density": 0.5, "majority_sign_method": "sum"}, r"majority_sign_method must be 'total' or 'frequency', got 'sum'"),
    ],
)
def test_option_errors(kw, match):
  t = {"d": _lora()}
  with pytest.raises(ValueError, match=match):
    combine([t, t], [1.0, 1.0], **kw)


def test_input_errors():
  t = {"d": _lora(), "e": None}
  with pytest.raises(ValueError, match=r"combine: 2 adapters but weights has shape \(3,\); give one weight per adapter"):
    combine([t, t], [1.0, 1.0, 1.0], "cat")
  with pytest.raises(ValueError, match=r"weights name \['a', 'c'\], the adapters \['a', 'b'\]"):
    combine({"a": t, "b": t}, {"a": 1.0, "c": 1.0}, "cat")
  with pytest.raises(TypeError, match=r"weights is a mapping but adapters is a sequence"):
    combine([t, t], {"a": 1.0, "b": 1.0}, "cat")
  with pytest.raises(ValueError, match=r"no adapters given"):
    combine([], [], "cat")
  with pytest.raises(ValueError, match=r"none of the trees holds an adapter"):
    combine([{"d": None}], [1.0], "cat")
  with pytest.raises(ValueError, match=r"adapters\[0\] and adapters\[1\] have different tree structures \('f' is in adapters\[1\] only\)"):
    combine([t, {"d": _lora(), "e": None, "f": None}], [1.0, 1.0], "cat")
  with pytest.raises(ValueError, match=r"adapters\['x'\] and adapters\['y'\] have different tree structures \(their containers differ\)"):
    combine({"x": [_lora(), None], "y": (_lora(), None)}, [1.0, 1.0], "cat")


def test_kernel_errors():
  base = {"d": _lora()}
  cases = [
      ({"d": _lora(lay="oi", shape=(3, 4))}, ValueError, r"at 'd', adapters\[0\] has layout 'io' and adapters\[1\] 'oi'"),
      ({"d": _lora(shape=(5, 3))}, ValueError, r"at 'd', adapters\[0\] adapts a kernel of shape \(4, 3\) and adapters\[1\] one of shape \(5, 3\)"),
      ({"d": _lora(base_digest="abc")}, ValueError, r"made for different base kernels \(base_digest None vs 'abc'.*lora_jax.to_original_base"),
      ({"d": jnp.ones((4, 3))}, TypeError, r"adapters\[1\]\['d'\] is an array of shape \(4, 3\); combine takes plain LoRA adapters"),
  ]
  for other, err, match in cases:
    with pytest.raises(err, match=match):
      combine([base, other], [1.0, 1.0], "cat")
  with pytest.raises(ValueError, match=r"'linear' needs equal ranks, but at 'd' adapters\[0\] has rank 2 and adapters\[1\] rank 3; use 'cat'"):
    combine([base, {"d": _lora(r=3)}], [1.0, 1.0], "linear")
  combine([base, {"d": _lora(r=3)}], [1.0, 1.0], "svd")  # unequal ranks are fine for svd


def test_dora_refused():
  params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (4, 3))}}
  spec = lora_jax.LoraSpec(["d"], rank=2, alpha=2, kind="dora")
  dora = lora_jax.init(jax.random.key(1), params, spec)
  assert isinstance(dora["d"]["kernel"], DoraFactors)
  with pytest.raises(TypeError, match=r"adapters\[0\]\['d/kernel'\] is DoRA \(DoraFactors\); its magnitude does not add"):
    combine([dora, dora], [1.0, 1.0], "svd")
