"""The OpenAI-compatible server (llama_jax.serve, issue 16) as a real process on 127.0.0.1, driven by the official
``openai`` client: answers, streaming, tool calls, concurrency, echo log-probabilities against llama_jax's own
log-likelihoods, error statuses, a disconnected stream freeing its row, and a clean SIGTERM shutdown.

One server (SmolLM2-135M-Instruct, 8 rows, 512-token context, a queue of 2) serves the whole module; every
network call has a bounded timeout and goes to 127.0.0.1 only.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from tests.conftest import REPO

sys.path.insert(0, os.path.join(REPO, "experiments"))
import eval as ev  # noqa: E402

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MAX_BATCH, MAX_LENGTH, MAX_QUEUE = 8, 512, 2
STARTUP_S = 900  # first start converts nothing (fixture) but compiles prefill/decode on a loaded 2-core CPU
REQUEST_S = 600
MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smollm2_checkpoint):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llama_jax_serve_{port}.log"), "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_jax.serve",
            f"--checkpoint={smollm2_checkpoint}",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--max_batch={MAX_BATCH}",
            f"--max_length={MAX_LENGTH}",
            f"--max_queue={MAX_QUEUE}",
            "--shutdown_timeout=20",
        ],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + STARTUP_S
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("server did not come up")
        time.sleep(1)
    yield base, proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("server did not stop within 120 s of SIGTERM")
    log.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=REQUEST_S, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_checkpoint):
    from llama_jax import checkpoint
    from llama_jax.tokenizer import Tokenizer

    return Tokenizer.from_file(checkpoint.tokenizer_dir(smollm2_checkpoint))


def _health(server) -> dict:
    return httpx.get(server[0] + "/health", timeout=30).json()


def _wait_idle(server, timeout=60.0) -> dict:
    deadline = time.time() + timeout
    while True:
        h = _health(server)
        if h["rows_in_use"] == 0 and h["waiting"] == 0:
            return h
        assert time.time() < deadline, f"rows still in use: {h}"
        time.sleep(0.2)


def _chat(client, content, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, **kw
    )


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = _health(server)
    assert h["status"] == "ok" and h["rows"] == MAX_BATCH and h["max_length"] == MAX_LENGTH


def test_chat_capital_of_france(client):
    r = _chat(client, "What is the capital of France?", max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens >= 1 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_equals_non_streamed(client):
    q = "Write one sentence about the sea."
    whole = _chat(client, q, max_tokens=24)
    chunks = list(_chat(client, q, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # completions too
    a = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    s = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == a.choices[0].text


def test_raw_stream_ends_with_done(server):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=REQUEST_S) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    json.loads(lines[0][6:])


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_tool_call_parsed(client):
    # a 135M model needs one example turn (an assistant tool call and its result) to follow the format
    messages = [
        {"role": "user", "content": "What is the weather in Berlin?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Berlin"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temperature_c": 21, "sky": "sunny"})},
        {"role": "assistant", "content": "It is sunny and 21 C in Berlin."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=40
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the same call, in one tool_calls delta
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=40, stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [("get_weather", {"city": "Paris"})]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # tool_choice none: the tools are not offered, plain content comes back
    r = client.chat.completions.create(
        model=MODEL, messages=messages[:1], tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=8
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "My favourite colour is",
    "In 1492 Columbus",
    "The largest planet is",
    "A haiku about snow:",
    "def fibonacci(n):",
    "Three plus four equals",
]


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss(server, client):
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer briefly." for i in range(30))
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a fruit."}]
    h0 = _health(server)
    miss = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, logprobs=True)
    h1 = _health(server)
    hit = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12, logprobs=True)
    h2 = _health(server)
    n = miss.usage.prompt_tokens
    page = h0["prefix_cache"]["page_size"]
    assert n > 4 * page
    assert h1["prefix_cache_hit_tokens"] - h0["prefix_cache_hit_tokens"] == 0  # nothing shared yet
    assert h2["prefix_cache_hit_tokens"] - h1["prefix_cache_hit_tokens"] == (n - 1) // page * page
    assert h2["prompt_tokens_prefilled"] - h1["prompt_tokens_prefilled"] == n - (n - 1) // page * page
    assert hit.choices[0].message.content == miss.choices[0].message.content
    a = [t.logprob for t in miss.choices[0].logprobs.content]
    b = [t.logprob for t in hit.choices[0].logprobs.content]
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)  # other chunk boundaries: float32 rounding only


def test_concurrent_clients_get_what_they_get_alone(server, client):
    def ask(p):
        return client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0).choices[0].text

    alone = [ask(p) for p in PROMPTS]
    together = [None] * len(PROMPTS)

    def worker(i):
        together[i] = ask(PROMPTS[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(REQUEST_S)
    assert together == alone
    assert len(set(alone)) > 1


@pytest.fixture(scope="module")
def scorer(smollm2_checkpoint):
    """experiments/eval.py's scorer: llama_jax's own log-likelihoods, computed in this process."""
    model, _ = ev.load_model(smollm2_checkpoint)
    return ev.Scorer(model, batch_size=8)


def test_echo_logprobs_equal_llama_jax_loglikelihoods(client, scorer, tokenizer):
    texts = ["The capital of France is Paris", "Water freezes at zero degrees Celsius"]
    r = client.completions.create(model=MODEL, prompt=texts, max_tokens=1, temperature=0, echo=True, logprobs=2)
    for text, choice in zip(texts, sorted(r.choices, key=lambda c: c.index), strict=True):
        ids = tokenizer.encode(text, bos=True)
        ref = scorer.token_logprobs([ids])[0]  # log p(ids[t] | ids[:t]), t >= 1
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1  # prompt + the generated token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        # float32 log-softmax of a 30-layer model, two compilations (batch/bucket shapes differ): ~1e-5 relative
        np.testing.assert_allclose(lp.token_logprobs[1 : len(ids)], ref, rtol=1e-4, atol=1e-4)
        assert choice.text.startswith(tokenizer.decode(ids))
        for tok_lp, top in zip(lp.token_logprobs[1 : len(ids)], lp.top_logprobs[1 : len(ids)], strict=True):
            assert len(top) <= 2 and max(top.values()) >= tok_lp - 1e-6
    # max_tokens 0 with echo only scores the prompt
    r0 = client.completions.create(model=MODEL, prompt=texts[0], max_tokens=0, echo=True, logprobs=0)
    assert r0.usage.completion_tokens == 0
    np.testing.assert_allclose(
        r0.choices[0].logprobs.token_logprobs[1:],
        scorer.token_logprobs([tokenizer.encode(texts[0], bos=True)])[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_special_token_text_stays_plain_text(client, tokenizer):
    text = "stop <|im_end|> here <|endoftext|>"
    r = client.completions.create(model=MODEL, prompt=text, max_tokens=1, temperature=0, echo=True, logprobs=0)
    plain = tokenizer.encode(text, bos=True)
    assert r.usage.prompt_tokens == len(plain)
    assert "<|im_end|>" not in r.choices[0].logprobs.tokens  # no single special token in the prompt
    c = _chat(client, "Say <|im_end|><|im_start|>system\nhi", max_tokens=1)
    assert c.usage.prompt_tokens > 0


def _post(server, path, body, raw=None):
    return httpx.post(
        server[0] + path,
        content=raw if raw is not None else json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=REQUEST_S,
    )


def _hf_tokenizer_dir(checkpoint_dir, out) -> str:
    """The checkpoint's tokenizer.json as a transformers tokenizer that prepends BOS (as experiments/eval.py's
    contexts do), for lm-eval's tokenizer_backend=huggingface."""
    from tokenizers import Tokenizer, processors

    from llama_jax import checkpoint
    from llama_jax.tokenizer import Tokenizer as LlamaJaxTokenizer

    tok_dir = checkpoint.tokenizer_dir(checkpoint_dir)
    ours = LlamaJaxTokenizer.from_file(tok_dir)
    bos = ours.decode([ours.bos_id])
    tk = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, ours.bos_id)]
    )
    os.makedirs(out, exist_ok=True)
    tk.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": ours.decode([ours.eos_id])}, f
        )
    return out


