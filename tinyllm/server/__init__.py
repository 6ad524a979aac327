"""`tinyllm serve`: an OpenAI-compatible HTTP server with continuous batching over a paged KV cache.

    python cli.py serve --model checkpoints/tiny --port 8080
    curl http://127.0.0.1:8080/v1/chat/completions -H "Content-Type: application/json" \\
         -d '{"model": "checkpoints/tiny", "messages": [{"role": "user", "content": "Hi!"}]}'

    app.py         the routes (aiohttp): chat completions, completions, models, health; JSON or server-sent events
    protocol.py    the OpenAI API's requests (validated field by field) and responses, errors, stop strings
    scheduler.py   continuous batching: one thread, one decode step over every running request, prompts prefilled
                   in chunks between steps, pages freed when a request ends or its client leaves
    loadgen.py     a load generator for any OpenAI-compatible server (ours, llama.cpp's llama-server): throughput
                   and per-request token latency at N concurrent streams
"""
import asyncio
import logging

from .app import make_app, run
from .scheduler import Busy, Scheduler

log = logging.getLogger("tinyllm.server")

__all__ = ["serve", "make_app", "Scheduler", "Busy"]


def serve(llm, name, host="127.0.0.1", port=8080, max_seqs=32, max_queue=64, n_blocks=None, block_size=16,
          ready=None):
    """Serve llm as `name` until interrupted (Ctrl-C, SIGTERM). ready(url) is called once it listens."""
    scheduler = Scheduler(llm, max_seqs=max_seqs, max_queue=max_queue, n_blocks=n_blocks,
                          block_size=block_size).start()
    log.info("tinyllm serve: %r, %d sequences at once, %d KV pages of %d tokens (%s engine)", name, max_seqs,
             scheduler.cache.n_blocks, block_size, llm.engine)
    try:
        asyncio.run(run(make_app(llm, name, scheduler), host, port, ready))
    finally:
        scheduler.stop()
