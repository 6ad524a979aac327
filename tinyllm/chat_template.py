"""Chat templates: Jinja2 in a sandbox, rendered in a worker process with limits on time, memory and output.

    renderer = TemplateRenderer(source)
    text = renderer.render(messages=[...], add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    renderer.close()                       # or let it be garbage-collected

A chat template is a program that comes with the model. jinja2's ImmutableSandboxedEnvironment (what
transformers uses) keeps it away from Python's objects, but not from the machine: `{{ 'x' * 10**10 }}` asks
for 10 GB, two nested `range(100000)` loops run for hours, and one C-level operation (a big repetition, a
padding width, a power of a big integer, the repr of a list that contains itself twice, 40 levels deep)
cannot be stopped from Python at all. Checks inside the process (counting loop iterations, intercepting
operators) close some of these doors, never all. So the template renders in a worker process, this file
run as a script, and the limits are the operating system's:

  * time: render() waits RENDER_SECONDS for the answer, then kills the worker (the next render starts a
    new one, ~0.1 s);
  * memory: the worker's address space is capped at MEMORY_BYTES (RLIMIT_AS, POSIX), so a huge allocation
    is a MemoryError there, reported like any other template error;
  * output: a rendering longer than MAX_CHARS characters is refused (the worker stops as soon as it is
    past the limit).

Every failure -- a syntax error, a template that calls raise_exception, 1/0, a type error, runaway
recursion, a limit -- is a ChatTemplateError with a one-line message; the caller's state is untouched.
The worker starts on the first render and serves every later one over a pipe (one JSON line each way,
~0.1 ms). It runs in its own session and ignores SIGINT: Ctrl-C in a terminal goes to the whole
foreground process group, and the chat, not the renderer, decides what Ctrl-C means.
"""
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from datetime import datetime

RENDER_SECONDS = 5.0          # a real chat template renders a long conversation in milliseconds
STARTUP_SECONDS = 30.0        # a fresh worker imports jinja2 first (~0.1 s; more on a loaded machine)
MEMORY_BYTES = 512 << 20      # the worker's whole address space (the interpreter and jinja2 take ~25 MB)
MAX_CHARS = 4 << 20           # 4M characters: a 128k-token context is ~0.5M


class ChatTemplateError(ValueError):
    """A chat template that does not compile, refuses the conversation, fails, or exceeds a limit. The message
    is a verb phrase: "<file>: the chat template " + message reads as a sentence."""


