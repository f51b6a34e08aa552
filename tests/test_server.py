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

MAX_QUEUE, MAX_SEQS, MAX_PREFERENCES = 12, 8, 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(llama, persrm):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "padengine", "serve", llama, "--reward", persrm,
                             "--port", str(port), "--max-queue", str(MAX_QUEUE), "--max-num-seqs", str(MAX_SEQS),
                             "--max-body-bytes", "20000", "--served-model-name", "tiny",
                             "--max-preferences", str(MAX_PREFERENCES)],
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
    ({"model": "tiny", "messages": MESSAGES, "n": 0}, 400, "n"),
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


# ---- what padengine refuses, limits and ranges -----------------------------------------------------------

REFUSED = [  # (endpoint, field, a value that would change the output)
    ("chat", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("chat", "tool_choice", "required"),
    ("chat", "tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("chat", "functions", [{"name": "f", "parameters": {}}]),
    ("chat", "function_call", {"name": "f"}),
    ("chat", "parallel_tool_calls", True),
    ("chat", "response_format", {"type": "json_object"}),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("chat", "logit_bias", {"5": 100}),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}),
    ("chat", "modalities", ["text", "audio"]),
    ("chat", "prediction", {"type": "content", "content": "x"}),
    ("chat", "web_search_options", {}),
    ("chat", "reasoning_effort", "high"),
    ("chat", "verbosity", "low"),
    ("chat", "echo", True),
    ("chat", "chat_template", "{{ messages }}"),
    ("chat", "add_generation_prompt", False),
    ("chat", "continue_final_message", True),
    ("chat", "use_beam_search", True),
    ("chat", "min_tokens", 4),
    ("chat", "guided_json", {"type": "object"}),
    ("chat", "guided_regex", "a+"),
    ("chat", "guided_choice", ["a", "b"]),
    ("chat", "structured_outputs", {"json": {}}),
    ("chat", "include_stop_str_in_output", True),
    ("chat", "skip_special_tokens", False),
    ("chat", "prompt_logprobs", 1),
    ("completions", "logit_bias", {"5": -100}),
    ("completions", "best_of", 3),
    ("completions", "echo", True),
    ("completions", "suffix", "the end"),
    ("completions", "response_format", {"type": "json_object"}),
    ("completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("completions", "guided_grammar", "root ::= 'a'"),
]


@pytest.mark.parametrize("endpoint,field,value", REFUSED, ids=[f"{e}-{f}" for e, f, _ in REFUSED])
def test_refused_fields_get_400_naming_them(server, endpoint, field, value):
    body = {"model": "tiny", "max_tokens": 2, field: value}
    body.update({"messages": MESSAGES} if endpoint == "chat" else {"prompt": "the quick brown fox"})
    code, text = request(server, "POST", f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", body)
    err = json.loads(text)["error"]
    assert (code, err["param"]) == (400, field), text
    assert err["message"].startswith(f"{field}: ") and "refuses it" in err["message"]


def test_neutral_and_harmless_fields_are_accepted(server):
    """Fields at their neutral value, and the ones that change nothing here (user, metadata, ...)."""
    harmless = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                "safety_identifier": "s", "prompt_cache_key": "p", "stream_options": {"include_usage": False},
                "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {},
                "modalities": ["text"], "skip_special_tokens": True, "min_tokens": 0, "echo": False}
    code, text = request(server, "POST", "/v1/chat/completions",
                         {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, **harmless})
    assert code == 200, text
    code, text = request(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "the sea", "max_tokens": 2,
                                                              "best_of": 1, "suffix": None, "echo": False, "user": "u"})
    assert code == 200, text


@pytest.mark.parametrize("count", [MAX_PREFERENCES + 1, 201])
def test_too_many_preferences(server, count):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2,
            "preference": [{"text": f"preference {i}", "weight": 0.5} for i in range(count)]}
    code, text = request(server, "POST", "/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert (code, err["param"]) == (400, "preference") and f"at most {MAX_PREFERENCES}" in err["message"], text


def test_max_preferences_are_accepted(server):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2,
            "preference": [{"text": f"preference {i}", "weight": 0.5} for i in range(MAX_PREFERENCES)]}
    assert request(server, "POST", "/v1/chat/completions", body)[0] == 200


