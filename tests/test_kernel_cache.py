"""numbattn/kernel_cache.py: compiled kernels kept on disk.

Without a GPU nothing compiles (the simulator runs kernels as Python), so these check the two layers that decide
everything: the key (what changes it and what does not, the same in every process) and the store (entries
written atomically, checked when read, two processes filling it at once). The `gpu` tests at the end run the real
thing: kernels compiled in one process, loaded by the next (zero compiles), a truncated entry compiled again.
"""
import json
import logging
import subprocess
import sys
import textwrap

import pytest
from children import child_env

from numbattn import kernel_cache as kc
from numbattn.kernels import gemm, gemv, rowwise

TARGET = ("(12, 8)", "(9, 0)")


def py_func(kernel):
    """The Python function of a kernel: a Numba dispatcher's py_func, or the simulator's fn."""
    return getattr(kernel, "py_func", None) or kernel.fn


def description(kernel, argtypes=("array(float32, 2d, C)",)):
    options = getattr(kernel, "targetoptions", {"fastmath": {"contract"}})
    return kc.describe(py_func(kernel), options, argtypes, TARGET)


# ---- the key ------------------------------------------------------------------------------------------------
def test_same_factory_arguments_same_key_and_a_changed_constant_another():
    """make_gemm's closure holds the tile sizes: built twice with the same ones (two distinct function objects:
    the factory's lru_cache bypassed), the key is the same; other tiles, another epilogue, another K: another."""
    a = kc.fingerprint(py_func(gemm.make_gemm.__wrapped__("bf16", "none", gemm.GEMM_TILES)))
    b = kc.fingerprint(py_func(gemm.make_gemm.__wrapped__("bf16", "none", gemm.GEMM_TILES)))
    assert a == b
    other_tiles = (16, 32, 8, 4)
    assert kc.fingerprint(py_func(gemm.make_gemm.__wrapped__("bf16", "none", other_tiles))) != a
    assert kc.fingerprint(py_func(gemm.make_gemm.__wrapped__("bf16", "residual", gemm.GEMM_TILES))) != a
    assert kc.fingerprint(py_func(gemv.make_gemv.__wrapped__(40, "bf16", 1))) != \
        kc.fingerprint(py_func(gemv.make_gemv.__wrapped__(48, "bf16", 1)))


def test_argument_types_options_and_target_are_in_the_key():
    k = rowwise.make_rms_norm()
    base = kc.entry_path("/c", description(k))
    assert kc.entry_path("/c", description(k)) == base
    assert kc.entry_path("/c", description(k, ("array(float16, 2d, C)",))) != base
    assert kc.entry_path("/c", kc.describe(py_func(k), {"fastmath": set()}, ("array(float32, 2d, C)",), TARGET)) != base
    assert kc.entry_path("/c", kc.describe(py_func(k), {"fastmath": {"contract"}}, ("array(float32, 2d, C)",),
                                           ("(12, 8)", "(8, 0)"))) != base


def write_modules(folder, scale_body, comment=""):
    """Two modules: dep_mod (a device function) and kern_mod (a kernel calling it through an import)."""
    (folder / "dep_mod.py").write_text(textwrap.dedent(f"""\
        from numba import cuda
        FACTOR = 2.0


        @cuda.jit(device=True)
        def scale(x):{comment}
            return {scale_body}
        """))
    (folder / "kern_mod.py").write_text(textwrap.dedent("""\
        from numba import cuda
        from dep_mod import scale


        @cuda.jit
        def kern(x):
            x[0] = scale(x[0])
        """))


def kernel_fingerprint(folder):
    import importlib
    for name in ("dep_mod", "kern_mod"):
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    return kc.fingerprint(py_func(importlib.import_module("kern_mod").kern))


def test_a_changed_line_in_a_device_function_of_another_file_changes_the_key_a_comment_does_not(tmp_path,
                                                                                                 monkeypatch):
    """What Numba's own cache misses: the kernel's file is unchanged, the device function it calls (in another
    module) changes. A changed expression or module constant changes the key; a comment does not."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)        # every import reads the source it is given
    try:
        write_modules(tmp_path, "x * FACTOR")
        base = kernel_fingerprint(tmp_path)
        write_modules(tmp_path, "x * FACTOR", comment="  # a comment changes nothing compiled")
        assert kernel_fingerprint(tmp_path) == base
        write_modules(tmp_path, "x * FACTOR + 1.0")
        assert kernel_fingerprint(tmp_path) != base
        write_modules(tmp_path, "x * FACTOR")
        (tmp_path / "dep_mod.py").write_text((tmp_path / "dep_mod.py").read_text().replace("2.0", "3.0"))
        assert kernel_fingerprint(tmp_path) != base
    finally:
        for name in ("dep_mod", "kern_mod"):
            sys.modules.pop(name, None)


FILL_SCRIPT = """
import json, sys
from numbattn import kernel_cache as kc, prefill
from numbattn.kernels import gemm, gemv, rowwise
kernels = [gemm.make_gemm("bf16", "swiglu"), gemv.make_gemv(40, "bf16", 1, "residual", True),
           rowwise.make_rope_append(4, 2, 16), prefill.make_kernel("v3", 16, prefill.SIM_TILES["v3"])]