# --------------------------------------------------------------------------------------------------------
# The template environment (used inside the worker)
# --------------------------------------------------------------------------------------------------------
def compile_template(source):
    """A chat template compiled as transformers compiles it: an immutable sandbox with trim_blocks and
    lstrip_blocks, the loopcontrols extension, the tojson filter and the raise_exception and strftime_now
    helpers. jinja2's lipsum() (random text of any length) is removed: no chat template uses it."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)
    return env.from_string(source)


def _render_limited(template, context):
    """Render chunk by chunk, stopping as soon as the text is longer than MAX_CHARS."""
    chunks, n = [], 0
    for chunk in template.generate(**context):
        n += len(chunk)
        if n > MAX_CHARS:
            raise ChatTemplateError(f"produced more than {MAX_CHARS:,} characters: stopped")
        chunks.append(chunk)
    return "".join(chunks)


def _answer(request, compiled):
    """One request -> one reply dict: {"text": ...} or {"error": ...} (what went wrong, one line)."""
    from jinja2 import TemplateError, TemplateSyntaxError
    source = request["source"]
    try:
        if source not in compiled:
            compiled.clear()                 # one template per tokenizer: keep the last one only
            compiled[source] = compile_template(source)
        return {"text": _render_limited(compiled[source], request["context"])}
    except TemplateSyntaxError as e:
        return {"error": f"does not compile: {e} (line {e.lineno})"}
    except TemplateError as e:
        return {"error": f"refused the conversation: {e}"}
    except ChatTemplateError as e:
        return {"error": str(e)}
    except MemoryError:
        return {"error": f"failed: it needed more than {MEMORY_BYTES >> 20} MB of memory (MemoryError)"}
    except Exception as e:           # 1/0, 'a' + 1, RecursionError, OverflowError...: the template's fault
        return {"error": f"failed: {type(e).__name__}: {e}"}


def _serve():
    """The worker's loop: a JSON request per line on stdin, a JSON reply per line on stdout, until EOF."""
    here = os.path.dirname(os.path.abspath(__file__))     # run as a script, tinyllm/ is sys.path[0]: its modules
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]   # must not shadow anyone's imports
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    except (ImportError, ValueError, OSError):   # not POSIX, or a lower hard limit: time and output still hold
        pass
    import jinja2.sandbox  # noqa: F401  (imported before "ready": render times are the template's own)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    compiled = {}
    for line in sys.stdin:
        reply = _answer(json.loads(line), compiled)
        sys.stdout.write(json.dumps(reply, ensure_ascii=True) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------------------
# The parent's side
# --------------------------------------------------------------------------------------------------------
class TemplateRenderer:
    """Renders one chat template in a worker process (started on the first render, restarted after a kill)."""

    def __init__(self, source):
        self.source = source
        self._worker = None        # (Popen, queue of reply lines)
        self._finalizer = None

    def render(self, **context):
        """The template rendered with these variables -> str; ChatTemplateError if it fails or exceeds a limit.

        context must be JSON data (str, numbers, bools, None, lists, dicts), as a chat's messages are."""
        try:
            request = json.dumps({"source": self.source, "context": context}, ensure_ascii=True)
        except (TypeError, ValueError) as e:
            raise ChatTemplateError(f"cannot be given this conversation: not JSON data ({e})") from e
        if self._worker is None or self._worker[0].poll() is not None:    # none yet, or it died since
            self.close()
            self._start()
        reply = self._exchange(request, RENDER_SECONDS, f"did not finish rendering within {RENDER_SECONDS:g} s: "
                                                        f"stopped")
        if "error" in reply:
            raise ChatTemplateError(reply["error"])
        return reply["text"]

    def _exchange(self, request, seconds, late):
        """Send a request line (None: only listen) and return the worker's next reply (a dict), waiting at most
        `seconds`. On any failure the worker is stopped, so that no reply can come out of turn later."""
        proc, replies = self._worker
        try:
            if request is not None:
                proc.stdin.write(request + "\n")
                proc.stdin.flush()
            line = replies.get(timeout=seconds)
        except queue.Empty:
            self.close(kill=True)
            raise ChatTemplateError(late) from None
        except OSError:              # a broken pipe: the worker is gone
            line = None
        except BaseException:        # Ctrl-C while waiting
            self.close(kill=True)
            raise
        if line is None:             # the worker died (killed from outside, or out of memory before replying)
            code = proc.wait()
            self.close()
            raise ChatTemplateError(f"crashed its renderer (worker exit code {code})")
        return json.loads(line)

    def _start(self):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, encoding="ascii",
                                start_new_session=True)
        replies = queue.Queue()

        def read():                  # a thread, so that render() can wait with a timeout on any platform
            with proc.stdout:        # closed here, at the worker's end, by the only thread that reads it
                for line in proc.stdout:
                    replies.put(line)
            replies.put(None)
        reader = threading.Thread(target=read, name="chat-template-reader", daemon=True)
        reader.start()
        self._worker = (proc, replies)
        self._finalizer = weakref.finalize(self, _stop, proc, reader)
        self._exchange(None, STARTUP_SECONDS, f"could not start its renderer within {STARTUP_SECONDS:g} s")

    def close(self, kill=False):
        """Stop the worker (the next render starts a new one); kill: at once, even in the middle of a render."""
        if kill and self._worker is not None:
            self._worker[0].kill()
        if self._finalizer is not None:
            self._finalizer()
        self._worker = self._finalizer = None


def _stop(proc, reader):
    """End a worker: EOF on its stdin lets an idle one exit; a busy one is killed. Its pipes are closed (the
    reader closes stdout once it has read the worker's end), or Python warns of unclosed files."""
    try:
        proc.stdin.close()
    except OSError:
        pass
    deadline = time.monotonic() + 0.5
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    reader.join(timeout=1)


if __name__ == "__main__":
    _serve()