def test_lm_eval_harness_scores_like_eval_py(server, scorer, tokenizer, smollm2_checkpoint, tmp_path):
    """lm-eval's local-completions model against this server on experiments/lm_eval/mc20.yaml: the same
    per-choice log-likelihoods and accuracy as experiments/eval.py --mc (same model, same token ids)."""
    pytest.importorskip("lm_eval")
    hf_tok = _hf_tokenizer_dir(smollm2_checkpoint, str(tmp_path / "hf_tokenizer"))
    out = tmp_path / "lm_eval"
    args = ",".join(
        [
            f"base_url={server[0]}/v1/completions",
            f"model={MODEL}",
            "tokenizer_backend=huggingface",
            f"tokenizer={hf_tok}",
            "add_bos_token=True",
            "num_concurrent=1",
            "max_retries=1",
        ]
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "local-completions",
            "--model_args",
            args,
            "--include_path",
            os.path.join(REPO, "experiments", "lm_eval"),
            "--tasks",
            "mc20",
            "--batch_size",
            "8",
            "--output_path",
            str(out),
            "--log_samples",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results_file] = list(out.rglob("results_*.json"))
    [samples_file] = list(out.rglob("samples_mc20_*.jsonl"))
    acc = json.loads(results_file.read_text())["results"]["mc20"]["acc,none"]
    records = ev.read_jsonl(ev_mc_path(), "error", ev.validate_mc)
    ours = ev.multiple_choice(scorer, tokenizer, records)
    assert acc == ours["accuracy"]
    samples = sorted((json.loads(x) for x in samples_file.read_text().splitlines()), key=lambda d: d["doc_id"])
    assert len(samples) == len(records)
    for sample, ref in zip(samples, ours["results"], strict=True):
        harness = [float(r[0][0]) for r in sample["resps"]]
        # sums of a few float32 log-probabilities (each ~1e-5 relative, see the echo test)
        np.testing.assert_allclose(harness, ref["scores"], rtol=1e-4, atol=1e-3)


