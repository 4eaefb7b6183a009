"""What the installed torch can do, for the tests that depend on it."""
import pytest
import torch

# a torch without aot_compile (2.11) runs every compiled step guarded: dynamo's guards may recompile it, and no
# compiled step is cached
AHEAD_OF_TIME = hasattr(torch.compile(lambda x: x), "aot_compile")
CACHED_STEPS = pytest.mark.skipif(
    not AHEAD_OF_TIME, reason="this torch has no aot_compile (e.g. 2.11): its guarded step is never cached")
