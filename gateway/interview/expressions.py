"""The XLSForm expression subset used in `relevant`, `constraint` and `calculation`.

A small recursive-descent parser compiles an expression into closures once, at form
load time; evaluation never calls eval(). Semantics follow XPath 1.0 where it matters
for forms: answers are strings, an unanswered question is '', comparisons are numeric
when both sides read as numbers, and `selected()` looks inside space-separated lists.

Supported: ${name}, '.', 'string' and "string" literals, numbers, = != < <= > >=,
+ - * div mod, and, or, not(), selected(), count-selected(), string-length(), if(),
coalesce(), int(), number(), true(), false(), and parentheses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

Value = str | float | bool
Env = Mapping[str, str]
Fn = Callable[[Env, str], Value]


class ExpressionError(ValueError):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} (at character {offset + 1})")
        self.offset = offset


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<ref>\$\{\s*(?P<refname>[A-Za-z_][\w.-]*)\s*\})
      | (?P<num>\d+(?:\.\d*)?|\.\d+)
      | (?P<str>'[^']*'|"[^"]*")
      | (?P<op><=|>=|!=|=|<|>|\+|-|\*|\(|\)|,)
      | (?P<dot>\.(?![\w.]))
      | (?P<name>[A-Za-z_][\w-]*)
    )""",
    re.VERBOSE,
)


@dataclass(frozen=True)
class Token:
    kind: str
    text: str
    offset: int


def _tokenize(src: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(src):
        if src[pos:].strip() == "":
            break
        m = _TOKEN.match(src, pos)
        if not m or m.end() == pos:
            raise ExpressionError(f"unexpected character {src[pos:].lstrip()[:1]!r}", pos)
        if m.group("ref"):
            kind, text, start = "ref", m.group("refname"), m.start("ref")
        else:
            kind = next(k for k in ("num", "str", "op", "dot", "name") if m.group(k) is not None)
            text, start = m.group(kind), m.start(kind)
        if kind == "name" and text in ("and", "or", "div", "mod"):
            kind = "op"
        tokens.append(Token(kind, text, start))
        pos = m.end()
    tokens.append(Token("end", "", len(src)))
    return tokens


def _num(v: Value) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, float):
        return v
    try:
        return float(v.strip())
    except ValueError:
        return math.nan


def _str(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        return str(int(v)) if v.is_integer() else repr(v)
    return v


def _bool(v: Value) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, float):
        return not (v == 0 or math.isnan(v))
    return v != ""


def _looks_numeric(v: Value) -> bool:
    return isinstance(v, float | bool) or not math.isnan(_num(v)) and v.strip() != ""


def _compare(op: str, a: Value, b: Value) -> bool:
    if op in ("=", "!="):
        if isinstance(a, bool) or isinstance(b, bool):
            same = _bool(a) == _bool(b)
        elif isinstance(a, float) or isinstance(b, float) or (
            _looks_numeric(a) and _looks_numeric(b)
        ):
            same = _num(a) == _num(b)
        else:
            same = _str(a) == _str(b)
        return same if op == "=" else not same
    x, y = _num(a), _num(b)
    if op == "<":
        return x < y
    if op == "<=":
        return x <= y
    if op == ">":
        return x > y
    return x >= y


def _selected(items: Value, choice: Value) -> bool:
    return _str(choice).strip() in _str(items).split()


def _count_selected(items: Value) -> float:
    return float(len(_str(items).split()))


_FUNCTIONS: dict[str, tuple[int, int]] = {
    # name: (min args, max args)
    "not": (1, 1),
    "selected": (2, 2),
    "count-selected": (1, 1),
    "string-length": (1, 1),
    "if": (3, 3),
    "coalesce": (2, 2),
    "int": (1, 1),
    "number": (1, 1),
    "true": (0, 0),
    "false": (0, 0),
}


def _call(name: str, args: list[Fn]) -> Fn:
    if name == "not":
        (a,) = args
        return lambda env, dot: not _bool(a(env, dot))
    if name == "selected":
        a, b = args
        return lambda env, dot: _selected(a(env, dot), b(env, dot))
    if name == "count-selected":
        (a,) = args
        return lambda env, dot: _count_selected(a(env, dot))
    if name == "string-length":
        (a,) = args
        return lambda env, dot: float(len(_str(a(env, dot))))
    if name == "if":
        c, t, f = args
        return lambda env, dot: t(env, dot) if _bool(c(env, dot)) else f(env, dot)
    if name == "coalesce":
        a, b = args

        def coalesce(env: Env, dot: str) -> Value:
            first = a(env, dot)
            return first if _str(first) != "" else b(env, dot)

        return coalesce
    if name == "int":
        (a,) = args

        def to_int(env: Env, dot: str) -> Value:
            n = _num(a(env, dot))
            # An answer of 400 nines reads as infinity, which has no integer part.
            return float(math.trunc(n)) if math.isfinite(n) else n

        return to_int
    if name == "number":
        (a,) = args
        return lambda env, dot: _num(a(env, dot))
    if name == "true":
        return lambda env, dot: True
    return lambda env, dot: False


def _logic(op: str, a: Fn, b: Fn) -> Fn:
    if op == "or":
        return lambda env, dot: _bool(a(env, dot)) or _bool(b(env, dot))
    return lambda env, dot: _bool(a(env, dot)) and _bool(b(env, dot))