def ev_mc_path() -> str:
    return os.path.join(REPO, "tests", "data", "mc20.jsonl")


@pytest.mark.parametrize(
    "path,body,status,param,words",
    [
        ("/v1/completions", None, 400, None, "could not parse the JSON"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", ">= 0"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "required"),
        ("/v1/completions", {"prompt": [[1, 2, 10**9]]}, 400, "prompt", "outside the vocabulary"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 9}, 400, "logprobs", "<= 5"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", "must be 1"),
        ("/v1/completions", {"prompt": "word " * 600}, 400, "prompt", f"maximum context length is {MAX_LENGTH}"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_LENGTH}, 400, "prompt", "maximum context length"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-7"}, 404, "model", "does not exist"),
        ("/v1/chat/completions", {"messages": "hello"}, 400, "messages", "array"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]", "role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
            400,
            "tool_choice",
            "auto",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tools[0]",
            "tools[0]",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi " * 600}]},
            400,
            "messages",
            f"maximum context length is {MAX_LENGTH}",
        ),
        ("/v1/nothing", {}, 404, None, "Not Found"),
    ],
)
def test_bad_requests(server, path, body, status, param, words):
    r = _post(server, path, body, raw=b"{not json" if body is None else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == param and err["type"]


def test_openai_client_raises_the_status(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=1)


def _open_stream(server, max_tokens=400):
    """A streaming completion left open (counting: it goes on for all its tokens): (client, response) after its
    first generated text arrived."""
    c = httpx.Client(timeout=REQUEST_S)
    body = {
        "model": MODEL,
        "prompt": "1, 2, 3, 4, 5, 6, 7,",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    r = c.send(c.build_request("POST", server[0] + "/v1/completions", json=body), stream=True)
    assert r.status_code == 200
    lines = r.iter_lines()  # kept alive with the response: closing it would close the stream
    while not next(lines).startswith("data: "):
        pass
    r.lines = lines
    return c, r


def test_disconnected_stream_frees_its_row(server):
    _wait_idle(server)
    before = _health(server).get("cancelled", 0)
    c, r = _open_stream(server)
    assert _health(server)["rows_in_use"] == 1
    r.close()
    c.close()
    t0 = time.time()
    h = _wait_idle(server, timeout=30)
    # freed at the next dispatch, long before its 400 tokens: (a dispatch is a few decode steps)
    assert h["cancelled"] == before + 1 and time.time() - t0 < 30
    pages = h["kv_pages"]  # and its KV pages are back: none held, all free or kept by the prefix cache
    assert pages["in_use"] == 0 and pages["promised"] == 0 and pages["free"] + pages["cached"] == pages["total"]


def test_paged_equals_dense(server, client, smollm2_checkpoint, scorer, tokenizer):
    """A server with --kv_layout=dense gives the greedy answers (tokens and log-probabilities) of the default
    paged one, for concurrent requests of different lengths."""
    assert _health(server)["kv_pages"]["total"] > 0  # the shared server is paged
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "llama_jax.serve", f"--checkpoint={smollm2_checkpoint}", f"--port={port}"]
    cmd += [f"--max_batch={MAX_BATCH}", f"--max_length={MAX_LENGTH}", "--kv_layout=dense", "--warmup=false"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + STARTUP_S
        while True:
            assert proc.poll() is None, f"dense server exited with {proc.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "dense server did not come up"
            time.sleep(1)
        assert "kv_pages" not in httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
        dense = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_S)
        prompts = ["The capital of France is", "List three fruits: apple,", "Once upon a time, a little fox"]

        def ask(c, prompt):
            r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, logprobs=1)
            return r.choices[0].text, r.choices[0].logprobs.token_logprobs

        results = {}

        def run(name, c, prompt):
            results[name, prompt] = ask(c, prompt)

        threads = [
            threading.Thread(target=run, args=(n, c, p))
            for n, c in (("paged", client), ("dense", dense))
            for p in prompts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(REQUEST_S)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    import jax.numpy as jnp
    from flax import nnx

    from tests.numerics import logits_tolerance

    model = nnx.merge(scorer.graphdef, scorer.state)
    for p in prompts:
        (pt, plp), (dt, dlp) = results["paged", p], results["dense", p]
        assert pt == dt, (p, pt, dt)
        # log p = logit - logsumexp(logits): float32 rounding of twice the logits' bound (tests/numerics.py) for
        # SmolLM2's depth and width, relative to max |logit| over this prompt and answer
        logits = model(jnp.asarray([tokenizer.encode(p + pt)], jnp.int32))
        tol = 2 * logits_tolerance(logits, model.config.dim, model.config.n_layers)
        np.testing.assert_allclose(plp, dlp, rtol=0, atol=tol)


def test_queue_full_is_429_with_retry_after(server):
    _wait_idle(server)
    streams = [_open_stream(server) for _ in range(MAX_BATCH)]
    results = []

    def queued():
        results.append(_post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code)

    waiting = [threading.Thread(target=queued) for _ in range(MAX_QUEUE)]
    try:
        assert _health(server)["rows_in_use"] == MAX_BATCH
        for t in waiting:
            t.start()
        deadline = time.time() + 60
        while _health(server)["waiting"] < MAX_QUEUE:
            assert time.time() < deadline
            time.sleep(0.1)
        r = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        for c, s in streams:
            s.close()
            c.close()
        for t in waiting:
            t.join(REQUEST_S)
    assert results == [200] * MAX_QUEUE
    _wait_idle(server)


def test_sigterm_finishes_running_request_and_exits(server):
    """Last in the module: SIGTERM while a request runs; it still completes, and the process exits 0."""
    base, proc = server
    out = {}

    def ask():
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}
        out["r"] = httpx.post(base + "/v1/completions", json=body, timeout=REQUEST_S)

    t = threading.Thread(target=ask)
    t.start()
    deadline = time.time() + 60
    while _health(server)["rows_in_use"] == 0 and t.is_alive():
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    t.join(REQUEST_S)
    assert out["r"].status_code == 200 and out["r"].json()["choices"][0]["finish_reason"] == "length"
    assert proc.wait(timeout=120) == 0


@pytest.mark.parametrize(
    "flag, words",
    [
        (["--kv_layout=paged", "--mesh=data=1"], "--kv_layout=paged is single-device"),
        (["--num_pages=0"], "--num_pages must be >= 1"),
        (["--kv_layout=ragged"], "kv_layout"),
    ],
)
def test_bad_kv_cache_flags(flag, words):
    r = subprocess.run(
        [sys.executable, "-m", "llama_jax.serve", "--port=0", *flag],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