folder, mode = sys.argv[1], sys.argv[2]
found = []
for k in kernels:
    d = kc.describe(k.fn, {}, ("array(float32, 2d, C)",), ("(12, 8)", "(9, 0)"))
    path = kc.entry_path(folder, d)
    if mode == "fill":
        kc.write_entry(path, d, "entry_" + k.fn.__name__, ("cubin of " + d["code"]).encode())
    else:
        got = kc.read_entry(path, d)
        found.append(got is not None and got[1] == ("cubin of " + d["code"]).encode())
print(json.dumps(found))
"""


def run_script(script, *args, seed="0"):
    env = child_env(NUMBA_ENABLE_CUDASIM="1", PYTHONHASHSEED=seed)
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_second_process_finds_every_entry_the_first_wrote(tmp_path):
    """Keys are the same in every process (string hashing randomised differently in each): what one process
    stored, the next one finds, all of it (on a GPU: zero compiles, test_second_process_compiles_nothing)."""
    run_script(FILL_SCRIPT, str(tmp_path), "fill", seed="1")
    assert json.loads(run_script(FILL_SCRIPT, str(tmp_path), "read", seed="2")) == [True] * 4
    assert kc.summary(tmp_path)[1] == 4


# ---- the store ----------------------------------------------------------------------------------------------
DESC = {"format": 1, "kernel": "numbattn.kernels.x.make.<locals>.k", "code": "ab", "argtypes": ["int32"]}


def test_an_entry_reads_back_whole(tmp_path):
    path = kc.entry_path(tmp_path, DESC)
    assert kc.read_entry(path, DESC) is None                        # nothing there yet: a plain miss
    kc.write_entry(path, DESC, "_Z1kPi", b"\x7fELF" + bytes(range(256)) * 40)
    assert kc.read_entry(path, DESC) == ("_Z1kPi", b"\x7fELF" + bytes(range(256)) * 40)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]       # no temporary file left behind
    assert kc.summary(tmp_path) == (tmp_path, 1, path.stat().st_size)


@pytest.mark.parametrize("damage,reason", [
    (lambda b: b[:len(b) - 100], "truncated"),                          # a write cut short (a full disk, a kill)
    (lambda b: b[:30], "not a numbattn kernel cache entry"),
    (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "does not match its checksum"),   # one flipped bit
    (lambda b: b.replace(b'"code": "ab"', b'"code": "cd"'), "another kernel"),
    (lambda b: b"garbage", "not a numbattn kernel cache entry"),
])
def test_a_damaged_entry_is_reported_removed_and_missed(tmp_path, caplog, damage, reason):
    path = kc.entry_path(tmp_path, DESC)
    kc.write_entry(path, DESC, "_Z1kPi", bytes(range(256)) * 8)
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="numbattn"):
        assert kc.read_entry(path, DESC) is None
    assert reason in caplog.text and "compiling the kernel again" in caplog.text
    assert not path.exists()                                          # the next compile writes a good one


def test_an_unwritable_folder_costs_the_reuse_only(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="numbattn"):
        kc.write_entry(kc.entry_path(blocker / "sub", DESC), DESC, "_Z1kPi", b"x")    # a file where a folder should be
    assert "could not write the kernel cache entry" in caplog.text


def test_the_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBATTN_KERNEL_CACHE", str(tmp_path / "k"))
    assert kc.cache_dir() == tmp_path / "k"
    monkeypatch.setenv("NUMBATTN_KERNEL_CACHE", "off")
    assert kc.cache_dir() is None and kc.summary() == (None, 0, 0)
    monkeypatch.delenv("NUMBATTN_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kc.cache_dir() == tmp_path / "xdg" / "numbattn" / "kernels"


RACE_SCRIPT = """
import sys
from pathlib import Path
from numbattn import kernel_cache as kc
folder, me = Path(sys.argv[1]), sys.argv[2]
entries = [({"format": 1, "kernel": "m.k%d" % i, "code": str(i)}, bytes([i]) * 300000) for i in range(24)]
for _ in range(3):
    for d, payload in entries:
        kc.write_entry(kc.entry_path(folder, d), d, "k", payload)
        got = kc.read_entry(kc.entry_path(folder, d), d)
        assert got == ("k", payload), (me, d)
