"""Guards that keep model output from running as Python code inside a verifier worker.

Some third-party scorers hand the model's answer to Python's `eval` (reasoning-gym's
string_insertion, spiral_matrix, binary_matrix, n_queens: "is it a Python list?") or to sympy's
`parse_expr` / `sympify`, which `eval`s the token-transformed text (countdown, puzzle24,
polynomial_multiplication, the integration tasks). Unguarded, an answer such as
`__import__('os').system(...)` runs in the worker. `install()` (called once per worker process,
after the scorers are imported) closes both paths:

* every loaded `reasoning_gym.*` module gets a module-level `eval` = `literal_eval`, which evaluates
  only literals and arithmetic on them (no names, calls, attributes, subscripts, comprehensions);
* sympy's `stringify_expr` (the step of `parse_expr`, and so of `sympify(str)`, that produces the
  code `eval` runs) rejects code that uses anything but numbers, strings, operators, containers, the
  caller's `local_dict` names and sympy's own math objects (Basic subclasses and instances, the
  functions of `sympy.functions`): no builtins (`__import__`, `exec`, `open`), no `sympify` /
  `lambdify` / `preview`, no attribute access, no keyword arguments.

A rejected answer raises ValueError inside the scorer, which scores it as unparseable. Resource
exhaustion (`9**9**9**9`) is not prevented here: the pool's hard per-item timeout and the worker's
memory cap handle it.
"""

from __future__ import annotations

import ast
import operator
import sys
import types

_LITERAL_NODES = (
    ast.Expression,
    ast.Constant,
    ast.List,
    ast.Tuple,
    ast.Set,
    ast.Dict,
    ast.UnaryOp,
    ast.BinOp,
    ast.BoolOp,
    ast.Compare,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
    ast.boolop,
)
_SYMPY_NODES = (
    ast.Expression,
    ast.Constant,
    ast.List,
    ast.Tuple,
    ast.UnaryOp,
    ast.BinOp,
    ast.Compare,
    ast.Name,
    ast.Call,
    ast.Load,
    ast.operator,
    ast.unaryop,
    ast.cmpop,
)


def _parse(source, what: str) -> ast.Expression:
    if isinstance(source, (bytes, bytearray)):
        source = bytes(source).decode("utf-8", errors="replace")
    if not isinstance(source, str):
        raise ValueError(f"{what}: only source text is accepted, not {type(source).__name__}")
    try:
        return ast.parse(source.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise ValueError(f"{what}: not a Python expression ({type(e).__name__})") from None


_BIN = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.LShift: operator.lshift,
    ast.RShift: operator.rshift,
    ast.BitOr: operator.or_,
    ast.BitXor: operator.xor,
    ast.BitAnd: operator.and_,
    ast.MatMult: operator.matmul,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg, ast.Not: operator.not_, ast.Invert: operator.invert}
_CMP = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}


def _value(node):
    """Evaluates a checked literal / arithmetic node by walking it: no eval, no name lookup."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_value(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](_value(node.left), _value(node.right))
    if isinstance(node, ast.BoolOp):  # Python's value semantics, short-circuiting
        for v in node.values[:-1]:
            x = _value(v)
            if bool(x) != isinstance(node.op, ast.And):
                return x
        return _value(node.values[-1])
    if isinstance(node, ast.Compare):
        left = _value(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = _value(right_node)
            if not _CMP[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(f"literal_eval: {type(node).__name__} is not allowed")


def literal_eval(source, globals=None, locals=None):  # noqa: A002 -- the signature of builtins.eval
    """`eval`'s place in the scorers, restricted to literals and arithmetic on them (what they use
    it for: "[1, 2]", "['a', 'b']", "3 + 4 // 2", "(0x3a << 2) & 7"). The text is parsed to an AST
    and evaluated by walking it (never handed to eval): anything with a name, call, attribute,
    subscript, comprehension, lambda or f-string raises ValueError before any evaluation."""
    tree = _parse(source, "literal_eval")
    for node in ast.walk(tree):
        if not isinstance(node, _LITERAL_NODES):
            raise ValueError(f"literal_eval: {type(node).__name__} is not allowed")
    return _value(tree.body)


def _sympy_math_object(obj) -> bool:
    from sympy import Basic

    if isinstance(obj, Basic) or (isinstance(obj, type) and issubclass(obj, Basic)):
        return True
    return isinstance(obj, types.FunctionType) and (obj.__module__ or "").startswith("sympy.functions.")


def check_sympy_code(code: str, local_dict: dict, global_dict: dict) -> None:
    """Raises ValueError unless `code` (the output of sympy's stringify_expr) only combines numbers,
    strings, operators, containers, `local_dict` names and sympy math objects of `global_dict`."""
    tree = _parse(code, "sympy parse")
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            raise ValueError(f"sympy parse: {type(node).__name__} is not allowed in an answer")
        if isinstance(node, ast.Call) and (node.keywords or not isinstance(node.func, (ast.Name, ast.Call))):
            raise ValueError("sympy parse: only plain calls of sympy functions are allowed")
        if isinstance(node, ast.Name) and node.id not in (local_dict or {}):
            if not _sympy_math_object((global_dict or {}).get(node.id)):
                raise ValueError(f"sympy parse: name {node.id!r} is not a sympy math object")


def _guarded_stringify(original):
    def stringify_expr(s, local_dict, global_dict, transformations):
        code = original(s, local_dict, global_dict, transformations)
        check_sympy_code(code, local_dict, global_dict)
        return code

    stringify_expr._tgpo_guarded = True
    return stringify_expr


_INSTALLED = False


def installed() -> bool:
    """Whether `install()` ran in this process."""
    return _INSTALLED


def install() -> None:
    """Installs both guards in this process (idempotent). Call it in verifier workers only, after
    importing reasoning_gym: it changes how `eval` behaves inside reasoning-gym modules and what
    sympy's parse_expr accepts."""
    from sympy.parsing import sympy_parser

    if not getattr(sympy_parser.stringify_expr, "_tgpo_guarded", False):
        sympy_parser.stringify_expr = _guarded_stringify(sympy_parser.stringify_expr)
    for name, mod in list(sys.modules.items()):
        if (name == "reasoning_gym" or name.startswith("reasoning_gym.")) and isinstance(mod, types.ModuleType):
            mod.__dict__["eval"] = literal_eval
    global _INSTALLED
    _INSTALLED = True


__all__ = ["install", "installed", "literal_eval", "check_sympy_code"]
