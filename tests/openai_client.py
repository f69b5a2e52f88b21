"""The official OpenAI Python client against a running `steerling serve`,
used as a new user would. Exits non-zero on the first failed check.

    python3 tests/openai_client.py http://127.0.0.1:8080/v1 MODEL_ID
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused")

# Models
ids = [m.id for m in client.models.list().data]
assert model in ids, ids

# Completions
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert c.object == "text_completion" and c.choices[0].text, c
assert c.usage.completion_tokens == 8, c.usage

c = client.completions.create(model=model, prompt=["Hello", "Bonjour"], n=2, max_tokens=4, seed=5)
assert [ch.index for ch in c.choices] == [0, 1, 2, 3], c

c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2, echo=True)
lp = c.choices[0].logprobs
assert c.choices[0].text.startswith("Once upon a time"), c.choices[0].text
assert lp.token_logprobs[0] is None and len(lp.tokens) == len(lp.token_logprobs), lp
assert all(len(t) <= 2 for t in lp.top_logprobs[1:]), lp.top_logprobs

c = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
assert " 7" not in c.choices[0].text and c.choices[0].finish_reason == "stop", c

a = client.completions.create(model=model, prompt="A story:", max_tokens=12, seed=42)
b = client.completions.create(model=model, prompt="A story:", max_tokens=12, seed=42)
assert a.choices[0].text == b.choices[0].text, (a, b)

pieces = []
for chunk in client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True):
    pieces.append(chunk.choices[0].text)
whole = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
assert "".join(pieces) == whole.choices[0].text, (pieces, whole)

# Chat completions
messages = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
assert r.object == "chat.completion" and r.choices[0].message.role == "assistant", r
assert r.choices[0].message.content, r

r = client.chat.completions.create(model=model, messages=messages, max_tokens=5, n=2, logprobs=True, top_logprobs=2, seed=1)
assert len(r.choices) == 2 and len(r.choices[0].logprobs.content) == 5, r
assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2

text = ""
usage = None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        text += ch.delta.content or ""
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
assert text == whole.choices[0].message.content, (text, whole)
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

# Errors arrive as the client's typed exceptions
try:
    client.completions.create(model=model, prompt="x", temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "temperature", e.body
try:
    client.completions.create(model="no-such-model", prompt="x")
    raise AssertionError("unknown model was accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

print("openai client: all checks passed")
