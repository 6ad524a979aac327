"""Compiled kernels kept on disk: a process that has compiled a kernel once never compiles it again.

Why this exists. Numba compiles a kernel the first time it is launched with new argument types: typing, LLVM,
NVVM, ptxas, in Python, 0.2-1 s per kernel. A Llama forward uses ~40 kernels, so every fresh process waited ~15
seconds before its first token. This cache keeps each compiled kernel's cubin in a file and loads it back in a
millisecond.

Why not Numba's own `cache=True`: it keys a kernel on its bytecode and the pickled contents of its closure, and on
the modification time of the one file that holds it. Our kernels come from factories whose closures hold device
functions that call module-level device functions in other files (kernels/common.py, mma.py): an edit there
would not reach the key, and a stale kernel would run. It also keeps its files beside the sources (or in one
global folder), keeps one index file per function that concurrent processes rewrite (entries get lost), and
raises on a truncated entry. So it is done here, through the extension point Numba offers for it: each numbattn
kernel (kernels/common.py `kernel`) gets a cache object whose load_overload / save_overload Numba calls when it
would otherwise compile, and which returns Numba's own kernel object rebuilt from the stored cubin. Every path
that launches a kernel (prepared launches, CUDA graphs, `kernel[grid, block](...)`) therefore finds it.

The key: a sha256 over everything that changes the code (`describe`)
    code        the bytecode, constants and names of the kernel and of every function it reaches, through its
                closure, its globals and the modules it names (device functions, intrinsics and their inline PTX
                included), and the values of the constants it reads there (tile sizes, FASTMATH, ...): what Numba
                freezes at compile time. Comments do not change it; a changed constant or line does.
    options     the compile options (fastmath, launch bounds, ...)
    argtypes    the Numba types of the arguments (dtype, rank, layout)
    target      the CUDA runtime version and the GPU's compute capability
    versions    numba, numba-cuda, numpy, python

The store: one file per entry, `<kernel>-<key>.kernel` = a magic line, a JSON header (the description, the
entry point's name, the payload's length and sha256), then the cubin. Written to a temporary file and renamed
(atomic on POSIX), so a reader sees a whole entry or none, and two processes filling the cache at once both
succeed (the last rename wins; both entries are the same). An entry that does not check (truncated, corrupt,
another key) is reported with a WARNING, removed, and compiled again.

Where: $NUMBATTN_KERNEL_CACHE, else $XDG_CACHE_HOME/numbattn/kernels, else ~/.cache/numbattn/kernels (beside
tinyllm's model cache, ~/.cache/tinyllm). NUMBATTN_KERNEL_CACHE=off turns it off. Deleting the folder is safe.

    prepare(plan, progress)    compile or load, ahead of use, the (kernel, argument types) a plan lists;
                               progress(i, n, name) counts only the kernels that must be compiled
    summary()                  (folder, entries, bytes) for `cli.py info`
    COUNTS                     kernels compiled and loaded in this process (tests count them)
"""
import hashlib
import json
import logging
import os
import sys
import types as pytypes
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger("numbattn")

FORMAT = 1
MAGIC = b"numbattn kernel cache entry, format 1\n"
SUFFIX = ".kernel"
COUNTS = {"compiled": 0, "loaded": 0}          # this process: kernels compiled by Numba, kernels loaded from disk
# Functions from these packages are named, not walked: their versions are part of the key.
LIBRARIES = ("numba", "numba_cuda", "numpy", "llvmlite", "math", "builtins", "cuda")


def cache_dir():
    """The folder of entries, or None when NUMBATTN_KERNEL_CACHE=off (see the module docstring)."""
    env = os.environ.get("NUMBATTN_KERNEL_CACHE", "")
    if env.lower() in ("off", "0", "none"):
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "numbattn" / "kernels"


# --------------------------------------------------------------------------------------------------------
# The key
# --------------------------------------------------------------------------------------------------------
def fingerprint(fn):
    """sha256 (hex) of what Numba compiles for the Python function fn (module docstring: "code")."""
    walk = _Walk()
    walk.function(fn)
    return walk.hash.hexdigest()


def _is_library(module_name):
    return (module_name or "").split(".")[0] in LIBRARIES