def _comparison(op: str, a: Fn, b: Fn, text: str | None = None) -> Fn:
    """a op b; `text`: b is that string literal (`${q} = 'yes'`, the usual `relevant`)."""
    if text is None or op not in ("=", "!=") or _looks_numeric(text):
        return lambda env, dot: _compare(op, a(env, dot), b(env, dot))
    # A text answer and text that does not read as a number compare as text. _compare finds
    # that only after failing to read the answer as a number (a ValueError raised and
    # caught), on every evaluation; the literal's side is known now.
    equal = op == "="

    def text_compare(env: Env, dot: str) -> Value:
        value = a(env, dot)
        if isinstance(value, str):
            return (value == text) if equal else (value != text)
        return _compare(op, value, text)

    return text_compare


def _arith(op: str, a: Fn, b: Fn) -> Fn:
    def apply(env: Env, dot: str) -> Value:
        x, y = _num(a(env, dot)), _num(b(env, dot))
        if op == "+":
            return x + y
        if op == "-":
            return x - y
        if op == "*":
            return x * y
        if y == 0 or (op == "mod" and math.isinf(x)):  # fmod(inf, y) raises
            return math.nan
        return x / y if op == "div" else math.fmod(x, y)

    return apply


@dataclass
class _Parser:
    tokens: list[Token]
    pos: int = 0
    refs: set[str] = field(default_factory=set)
    uses_dot: bool = False
    # The closures compiled from string literals, and their text.
    texts: dict[Fn, str] = field(default_factory=dict)

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def expect(self, text: str) -> None:
        tok = self.take()
        if tok.text != text or tok.kind not in ("op",):
            raise ExpressionError(f"expected {text!r}, found {tok.text or 'end'!r}", tok.offset)

    def parse(self) -> Fn:
        fn = self.or_expr()
        tok = self.peek()
        if tok.kind != "end":
            raise ExpressionError(f"unexpected {tok.text!r}", tok.offset)
        return fn

    def or_expr(self) -> Fn:
        left = self.and_expr()
        while self.peek().kind == "op" and self.peek().text == "or":
            self.take()
            left = _logic("or", left, self.and_expr())
        return left

    def and_expr(self) -> Fn:
        left = self.cmp_expr()
        while self.peek().kind == "op" and self.peek().text == "and":
            self.take()
            left = _logic("and", left, self.cmp_expr())
        return left

    def cmp_expr(self) -> Fn:
        left = self.add_expr()
        while self.peek().kind == "op" and self.peek().text in ("=", "!=", "<", "<=", ">", ">="):
            op = self.take().text
            right = self.add_expr()
            if left in self.texts and op in ("=", "!="):
                # Equality does not depend on the order (and a literal cannot fail).
                left, right = right, left
            left = _comparison(op, left, right, self.texts.get(right))
        return left

    def add_expr(self) -> Fn:
        left = self.mul_expr()
        while self.peek().kind == "op" and self.peek().text in ("+", "-"):
            op = self.take().text
            left = _arith(op, left, self.mul_expr())
        return left

    def mul_expr(self) -> Fn:
        left = self.unary()
        while self.peek().kind == "op" and self.peek().text in ("*", "div", "mod"):
            op = self.take().text
            left = _arith(op, left, self.unary())
        return left

    def unary(self) -> Fn:
        if self.peek().kind == "op" and self.peek().text == "-":
            self.take()
            inner = self.unary()
            return lambda env, dot: -_num(inner(env, dot))
        return self.primary()

    def primary(self) -> Fn:
        tok = self.take()
        if tok.kind == "num":
            value = float(tok.text)
            return lambda env, dot: value
        if tok.kind == "str":
            text = tok.text[1:-1]

            def literal(env: Env, dot: str) -> Value:
                return text

            self.texts[literal] = text
            return literal
        if tok.kind == "ref":
            name = tok.text
            self.refs.add(name)
            return lambda env, dot: env.get(name, "")
        if tok.kind == "dot":
            self.uses_dot = True
            return lambda env, dot: dot
        if tok.kind == "op" and tok.text == "(":
            inner = self.or_expr()
            self.expect(")")
            return inner
        if tok.kind == "name":
            if self.peek().text != "(":
                raise ExpressionError(
                    f"bare name {tok.text!r}: refer to questions as ${{{tok.text}}}", tok.offset
                )
            if tok.text not in _FUNCTIONS:
                supported = ", ".join(f"{n}()" for n in _FUNCTIONS)
                raise ExpressionError(
                    f"function {tok.text}() is not supported (supported: {supported})", tok.offset
                )
            self.take()
            args: list[Fn] = []
            if not (self.peek().kind == "op" and self.peek().text == ")"):
                args.append(self.or_expr())
                while self.peek().kind == "op" and self.peek().text == ",":
                    self.take()
                    args.append(self.or_expr())
            self.expect(")")
            low, high = _FUNCTIONS[tok.text]
            if not low <= len(args) <= high:
                raise ExpressionError(
                    f"{tok.text}() takes {low} argument(s), got {len(args)}", tok.offset
                )
            return _call(tok.text, args)
        raise ExpressionError(f"unexpected {tok.text or 'end of expression'!r}", tok.offset)


@dataclass(frozen=True)
class Expression:
    source: str
    refs: frozenset[str]
    uses_dot: bool
    _fn: Fn = field(repr=False, compare=False)

    def value(self, env: Env, dot: str = "") -> Value:
        return self._fn(env, dot)

    def truth(self, env: Env, dot: str = "") -> bool:
        return _bool(self._fn(env, dot))

    def text(self, env: Env, dot: str = "") -> str:
        return _str(self._fn(env, dot))


def compile_expression(source: str) -> Expression:
    parser = _Parser(_tokenize(source))
    try:
        fn = parser.parse()
    except RecursionError:  # ((((…)))) or - - - … deeper than the parser can follow
        raise ExpressionError("nested too deeply", 0) from None
    return Expression(source, frozenset(parser.refs), parser.uses_dot, fn)
