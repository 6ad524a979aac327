"""A load generator for any OpenAI-compatible server: N concurrent streaming completions, the same requests to each.

    python -m tinyllm.server.loadgen --url http://127.0.0.1:8080 --concurrency 1,8,32 --max-tokens 128
    python -m tinyllm.server.loadgen --url http://127.0.0.1:8081 ...     # llama.cpp's llama-server, same load

At each concurrency C, C clients each send `requests` streaming POST /v1/completions one after another: the same
prompt text (prompt_words words), max_tokens new tokens, greedy, ignore_eos (both tinyllm and llama-server take it),
so every request generates exactly max_tokens tokens. Measured per request, from the client's side:

    ttft_ms           time to the first streamed token (queueing and prefill included)
    token_ms          (time of the last token - time of the first) / (tokens - 1): the decode latency a user sees

and per level: throughput (completion tokens of all requests / wall time) and the medians of the above. The token
count comes from the final usage chunk (stream_options.include_usage) where the server sends one, else from the
number of streamed chunks. Only loopback URLs make sense for a benchmark here; nothing else is contacted.
"""
import argparse
import asyncio
import json
import statistics
import time

PROMPT_WORDS = ("the quick brown fox jumps over the lazy dog while a small robot counts the keys and values "
                "of every token in its cache").split()


def prompt_text(n_words):
    return " ".join(PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n_words))


async def one_request(session, url, model, prompt, max_tokens):
    """One streaming completion -> dict(ttft_ms, token_ms, tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:200]}")
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(c.get("text") for c in event.get("choices") or []):
                times.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(times)
    if not times:
        raise RuntimeError(f"{url}: a request streamed no text")
    return dict(ttft_ms=(times[0] - t0) * 1e3, tokens=tokens,
                token_ms=(times[-1] - times[0]) / max(tokens - 1, 1) * 1e3)


async def level(url, model, concurrency, requests, prompt, max_tokens):
    """C clients, `requests` each, one after another -> one row."""
    import aiohttp
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def client():
            return [await one_request(session, url, model, prompt, max_tokens) for _ in range(requests)]
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(concurrency))) for r in rs]
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return dict(concurrency=concurrency, requests=len(results), tokens=tokens, wall_s=wall,
                throughput_tok_s=tokens / wall, ttft_ms=statistics.median(r["ttft_ms"] for r in results),
                token_ms=statistics.median(r["token_ms"] for r in results),
                token_ms_p90=sorted(r["token_ms"] for r in results)[int(0.9 * (len(results) - 1))])


async def served_model(url):
    import aiohttp
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as resp:
        return (await resp.json())["data"][0]["id"]


def run_load(url, concurrencies=(1, 8, 32), requests=2, max_tokens=128, prompt_words=64, warmup=True, label=None):
    """Every level against the server at url -> rows (with speed-up and latency ratios against the first level).
    warmup: one untimed pass per level first (a GPU server compiles and captures its graphs then)."""
    url = url.rstrip("/")
    model = asyncio.run(served_model(url))
    prompt = prompt_text(prompt_words)
    rows = []
    for c in concurrencies:
        if warmup:
            asyncio.run(level(url, model, c, 1, prompt, min(max_tokens, 16)))
        row = asyncio.run(level(url, model, c, requests, prompt, max_tokens))
        rows.append(dict(server=label or url, **row))
    base = rows[0]
    for r in rows:
        r["x_throughput"] = r["throughput_tok_s"] / base["throughput_tok_s"]
        r["x_token_ms"] = r["token_ms"] / base["token_ms"]
    return rows


COLUMNS = ["server", "concurrency", "requests", "tokens", "throughput_tok_s", "x_throughput", "ttft_ms", "token_ms",
           "token_ms_p90", "x_token_ms"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8080")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    from numbattn.lab.bench import format_table
    rows = run_load(args.url, [int(c) for c in args.concurrency.split(",")], args.requests, args.max_tokens,
                    args.prompt_words)
    print(format_table(rows, COLUMNS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
