"""Regexes from untrusted files, matched in linear time.

PEFT configs carry regexes (``rank_pattern`` / ``alpha_pattern`` keys, a string
``target_modules``) that PEFT matches with Python's backtracking ``re``: ``(a|a)+b`` takes
time doubling with every character, ``"(" * 5000`` overflows the parser's recursion. A file
must not be able to hang or crash a reader, so these patterns are parsed here, with bounded
length, nesting and size, into a Thompson automaton that is run as a lazily built DFA: time
linear in the name's length, whatever the pattern.

The dialect is the part of Python's ``re`` that adapter configs use, with ``re``'s meaning:
literals and escaped punctuation; ``.``; ``\\d \\w \\s`` (and ``\\D \\W \\S``) with Unicode
semantics; ``\\n \\t \\r \\f \\v \\xHH \\uHHHH``; classes ``[...]`` / ``[^...]`` with ranges; groups
``(...)``, ``(?:...)``, ``(?P<name>...)``; ``|``; ``* + ? {m} {m,} {,n} {m,n}`` (greedy or lazy:
whether a match exists does not depend on it); ``^`` and ``$``. Everything else
(backreferences, lookaround, inline flags, possessive repeats, atomic groups, ``\\b``, a
``{`` that is not a repeat) is refused with :class:`UnsafePattern`, a ``ValueError`` naming
the reason, never a wrong answer.

>>> SafeRegex(r"model\\.layers\\.\\d+\\.q_proj").fullmatch("model.layers.12.q_proj")
True
>>> peft_key_matches("(a|a)+b", "a" * 4000 + "c")  # instant, where re.match backtracks 2**4000 times
False
>>> SafeRegex("(" * 40 + ")" * 40)
Traceback (most recent call last):
...
lora_jax._regex.UnsafePattern: groups nested deeper than 32 levels
>>> SafeRegex("(" * 5000)
Traceback (most recent call last):
...
lora_jax._regex.UnsafePattern: longer than 1000 characters (5000)
"""

from __future__ import annotations

from typing import Callable

MAX_LENGTH = 1000  # characters of a pattern
MAX_DEPTH = 32  # nesting of groups
MAX_REPEAT = 1000  # the largest count in {m,n}
MAX_STATES = 5000  # automaton states after expanding {m,n}
MAX_NAME = 4096  # characters of a string matched
MAX_KEYS = 4096  # keys of one PeftPatterns
MAX_TOTAL_STATES = 200_000  # automaton states of all keys together
MAX_WORK = 50_000_000  # automaton steps (state visits) one automaton may take, over all strings
_CACHE = 100_000  # DFA transitions kept per automaton

_CHAR, _EPS, _BOL, _EOL, _ACCEPT = range(5)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
_CATEGORIES: dict[str, Callable[[str], bool]] = {
    "d": str.isdecimal,  # re: Unicode category Nd
    "w": lambda c: c.isalnum() or c == "_",  # re: alphanumeric or underscore
    "s": str.isspace,
}


class UnsafePattern(ValueError):
  """A pattern outside the supported dialect, or beyond the size limits."""


