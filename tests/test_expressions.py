"""The XLSForm expression subset: a table of what each expression means, and of what is refused."""

from __future__ import annotations

import dis
import types
from dataclasses import dataclass, field

import pytest

from gateway.interview import expressions
from gateway.interview.expressions import ExpressionError, compile_expression


@dataclass(frozen=True)
class Case:
    label: str
    source: str
    env: dict[str, str] = field(default_factory=dict)
    dot: str = ""
    truth: bool | None = None  # expected Expression.truth(...)
    text: str | None = None  # expected Expression.text(...)


TRUTH = [
    # ${q} = 'x', and an unanswered question reads as ''
    Case("equals, answered", "${a} = 'x'", {"a": "x"}, truth=True),
    Case("equals, other answer", "${a} = 'x'", {"a": "y"}, truth=False),
    Case("equals, unanswered is ''", "${a} = 'x'", {}, truth=False),
    Case("unanswered equals empty string", "${a} = ''", {}, truth=True),
    Case("answered is not empty string", "${a} = ''", {"a": "x"}, truth=False),
    Case("not-equals, unanswered", "${a} != 'x'", {}, truth=True),
    Case("not-equals, same answer", "${a} != 'x'", {"a": "x"}, truth=False),
    Case("double-quoted literal", '${a} = "x y"', {"a": "x y"}, truth=True),
    Case("spaces inside ${ }", "${ a } = 'x'", {"a": "x"}, truth=True),
    Case("literal on the left", "'x' = ${a}", {"a": "x"}, truth=True),
    Case("two references", "${a} = ${b}", {"a": "k", "b": "k"}, truth=True),
    Case("string compare is exact", "${a} = 'X'", {"a": "x"}, truth=False),
    # numbers compare as numbers when both sides read as numbers
    Case("10 > 9 numerically (not as text)", "${n} > 9", {"n": "10"}, truth=True),
    Case("'10' > '9' both strings, still numeric", "${n} > '9'", {"n": "10"}, truth=True),
    Case("10 < 9 is false", "${n} < 9", {"n": "10"}, truth=False),
    Case("<= at the bound", "${n} <= 18", {"n": "18"}, truth=True),
    Case("<= above the bound", "${n} <= 18", {"n": "19"}, truth=False),
    Case(">= at the bound", "${n} >= 18", {"n": "18"}, truth=True),
    Case(">= below the bound", "${n} >= 18", {"n": "17"}, truth=False),
    Case("< strict", "${n} < 18", {"n": "18"}, truth=False),
    Case("> strict", "${n} > 18", {"n": "18"}, truth=False),
    Case("= numeric: 10 = 10.0", "${n} = 10", {"n": "10.0"}, truth=True),
    Case("= numeric: '010' = '10'", "${n} = '010'", {"n": "10"}, truth=True),
    Case("!= numeric", "${n} != 3", {"n": "3.0"}, truth=False),
    Case("decimal comparison", "${n} > 2.5", {"n": "2.75"}, truth=True),
    Case("negative number", "${n} < -1", {"n": "-2"}, truth=True),
    Case("unanswered is not >= 0", "${n} >= 0", {}, truth=False),
    Case("unanswered is not <= 0", "${n} <= 0", {}, truth=False),
    Case("unanswered != a number", "${n} != 1", {}, truth=True),
    Case("text = number is false", "${s} = 1", {"s": "abc"}, truth=False),
    Case("text is not ordered (XPath: < > are numeric)", "'b' > 'a'", truth=False),
    # and / or / not, with XPath precedence (and binds tighter than or)
    Case("and: both", "${a} = 'x' and ${b} = 'y'", {"a": "x", "b": "y"}, truth=True),
    Case("and: one", "${a} = 'x' and ${b} = 'y'", {"a": "x", "b": "n"}, truth=False),
    Case("or: one", "${a} = 'x' or ${b} = 'y'", {"a": "n", "b": "y"}, truth=True),
    Case("or: none", "${a} = 'x' or ${b} = 'y'", {"a": "n", "b": "n"}, truth=False),
    Case("and binds tighter than or", "${a} = 'x' or ${b} = 'y' and ${c} = 'z'",
         {"a": "x", "b": "n", "c": "n"}, truth=True),
    Case("parentheses regroup", "(${a} = 'x' or ${b} = 'y') and ${c} = 'z'",
         {"a": "x", "b": "n", "c": "n"}, truth=False),
    Case("not()", "not(${a} = 'x')", {"a": "y"}, truth=True),
    Case("not() of true", "not(${a} = 'x')", {"a": "x"}, truth=False),
    Case("not() of unanswered", "not(${a})", {}, truth=True),
    Case("shipped-form style skip", "${consent} = 'yes' and ${age} != 'u18'",
         {"consent": "yes", "age": "25_34"}, truth=True),
    Case("shipped-form style skip, under 18", "${consent} = 'yes' and ${age} != 'u18'",
         {"consent": "yes", "age": "u18"}, truth=False),
    Case("true()", "true()", truth=True),
    Case("false()", "false()", truth=False),
    Case("true() = 1", "true() = 1", truth=True),
    # selected() looks inside space-separated lists
    Case("selected: present", "selected(${m}, 'b')", {"m": "a b c"}, truth=True),
    Case("selected: absent", "selected(${m}, 'd')", {"m": "a b c"}, truth=False),
    Case("selected: no substring match", "selected(${m}, 'b')", {"m": "abc"}, truth=False),
    Case("selected: unanswered", "selected(${m}, 'a')", {}, truth=False),
    Case("selected: single answer", "selected(${m}, 'yes')", {"m": "yes"}, truth=True),
    Case("count-selected in comparison", "count-selected(${m}) >= 2", {"m": "a c"}, truth=True),
    Case("string-length in constraint", "string-length(.) <= 5", dot="hello", truth=True),
    Case("string-length too long", "string-length(.) <= 5", dot="hello!", truth=False),
    # '.' is the value being checked (constraints)
    Case("dot in range", ". >= 0 and . <= 50", dot="0", truth=True),
    Case("dot at top of range", ". >= 0 and . <= 50", dot="50", truth=True),
    Case("dot above range", ". >= 0 and . <= 50", dot="51", truth=False),
    Case("dot below range", ". >= 0 and . <= 50", dot="-1", truth=False),
    Case("dot empty", ". >= 0 and . <= 50", dot="", truth=False),
    Case("dot against another answer", ". <= ${total}", {"total": "10"}, dot="7", truth=True),
    Case("dot alone, empty", ".", dot="", truth=False),
    Case("dot alone, non-empty", ".", dot="x", truth=True),
    Case("if() as truth", "if(${a} = 'x', true(), false())", {"a": "x"}, truth=True),
    Case("zero is false", "0", truth=False),
    Case("non-zero is true", "${n} * 1", {"n": "2"}, truth=True),
    # Answers no number can hold: a constraint on them fails (the answer is re-asked),
    # never raises (it once did, and the hop answered 500).
    Case("int() of 400 nines", "int(.) < 10", dot="9" * 400, truth=False),
    Case("int() of a huge negative", "int(.) < 10", dot="-" + "9" * 400, truth=True),
    Case("mod of 400 nines", ". mod 2 = 0", dot="9" * 400, truth=False),
    Case("int() of inf", "int(.) < 10", dot="inf", truth=False),
    Case("mod of -inf", ". mod 2 = 1", dot="-inf", truth=False),
    Case("int() of a small number still works", "int(.) = 3", dot="3.9", truth=True),
]

