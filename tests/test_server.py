"""`tinyllm serve` through the official `openai` client: a live server on a random loopback port, a miniature
checkpoint, the NumPy engine (the paged kernels themselves are tested in the simulator: test_paged.py).

What is held: greedy answers identical to Llama.generate for the same prompt (chat and completion, streamed or
not); 16 concurrent streaming clients each get exactly their own tokens; a client that disconnects mid-stream
frees its pages (counted through /health); malformed and hostile requests get OpenAI error objects with the right
status while a stream in flight is undisturbed; past the bounded queue, 503 with Retry-After; the server still
answers after all of it. Every server started here is stopped by its fixture, also when a test fails; every wait
is bounded.
"""
import concurrent.futures
import http.client
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai  # the official client (the test extra installs it)
import pytest
from children import child_env

from tinyllm import StreamDecoder, load_model, make_tiny

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60


def start_server(model_dir, *args, backend="numpy", timeout=TIMEOUT):
    """`cli.py serve` on port 0 -> (process, base url), once it says it listens (at most `timeout` s)."""
    env = child_env()
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", "-m", str(model_dir), "--backend", backend,
                             "--port", "0", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    stop_server(proc)
    raise RuntimeError(f"the server did not start: {''.join(lines)[-2000:]}")


def stop_server(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    proc.stderr.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny_serve"), seed=0, max_position_embeddings=512)


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir, "--parallel", "16")
    try:
        yield url
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def reference(model_dir):
    return load_model(model_dir, backend="numpy")


def name(model_dir):
    return str(model_dir)


def alone(reference, ids, max_new, context=()):
    """What Llama.generate answers (greedy) -> (text as the server assembles it, number of tokens)."""
    reference.reset()
    result = reference.generate(ids, max_new_tokens=max_new)
    stream = StreamDecoder(reference.tokenizer, context_ids=context)
    return "".join(stream.feed(t) for t in result.ids) + stream.flush(), len(result.ids)


def chat_ids(reference, text):
    return reference.tokenizer.encode_chat([{"role": "user", "content": text}])


def health(url):
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=TIMEOUT)
    conn.request("GET", "/health")
    body = json.loads(conn.getresponse().read())
    conn.close()
    return body


def raw(url, method, path, body=b"", headers=None):
    """One raw HTTP request -> (status, headers, decoded JSON body)."""
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=TIMEOUT)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(data)


def test_chat_and_completion_match_generate(client, model_dir, reference):
    for text, n in (("What is the capital of France?", 12), ("Tell me a story", 30)):
        got = client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": text}],
                                             max_tokens=n, temperature=0)
        want, n_tokens = alone(reference, chat_ids(reference, text), n)
        assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
        assert got.usage.completion_tokens == n_tokens and got.usage.prompt_tokens == len(chat_ids(reference, text))
        assert got.choices[0].finish_reason == ("length" if n_tokens == n else "stop")
    ids = reference.tokenizer.encode("Once upon a time")
    got = client.completions.create(model=name(model_dir), prompt="Once upon a time", max_tokens=16, temperature=0)
    assert got.choices[0].text == alone(reference, ids, 16, context=ids)[0]
    by_ids = client.completions.create(model=name(model_dir), prompt=ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == got.choices[0].text
    assert client.models.list().data[0].id == name(model_dir)


def test_streams_equal_the_whole_answer(client, model_dir, reference):
    text = "Hello world! How are you today?"
    chunks = list(client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": text}],
                                                 max_tokens=24, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    want, n_tokens = alone(reference, chat_ids(reference, text), 24)
    assert streamed == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_tokens
    pieces = client.completions.create(model=name(model_dir), prompt="The quick brown fox", max_tokens=10,
                                       temperature=0, stream=True)
    ids = reference.tokenizer.encode("The quick brown fox")
    assert "".join(c.choices[0].text for c in pieces) == alone(reference, ids, 10, context=ids)[0]


def test_sixteen_concurrent_streams_each_get_their_own_tokens(client, model_dir, reference, server):
    prompts = [(f"Tell me about {w} number {i}", 24 + 3 * i) for i, w in
               enumerate("fox dog robot water sun moon code queries keys values cache token pirate helicopter "
                         "France Paris".split())]

    def one(prompt, n):
        stream = client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": prompt}],
                                                max_tokens=n, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda pn: one(*pn), prompts))
    for (prompt, n), text in zip(prompts, got):
        assert text == alone(reference, chat_ids(reference, prompt), n)[0], prompt
    assert health(server)["largest_decode_batch"] > 1, health(server)   # they were decoded together


def test_stop_strings_and_seeds(client, model_dir, reference):
    want, _ = alone(reference, chat_ids(reference, "Good morning"), 40)
    stop = want[6:8]
    cut = want[:want.find(stop)]
    for stream in (False, True):
        got = client.chat.completions.create(model=name(model_dir),
                                             messages=[{"role": "user", "content": "Good morning"}], max_tokens=40,
                                             temperature=0, stop=[stop, "never-seen"], stream=stream)
        text = ("".join(c.choices[0].delta.content or "" for c in got if c.choices) if stream
                else got.choices[0].message.content)
        assert text == cut
    sample = lambda seed: client.completions.create(model=name(model_dir), prompt="Hello", max_tokens=12,  # noqa: E731
                                                    temperature=1.0, seed=seed).choices[0].text
    assert sample(7) == sample(7)


