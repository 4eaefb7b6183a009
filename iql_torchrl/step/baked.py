"""What a compiled step baked in: the Python values its trace read, read again before each call.

A step compiled ahead of time runs without dynamo's guards, so a Python number it read while
tracing (``loss.loss_function``, an optimizer's ``weight_decay``, a network's flag, the value
estimator's class) is a constant of its graph. :class:`BakedValues` is built from the guards dynamo
wrote for that trace -- the record of what it read -- keeping those on plain values and types of
objects reached from the step's ``self``, and drops the tensor guards (the tensors are the graph's
inputs, read anew on every call). Reading them again costs a few microseconds; a difference means
the graph no longer computes what eager would, and the step is compiled anew.

Settings a user changes often (β, τ, the learning rates, the target update rate) are tensors the
graph reads, not values it bakes: changing them compiles nothing.
"""
from __future__ import annotations

import ast
import re
import textwrap

import torch
from tensordict import TensorDictBase

__all__ = ["BakedValues", "VALUE_GUARDS"]

# dynamo guard types that compare a value the trace read (or its type) with the one it saw
VALUE_GUARDS = ("CONSTANT_MATCH", "EQUALS_MATCH", "TYPE_MATCH")
_PLAIN = (bool, int, float, str, type(None))


class BakedValues:
    """Reads, from a step's owner, the values a trace of the step read.

    Args:
        reads: ``(kind, expression)`` pairs: ``kind`` is ``"value"`` (a plain value) or ``"type"`` (the
            qualified name of an object's type); ``expression`` is a Python expression in ``self``.
    """

    def __init__(self, reads: list[tuple[str, str]]):
        self.reads = [tuple(r) for r in reads]
        self._read = _reader(self.reads)

    @classmethod
    def from_guards(cls, entries, owner) -> BakedValues:
        """The reads of dynamo's guard ``entries`` (``GuardFilterEntry``) on ``self`` that can be read back
        from ``owner`` (the step's ``self``) as plain values."""
        reads = []
        for entry in entries:
            kind = "type" if entry.guard_type == "TYPE_MATCH" else "value"
            name = entry.name if kind == "type" else _as_attribute(entry.name)
            if entry.guard_type not in VALUE_GUARDS or not name.startswith("self.") and not name.startswith("self["):
                continue
            read = (kind, name)
            if read in reads or not _readable(read, owner):
                continue
            reads.append(read)
        return cls(reads)

    def __call__(self, owner) -> tuple:
        """The values now."""
        return self._read(owner)

    def to_json(self) -> list:
        return [list(r) for r in self.reads]


_CHANGED = object()  # what a read that fails returns: never equal to a value read before


def _reader(reads: list[tuple[str, str]]):
    """One function reading every expression of ``reads``, each attribute or item of a shared prefix read
    once (the reads walk the same objects: ``self.loss.actor_network...``), so a check costs microseconds."""
    lines, names, results = [], {}, []

    def node(expression: ast.expr) -> str:
        key = ast.dump(expression)
        if key not in names:
            if isinstance(expression, ast.Name):
                return expression.id
            if isinstance(expression, ast.Attribute):
                text = f"{node(expression.value)}.{expression.attr}"
            elif isinstance(expression, ast.Subscript) and isinstance(expression.slice, ast.Constant):
                text = f"{node(expression.value)}[{expression.slice.value!r}]"
            else:  # anything else is read whole
                text = ast.unparse(expression)
            names[key] = f"_{len(names)}"
            lines.append(f"    {names[key]} = {text}")
        return names[key]

    for kind, expression in reads:
        name = node(ast.parse(expression, mode="eval").body)
        results.append(name if kind == "value" else f"_type_name({name})")
    body = "\n".join(lines) or "    pass"
    source = (f"def read(self):\n    try:\n{textwrap.indent(body, '    ')}\n    except Exception:\n        return _CHANGED\n"
              f"    return ({''.join(r + ', ' for r in results)})\n")
    scope = {"_type_name": _type_name, "_CHANGED": _CHANGED}
    exec(compile(source, "<baked values>", "exec"), scope)  # noqa: S102 -- code built from dynamo's guard sources
    return scope["read"]


# a class attribute dynamo read for an object that has none of its own: dict(type(X)[.__mro__[k]].__dict__)['name']
_CLASS_ATTRIBUTE = re.compile(r"dict\(type\((?P<owner>self\b.*)\)(?:\.__mro__\[\d+\])?\.__dict__\)\['(?P<name>[A-Za-z_]\w*)'\]")


def _as_attribute(expression: str) -> str:
    """A class attribute's read as the object's attribute, ``X.name``: an attribute the object is given
    later (``loss.loss_mask_key = ...`` over the class's default) changes what ``X.name`` reads, not the
    class's entry. Any other expression as it is."""
    match = _CLASS_ATTRIBUTE.fullmatch(expression)
    return f"{match['owner']}.{match['name']}" if match else expression


def _type_name(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _readable(read: tuple[str, str], owner) -> bool:
    """Whether ``read`` evaluates on ``owner`` to a plain value (a tensor, a module, a dict is not one)."""
    kind, expression = read
    try:
        value = eval(compile(f"lambda self: {expression}", "<baked value>", "eval"), {})(owner)  # noqa: S307
    except Exception:  # a guard's source that is not plain Python (dynamo's own helpers)
        return False
    if kind == "type":  # a replaced module or object; tensors and containers are checked by what they hold
        return not isinstance(value, (torch.Tensor, TensorDictBase, dict, list, tuple))
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))
