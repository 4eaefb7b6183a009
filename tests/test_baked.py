"""BakedValues reads back, from a step's owner, the plain values a trace read: attribute and item chains of ``self``."""
from types import SimpleNamespace

import pytest

from iql_torchrl.step.baked import BakedValues


class Counting:
    """An object whose ``inner`` attribute counts its reads."""

    def __init__(self, inner):
        self._inner, self.reads = inner, 0

    @property
    def inner(self):
        self.reads += 1
        return self._inner


def owner():
    groups = [{"eps": 1e-8, "betas": (0.9, 0.999), "weight_decay": 0.0}]
    shared = Counting(SimpleNamespace(loss_function="l2", flag=True, net=SimpleNamespace(width=256)))
    return SimpleNamespace(optimizers={"actor": SimpleNamespace(param_groups=groups)}, loss=shared, name="x")


READS = [("value", "self.optimizers['actor'].param_groups[0]['eps']"),
         ("value", "self.optimizers['actor'].param_groups[0]['betas'][1]"),
         ("value", "self.loss.inner.loss_function"), ("value", "self.loss.inner.flag"),
         ("type", "self.loss.inner.net"), ("value", "self.loss.inner.net.width"), ("value", "self.name")]


def test_reads_every_value_and_type_as_the_expressions_say():
    o = owner()
    assert BakedValues(READS)(o) == (1e-8, 0.999, "l2", True, SimpleNamespace, 256, "x")


def test_a_change_anywhere_on_a_path_reads_differently():
    baked, o = BakedValues(READS), owner()
    before = baked(o)
    o.optimizers["actor"].param_groups[0]["betas"] = (0.9, 0.99)
    o.loss._inner.net = SimpleNamespace(width=256)  # the same width in an object of the same type: equal
    assert baked(o) != before and baked(o)[1] == 0.99 and baked(o)[4:] == before[4:]
    o.loss._inner.net = [256]  # another type
    assert baked(o) != before


def test_a_path_that_no_longer_reads_never_equals_what_was_read():
    baked, o = BakedValues(READS), owner()
    before = baked(o)
    del o.optimizers["actor"]
    assert baked(o) != before


def test_a_shared_prefix_is_read_once_per_check():
    o = owner()
    BakedValues(READS)(o)
    assert o.loss.reads == 1  # four reads go through self.loss.inner; the property ran once


def test_an_expression_that_is_not_a_plain_read_is_refused():
    """Guard sources with calls (dynamo's helpers) are not read back; from_guards leaves them out."""
    with pytest.raises(ValueError, match=r"'len\(self.optimizers\)' is not a chain of attributes"):
        BakedValues([("value", "self.name"), ("value", "len(self.optimizers)")])
    entries = [SimpleNamespace(guard_type="EQUALS_MATCH", name=name) for name in
               ("len(self.optimizers)", "self.name", "self.optimizers", "G['x']", "self.loss.inner.flag")]
    # a call, a plain value, a dict (checked by what it holds), not of self, a plain value
    assert BakedValues.from_guards(entries, owner()).reads == [("value", "self.name"), ("value", "self.loss.inner.flag")]


def test_a_type_read_is_kept_for_an_object_not_for_a_container_or_tensor():
    """A replaced module or object changes a type the step read; containers and tensors are checked by what they hold
    (the update's held-tensor checks), so dynamo's type guards on them are not read back on every call."""
    import torch

    o = owner()
    o.weight = torch.zeros(2)
    entries = [SimpleNamespace(guard_type="TYPE_MATCH", name=name) for name in
               ("self.optimizers", "self.optimizers['actor'].param_groups", "self.weight", "self.loss.inner.net")]
    assert BakedValues.from_guards(entries, o).reads == [("type", "self.loss.inner.net")]