class _Parser:
  """Recursive descent over the pattern; recursion depth is bounded by ``MAX_DEPTH``."""

  def __init__(self, pattern: str):
    self.p, self.i = pattern, 0
    self.names: set[str] = set()

  def fail(self, what: str) -> UnsafePattern:
    return UnsafePattern(f"{what} at position {self.i}")

  def peek(self) -> str | None:
    return self.p[self.i] if self.i < len(self.p) else None

  def alternation(self, depth: int) -> tuple:
    branches = [self.sequence(depth)]
    while self.peek() == "|":
      self.i += 1
      branches.append(self.sequence(depth))
    return branches[0] if len(branches) == 1 else ("alt", branches)

  def sequence(self, depth: int) -> tuple:
    items: list[tuple] = []
    while self.peek() not in (None, "|", ")"):
      atom = self.atom(depth)
      quant = self.quantifier()
      if quant is not None:
        if atom[0] in ("bol", "eol"):
          raise self.fail("a repeat of '^' or '$'")
        atom = ("rep", atom, *quant)
        if self.peek() in ("*", "+", "?", "{"):
          raise self.fail("a repeat of a repeat (possessive or multiple repeat)")
      items.append(atom)
    return ("cat", items)

  def quantifier(self) -> tuple[int, int | None] | None:
    c = self.peek()
    if c in ("*", "+", "?"):
      self.i += 1
      quant = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
    elif c == "{":
      close = self.p.find("}", self.i)
      body = self.p[self.i + 1 : close] if close != -1 else ""
      lo, comma, hi = body.partition(",")
      if close == -1 or not (lo.isascii() and hi.isascii()) or not (lo.isdigit() or (comma and lo == "")) or not (hi == "" or hi.isdigit()):
        raise self.fail("a '{' that is not a {m,n} repeat (escape it as '\\{')")
      if len(lo) > 4 or len(hi) > 4:
        raise self.fail(f"a repeat count above {MAX_REPEAT}")
      m = int(lo) if lo else 0
      n = (int(hi) if hi else None) if comma else m
      if max(m, n or 0) > MAX_REPEAT:
        raise self.fail(f"a repeat count above {MAX_REPEAT}")
      if n is not None and n < m:
        raise self.fail(f"a repeat {{{m},{n}}} with min > max")
      self.i = close + 1
      quant = (m, n)
    else:
      return None
    if self.peek() == "?":  # lazy: the same set of matches
      self.i += 1
    return quant

  def atom(self, depth: int) -> tuple:
    c = self.peek()
    if c in ("*", "+", "?", "{"):
      raise self.fail("nothing to repeat")
    self.i += 1
    if c == "(":
      if depth >= MAX_DEPTH:
        raise UnsafePattern(f"groups nested deeper than {MAX_DEPTH} levels")
      if self.p.startswith("?:", self.i):
        self.i += 2
      elif self.p.startswith("?P<", self.i):
        close = self.p.find(">", self.i)
        name = self.p[self.i + 3 : close] if close != -1 else ""
        if not name.isidentifier() or name in self.names:
          raise self.fail("a bad or repeated group name")
        self.names.add(name)
        self.i = close + 1
      elif self.peek() == "?":
        raise self.fail("an extension group '(?...' (lookaround, flags, backreference, atomic or conditional group)")
      inner = self.alternation(depth + 1)
      if self.peek() != ")":
        raise self.fail("a missing ')'")
      self.i += 1
      return inner
    if c == ")":
      raise self.fail("an unbalanced ')'")
    if c == "[":
      return ("char", self.char_class())
    if c == ".":
      return ("char", lambda ch: ch != "\n")
    if c == "^":
      return ("bol",)
    if c == "$":
      return ("eol",)
    if c == "\\":
      return ("char", self.escape(in_class=False))
    return ("char", _literal(c))

  def escape(self, in_class: bool) -> Callable[[str], bool]:
    c = self.peek()
    if c is None:
      raise self.fail("a trailing backslash")
    self.i += 1
    if c.lower() in _CATEGORIES:
      pred = _CATEGORIES[c.lower()]
      return pred if c.islower() else (lambda ch, pred=pred: not pred(ch))
    return _literal(self.escaped_char(c, in_class))

  def escaped_char(self, c: str, in_class: bool) -> str:
    if c in _ESCAPES:
      return _ESCAPES[c]
    if c in ("x", "u"):
      digits = self.p[self.i : self.i + (2 if c == "x" else 4)]
      if len(digits) != (2 if c == "x" else 4) or not all(d in "0123456789abcdefABCDEF" for d in digits):
        raise self.fail(f"a bad \\{c} escape")
      self.i += len(digits)
      return chr(int(digits, 16))
    if c.isascii() and c.isalnum():
      raise self.fail(f"an unsupported escape '\\{c}' (backreference, assertion or unknown)")
    return c

  def char_class(self) -> Callable[[str], bool]:
    negate = self.peek() == "^"
    if negate:
      self.i += 1
    items: list[Callable[[str], bool]] = []
    first = True
    while True:
      c = self.peek()
      if c is None:
        raise self.fail("an unterminated '['")
      if c == "]" and not first:
        self.i += 1
        break
      first = False
      lo = self.class_char()
      if self.peek() == "-" and self.p[self.i + 1 : self.i + 2] not in ("]", ""):
        if not isinstance(lo, str):
          raise self.fail("a bad character range")
        self.i += 1
        hi = self.class_char()
        if not isinstance(hi, str) or hi < lo:
          raise self.fail("a bad character range")
        items.append(lambda ch, lo=lo, hi=hi: lo <= ch <= hi)
      else:
        items.append(_literal(lo) if isinstance(lo, str) else lo)
    if negate:
      return lambda ch: not any(f(ch) for f in items)
    return lambda ch: any(f(ch) for f in items)

  def class_char(self) -> str | Callable[[str], bool]:
    """One member of a class: a character, or a category predicate (``\\d``...)."""
    c = self.p[self.i]
    self.i += 1
    if c != "\\":
      return c
    e = self.peek()
    if e is not None and e.lower() in _CATEGORIES:
      return self.escape(in_class=True)
    if e is None:
      raise self.fail("a trailing backslash")
    self.i += 1
    return self.escaped_char(e, in_class=True)