def test_a_client_that_disconnects_frees_its_pages(client, model_dir, server):
    before = health(server)
    stream = client.completions.create(model=name(model_dir), prompt="Once", max_tokens=480, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    during = health(server)
    assert during["requests_running"] == 1 and during["kv_blocks_free"] < during["kv_blocks_total"]
    stream.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and health(server)["requests_running"]:
        time.sleep(0.05)
    after = health(server)
    assert after["requests_running"] == 0 and after["kv_blocks_free"] == after["kv_blocks_total"]
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["requests_done"] == before["requests_done"]         # it ended by the disconnect, not by length


def test_a_waiting_non_streaming_client_that_leaves_frees_its_pages(model_dir, server):
    """Not streamed: the client sends its request and closes the connection before the answer."""
    import socket
    before = health(server)
    body = json.dumps(dict(model=name(model_dir), prompt="Once", max_tokens=480, temperature=0,
                           ignore_eos=True)).encode()
    host, port = server.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and health(server)["requests_running"] == 0:
            time.sleep(0.01)
    while time.monotonic() < deadline and health(server)["requests_running"]:
        time.sleep(0.05)
    after = health(server)
    assert after["requests_cancelled"] == before["requests_cancelled"] + 1
    assert after["kv_blocks_free"] == after["kv_blocks_total"] and after["requests_done"] == before["requests_done"]


BAD_REQUESTS = [      # (path, body, status, param) -- each answered with an OpenAI error object
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"\xff\xfe\xfd", 400, None),
    ("/v1/chat/completions", b"[" * 100000 + b"]" * 100000, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}, 400, "frobnicate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
]


def test_bad_requests_get_errors_and_disturb_nothing(client, model_dir, server, reference):
    prompt = "Tell me a story about a small robot."
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(lambda: "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=name(model_dir), messages=[{"role": "user", "content": prompt}], max_tokens=60, temperature=0,
                stream=True) if c.choices))
        for path, body, status, param in BAD_REQUESTS:
            if isinstance(body, dict) and "model" not in body and param != "model":
                body = dict(body, model=name(model_dir))
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            got, _, answer = raw(server, "POST", path, data)
            assert got == status and answer["error"]["param"] == param, (body if len(data) < 200 else data[:50], answer)
            assert answer["error"]["message"] and answer["error"]["type"]
        assert raw(server, "GET", "/v1/chat/completions")[0] == 405
        assert raw(server, "POST", "/v1/nowhere", b"{}")[0] == 404
        assert raw(server, "POST", "/v1/completions", b"x" * (5 * 2**20))[0] == 413
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="not-served", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="context length"):
            client.completions.create(model=name(model_dir), prompt="word " * 600, max_tokens=2)
        assert in_flight.result(TIMEOUT) == alone(reference, chat_ids(reference, prompt), 60)[0]
    state = health(server)
    assert state["status"] == "ok" and state["requests_running"] == 0 and state["requests_failed"] == 0
    assert state["kv_blocks_free"] == state["kv_blocks_total"]
    again = client.chat.completions.create(model=name(model_dir), messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    assert again.choices[0].message.content == alone(reference, chat_ids(reference, "Hi"), 4)[0]


def test_past_the_queue_503_with_retry_after(model_dir):
    proc, url = start_server(model_dir, "--parallel", "1", "--max-queue", "1")
    try:
        busy = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        long = dict(model=name(model_dir), prompt="Once", max_tokens=400, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
        running = busy.completions.create(**long)
        next(iter(running))                                            # it holds the one seat
        waiting = busy.completions.create(**long)                      # it waits (the queue holds one)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and health(url)["requests_waiting"] == 0:
            time.sleep(0.02)
        status, headers, answer = raw(url, "POST", "/v1/completions",
                                      json.dumps(dict(model=name(model_dir), prompt="hi", max_tokens=2)).encode())
        assert status == 503 and headers["Retry-After"] == "1" and answer["error"]["code"] == "server_overloaded"
        running.close()
        waiting.close()
        while time.monotonic() < deadline and health(url)["kv_blocks_free"] != health(url)["kv_blocks_total"]:
            time.sleep(0.05)
        state = health(url)
        assert state["kv_blocks_free"] == state["kv_blocks_total"] and state["requests_waiting"] == 0
    finally:
        stop_server(proc)


def test_load_generator_measures_this_server(server):
    """tinyllm.server.loadgen (the serving benchmark's client): every request generates exactly max_tokens."""
    from tinyllm.server.loadgen import run_load
    rows = run_load(server, concurrencies=(1, 4), requests=2, max_tokens=8, prompt_words=5, warmup=False)
    assert [r["concurrency"] for r in rows] == [1, 4] and [r["tokens"] for r in rows] == [16, 64]
    assert all(r["throughput_tok_s"] > 0 and r["token_ms"] > 0 for r in rows) and rows[0]["x_throughput"] == 1


def test_a_taken_port_is_one_error_line(server, model_dir):
    port = server.rsplit(":", 1)[1]
    env = child_env()
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "serve", "-m", str(model_dir), "--backend", "numpy",
                           "--port", port], capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 1 and f"error: cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_on_the_gpu_concurrent_streams_equal_each_alone(model_dir):
    """The device engine behind the server (paged decode kernels, graphs per batch bucket): 12 concurrent greedy
    streams, each identical to the device model's own generate of the same prompt."""
    device_model = load_model(model_dir, backend="cuda")
    proc, url = start_server(model_dir, "--parallel", "16", backend="cuda", timeout=5 * TIMEOUT)
    try:
        gpu_client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=5 * TIMEOUT)
        prompts = [(f"Tell me about number {i}", 20 + 5 * i) for i in range(12)]

        def one(prompt, n):
            stream = gpu_client.chat.completions.create(model=name(model_dir), stream=True, max_tokens=n,
                                                        temperature=0, messages=[{"role": "user", "content": prompt}])
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda pn: one(*pn), prompts))
        for (prompt, n), text in zip(prompts, got):
            assert text == alone(device_model, chat_ids(device_model, prompt), n)[0], prompt
    finally:
        stop_server(proc)