TEXT = [
    Case("reference reads the answer", "${a}", {"a": "hello"}, text="hello"),
    Case("unanswered reference is ''", "${a}", {}, text=""),
    Case("dot reads the value", ".", dot="42", text="42"),
    Case("count-selected", "count-selected(${m})", {"m": "a b c"}, text="3"),
    Case("count-selected of unanswered", "count-selected(${m})", {}, text="0"),
    Case("string-length of literal", "string-length('hello')", text="5"),
    Case("string-length of unanswered", "string-length(${a})", {}, text="0"),
    Case("if: then branch", "if(${a} = 'x', 'yes', 'no')", {"a": "x"}, text="yes"),
    Case("if: else branch", "if(${a} = 'x', 'yes', 'no')", {"a": "y"}, text="no"),
    Case("if: unanswered", "if(${n} = '', 0, ${n} * 2)", {}, text="0"),
    Case("if: answered", "if(${n} = '', 0, ${n} * 2)", {"n": "4"}, text="8"),
    Case("coalesce: first empty", "coalesce(${a}, 'z')", {}, text="z"),
    Case("coalesce: first set", "coalesce(${a}, 'z')", {"a": "q"}, text="q"),
    Case("precedence: * before +", "1 + 2 * 3", text="7"),
    Case("parentheses", "(1 + 2) * 3", text="9"),
    Case("subtraction is left-associative", "10 - 2 - 3", text="5"),
    Case("div", "7 div 2", text="3.5"),
    Case("mod", "7 mod 3", text="1"),
    Case("unary minus", "-${n} + 1", {"n": "4"}, text="-3"),
    Case("double negation", "1 - -1", text="2"),
    Case("answer arithmetic", "${a} + ${b}", {"a": "2", "b": "40"}, text="42"),
    Case("decimal arithmetic", "${a} * 1.5", {"a": "3"}, text="4.5"),
    Case("arithmetic on unanswered is NaN", "${n} + 1", {}, text="NaN"),
    Case("arithmetic on text is NaN", "${n} + 1", {"n": "abc"}, text="NaN"),
    Case("int() truncates", "int(${n})", {"n": "3.7"}, text="3"),
    Case("int() of negative truncates toward 0", "int(${n})", {"n": "-3.7"}, text="-3"),
    Case("number() of text", "number('x')", text="NaN"),
    Case("number() of text number", "number(' 12 ')", text="12"),
    Case("boolean as text", "${a} = 'x'", {"a": "x"}, text="true"),
    Case("whole numbers print without .0", "4 div 2", text="2"),
]