def _literal(c: str) -> Callable[[str], bool]:
  return lambda ch: ch == c


def _size(node: tuple) -> int:
  kind = node[0]
  if kind == "cat":
    return sum(_size(n) for n in node[1]) + 1
  if kind == "alt":
    return sum(_size(n) for n in node[1]) + 2
  if kind == "rep":
    _, inner, m, n = node
    copies = m + 1 if n is None else n
    return _size(inner) * copies + 2 * copies + 3
  return 2


class _Nfa:
  def __init__(self):
    self.kind: list[int] = []
    self.pred: list[Callable[[str], bool] | None] = []
    self.outs: list[list[int]] = []

  def new(self, kind: int, pred=None) -> int:
    self.kind.append(kind)
    self.pred.append(pred)
    self.outs.append([])
    return len(self.kind) - 1

  def build(self, node: tuple) -> tuple[int, int]:
    """States for ``node``: ``(start, end)``, ``end`` an epsilon state with no exits yet."""
    kind = node[0]
    if kind == "char":
      s, e = self.new(_CHAR, node[1]), self.new(_EPS)
      self.outs[s].append(e)
      return s, e
    if kind in ("bol", "eol"):
      s, e = self.new(_BOL if kind == "bol" else _EOL), self.new(_EPS)
      self.outs[s].append(e)
      return s, e
    if kind == "cat":
      s = e = self.new(_EPS)
      for item in node[1]:
        a, b = self.build(item)
        self.outs[e].append(a)
        e = b
      return s, e
    if kind == "alt":
      s, e = self.new(_EPS), self.new(_EPS)
      for item in node[1]:
        a, b = self.build(item)
        self.outs[s].append(a)
        self.outs[b].append(e)
      return s, e
    _, inner, m, n = node  # rep
    s = e = self.new(_EPS)
    for _ in range(m):
      a, b = self.build(inner)
      self.outs[e].append(a)
      e = b
    if n is None:  # a loop: e -> inner -> e, or leave
      a, b = self.build(inner)
      self.outs[e].append(a)
      self.outs[b].append(e)
      end = self.new(_EPS)
      self.outs[e].append(end)
      return s, end
    end = self.new(_EPS)
    for _ in range(n - m):  # optional copies, each may be skipped to the end
      self.outs[e].append(end)
      a, b = self.build(inner)
      self.outs[e].append(a)
      e = b
    self.outs[e].append(end)
    return s, end


