"""The compiled-step cache trusts only entries its own key signed, and never breaks a run."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest

from iql_torchrl.compile_cache import CompiledStepCache, default_cache_folder, entry_key


class FakeCompiled:
    """Stands for an AOTCompiledFunction: what store() serialises."""

    def __init__(self, payload: bytes):
        self.payload = payload

    @classmethod
    def serialize(cls, fn):
        return SimpleNamespace(serialized_data=fn.payload)


def loaded_payloads(monkeypatch):
    seen = []
    monkeypatch.setattr("torch.compiler.load_compiled_function", lambda f, f_globals: seen.append(f.read()) or "step")
    return seen


def test_an_entry_it_signed_loads(tmp_path, monkeypatch):
    seen = loaded_payloads(monkeypatch)
    cache = CompiledStepCache(tmp_path)
    cache.store("k", FakeCompiled(b"compiled bytes"))
    assert cache.load("k", {}) == "step" and seen == [b"compiled bytes"]
    assert (tmp_path / "secret.key").stat().st_mode & 0o077 == 0  # the key is its owner's alone


@pytest.mark.parametrize("damage", ["flip a payload byte", "truncate", "foreign key"])
def test_a_damaged_or_foreign_entry_is_removed_not_loaded(tmp_path, monkeypatch, damage):
    seen = loaded_payloads(monkeypatch)
    cache = CompiledStepCache(tmp_path / "mine")
    cache.store("k", FakeCompiled(b"compiled bytes" * 10))
    entry = cache.path("k")
    if damage == "flip a payload byte":
        data = bytearray(entry.read_bytes())
        data[-1] ^= 1
        entry.write_bytes(bytes(data))
    elif damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:20])
    else:  # an entry another cache (another user, another machine) wrote, copied in
        other = CompiledStepCache(tmp_path / "theirs")
        other.store("k", FakeCompiled(b"their bytes"))
        shutil.copy(other.path("k"), entry)
    with pytest.warns(UserWarning, match="compiled anew"):
        assert cache.load("k", {}) is None
    assert seen == [] and not entry.exists()


def test_an_entry_torch_cannot_load_is_removed(tmp_path, monkeypatch):
    def refuse(f, f_globals):
        raise RuntimeError("incompatible")
    monkeypatch.setattr("torch.compiler.load_compiled_function", refuse)
    cache = CompiledStepCache(tmp_path)
    cache.store("k", FakeCompiled(b"bytes"))
    with pytest.warns(UserWarning, match="could not load it"):
        assert cache.load("k", {}) is None
    assert not cache.path("k").exists()


def test_a_failed_write_warns_and_leaves_nothing(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not be cached"):
        CompiledStepCache(blocked / "cache").store("k", FakeCompiled(b"bytes"))


def test_the_key_follows_every_setting():
    base = {"tau": 0.005, "signature": "(256, 3)"}
    assert entry_key(base) == entry_key(dict(base))
    assert entry_key(base) != entry_key({**base, "tau": 0.01})
    assert entry_key(base) != entry_key({**base, "signature": "(128, 3)"})


def test_the_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IQL_TORCHRL_COMPILE_CACHE", str(tmp_path))
    assert default_cache_folder() == tmp_path
    monkeypatch.setenv("IQL_TORCHRL_COMPILE_CACHE", "")
    assert default_cache_folder() is None
    monkeypatch.delenv("IQL_TORCHRL_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_folder() == tmp_path / "iql_torchrl" / "compiled-steps"