@pytest.mark.parametrize("field,value,param,expected", [
    ("temperature", 1e-5, "temperature", "[0.001, 100.0]"),
    ("temperature", 500, "temperature", "[0.001, 100.0]"),
    ("pad_weight", 101, "pad_weight", "[-100.0, 100.0]"),
    ("preference", [{"text": "x", "weight": 0.5}, {"text": "y", "weight": -1e4}], "preference[1].weight",
     "[-100.0, 100.0]"),
    ("top_p", 0, "top_p", "(0, 1]"),
    ("top_p", 1.5, "top_p", "(0, 1]"),
    ("min_p", 2, "min_p", "[0.0, 1.0]"),
    ("repetition_penalty", 0, "repetition_penalty", "(0, 100]"),
    ("presence_penalty", 3, "presence_penalty", "[-2.0, 2.0]"),
    ("frequency_penalty", -2.5, "frequency_penalty", "[-2.0, 2.0]"),
    ("n", 0, "n", "[1, 128]"),
    ("n", 1000, "n", "[1, 128]"),
    ("top_logprobs", 21, "top_logprobs", "[0, 20]"),
    ("pad_top_k", -1, "pad_top_k", ">= 0"),
    ("top_k", 2.5, "top_k", "integer"),
    ("max_completion_tokens", 0, "max_completion_tokens", "at least 1"),
    ("stop_token_ids", [10**6], "stop_token_ids", "outside"),
])
def test_bad_ranges_name_the_body_field_and_the_range(server, field, value, param, expected):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    code, text = request(server, "POST", "/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert (code, err["param"]) == (400, param), text
    assert err["message"].startswith(f"{param}: ") and expected in err["message"], text


@pytest.mark.parametrize("path,body,param", [
    ("chat/completions", {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),        # needs logprobs
    ("chat/completions", {"messages": MESSAGES, "logprobs": 2}, "logprobs"),                # a bool in chat
    ("chat/completions", {"messages": MESSAGES, "pad_base_logprobs": True}, "pad_base_logprobs"),
    ("completions", {"prompt": "the sea", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "the sea", "logprobs": True}, "logprobs"),                   # an int in completions
    ("completions", {"prompt": [5, 6, 7], "preference": "be concise"}, "preference"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"prompt": ["the sea", ""]}, "prompt[1]"),
    ("completions", {"prompt": ["the sea", [5, "x"]]}, "prompt[1]"),
    ("completions", {"prompt": [5, 10**6]}, "prompt"),                                      # outside the vocabulary
    ("completions", {"prompt": ["the sea", [5, 10**6]]}, "prompt[1]"),
    ("completions", {"prompt": ["the sea"] * 50, "n": 3}, "prompt"),                        # 150 choices
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
])
def test_bad_logprobs_and_prompts(server, path, body, param):
    code, text = request(server, "POST", f"/v1/{path}", {"model": "tiny", "max_tokens": 2, **body})
    assert (code, json.loads(text)["error"]["param"]) == (400, param), text


def test_too_long_preference_is_blamed_on_preference(server):
    for in_base in (True, False):
        code, text = request(server, "POST", "/v1/chat/completions", {
            "model": "tiny", "messages": MESSAGES, "preference": "be concise " * 150, "preference_in_base": in_base})
        assert (code, json.loads(text)["error"]["param"]) == (400, "preference"), text
    code, text = request(server, "POST", "/v1/chat/completions", {     # fits alone, not with max_tokens
        "model": "tiny", "messages": MESSAGES, "max_tokens": 200, "preference": "be concise " * 20,
        "preference_in_base": False})
    assert (code, json.loads(text)["error"]["param"]) == (400, "preference"), text
    code, text = request(server, "POST", "/v1/completions", {"model": "tiny", "prompt": "sea " * 400,
                                                              "preference": "be concise"})
    assert (code, json.loads(text)["error"]["param"]) == (400, "prompt"), text


# ---- completions prompts: raw text, token ids, lists ------------------------------------------------------

@pytest.fixture(scope="module")
def library(llama, persrm):
    return Engine(llama, persrm, block_size=4)


def plain(library, ids: list[int], **kw):
    return library.generate(prompt_token_ids=[ids], params=SamplingParams(weight=0.0, **kw))[0]


def test_completions_is_raw_text_and_takes_token_ids(server, client, library, tokenizer):
    """/v1/completions encodes the text as it is (no chat template); a token-id prompt is used verbatim."""
    raw = tokenizer.encode("the quick brown fox")
    expected = plain(library, raw, max_tokens=8, top_k=10)
    resp = client.completions.create(model="tiny", prompt="the quick brown fox", max_tokens=8, temperature=0)
    assert resp.choices[0].text == expected.text and resp.usage.prompt_tokens == len(raw)
    ids = encode(tokenizer, MESSAGES)                   # a chat rendered by the caller, sent as ids
    expected = plain(library, ids, max_tokens=8, top_k=10)
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert resp.choices[0].text == expected.text and resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(expected.token_ids)


def test_completions_list_of_prompts(server, client, library, tokenizer):
    ids = tokenizer.encode("write a short poem about the sea")
    prompts = ["the quick brown fox", ids, "explain how a computer works"]
    resp = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    singles = [client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [s.choices[0].text for s in singles]
    assert resp.choices[1].text == plain(library, ids, max_tokens=6).text
    assert resp.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert resp.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    stream = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, stream=True)
    texts, finished = ["", "", ""], set()
    for chunk in stream:
        c = chunk.choices[0]
        texts[c.index] += c.text
        if c.finish_reason:
            finished.add(c.index)
    assert texts == [c.text for c in resp.choices] and finished == {0, 1, 2}


# ---- log-probabilities --------------------------------------------------------------------------------------

def test_logprob_formatting_with_hand_built_outputs(tokenizer):
    """The response shapes, from a StreamOutput built by hand (no engine)."""
    from padengine.engine.detokenizer import StreamOutput
    from padengine.serving import openai_api as api, openai_format as fmt
    ids = tokenizer.encode("the sea")
    out = StreamOutput(0, 7, "the sea", ids, logprobs=[-0.5 * (k + 1) for k in range(len(ids))],
                       top_logprobs=[[(t, -0.1), (4, -2.0)] for t in ids], base_logprobs=[-1.0] * len(ids))
    strings = fmt.TokenStrings(tokenizer)
    parsed = lambda chat, **kw: api.ParsedRequest(chat, False, False, [[5]], None, SamplingParams(**kw), [], True)
    chat = fmt.logprobs_object(parsed(True, top_logprobs=2, base_logprobs=True), strings, out)["content"]
    assert [e["token"] for e in chat] == [tokenizer.decode([t]) for t in ids]
    assert [e["logprob"] for e in chat] == out.logprobs and [e["pad_base_logprob"] for e in chat] == [-1.0] * len(ids)
    assert all(e["bytes"] == list(e["token"].encode()) for e in chat)
    assert [[(a["token"], a["logprob"]) for a in e["top_logprobs"]] for e in chat] == [
        [(tokenizer.decode([t]), -0.1), (tokenizer.decode([4]), -2.0)] for t in ids]
    assert "pad_base_logprob" not in fmt.logprobs_object(parsed(True, top_logprobs=2), strings, out)["content"][0]
    comp = fmt.logprobs_object(parsed(False, top_logprobs=2, base_logprobs=True), strings, out, text_offset=3)
    tokens = [tokenizer.decode([t]) for t in ids]
    assert comp["tokens"] == tokens and comp["token_logprobs"] == out.logprobs
    assert comp["top_logprobs"][0] == {tokens[0]: -0.1, tokenizer.decode([4]): -2.0}
    assert comp["text_offset"][0] == 3 and comp["text_offset"][1] == 3 + len(tokens[0])
    assert comp["pad_base_token_logprobs"] == [-1.0] * len(ids)
    # a token holding half of a UTF-8 character reports its own byte; -inf becomes -9999.0
    half = tokenizer.convert_tokens_to_ids("Ã")            # byte 0xC3 in byte-level BPE
    assert strings(half) == ("\ufffd", [0xC3])
    odd = StreamOutput(0, 7, "", [half], logprobs=[float("-inf")], top_logprobs=[[]])
    entry = fmt.logprobs_object(parsed(True), strings, odd)["content"][0]
    assert entry["logprob"] == -9999.0 and entry["bytes"] == [0xC3] and entry["top_logprobs"] == []
    choice = fmt.Choice(0)
    for part in (out, odd):
        choice.add(part)
    assert choice.token_ids == ids + [half] and choice.logprobs == out.logprobs + [float("-inf")]


def pad_reference(library, tokenizer, **kw):
    """What the server's PAD chat request below computes, through the Python API."""
    return library.generate(prompt_token_ids=[encode(tokenizer, MESSAGES)], params=SamplingParams(
        max_tokens=8, top_k=5, **kw), reward_prompt_token_ids=[[(encode(tokenizer, with_preference(
            MESSAGES, "be concise")), 1.5)]])[0]


PAD_CHAT = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                extra_body={"preference": "be concise", "pad_weight": 1.5, "pad_top_k": 5,
                            "preference_in_base": False, "pad_base_logprobs": True})


