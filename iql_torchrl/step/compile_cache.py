"""Compiled update steps kept on disk: a second run of the same shapes starts without compiling.

An entry is torch's serialised ahead-of-time compiled step (the bytes of
``AOTCompiledFunction.save_compiled_function``: pickled code and kernels), after a JSON header with the
Python values its trace baked in (:mod:`iql_torchrl.step.baked`), so an entry is loaded only if this user's
cache wrote it. Each file carries an HMAC-SHA256 of its bytes under a secret key
kept beside the entries (created on first use, readable by its owner only); its name is a hash of
everything the compiled graph bakes in (the caller's description of the step and its call
signature, plus torch's, TorchRL's and tensordict's versions, this package's sources, the Python version,
the CPU's instruction set and torch's thread count). The header also holds a hash of each source file whose
code the trace went through (a network's helper in a file of the user's, TorchRL's modules, torch's): an
entry whose files have changed since is compiled anew. A truncated, corrupt, foreign or unloadable entry is
removed, with a warning, and the step is compiled anew: the cache never decides a result, it only
saves time. Runs that start the same step at once (seeds launched side by side) take turns on a lock per
entry: one compiles and stores it, the others wait and load it.

The folder is ``$IQL_TORCHRL_COMPILE_CACHE`` when set (empty: no cache), else
``$XDG_CACHE_HOME/iql_torchrl/compiled-steps`` (``~/.cache/...``).
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import importlib.metadata
import inspect
import io
import json
import os
import platform
import secrets
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import filelock
import torch

__all__ = ["CompiledStepCache", "default_cache_folder", "entry_key", "describe_objects", "describe_classes"]

_SUFFIX = ".step"
_KEY_FILE = "secret.key"
_MAC_BYTES = 32
_HEADER_BYTES = 8  # the JSON header's length
_PACKAGE = Path(__file__).resolve().parents[1]  # the whole package: a step traces the loss's and networks' code too


def default_cache_folder() -> Path | None:
    """Where compiled steps are kept (``None``: nowhere; ``IQL_TORCHRL_COMPILE_CACHE=""``)."""
    configured = os.environ.get("IQL_TORCHRL_COMPILE_CACHE")
    if configured is not None:
        return Path(configured).expanduser() if configured else None
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "iql_torchrl" / "compiled-steps"


def _package_sources() -> str:
    """A hash of this package's Python sources: a changed step never loads an older compilation."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def entry_key(description: dict) -> str:
    """The entry's name: a hash of ``description`` (JSON-able; ``str`` of anything else) and the
    environment a compiled step depends on."""
    environment = {
        "torch": torch.__version__,
        "torchrl": _version("torchrl"),  # its value estimators, distributions and modules are traced into the step
        "tensordict": _version("tensordict"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),  # the compiled kernels' parallel regions are sized for them
        "sources": _package_sources(),
    }
    text = json.dumps({"step": description, "environment": environment}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:40]


_PLAIN = (bool, int, float, str, type(None))


def describe_objects(*objects, ignore: tuple[str, ...] = ()) -> list:
    """What a compiled graph may bake in from ``objects`` (modules and plain objects): for each object,
    each of its submodules and each module it holds outside its registered submodules (a TorchRL loss
    keeps its networks so), its class, a hash of the file that defines the class, and its attributes
    that are plain Python values (numbers, strings, flags, tuples of them); tensors are left to the
    call signature. A custom network with a constant in its ``forward`` changes the key when its
    source file or that constant changes (code it calls in other files is checked on loading:
    :meth:`CompiledStepCache.load`). ``ignore``: attributes of ``objects`` themselves that only Python
    reads around the step."""
    out, seen, roots = [], set(), {id(obj) for obj in objects}

    def visit(obj, path: str) -> None:
        parts = obj.named_modules() if isinstance(obj, torch.nn.Module) else [("", obj)]
        for name, part in parts:
            if id(part) in seen:
                continue
            seen.add(id(part))
            cls = type(part)
            attributes = {k: v for k, v in sorted(vars(part).items())
                          if _plain(v) and not (id(part) in roots and k in ignore)}
            out.append([f"{path}{name}", f"{cls.__module__}.{cls.__qualname__}", _source_hash(cls), attributes])
            for key, value in sorted(vars(part).items()):
                if isinstance(value, torch.nn.Module) and id(value) not in seen:
                    visit(value, f"{path}{name}.{key}:")

    for obj in objects:
        visit(obj, "")
    return out


