"""A real server process on a loopback port with tiny random models, spoken to with the `openai` client
and with raw HTTP."""
import http.client
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from padengine import Engine, SamplingParams
from padengine.prompts import encode, with_preference

MAX_QUEUE, MAX_SEQS = 12, 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(llama, persrm):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "padengine", "serve", llama, "--reward", persrm,
                             "--port", str(port), "--max-queue", str(MAX_QUEUE), "--max-num-seqs", str(MAX_SEQS),
                             "--max-body-bytes", "20000", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if get(port, "/health")[0] == 200:
                break
        except OSError:
            time.sleep(0.3)
        assert proc.poll() is None, proc.stdout.read()
    yield port
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="none", max_retries=0)


def request(port, method, path, body=None, raw: bytes | None = None, timeout=60):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read().decode()


def get(port, path):
    return request(port, "GET", path, timeout=2)


def metrics(port) -> dict:
    out = {}
    for line in get(port, "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sse_events(resp) -> list:
    events = []
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: "):
            events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return events


MESSAGES = [{"role": "user", "content": "write a short poem about the sea"}]


def test_health_and_models(server):
    assert get(server, "/health") == (200, '{"status":"ok"}')
    status, body = get(server, "/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"


def test_chat_with_preference_equals_library_output(client, llama, persrm, tokenizer):
    resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                          extra_body={"preference": "be concise", "pad_weight": 1.5,
                                                      "pad_top_k": 5, "preference_in_base": False})
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length") and resp.usage.completion_tokens >= 1
    engine = Engine(llama, persrm, block_size=4)
    expected = engine.generate(prompt_token_ids=[encode(tokenizer, MESSAGES)], params=SamplingParams(
        max_tokens=12, top_k=5), reward_prompt_token_ids=[[(encode(tokenizer, with_preference(MESSAGES, "be concise")),
                                                           1.5)]])[0]
    assert choice.message.content == expected.text
    assert resp.usage.completion_tokens == len(expected.token_ids)


def test_streaming_equals_non_streaming(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0,
                  extra_body={"preference": [{"text": "be concise", "weight": 1.0},
                                             {"text": "answer in french", "weight": 0.5}]})
    whole = client.chat.completions.create(**kwargs).choices[0]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.message.content
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason


def test_plain_decoding_without_preference_and_completions(server, client):
    resp = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=8, temperature=0)
    assert resp.choices[0].finish_reason in ("stop", "length")
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "the quick brown fox",
                                                        "max_tokens": 8, "temperature": 0, "stream": True,
                                                        "stream_options": {"include_usage": True}}))
    events = sse_events(conn.getresponse())
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == resp.usage.completion_tokens
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == resp.choices[0].text


@pytest.mark.parametrize("body,status,param", [
    ({"model": "gpt-4", "messages": MESSAGES}, 404, "model"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "messages": MESSAGES, "max_tokens": 10**6}, 400, "messages"),
    ({"model": "tiny", "messages": MESSAGES, "pad_top_k": -2}, 400, "pad_top_k"),
    ({"model": "tiny", "messages": MESSAGES, "pad_weight": float("nan")}, 400, "pad_weight"),
    ({"model": "tiny", "messages": MESSAGES, "seed": 1.5}, 400, "seed"),
    ({"model": "tiny", "messages": MESSAGES, "n": 3}, 400, "n"),
    ({"model": "tiny", "messages": MESSAGES, "stop": 5}, 400, "stop"),
    ({"model": "tiny", "messages": MESSAGES, "preference": 3}, 400, "preference"),
    ({"model": "tiny", "messages": MESSAGES, "preference": [{"text": "x", "weight": "y"}]}, 400, "preference[0].weight"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "sea " * 400}]}, 400, "messages"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
])
def test_bad_requests_name_the_field(server, body, status, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    code, text = request(server, "POST", path, raw=json.dumps(body).replace("NaN", "NaN").encode())
    err = json.loads(text)["error"]
    assert (code, err["param"]) == (status, param), text
    assert err["message"] and err["type"]


def test_malformed_and_oversized_bodies(server):
    code, text = request(server, "POST", "/v1/chat/completions", raw=b'{"model": "tiny", "messages": [')
    assert code == 400 and "malformed JSON" in json.loads(text)["error"]["message"]
    code, text = request(server, "POST", "/v1/chat/completions",
                         raw=json.dumps({"model": "tiny", "messages": MESSAGES, "pad": "x" * 30000}).encode())
    assert code == 413 and json.loads(text)["error"]["param"] == "body"
    assert get(server, "/health")[0] == 200


def wait_idle(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(port)
        if m["padengine_requests_running"] == 0 and m["padengine_requests_waiting"] == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"server not idle: {m}")


def test_client_disconnect_aborts_request(server):
    before = metrics(server).get('padengine_requests_finished_total{reason="abort"}', 0)
    sock = socket.create_connection(("127.0.0.1", server))
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 150, "stream": True,
                       "ignore_eos": True, "preference": "be concise"}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()                        # mid-stream: 150 tokens were asked for
    m = wait_idle(server)
    assert m['padengine_requests_finished_total{reason="abort"}'] == before + 1
    assert m['padengine_kv_blocks_used{pool="0"}'] == 0 and m['padengine_kv_blocks_used{pool="1"}'] == 0


def stream_one(port, i):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"question number {i} about the sea"}],
            "max_tokens": 4 + i % 13, "stream": True, "temperature": 0.8, "seed": i}
    if i % 2:
        body["preference"] = "be concise"
    conn.request("POST", "/v1/chat/completions", json.dumps(body))
    resp = conn.getresponse()
    if resp.status != 200:
        return resp.status, json.loads(resp.read())["error"]["code"]
    events = sse_events(resp)
    return 200, (events[-1], events[-2]["choices"][0]["finish_reason"])


def test_bounded_load_then_no_leak(server):
    """64 concurrent streaming clients against a queue of 12: the overflow gets 429 at once, every accepted
    request completes, and afterwards no KV block is in use."""
    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(lambda i: stream_one(server, i), range(64)))
    accepted = [r for s, r in results if s == 200]
    rejected = [r for s, r in results if s != 200]
    assert all(s in (200, 429) for s, _ in results)
    assert accepted and rejected and set(rejected) == {"queue_full"}
    assert all(done == "[DONE]" and reason in ("stop", "length") for done, reason in accepted)
    m = wait_idle(server)
    assert m['padengine_kv_blocks_used{pool="0"}'] == 0 and m['padengine_kv_blocks_used{pool="1"}'] == 0
    assert get(server, "/health")[0] == 200