def test_chat_logprobs_equal_library_output(client, library, tokenizer):
    expected = pad_reference(library, tokenizer, top_logprobs=3, base_logprobs=True)
    resp = client.chat.completions.create(**PAD_CHAT)
    content = resp.model_dump()["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == [tokenizer.decode([t]) for t in expected.token_ids]
    assert [e["logprob"] for e in content] == pytest.approx(expected.logprobs, abs=1e-5)
    assert [e["pad_base_logprob"] for e in content] == pytest.approx(expected.base_logprobs, abs=1e-5)
    for e, top in zip(content, expected.top_logprobs):
        assert len(e["top_logprobs"]) == 3
        assert [a["token"] for a in e["top_logprobs"]] == [tokenizer.decode([t]) for t, _ in top]
        assert [a["logprob"] for a in e["top_logprobs"]] == pytest.approx([lp for _, lp in top], abs=1e-5)
        assert all(isinstance(a["bytes"], list) for a in e["top_logprobs"])
    chunks = list(client.chat.completions.create(stream=True, **PAD_CHAT))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.model_dump()["choices"][0]["logprobs"]["content"]]
    assert streamed == content
    plain_resp = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert plain_resp.choices[0].logprobs is None


def test_completions_logprobs_equal_library_output(server, library, tokenizer):
    ids = tokenizer.encode("the quick brown fox")
    expected = plain(library, ids, max_tokens=8, top_k=10, top_logprobs=2, base_logprobs=True)
    body = {"model": "tiny", "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0, "logprobs": 2,
            "pad_base_logprobs": True}
    code, text = request(server, "POST", "/v1/completions", body)
    lp = json.loads(text)["choices"][0]["logprobs"]
    tokens = [tokenizer.decode([t]) for t in expected.token_ids]
    assert lp["tokens"] == tokens
    assert lp["token_logprobs"] == pytest.approx(expected.logprobs, abs=1e-5)
    assert lp["pad_base_token_logprobs"] == pytest.approx(expected.base_logprobs, abs=1e-5)
    for alternatives, top, token, chosen in zip(lp["top_logprobs"], expected.top_logprobs, tokens, expected.logprobs):
        want = {}                   # the chosen token is always listed; of two with one text, the likelier
        for t, l in top + [(None, chosen)]:
            want.setdefault(token if t is None else tokenizer.decode([t]), l)
        assert alternatives == pytest.approx(want, abs=1e-5)
    assert lp["text_offset"] == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(body | {"stream": True}))
    events = [e for e in sse_events(conn.getresponse())[:-1] if e["choices"][0]["logprobs"]]
    joined = {k: [x for e in events for x in e["choices"][0]["logprobs"][k]] for k in lp}
    assert joined == lp