class _Walk:
    """Feeds a hash with a function's code and everything it reaches, in a deterministic order (no ids, no
    addresses, no hash-randomised orders: two processes get the same digest)."""

    def __init__(self):
        self.hash, self.seen = hashlib.sha256(), {}

    def put(self, *parts):
        for p in parts:
            self.hash.update(repr(p).encode())
            self.hash.update(b"\0")

    def function(self, fn):
        if id(fn) in self.seen:                       # reached again (or recursively): named by its first visit
            self.put("again", self.seen[id(fn)])
            return
        self.seen[id(fn)] = len(self.seen)
        self.put("function", fn.__module__, fn.__qualname__)
        if _is_library(fn.__module__):
            return
        self.code(fn.__code__, fn.__globals__)
        self.value(fn.__defaults__)
        for cell in fn.__closure__ or ():
            self.value(cell.cell_contents)

    def code(self, code, globals_):
        self.put(code.co_code, code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars)
        for const in code.co_consts:
            if isinstance(const, pytypes.CodeType):
                self.code(const, globals_)
            else:
                self.value(const)
        for name in code.co_names:                     # the globals it reads (attribute names resolve to nothing)
            if name in globals_:
                self.put("global", name)
                self.value(globals_[name], code.co_names)

    def value(self, v, names=()):
        """A value the code reads: constants by value, callables by their code, modules by name (ours also by
        the attributes the code names on them), anything else by its type."""
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, np.generic, np.dtype)):
            self.put(type(v).__name__, v)
        elif isinstance(v, (tuple, list)):
            self.put(type(v).__name__, len(v))
            for x in v:
                self.value(x)
        elif isinstance(v, (set, frozenset)):
            self.put("set", sorted(repr(x) for x in v))
        elif isinstance(v, dict):
            self.put("dict", sorted((repr(k), repr(x)) for k, x in v.items()))
        elif isinstance(v, np.ndarray):
            self.put("ndarray", v.dtype.str, v.shape, hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest())
        elif isinstance(v, pytypes.ModuleType):
            self.module(v, names)
        else:
            self.callable_or_type(v)

    def module(self, module, names):
        self.put("module", module.__name__)
        if not _is_library(module.__name__):
            for name in names:
                if name in vars(module):
                    self.put("attribute", name)
                    self.value(vars(module)[name])

    def callable_or_type(self, v):
        if isinstance(v, pytypes.FunctionType):
            self.function(v)
        elif hasattr(v, "py_func") and hasattr(v, "targetoptions"):    # a Numba dispatcher (kernel, device fn)
            self.put("dispatcher", _options(v.targetoptions))
            self.function(v.py_func)
        elif isinstance(getattr(v, "fn", None), pytypes.FunctionType):    # the simulator's kernels
            self.function(v.fn)
        elif isinstance(getattr(v, "_defn", None), pytypes.FunctionType):  # an @intrinsic (its codegen, its PTX)
            self.function(v._defn)
        elif _is_library(type(v).__module__) and hasattr(v, "name") and hasattr(v, "key"):  # a Numba type
            self.put("numba type", str(v))
        else:
            self.put("object", type(v).__module__, type(v).__qualname__, getattr(v, "__qualname__", None))


def _options(targetoptions):
    """Compile options as plain sorted data (fastmath is a set)."""
    return sorted((k, sorted(v) if isinstance(v, (set, frozenset)) else repr(v)) for k, v in targetoptions.items())


def describe(py_func, targetoptions, argtypes, target, code=None):
    """The key's description: everything that changes the compiled code (module docstring). code: py_func's
    fingerprint, if already known."""
    import numba
    try:
        import numba_cuda
        cuda_version = numba_cuda.__version__
    except ImportError:
        cuda_version = "-"
    return {"format": FORMAT, "kernel": f"{py_func.__module__}.{py_func.__qualname__}",
            "code": code or fingerprint(py_func), "options": _options(targetoptions),
            "argtypes": [str(t) for t in argtypes], "target": [str(x) for x in target],
            "versions": [numba.__version__, cuda_version, np.__version__, sys.version.split()[0]]}


def entry_path(folder, description):
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()
    name = description["kernel"].rsplit(".", 1)[-1].replace("<", "").replace(">", "")
    return Path(folder) / f"{name}-{digest[:40]}{SUFFIX}"