class _Automaton:
  """The union of several patterns as one NFA (each with its own accepting state), run as a
  lazily built DFA: one pass over a string tells which of the patterns match it. Work is
  linear in the string's length (each step is a cached transition, or a visit of at most all
  states), and bounded in total by ``MAX_WORK``."""

  def __init__(self, trees: list[tuple]):
    if sum(_size(t) for t in trees) > MAX_TOTAL_STATES:
      raise UnsafePattern(f"the patterns expand to more than {MAX_TOTAL_STATES} automaton states")
    self.nfa = nfa = _Nfa()
    start = nfa.new(_EPS)
    self.tag: dict[int, int] = {}
    for i, tree in enumerate(trees):
      a, b = nfa.build(tree)
      accept = nfa.new(_ACCEPT)
      nfa.outs[start].append(a)
      nfa.outs[b].append(accept)
      self.tag[accept] = i
    self.start = frozenset([start])
    self.closures: dict = {}
    self.steps: dict = {}
    self.work = 0

  def _spend(self, n: int) -> None:
    self.work += n
    if self.work > MAX_WORK:
      raise UnsafePattern(f"matching needs more than {MAX_WORK} automaton steps")

  def closure(self, states: frozenset, at_start: bool, at_end: bool) -> frozenset:
    """The character-consuming and accepting states reachable without consuming; ``^``
    passes where ``at_start``, ``$`` where ``at_end`` (positions of the original string)."""
    key = (states, at_start, at_end)
    hit = self.closures.get(key)
    if hit is not None:
      return hit
    nfa, seen, stack, core = self.nfa, set(states), list(states), []
    while stack:
      s = stack.pop()
      k = nfa.kind[s]
      if k in (_CHAR, _ACCEPT):
        core.append(s)
        continue
      if (k == _BOL and not at_start) or (k == _EOL and not at_end):
        continue
      for t in nfa.outs[s]:
        if t not in seen:
          seen.add(t)
          stack.append(t)
    self._spend(len(seen))
    out = frozenset(core)
    if len(self.closures) > _CACHE:
      self.closures.clear()
    self.closures[key] = out
    return out

  def step(self, core: frozenset, ch: str) -> frozenset:
    key = (core, ch)
    hit = self.steps.get(key)
    if hit is None:
      nfa = self.nfa
      self._spend(len(core))
      hit = frozenset(nfa.outs[s][0] for s in core if nfa.kind[s] == _CHAR and nfa.pred[s](ch))
      if len(self.steps) > _CACHE:
        self.steps.clear()
      self.steps[key] = hit
    return hit

  def accepted(self, core: frozenset) -> list[int]:
    return [self.tag[t] for t in core if t in self.tag]


def _check_string(s: str) -> None:
  if not isinstance(s, str):
    raise TypeError(f"expected a string to match, found a {type(s).__name__}")
  if len(s) > MAX_NAME:
    raise UnsafePattern(f"the string matched is longer than {MAX_NAME} characters")


def _at_dollar(s: str, p: int) -> bool:
  """Where ``$`` holds (no MULTILINE): at the end, or before a final newline."""
  n = len(s)
  return p == n or (p == n - 1 and s[p] == "\n")


class SafeRegex:
  """One regex in the dialect above, matched with ``re``'s meaning in linear time.

  Raises:
    UnsafePattern: a pattern outside the dialect or the limits (a ``ValueError``).
  """

  def __init__(self, pattern: str):
    self.pattern = pattern
    self._automaton = _Automaton([_parse(pattern)])

  def _run(self, s: str, full: bool) -> bool:
    _check_string(s)
    auto, n, pre = self._automaton, len(s), self._automaton.start
    for i in range(n + 1):
      core = auto.closure(pre, i == 0, _at_dollar(s, i))
      if (i == n or not full) and auto.accepted(core):
        return True
      if i == n or not core:
        return False
      pre = auto.step(core, s[i])
    return False

  def match(self, s: str) -> bool:
    """Whether ``re.match(pattern, s)`` finds a match (anchored at the start only)."""
    return self._run(s, full=False)

  def fullmatch(self, s: str) -> bool:
    """Whether ``re.fullmatch(pattern, s)`` finds a match."""
    return self._run(s, full=True)


