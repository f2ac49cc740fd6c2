"""lora_jax._regex: untrusted regexes matched in linear time, with Python re's meaning."""

import re
import time
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_jax._regex import MAX_DEPTH, PeftPatterns, SafeRegex, UnsafePattern, peft_key_matches

ALPHABET = "ab._1\n-"


def _re_peft(keys, name):
  for k in keys:  # peft.utils.other.get_pattern_key
    if re.match(rf"(.*\.)?({k})$", name):
      return k
  return None


def _compiles(pattern):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # FutureWarning: possible nested set
    try:
      re.compile(pattern)
      return True
    except (re.error, RecursionError, OverflowError):
      return False


# Patterns from the supported dialect, built as strings (so they are also valid for re).
_atom = st.sampled_from(["a", "b", r"\.", ".", "_", "1", r"\d", r"\w", r"\s", r"\D", "[ab]", "[^a]", "[a-c]", r"[\d.]", "-", r"\-", r"\n", "^", "$"])


def _combine(children):
  return st.one_of(
      st.tuples(children, children).map(lambda t: t[0] + t[1]),
      st.tuples(children, children).map(lambda t: f"{t[0]}|{t[1]}"),
      children.map(lambda c: f"({c})"),
      children.map(lambda c: f"(?:{c})"),
      st.tuples(children, st.sampled_from(["*", "+", "?", "{2}", "{0,2}", "{1,}", "{,2}", "*?", "+?"])).map(lambda t: f"(?:{t[0]}){t[1]}"),
  )


PATTERNS = st.recursive(_atom, _combine, max_leaves=8)
NAMES = st.text(alphabet=ALPHABET, max_size=10)


@settings(max_examples=400, deadline=None)
@given(PATTERNS, NAMES)
def test_dialect_means_what_re_means(pattern, name):
  assert _compiles(pattern), pattern
  rx = SafeRegex(pattern)
  assert rx.match(name) == bool(re.match(pattern, name)), (pattern, name)
  assert rx.fullmatch(name) == bool(re.fullmatch(pattern, name)), (pattern, name)


@settings(max_examples=300, deadline=None)
@given(st.lists(PATTERNS, min_size=1, max_size=4), NAMES)
def test_peft_patterns_pick_the_key_peft_picks(keys, name):
  assert PeftPatterns(keys).first(name) == _re_peft(keys, name), (keys, name)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="ab.()[]{}|*+?^$\\-,:P<>=!1d\n", max_size=12), NAMES)
def test_any_string_is_refused_or_agrees_with_re(pattern, name):
  """Random pattern text: either refused (with UnsafePattern), or valid for re with the same answer."""
  try:
    rx = SafeRegex(pattern)
  except UnsafePattern:
    return
  assert _compiles(pattern), f"accepted {pattern!r}, which re refuses"
  assert rx.match(name) == bool(re.match(pattern, name)), (pattern, name)
  assert PeftPatterns([pattern]).first(name) == _re_peft([pattern], name), (pattern, name)


def test_what_peft_configs_hold():
  keys = [r"model\.layers\.\d+\.self_attn\.q_proj", "model.layers.0.mlp.down_proj", "v_proj", "(q|k)_proj", "layers.1[0-9].mlp"]
  ps = PeftPatterns(keys)
  assert ps.first("model.layers.7.self_attn.q_proj") == keys[0]
  assert ps.first("model.layers.0.mlp.down_proj") == keys[1]
  assert ps.first("model.layers.3.self_attn.v_proj") == "v_proj"
  assert ps.first("model.layers.3.self_attn.k_proj") == "(q|k)_proj"
  assert ps.first("model.layers.12.mlp") == keys[4]
  assert ps.first("model.layers.3.self_attn.xv_proj") is None  # a key matches after a '.' only
  assert ps.first("model.layers.3.self_attn.v_proj.extra") is None  # ... and up to the end
  for key, name in [("q_proj", "q_proj\n"), ("^q_proj", "x.q_proj"), ("q_proj$", "a.q_proj")]:
    assert peft_key_matches(key, name) == bool(_re_peft([key], name)), (key, name)


@pytest.mark.parametrize(
    "pattern,reason",
    [
        ("(a)\\1", r"unsupported escape '\\1' \(backreference"),
        ("(?=a)", r"extension group"),
        ("(?i)a", r"extension group"),
        ("a*+", r"repeat of a repeat"),
        ("a**", r"repeat of a repeat"),
        ("a{2,1}", r"min > max"),
        ("a{5000}", r"repeat count above 1000"),
        ("(a{1000}){1000}", r"more than 5000 automaton states"),
        ("(" * (MAX_DEPTH + 1) + ")" * (MAX_DEPTH + 1), r"nested deeper than 32"),
        ("(" * 5000, r"longer than 1000 characters"),
        ("((", r"missing '\)'"),
        ("a)", r"unbalanced '\)'"),
        ("[a", r"unterminated '\['"),
        ("[z-a]", r"bad character range"),
        ("\\b", r"unsupported escape"),
        ("a\\", r"trailing backslash"),
        ("*a", r"nothing to repeat"),
        ("a{x", r"not a \{m,n\} repeat"),
        ("(?P<n>a)(?P<n>b)", r"repeated group name"),
    ],
)
def test_refusals(pattern, reason):
  with pytest.raises(UnsafePattern, match=reason):
    SafeRegex(pattern)


def test_catastrophic_patterns_take_linear_time():
  evil = ["(a|a)+b", "(a+)+b", "(.*.*)*x", ".*" * 30 + "x", "(a|aa)*c", "(?:a?){30}a{30}"]
  name = "a" * 4000 + "."
  start = time.perf_counter()
  assert PeftPatterns(evil).first(name) is None
  for key in evil:
    assert not SafeRegex(key).fullmatch("a" * 4000)
  assert time.perf_counter() - start < 20  # re.match would need ~2**4000 steps for the first


def test_limits_on_the_strings_matched():
  with pytest.raises(UnsafePattern, match="longer than 4096 characters"):
    PeftPatterns(["a"]).first("a" * 5000)
  with pytest.raises(TypeError, match="expected a string to match, found a int"):
    SafeRegex("a").match(3)
  with pytest.raises(UnsafePattern, match="expected a string, found a int"):
    PeftPatterns([3])
  with pytest.raises(UnsafePattern, match="more than 4096 keys"):
    PeftPatterns(["a"] * 5000)