# --------------------------------------------------------------------------------------------------------
# The store: one file per entry, written atomically, checked when read
# --------------------------------------------------------------------------------------------------------
def write_entry(path, description, entry_name, payload):
    """Write one entry atomically (temporary file, then rename). Never raises for a folder that cannot be
    written: the kernel was compiled, only its reuse is lost (a WARNING says so)."""
    header = json.dumps({"description": description, "entry_name": entry_name, "payload_bytes": len(payload),
                         "payload_sha256": hashlib.sha256(payload).hexdigest()}, sort_keys=True).encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(MAGIC + header + b"\n" + payload)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("numbattn: could not write the kernel cache entry %s (%s); the kernel is compiled, not kept",
                    path, e)
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def read_entry(path, description):
    """-> (entry_name, payload) of a whole, matching entry; None if there is none. An entry that does not check
    (truncated, corrupt, another key) is reported with a WARNING and removed: the caller compiles again."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("numbattn: kernel cache entry %s cannot be read (%s); compiling the kernel again", path, e)
        return None
    problem, found = _check_entry(data, description)
    if problem is None:
        return found
    log.warning("numbattn: kernel cache entry %s is %s; compiling the kernel again", path, problem)
    try:
        Path(path).unlink()
    except OSError:
        pass
    return None


def _check_entry(data, description):
    """-> (None, (entry_name, payload)) for a good entry, else (what is wrong, None)."""
    if not data.startswith(MAGIC):
        return "not a numbattn kernel cache entry (or of another format)", None
    end = data.find(b"\n", len(MAGIC))
    if end < 0:
        return "truncated (no whole header)", None
    try:
        header = json.loads(data[len(MAGIC):end])
        payload = data[end + 1:]
        size, digest, entry_name = header["payload_bytes"], header["payload_sha256"], header["entry_name"]
        stored = header["description"]
    except (ValueError, KeyError, TypeError):
        return "corrupt (its header does not parse)", None
    if json.dumps(stored, sort_keys=True) != json.dumps(description, sort_keys=True):   # as text: NaN == NaN there
        return "for another kernel (a different description under the same name)", None
    if len(payload) != size:
        return f"truncated ({len(payload)} of {size} payload bytes)", None
    if hashlib.sha256(payload).hexdigest() != digest:
        return "corrupt (its payload does not match its checksum)", None
    return None, (entry_name, payload)


def summary(folder=None):
    """(folder, number of entries, bytes) of the cache (folder None: it is off)."""
    folder = cache_dir() if folder is None else Path(folder)
    if folder is None:
        return None, 0, 0
    files = list(folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    return folder, len(files), sum(f.stat().st_size for f in files)


# --------------------------------------------------------------------------------------------------------
# Numba's side: the cache object of a kernel (GPU only; the simulator compiles nothing)
# --------------------------------------------------------------------------------------------------------
def attach(dispatcher):
    """Give a Numba CUDA kernel (a CUDADispatcher) its disk cache. Returns the dispatcher."""
    dispatcher._cache = _disk_cache_class()(dispatcher)
    return dispatcher


_CLASS = []


def _disk_cache_class():
    """The cache class, defined on first use (Numba's cache base class exists only outside the simulator)."""
    if _CLASS:
        return _CLASS[0]
    from numba.cuda.core.caching import _Cache

    class DiskCache(_Cache):
        """What Numba asks before compiling a kernel for new argument types, and tells after (module docstring)."""

        def __init__(self, dispatcher):
            self.dispatcher, self._code, self._enabled = dispatcher, None, True

        @property
        def cache_path(self):
            return str(cache_dir())

        def enable(self):
            self._enabled = True

        def disable(self):
            self._enabled = False

        def flush(self):
            pass

        def locate(self, sig, target_context):
            """-> (entry path, description) for these argument types, or (None, None) when the cache is off."""
            folder = cache_dir()
            if folder is None or not self._enabled:
                return None, None
            if self._code is None:                      # the walk is done once per kernel and process
                self._code = fingerprint(self.dispatcher.py_func)
            description = describe(self.dispatcher.py_func, self.dispatcher.targetoptions, _argtypes(sig),
                                   target_context.codegen().magic_tuple(), self._code)
            return entry_path(folder, description), description

        def load_overload(self, sig, target_context):
            path, description = self.locate(sig, target_context)
            found = read_entry(path, description) if path is not None else None
            if found is None:
                return None
            try:
                kernel = _rebuild(found, _argtypes(sig), target_context)
            except Exception as e:          # a cubin this driver will not load: compile instead
                log.warning("numbattn: kernel cache entry %s could not be loaded (%s: %s); compiling the kernel "
                            "again", path, type(e).__name__, e)
                return None
            COUNTS["loaded"] += 1
            return kernel

        def save_overload(self, sig, kernel):
            COUNTS["compiled"] += 1
            path, description = self.locate(sig, kernel.target_context)
            if path is None or not _cachable(kernel):
                return
            lib = kernel._codelibrary
            write_entry(path, description, kernel.entry_name, cubin_bytes(lib.get_cubin(lib._ensure_cc(None))))

    _CLASS.append(DiskCache)
    return DiskCache


def _argtypes(sig):
    from numba.cuda.core import sigutils          # as numba-cuda's dispatcher normalises them
    argtypes, _ = sigutils.normalize_signature(sig)
    return tuple(argtypes)


def _cachable(kernel):
    """A kernel whose cubin is all there is to it: no cooperative launch, no debug exception flag, no module
    set-up (NRT), no launch-config-dependent code."""
    lib = kernel._codelibrary
    return not (kernel.cooperative or kernel.debug or lib._setup_functions or lib._teardown_functions
                or getattr(kernel, "launch_config_sensitive", False) or kernel.shared_memory_carveout is not None)


def cubin_bytes(cubin):
    """The bytes of a linked cubin: numba-cuda 0.30 returns cuda.core's ObjectCode (its .code holds them)."""
    code = getattr(cubin, "code", cubin)
    if not isinstance(code, (bytes, bytearray, memoryview)):
        raise TypeError(f"a cubin of type {type(cubin).__name__} holds {type(code).__name__}, not bytes")
    return bytes(code)


def _object_code(cubin):
    """Stored cubin bytes as what numba-cuda 0.30 loads a module from: cuda.core's ObjectCode."""
    from cuda.core import ObjectCode
    return ObjectCode.from_cubin(cubin)


def _rebuild(found, argtypes, target_context):
    """Numba's kernel object from a stored cubin, loaded into the current context (internals of numba-cuda 0.30,
    whose version is part of the key)."""
    from numba.core import types
    from numba.cuda.codegen import CUDACodeLibrary
    from numba.cuda.dispatcher import _Kernel
    entry_name, cubin = found
    lib = CUDACodeLibrary(target_context.codegen(), entry_name, entry_name=entry_name)
    lib._cubin_cache[lib._ensure_cc(None)] = _object_code(cubin)
    lib._finalized = True
    kernel = _Kernel._rebuild(cooperative=False, name=entry_name, signature=types.void(*argtypes), codelibrary=lib,
                              debug=False, lineinfo=False, call_helper=None, extensions=[])
    kernel.target_context = target_context
    lib.get_cufunc()                    # load it now: a bad cubin fails here, not at its first launch
    return kernel


def prepare(plan, progress=None):
    """Compile or load ahead of use every (kernel, argument types) of plan (e.g. launch.planning()'s). Those on
    disk are loaded first; progress(i, n, name) is called as each of the n others is compiled (nothing when all
    are cached). Returns (loaded, compiled)."""
    to_compile, loaded = [], 0
    for kernel, argtypes in dict.fromkeys(plan):          # in order, each once
        if argtypes in kernel.overloads:
            continue
        path = None
        if hasattr(kernel._cache, "locate"):               # a numbattn kernel (kernels/common.py `kernel`)
            path, _ = kernel._cache.locate(argtypes, kernel.targetctx)
        if path is not None and path.is_file():
            before = COUNTS["loaded"]
            kernel.compile(argtypes)                       # finds it on disk (or compiles a bad entry again)
            loaded += COUNTS["loaded"] - before
        else:
            to_compile.append((kernel, argtypes))
    for i, (kernel, argtypes) in enumerate(to_compile):
        if progress is not None:
            progress(i, len(to_compile), kernel.py_func.__name__)
        kernel.compile(argtypes)
    if progress is not None and to_compile:
        progress(len(to_compile), len(to_compile), "")
    return loaded, len(to_compile)
