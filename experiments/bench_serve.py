"""Load test of the OpenAI-compatible server (llama_jax.serve): N concurrent clients x M requests, loopback only.

    python experiments/bench_serve.py --clients=8 --requests=4 --max_tokens=32
    python experiments/bench_serve.py --url=http://127.0.0.1:8000     # a server already running

Without ``--url`` it starts ``python -m llama_jax.serve`` on a free 127.0.0.1 port for each configuration
(``--configs``: "prefix" / "noprefix" = paged KV cache with / without the prefix cache, "dense" /
"dense_noprefix" = the dense cache, every row reserving ``--max_length`` slots; the same cache bytes in all) and
stops it afterwards. Every request is a chat
completion streamed over SSE; the script prints requests/s, output tokens/s, p50/p99 time to first token and
per-token latency, and checks that every request got a complete answer (a finish_reason and ``data: [DONE]``).
Requests share a system prompt of ``--system_tokens`` words, so the prefix cache has something to share.

It also prints the concurrency fit (no server needed): with one cache budget, how many requests of a mix
(``--mix``: many short, a few long) fit at once with a dense cache (every row reserves ``max_length``) vs a paged
one (a row holds only the pages its tokens use), computed by the scheduler's own page allocator
(``llama_jax.scheduler.PagePool``): ``python experiments/bench_serve.py --fit_only``.

Bounded: at most ``--clients`` x ``--requests`` requests, each with a ``--timeout``; only 127.0.0.1 is contacted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

from absl import app, flags

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def concurrency_fit(
    lengths: list[int], budget_tokens: int, max_length: int, page_size: int, repeat: bool = False
) -> dict:
    """How many of the requests (their total lengths, prompt + max_tokens, admitted in order) run at once with a
    cache of ``budget_tokens`` slots (the same bytes both ways): a dense row reserves ``max_length`` slots; a paged
    row is admitted by the scheduler's own allocator (:class:`llama_jax.scheduler.PagePool`, a pool of
    budget / page_size pages), which promises it ceil(length / page_size) pages. Returns {"dense": rows,
    "paged": rows, "budget_tokens", "page_size", "pages_promised"}. ``repeat``: the mix arrives over and over
    (in its order) until a request no longer fits, so both counts measure a full cache."""
    from llama_jax.scheduler import PagePool

    pool = PagePool(budget_tokens // page_size, page_size)
    total = len(lengths) * (budget_tokens // page_size + 1 if repeat else 1)  # each request takes >= 1 page
    dense = min(total, budget_tokens // max_length)
    paged = 0
    while paged < total:
        n = lengths[paged % len(lengths)]
        if pool.admit([0], pool.pages_for(min(n, max_length))) is None:
            break
        paged += 1
    return {
        "dense": dense,
        "paged": paged,
        "budget_tokens": budget_tokens,
        "page_size": page_size,
        "pages_promised": pool.stats()["promised"],
    }


#: --configs: server flags of each compared configuration (the cache budget is the same bytes in all of them:
#: the paged pool defaults to max_batch x max_length slots + the prefix cache's pages, as the dense cache).
CONFIGS = {
    "prefix": ["--kv_layout=paged"],
    "noprefix": ["--kv_layout=paged", "--prefix_cache_pages=0"],
    "dense": ["--kv_layout=dense"],
    "dense_noprefix": ["--kv_layout=dense", "--prefix_cache_pages=0"],
}


def _define_flags():
    flags.DEFINE_string("url", None, "A running server (http://127.0.0.1:PORT); default: start one per config.")
    flags.DEFINE_integer("clients", 8, "Concurrent clients.")
    flags.DEFINE_integer("requests", 4, "Requests per client.")
    flags.DEFINE_integer("max_tokens", 32, "New tokens per request.")
    flags.DEFINE_integer("system_tokens", 500, "Words (about one token each) in the shared system prompt.")
    flags.DEFINE_float("timeout", 600.0, "Seconds per request.")
    flags.DEFINE_list(
        "configs",
        ["prefix", "noprefix", "dense"],
        f"Server configurations to compare (without --url): {', '.join(CONFIGS)} (prefix/noprefix: paged KV cache "
        "with/without the prefix cache; dense: every row reserves --max_length slots, prefix cache on).",
    )
    flags.DEFINE_integer("max_batch", 8, "--max_batch of the started server.")
    flags.DEFINE_integer("max_length", 1024, "--max_length of the started server.")
    flags.DEFINE_string("checkpoint", None, "--checkpoint of the started server (default SmolLM2).")
    flags.DEFINE_string("mix", "200x28,3000x4", "Concurrency fit: LENGTHxCOUNT,... (prompt + output tokens).")
    flags.DEFINE_integer("fit_budget", 16 * 4096, "Concurrency fit: cache slots.")
    flags.DEFINE_integer("fit_max_length", 4096, "Concurrency fit: the dense cache's row length.")
    flags.DEFINE_integer("fit_page_size", 16, "Concurrency fit: tokens per page.")
    flags.DEFINE_bool("fit_only", False, "Print the concurrency fit only (no server).")


def _percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _one_request(base: str, system: str, i: int, timeout: float) -> dict:
    import httpx

    body = {
        "model": None,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"Question {i}: name a colour."},
        ],
        "max_tokens": FLAGS.max_tokens,
        "temperature": 0,
        "stream": True,
    }
    body.pop("model")
    t0 = time.perf_counter()
    times, reason, done = [], None, False
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            return {"ok": False, "status": r.status_code}
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            c = chunk["choices"][0] if chunk.get("choices") else {}
            if c.get("delta", {}).get("content"):
                times.append(time.perf_counter())
            reason = c.get("finish_reason") or reason
    return {"ok": done and reason is not None, "t0": t0, "times": times, "end": time.perf_counter()}


def load_test(base: str, label: str) -> dict:
    import httpx

    host = urllib.parse.urlparse(base).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"error: --url: {base}: only loopback servers may be benchmarked")
    words = "the quick brown fox jumps over the lazy dog and then".split()  # about one token per word
    system = " ".join(words[i % len(words)] for i in range(FLAGS.system_tokens))
    results: list[dict] = []
    lock = threading.Lock()

    def client(c):
        for m in range(FLAGS.requests):
            try:
                r = _one_request(base, system, c * FLAGS.requests + m, FLAGS.timeout)
            except httpx.HTTPError as e:
                r = {"ok": False, "error": str(e)}
            with lock:
                results.append(r)

    before = httpx.get(base + "/health", timeout=30).json()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(FLAGS.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(FLAGS.timeout * FLAGS.requests + 60)
    wall = time.perf_counter() - start
    good = [r for r in results if r.get("ok")]
    for r in results:
        if not r.get("ok"):
            print(
                f"warning: {label}: a request failed: {r.get('status') or r.get('error') or 'incomplete'}",
                file=sys.stderr,
            )
    ttft = [r["times"][0] - r["t0"] for r in good if r["times"]]
    tpot = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in good if len(r["times"]) > 1]
    after = httpx.get(base + "/health", timeout=30).json()
    health = {
        k: after.get(k, 0) - before.get(k, 0)
        for k in ("tokens_generated", "prompt_tokens_prefilled", "prefix_cache_hit_tokens")
    }
    tokens = sum(len(r["times"]) for r in good)
    return {
        "config": label,
        "requests": len(results),
        "complete": len(good),
        "wall_s": wall,
        "req_s": len(good) / wall,
        "out_chunks_s": tokens / wall,
        "tokens_generated": health.get("tokens_generated"),
        "tok_s": (health.get("tokens_generated") or 0) / wall,
        "ttft_p50": _percentile(ttft, 0.5),
        "ttft_p99": _percentile(ttft, 0.99),
        "tpot_p50": _percentile(tpot, 0.5),
        "tpot_p99": _percentile(tpot, 0.99),
        "prefilled": health.get("prompt_tokens_prefilled"),
        "prefix_hits": health.get("prefix_cache_hit_tokens", 0),
    }


def _start_server(extra: list[str]):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [
        sys.executable,
        "-m",
        "llama_jax.serve",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--max_batch={FLAGS.max_batch}",
        f"--max_length={FLAGS.max_length}",
        *extra,
    ]
    if FLAGS.checkpoint:
        args.append(f"--checkpoint={FLAGS.checkpoint}")
    proc = subprocess.Popen(args, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("error: the server did not start")


def main(argv):
    del argv
    mix = []
    for part in FLAGS.mix.split(","):
        length, _, count = part.partition("x")
        mix += [int(length)] * int(count or 1)
    fit = concurrency_fit(mix, FLAGS.fit_budget, FLAGS.fit_max_length, FLAGS.fit_page_size, repeat=True)
    print(
        f"concurrency fit, budget {fit['budget_tokens']} slots, mix {FLAGS.mix} arriving over and over: dense "
        f"{fit['dense']} rows (each reserves {FLAGS.fit_max_length}), paged {fit['paged']} rows (pages of "
        f"{fit['page_size']}, {fit['pages_promised']} of {FLAGS.fit_budget // FLAGS.fit_page_size} promised)"
    )
    if FLAGS.fit_only:
        return 0
    unknown = [c for c in FLAGS.configs if c not in CONFIGS]
    if unknown:
        print(f"error: --configs: unknown {unknown}; choose from {list(CONFIGS)}", file=sys.stderr)
        return 1
    rows = []
    if FLAGS.url:
        rows.append(load_test(FLAGS.url.rstrip("/"), "given"))
    else:
        for config in FLAGS.configs:
            proc, base = _start_server(CONFIGS[config])
            try:
                load_test(base, config + " (warm-up)") if FLAGS.requests > 1 else None
                rows.append(load_test(base, config))
            finally:
                proc.terminate()
                proc.wait(120)
    print(
        f"{FLAGS.clients} clients x {FLAGS.requests} requests, {FLAGS.max_tokens} new tokens, "
        f"{FLAGS.system_tokens}-word shared system prompt"
    )
    print(
        "| config | complete | req/s | out tok/s | TTFT p50 / p99 s | per-token p50 / p99 s | prefilled | prefix hits |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {r['complete']}/{r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
            f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f} | {r['tpot_p50']:.3f} / {r['tpot_p99']:.3f} | "
            f"{r['prefilled']} | {r['prefix_hits']} |"
        )
    return 0 if all(r["complete"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    _define_flags()
    app.run(main)