# ---- n choices ----------------------------------------------------------------------------------------------

def test_n_choices_seeded_reproducible_usage_counts_prompt_once(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=11, n=3,
                  extra_body={"preference": "be concise", "pad_weight": 1.0})
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1          # the choices are distinct draws
    one = client.chat.completions.create(**(kwargs | {"n": 1}))
    assert first.usage.prompt_tokens == one.usage.prompt_tokens         # the prompt is counted once
    assert one.choices[0].message.content == first.choices[0].message.content   # choice 0 draws with the seed
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    texts, finishes, roles = ["", "", ""], {}, []
    for c in chunks[:-1]:
        choice = c.choices[0]
        texts[choice.index] += choice.delta.content or ""
        roles += [choice.index] if choice.delta.role else []
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in first.choices] and sorted(roles) == [0, 1, 2]
    assert finishes == {c.index: c.finish_reason for c in first.choices}
    assert chunks[-1].usage.model_dump() == first.usage.model_dump()
    assert first.usage.completion_tokens == chunks[-1].usage.completion_tokens


def test_n_with_a_list_of_prompts_indexes_prompt_major(server):
    body = {"model": "tiny", "prompt": ["the quick brown fox", "the sea"], "max_tokens": 4, "temperature": 1.0,
            "seed": 5, "n": 2}
    code, text = request(server, "POST", "/v1/completions", body)
    choices = json.loads(text)["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(body["prompt"]):
        code, alone = request(server, "POST", "/v1/completions", body | {"prompt": prompt})
        assert [c["text"] for c in json.loads(alone)["choices"]] == [c["text"] for c in choices[2 * p:2 * p + 2]]


def wait_idle(port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(port)
        if m["padengine_requests_running"] == 0 and m["padengine_requests_waiting"] == 0:
            return m
        time.sleep(0.2)
    raise AssertionError(f"server not idle: {m}")


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_aborts_request(server, n):
    """Leaving mid-stream aborts the request (all n choices of it) and frees its blocks."""
    before = metrics(server).get('padengine_requests_finished_total{reason="abort"}', 0)
    sock = socket.create_connection(("127.0.0.1", server))
    body = json.dumps({"model": "tiny", "messages": MESSAGES, "max_tokens": 150, "stream": True, "n": n,
                       "ignore_eos": True, "preference": "be concise", "temperature": 1.0}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"data: " not in received:
        received += sock.recv(4096)
    assert received.startswith(b"HTTP/1.1 200")
    sock.close()                        # mid-stream: 150 tokens were asked for
    m = wait_idle(server)
    assert m['padengine_requests_finished_total{reason="abort"}'] == before + n
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