@pytest.mark.parametrize("case", TRUTH, ids=lambda c: c.label)
def test_truth(case: Case) -> None:
    """An expression's truth value for the given answers and '.' value."""
    expr = compile_expression(case.source)
    assert expr.truth(case.env, case.dot) is case.truth


@pytest.mark.parametrize("case", TEXT, ids=lambda c: c.label)
def test_text(case: Case) -> None:
    """An expression's value as text (what a calculate stores)."""
    expr = compile_expression(case.source)
    assert expr.text(case.env, case.dot) == case.text


@dataclass(frozen=True)
class Refs:
    label: str
    source: str
    refs: frozenset[str]
    uses_dot: bool


REFS = [
    Refs("no references", "1 + 1", frozenset(), False),
    Refs("one reference", "${a} = 'x'", frozenset({"a"}), False),
    Refs("references inside functions", "selected(${m}, 'a') or count-selected(${n}) > 1",
         frozenset({"m", "n"}), False),
    Refs("dot and reference", ". <= ${total}", frozenset({"total"}), True),
    Refs("dotted and dashed names", "${q.1} = ${q-2}", frozenset({"q.1", "q-2"}), False),
    Refs("decimal literal is not a dot", ".5 < 1", frozenset(), False),
]


@pytest.mark.parametrize("case", REFS, ids=lambda c: c.label)
def test_refs(case: Refs) -> None:
    """The loader's reference checks rely on refs and uses_dot being exact."""
    expr = compile_expression(case.source)
    assert expr.refs == case.refs
    assert expr.uses_dot is case.uses_dot
    assert expr.source == case.source


@dataclass(frozen=True)
class Bad:
    label: str
    source: str
    offset: int | None = None  # 0-based character the error points at, when it is exact
    contains: str = ""


MALFORMED = [
    Bad("empty", "", 0),
    Bad("only spaces", "   "),
    Bad("missing right operand", "${a} =", 6),
    Bad("missing left operand", "= 'x'", 0),
    Bad("dangling and", "${a} = 'x' and", 14),
    Bad("dangling plus", "1 +", 3),
    Bad("unterminated string", "${a} = 'x"),
    Bad("unclosed parenthesis", "(1 + 2", 6, "expected ')'"),
    Bad("extra closing parenthesis", "1)", 1),
    Bad("two values in a row", "1 2", 2),
    Bad("== is not XPath", "${a} == 'x'"),
    Bad("<> is not XPath", "${a} <> 'x'"),
    Bad("empty reference", "${} = 'x'"),
    Bad("reference starting with a digit", "${1a} = 'x'"),
    Bad("unclosed reference", "${a = 'x'"),
    Bad("bare name", "consent = 'yes'", 0, "${consent}"),
    Bad("not without parentheses", "not ${a}", 0, "bare name"),
    Bad("unsupported function", "regex(., '^[0-9]+$')", 0, "not supported"),
    Bad("unsupported function: today()", "today() > 0", 0, "not supported"),
    Bad("selected() with one argument", "selected(${a})", 0, "argument"),
    Bad("not() with no argument", "not()", 0, "argument"),
    Bad("true() with an argument", "true(1)", 0, "argument"),
    Bad("if() with two arguments", "if(${a}, 1)", 0, "argument"),
    Bad("two dots", ".."),
    Bad("path step", "../a = 'x'"),
    Bad("xpath axis", "/data/a = 'x'"),
    Bad("brackets", "${a}[0]"),
    Bad("semicolon", "${a} = 'x'; 1"),
    Bad("operator word alone", "and"),
    Bad("trailing comma in call", "selected(${a}, )"),
    # Deeper than the parser follows: refused, not a RecursionError (once a 500 on upload).
    Bad("parentheses 150 deep", "(" * 150 + "1" + ")" * 150, 0, "nested too deeply"),
    Bad("2,000 minus signs", "-" * 2000 + "1", 0, "nested too deeply"),
]