def _parse(pattern: str) -> tuple:
  if not isinstance(pattern, str):
    raise UnsafePattern(f"expected a string, found a {type(pattern).__name__}")
  if len(pattern) > MAX_LENGTH:
    raise UnsafePattern(f"longer than {MAX_LENGTH} characters ({len(pattern)})")
  parser = _Parser(pattern)
  tree = parser.alternation(0)
  if parser.i != len(pattern):
    raise parser.fail("an unbalanced ')'")
  if _size(tree) > MAX_STATES:
    raise UnsafePattern(f"expands to more than {MAX_STATES} automaton states (large {{m,n}} repeats)")
  return tree


def _reverse(node: tuple) -> tuple:
  """The tree matching the reversed strings (assertions keep their forward meaning)."""
  kind = node[0]
  if kind == "cat":
    return ("cat", [_reverse(n) for n in reversed(node[1])])
  if kind == "alt":
    return ("alt", [_reverse(n) for n in node[1]])
  if kind == "rep":
    return ("rep", _reverse(node[1]), node[2], node[3])
  return node


class PeftPatterns:
  r"""PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup, for all keys in one pass per name.

  ``first(name)`` is the first key ``k`` (in order) for which
  ``re.match(rf"(.*\.)?({k})$", name)`` matches (``peft.utils.other.get_pattern_key``): ``k``
  matches a tail of ``name`` that starts at 0 or after a ``.`` (the prefix ``.*`` stops at a
  newline) and ends where ``$`` holds. The keys run reversed, from the end of the name,
  anchored there: the automaton then follows only the keys that fit the name's last
  characters.

  Each key must be a complete regex by itself (balanced), so composing parse trees is the
  same as PEFT's composing strings.

  Raises:
    UnsafePattern: a key outside the dialect or the limits; its ``key`` attribute names it.

  >>> PeftPatterns([r"layers\.1\.q_proj", "q_proj"]).first("model.layers.3.q_proj")
  'q_proj'
  """

  def __init__(self, keys):
    self.keys = list(keys)
    if len(self.keys) > MAX_KEYS:
      raise UnsafePattern(f"more than {MAX_KEYS} keys ({len(self.keys)})")
    trees = []
    for key in self.keys:
      try:
        trees.append(_reverse(_parse(key)))
      except UnsafePattern as e:
        e.key = key
        raise
    self._automaton = _Automaton(trees) if trees else None

  def first(self, name: str) -> str | None:
    """The first key that matches ``name`` PEFT's way, or None."""
    _check_string(name)
    if self._automaton is None:
      return None
    auto, n, r = self._automaton, len(name), name[::-1]
    first_nl = name.find("\n")  # the prefix (.*\.)? cannot cross a newline
    hits: set[int] = set()
    pre = auto.start
    for q in range(n + 1):  # q characters of the reversed name consumed: forward position p = n - q
      p = n - q
      if q == 1 and name[-1] == "\n":  # the key may also end before a final newline ($)
        pre = pre | auto.start
      core = auto.closure(pre, p == 0, _at_dollar(name, p))
      if core and (p == 0 or (name[p - 1] == "." and (first_nl == -1 or first_nl >= p - 1))):
        hits.update(auto.accepted(core))
      if q == n or (not core and not (q == 0 and name.endswith("\n"))):
        break
      pre = auto.step(core, r[q])
    return self.keys[min(hits)] if hits else None


def peft_key_matches(key: str, name: str) -> bool:
  r"""``re.match(rf"(.*\.)?({key})$", name) is not None``, in linear time."""
  return PeftPatterns([key]).first(name) is not None


__all__ = [
    "MAX_DEPTH",
    "MAX_KEYS",
    "MAX_LENGTH",
    "MAX_NAME",
    "MAX_REPEAT",
    "MAX_STATES",
    "PeftPatterns",
    "SafeRegex",
    "UnsafePattern",
    "peft_key_matches",
]