def describe_classes(obj) -> list:
    """``obj``'s class and its bases, each named with a hash of the file defining it: a subclass that changes
    the step (an overridden method) never loads its base's compiled step, nor the base a subclass's."""
    return [[f"{cls.__module__}.{cls.__qualname__}", _source_hash(cls)] for cls in type(obj).__mro__ if cls is not object]


def _plain(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _source_hash(cls) -> str | None:
    """A hash of the file defining ``cls`` (``None`` for a builtin or a class without one: its name stands for it)."""
    try:
        return _file_hash(inspect.getsourcefile(cls))
    except TypeError:  # a builtin class
        return None


class CompiledStepCache:
    """Ahead-of-time compiled steps in ``folder``, each signed with the folder's own secret key.

    ``wait``: how long, in seconds, a run waits for another process compiling the same step before it
    compiles the step itself."""

    def __init__(self, folder: str | Path, wait: float = 600.0):
        self.folder = Path(folder)
        self.wait = wait

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{_SUFFIX}"

    @contextlib.contextmanager
    def compiling(self, key: str):
        """Held while the step of ``key`` is loaded, or compiled and stored: a second run of the same step
        waits here for the first one's entry instead of compiling it too. A lock the folder cannot hold (not
        writable, a filesystem without locks), or held by another process longer than ``wait``, leaves this
        run to compile on its own (the entry is written atomically either way)."""
        lock = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(self.folder / f".{key}.lock", timeout=self.wait)
            lock.acquire()
        except filelock.Timeout:
            warnings.warn(f"Another process has been compiling this update step for {self.wait:.0f} s (it holds "
                          f"{lock.lock_file}); compiling it here too.", stacklevel=3)
            lock = None
        except OSError:
            lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def load(self, key: str, f_globals: dict) -> tuple[Callable, list, list] | None:
        """The compiled step stored under ``key`` with the reads and values it baked in (as given to
        :meth:`store`), or ``None`` (absent, traced from source files that have changed since, or removed as
        untrustworthy)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        secret = self._secret(create=False)
        payload = data[_MAC_BYTES:]
        if secret is None or len(data) <= _MAC_BYTES or not hmac.compare_digest(data[:_MAC_BYTES], _mac(secret, payload)):
            return self._discard(path, "its signature does not match this cache's key (corrupt or written elsewhere)")
        try:
            header_size = int.from_bytes(payload[:_HEADER_BYTES], "big")
            header = json.loads(payload[_HEADER_BYTES:_HEADER_BYTES + header_size])
            if _changed(header["traced"]):
                return None  # compiled anew, and stored over this entry
            step_bytes = payload[_HEADER_BYTES + header_size:]
            with _torch_s_own_vmap_helpers():
                step = torch.compiler.load_compiled_function(io.BytesIO(step_bytes), f_globals=f_globals,
                                                             external_data=_module_namespaces())
            return step, header["reads"], header["values"]
        except Exception as error:  # an experimental torch API: any failure means compile anew
            return self._discard(path, f"torch could not load it ({type(error).__name__}: {error})")

    def store(self, key: str, compiled, reads: list, values: list) -> None:
        """Writes ``compiled`` (an ``AOTCompiledFunction``) under ``key`` atomically, with the ``reads`` and
        ``values`` it baked in (JSON-able); a failure only warns."""
        try:
            header = json.dumps({"reads": reads, "values": values, "traced": _traced_files(compiled)}).encode()
            with _torch_s_own_vmap_helpers():
                step_bytes = type(compiled).serialize(compiled, external_data=_module_namespaces()).serialized_data
            payload = len(header).to_bytes(_HEADER_BYTES, "big") + header + step_bytes
            secret = self._secret(create=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".entry.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(_mac(secret, payload) + payload)
                os.replace(tmp, self.path(key))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except Exception as error:
            warnings.warn(f"The compiled update step could not be cached in {self.folder} "
                          f"({type(error).__name__}: {error}); the next run compiles it again.", stacklevel=2)

    def _secret(self, create: bool) -> bytes | None:
        path = self.folder / _KEY_FILE
        if create and not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            # written whole under another name, then linked into place: a run starting at the same moment
            # never reads a key half written, and of two runs creating one, the first link wins for both
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".key.", suffix=".tmp")  # mode 0o600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(secrets.token_bytes(32))
                os.link(tmp, path)
            except FileExistsError:  # another run created it first
                pass
            finally:
                Path(tmp).unlink(missing_ok=True)
        try:
            secret = path.read_bytes()
        except OSError:
            return None
        return secret if len(secret) == 32 else None

    def _discard(self, path: Path, why: str) -> None:
        warnings.warn(f"Ignoring the cached compiled step {path.name}: {why}. It is removed and the step "
                      "compiled anew.", stacklevel=3)
        path.unlink(missing_ok=True)
        return None


def _traced_files(compiled) -> dict[str, list]:
    """The modules whose code the trace of ``compiled`` went through: each module's source file and its hash."""
    files = {}
    for name in sorted({source.module for source in compiled.source_info().inlined_sources}):
        path = getattr(sys.modules.get(name), "__file__", None)
        files[name] = [path, _file_hash(path)]
    return files


def _changed(traced: dict[str, list]) -> bool:
    """Whether a file of ``traced`` differs now: a module imported from elsewhere, or its file's text changed (a
    module not imported yet is read where the trace found it)."""
    for name, (path, digest) in traced.items():
        now = getattr(sys.modules.get(name), "__file__", path)
        if now != path or _file_hash(now) != digest:
            return True
    return False


def _file_hash(path: str | None) -> str | None:
    """A SHA-256 of the file at ``path`` (``None``: no path, or no such file)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except (TypeError, OSError):  # no file (a built-in or namespace module), or gone
        return None


def _module_namespaces() -> dict[str, dict]:
    """Every imported module's namespace, by the module's name: what a compiled step refers to of them is
    stored as that name and found again by it on loading (torch's ``external_data``).

    Dynamo's code around the graph may hold a module's globals (e.g. tensordict.utils' when a network nests a
    TorchRL ``MLP`` in a ``Sequential``), and those hold objects pickle refuses (a logging handler's lock); a
    module missing from a later process makes its load fail, and the step is compiled anew.
    """
    return {f"module-namespace:{name}": vars(module) for name, module in list(sys.modules.items())
            if module is not None}


@contextlib.contextmanager
def _torch_s_own_vmap_helpers():
    """For the time of a pickle or unpickle, ``torch._functorch.vmap``'s helpers are torch's own again.

    tensordict replaces some of them with its own (to vmap over TensorDicts), while torch's vmap keeps the
    originals (``torch._functorch.apis`` imported them first). A compiled vmapped step refers to torch's
    originals and pickles them by name: under tensordict's replacements pickle refuses them ("not the same
    object"), and an unpickled step would call tensordict's. The swap is undone on exit; a thread running a
    vmap over TensorDicts during it would get torch's helpers.
    """
    import torch._functorch.apis as apis
    import torch._functorch.vmap as vmap_module

    replaced = {name: getattr(vmap_module, name) for name, original in vars(apis).items()
                if callable(original) and getattr(original, "__module__", None) == vmap_module.__name__
                and getattr(vmap_module, name, original) is not original}
    for name in replaced:
        setattr(vmap_module, name, getattr(apis, name))
    try:
        yield
    finally:
        for name, theirs in replaced.items():
            setattr(vmap_module, name, theirs)


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()