# Python that must never run: if the parser ever fell back to eval, these would succeed.
HOSTILE = [
    Bad("__import__ call", "__import__('os')", 0),
    Bad("__import__ then attribute", "__import__('os').system('echo pwned')"),
    Bad("eval call", "eval('1 + 1')", 0),
    Bad("exec call", "exec('x = 1')", 0),
    Bad("open call", "open('/etc/passwd')", 0),
    Bad("getattr call", "getattr(${a}, 'upper')", 0),
    Bad("attribute on a reference", "${a}.__class__"),
    Bad("attribute on a literal", "'x'.upper()"),
    Bad("dunder walk", "().__class__.__bases__[0].__subclasses__()"),
    Bad("lambda", "lambda: 1"),
    Bad("python keyword", "import os"),
    Bad("f-string", "f'{1}'"),
]


@pytest.mark.parametrize("case", MALFORMED + HOSTILE, ids=lambda c: c.label)
def test_refused(case: Bad) -> None:
    """Malformed or non-XLSForm expressions raise ExpressionError at compile time."""
    with pytest.raises(ExpressionError) as info:
        compile_expression(case.source)
    if case.offset is not None:
        assert info.value.offset == case.offset
    assert case.contains in str(info.value)


def _global_loads(code: types.CodeType) -> set[str]:
    """Names a code object (and the functions inside it) looks up as globals or builtins."""
    names = {ins.argval for ins in dis.get_instructions(code)
             if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_loads(const)
    return names


def test_module_never_calls_eval() -> None:
    """The expression module never looks up eval, exec, compile, __import__ or getattr."""
    with open(expressions.__file__, encoding="utf-8") as f:
        code = compile(f.read(), expressions.__file__, "exec")
    loads = _global_loads(code)
    assert "ExpressionError" in loads  # the scan sees the module's own global lookups
    assert not loads & {"eval", "exec", "compile", "__import__", "getattr", "setattr",
                        "globals", "locals", "vars", "__builtins__"}


def test_evaluation_does_not_touch_the_environment() -> None:
    """Evaluating reads answers and never writes to the mapping it is given."""
    env = {"a": "x"}
    compile_expression("if(${a} = 'x', ${b}, coalesce(${c}, 'd'))").value(env)
    assert env == {"a": "x"}


def test_comparing_with_text_is_the_general_comparison() -> None:
    """`${q} = 'yes'` and `'yes' != ${q}` are compiled to a shortcut when the literal does not
    read as a number: for every kind of value on the other side (text, numbers, booleans,
    NaN), the result is what the general XPath comparison gives."""
    literals = ["yes", "", "x y", "nan", "NaN", "inf", "10", " 10 ", "1e3", "1_0", "-"]
    others = ["${a}", ".", "true()", "false()", "1", "0", "number(${a})",
              "count-selected(${a})", "string-length(${a})", "${a} = 'x'"]
    answers = ["", "x", "yes", "x y", "10", "10.0", " 10 ", "1e3", "nan", "NaN", "inf", "-"]
    for literal in literals:
        for op in ("=", "!="):
            for other in others:
                side = compile_expression(other)
                for source, literal_first in ((f"({other}) {op} '{literal}'", False),
                                              (f"'{literal}' {op} ({other})", True)):
                    expr = compile_expression(source)
                    for answer in answers:
                        env, value = {"a": answer}, side.value({"a": answer}, answer)
                        expected = (expressions._compare(op, literal, value) if literal_first
                                    else expressions._compare(op, value, literal))
                        assert expr.value(env, answer) is expected, (source, answer)