print("ok", me)
"""


def test_two_processes_filling_the_cache_at_once_both_succeed(tmp_path):
    """Both write the same entries (as two processes compiling the same kernels would) and read each back at
    once: every read sees a whole entry (never a half-written one), nothing is reported damaged."""
    env = child_env(NUMBA_ENABLE_CUDASIM="1")
    procs = [subprocess.Popen([sys.executable, "-c", RACE_SCRIPT, str(tmp_path), str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and out.startswith("ok") and "WARNING" not in err and "damaged" not in err, err
    assert kc.summary(tmp_path)[1] == 24
    assert not list(tmp_path.glob(".*.tmp"))


# ---- real GPU only --------------------------------------------------------------------------------------------
GPU_SCRIPT = """
import json, sys
import numpy as np
from numba import cuda
from numbattn import kernel_cache as kc, linear
from tinyllm.weights import f32_to_bf16
rng = np.random.default_rng(0)
x = cuda.to_device(rng.standard_normal((3, 256), dtype=np.float32))
words, kind = linear.pack_weight(f32_to_bf16(rng.standard_normal((96, 256), dtype=np.float32)))
w = cuda.to_device(words)
outs = []
for m in (1, 3):
    out = cuda.device_array((m, 96), np.float32)
    linear.linear(x[:m], w, kind, out)
    outs.append(out.copy_to_host().tolist())
print(json.dumps(dict(kc.COUNTS, outs=outs)))
"""


def gpu_run(folder):
    env = child_env(NUMBATTN_KERNEL_CACHE=str(folder))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", GPU_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


@pytest.mark.gpu
def test_second_process_compiles_nothing_and_a_truncated_entry_is_compiled_again(tmp_path):
    first, _ = gpu_run(tmp_path)
    assert first["compiled"] >= 2 and first["loaded"] == 0
    second, _ = gpu_run(tmp_path)
    assert second["compiled"] == 0 and second["loaded"] == first["compiled"] and second["outs"] == first["outs"]
    victim = sorted(tmp_path.glob("*.kernel"))[0]
    victim.write_bytes(victim.read_bytes()[:-1000])
    third, err = gpu_run(tmp_path)
    assert third["compiled"] == 1 and "truncated" in err and third["outs"] == first["outs"]


@pytest.mark.gpu
def test_two_real_processes_compiling_at_once_both_succeed(tmp_path):
    env = child_env(NUMBATTN_KERNEL_CACHE=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", GPU_SCRIPT], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    outs = [json.loads(out.strip().splitlines()[-1])["outs"] for out, _ in results]
    assert outs[0] == outs[1]
    after, _ = gpu_run(tmp_path)
    assert after["compiled"] == 0


ATTACH_SCRIPT = """
import types
from numbattn.kernels import rowwise
k = rowwise.make_rms_norm()                        # a numbattn kernel: its disk cache attached by kernels.common
fake = types.SimpleNamespace(codegen=lambda: types.SimpleNamespace(magic_tuple=lambda: ((12, 8), (9, 0))))
from numba.core import types as nt
sig = (nt.float32[:, ::1], nt.float32[::1], nt.float32, nt.float32[:, ::1])
path, d = k._cache.locate(sig, fake)
print(type(k._cache).__name__, path.name, d["argtypes"][0], d["target"])
"""


def test_numba_kernels_carry_the_disk_cache(tmp_path):
    """Outside the simulator (no GPU needed to build a kernel object): a numbattn kernel's cache is ours, and it
    locates an entry from the argument types and the target, as Numba will ask it."""
    env = child_env(NUMBATTN_KERNEL_CACHE=str(tmp_path))
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    done = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    name, entry, argtype, target = done.stdout.split(" ", 3)
    assert name == "DiskCache" and entry.startswith("rms_norm-") and entry.endswith(".kernel")
    assert argtype == "array(float32," and "(9, 0)" in target


def test_cubins_round_trip_as_numba_cuda_holds_them():
    """numba-cuda 0.30 links a kernel into cuda.core's ObjectCode (the bytes in .code) and loads modules from one:
    the cache stores the bytes and hands an ObjectCode back."""
    from types import SimpleNamespace

    from numbattn.kernel_cache import cubin_bytes
    assert cubin_bytes(SimpleNamespace(code=b"\x7fELF...")) == b"\x7fELF..." == cubin_bytes(b"\x7fELF...")
    with pytest.raises(TypeError, match="not bytes"):
        cubin_bytes(SimpleNamespace(code="/a/path.cubin"))


def test_an_entry_whose_key_holds_nan_is_found_again(tmp_path):
    """A kernel that reads a NaN constant (the cache's fill_nan) has NaN in its description: NaN != NaN, so the
    entry must be matched as the text it was written as (on the H100 every such entry was compiled again)."""
    from numbattn.kernel_cache import entry_path, read_entry, write_entry
    description = {"kernel": "m.fill_nan", "code": [["NAN", float("nan")]], "argtypes": ["float32"]}
    path = entry_path(tmp_path, description)
    write_entry(path, description, "fill_nan", b"cubin")
    assert read_entry(path, description) == ("fill_nan", b"cubin")
