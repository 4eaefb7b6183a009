"""What a compiled step baked in: the Python values its trace read, read again before each call.

A Python value a trace read (``loss.loss_function``, an optimizer's ``weight_decay``, the value estimator's
class) is a constant of its graph, which a step skipping dynamo's guards (or a CUDA graph) would not see change.
:class:`BakedValues` keeps, of the guards dynamo wrote for the trace, those on plain values and types reached
from the step's ``self`` (tensors are the graph's inputs, read on every call). Reading them costs tens of
microseconds; a difference sends the call through dynamo's guards, which compile the step anew. The settings
users change often (β, τ, the learning rates) are tensors the graph reads: changing them compiles nothing.
"""
from __future__ import annotations

import ast
import operator
import re

import torch
from tensordict import TensorDictBase

__all__ = ["BakedValues", "CHANGED", "VALUE_GUARDS"]

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
        """``ValueError`` when an expression is not a chain of attributes and constant subscripts of ``self``."""
        self.reads = [tuple(r) for r in reads]
        self._read = _reader(self.reads)

    @classmethod
    def from_guards(cls, entries, owner) -> BakedValues:
        """The reads of dynamo's guard ``entries`` on ``self`` that read back from ``owner`` as plain values."""
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
        """The values now (a ``"type"`` read as the class); :data:`CHANGED` when one cannot be read."""
        return self._read(owner)


CHANGED = object()  # what a read that fails returns: never equal to a value read before


def _path(expression: str) -> tuple | None:
    """``expression``'s steps from ``self``, ``("attr", name)`` or ``("item", key)``, when it
    is a chain of attributes and constant subscripts of ``self``; ``None`` for anything else."""
    try:
        node = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    steps = []
    while not (isinstance(node, ast.Name) and node.id == "self"):
        if isinstance(node, ast.Attribute):
            steps.append(("attr", node.attr))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            steps.append(("item", node.slice.value))
        else:
            return None
        node = node.value
    return tuple(reversed(steps))


def _reader(reads: list[tuple[str, str]]):
    """One function reading every expression of ``reads``, each shared prefix (``self.loss.actor_network``) once."""
    nodes: list[tuple[int, object]] = []  # (the node it reads from, its getter); node 0 is ``self``
    index: dict[tuple, int] = {(): 0}  # a path's prefix → its node
    results = []
    for kind, expression in reads:
        path = _path(expression)
        if path is None:
            raise ValueError(f"{expression!r} is not a chain of attributes and constant subscripts of self")
        for depth in range(1, len(path) + 1):
            if path[:depth] not in index:
                index[path[:depth]] = len(nodes) + 1
                step, name = path[depth - 1]
                getter = operator.attrgetter(name) if step == "attr" else operator.itemgetter(name)
                nodes.append((index[path[:depth - 1]], getter))
        results.append((index[path], kind == "type"))

    def read(owner) -> tuple:
        values = [owner]
        try:
            for source, getter in nodes:
                values.append(getter(values[source]))
        except Exception:
            return CHANGED
        return tuple(type(values[i]) if is_type else values[i] for i, is_type in results)

    return read


# a class attribute dynamo read for an object that has none of its own: dict(type(X)[.__mro__[k]].__dict__)['name']
_CLASS_ATTRIBUTE = re.compile(r"dict\(type\((?P<owner>self\b.*)\)(?:\.__mro__\[\d+\])?\.__dict__\)\['(?P<name>[A-Za-z_]\w*)'\]")


def _as_attribute(expression: str) -> str:
    """A class attribute's read as the object's, ``X.name``, which an attribute set later on the object
    (``loss.loss_mask_key = ...``) changes; any other expression as it is."""
    match = _CLASS_ATTRIBUTE.fullmatch(expression)
    return f"{match['owner']}.{match['name']}" if match else expression


def _readable(read: tuple[str, str], owner) -> bool:
    """Whether ``read`` evaluates on ``owner`` to a plain value (a tensor, a module, a dict is not one)."""
    try:
        value = _reader([("value", read[1])])(owner)
    except ValueError:  # a guard's source that is not a plain read (dynamo's own helpers)
        return False
    if value is CHANGED:
        return False
    value = value[0]
    if read[0] == "type":  # a replaced module or object; tensors and containers are checked by what they hold
        return not isinstance(value, (torch.Tensor, TensorDictBase, dict, list, tuple))
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value))
