"""Embeddings on the real default model: the engine's lanes (llama_lib.engine.embedding) and the
server's /v1/embeddings and /embedding (server/api/embeddings.py).

What must hold (issue 14): one vector per input, in order, of the model's size, normalised; an
input's vector does not depend on its batch (cosine >= 0.9999 at every position); token ids
give the same vector as their text; base64 decodes to the same floats; our vector agrees with
llama.cpp's own pooling through the C API (cosine >= 0.999); bad inputs are 400 and the server
keeps serving.
"""

from __future__ import annotations

import base64
import os
import threading

import numpy as np
import pytest

from llama_lib import Batch, Context, ContextParams, Engine, EngineConfig, Model, RequestParams
from llama_lib import _bindings as B
from llama_lib.engine.embedding import EmbeddingTooLong, normalize
from server.api.embeddings import parse_embedding
from server.errors import ApiError
from server_util import served

THREADS = int(os.environ.get("TEST_THREADS", "2"))
TEXTS = ["The weather today is sunny.", "A cat is sitting on a mat.",
         "The quick brown fox jumps over the lazy dog.", "Hello",
         "Paris is the capital of France and a large city with many museums and old bridges."]


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def model():
    with Model() as m:
        yield m


def make_engine(model, **kw) -> Engine:
    cfg = dict(n_parallel=2, n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS,
               embeddings=True, pooling="mean")
    cfg.update(kw)
    return Engine(model, EngineConfig(**cfg)).start()


@pytest.fixture(scope="module")
def engine(model):
    e = make_engine(model)
    yield e
    e.close()


def reference(model, tokens, pooling=B.LLAMA_POOLING_TYPE_MEAN, n_ubatch=1024, skip=False) -> np.ndarray:
    """llama.cpp's own pooling: one input alone, in a context that pools (llama_get_embeddings_seq),
    or per-token rows for pooling none. Flash attention off, as in the engine's embedding context
    (ggml's CPU flash attention accumulates in f16 below 32 rows: see docs/embeddings.md)."""
    ctx = Context(model, ContextParams(n_ctx=2048, n_batch=n_ubatch, n_ubatch=n_ubatch, n_seq_max=1,
                                       n_threads=THREADS, n_threads_batch=THREADS, embeddings=True,
                                       pooling_type=pooling, flash_attn=B.LLAMA_FLASH_ATTN_TYPE_DISABLED,
                                       skip_output_layer=skip))
    b = Batch(len(tokens), 1)
    try:
        b.add_sequence(np.asarray(tokens, np.int32), 0, 0, logits_last=False)
        b.logits[:b.n_tokens] = 1
        assert ctx.decode(b.view()) == 0
        if pooling == B.LLAMA_POOLING_TYPE_NONE:
            rows = np.stack([ctx.embeddings_ith(i).copy() for i in range(len(tokens))])
            return rows, ctx.logits(len(tokens) - 1).copy()
        return ctx.embeddings_seq(0).copy()
    finally:
        b.close()
        ctx.close()


def toks(model, text):
    return model.vocab.tokenize(text, add_special=True, parse_special=True)


# -- the engine -----------------------------------------------------------------------------------

def test_one_normalised_vector_per_input_in_order(engine, model):
    vecs = engine.embed(TEXTS)
    assert vecs.shape == (len(TEXTS), model.n_embd_out) and vecs.dtype == np.float32
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    alone = [engine.embed(t) for t in TEXTS]
    for i, a in enumerate(alone):  # rows in input order, each the same as alone
        assert cos(a, vecs[i]) >= 0.9999, i
        assert max(cos(a, vecs[j]) for j in range(len(TEXTS)) if j != i) < 0.999


def test_batch_invariance_at_every_position(engine):
    target = "A cat is sitting on a mat."
    alone = engine.embed(target)
    fillers = ["x", "one two three", "a much longer filler sentence with quite a few words in it",
               "Hello", "The weather today is sunny."]
    for pos in range(5):
        batch = fillers[:pos] + [target] + fillers[pos:4]
        assert np.array_equal(engine.embed(batch)[pos], alone), pos  # bit for bit


def test_bit_identical_in_a_request_of_more_inputs_than_lanes(engine):
    """More inputs than lanes and than one decode holds: each comes out as it does alone."""
    words = "river mountain quiet engine library garden window market winter silver story".split()
    texts = [" ".join(words[(i * 7 + k) % len(words)] for k in range(3 + (i * 5) % 28)) + "."
             for i in range(2 * len(engine.embedder.lanes) + 3)]
    vecs = engine.embed(texts)
    for i, t in enumerate(texts):
        assert np.array_equal(vecs[i], engine.embed(t)), i


def test_concurrent_requests_and_generation_do_not_change_vectors(engine):
    alone = {t: engine.embed(t) for t in TEXTS}
    gen = engine.submit("User: Name a fruit.\nAssistant:", RequestParams(n_predict=24))
    out, errors = {}, []

    def client(k):
        try:
            out[k] = engine.embed(TEXTS[k:] + TEXTS[:k])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(out) == 4
    for k, vecs in out.items():
        for i, t in enumerate(TEXTS[k:] + TEXTS[:k]):
            assert cos(vecs[i], alone[t]) >= 0.9999
    assert gen.result(120) and gen.n_generated == 24


def test_token_ids_equal_text(engine, model):
    t = TEXTS[1]
    assert cos(engine.embed([int(x) for x in toks(model, t)]), engine.embed(t)) >= 0.99999
    two = engine.embed([[int(x) for x in toks(model, t)], t])
    assert cos(two[0], two[1]) >= 0.99999


def test_agrees_with_llama_cpp_pooling(engine, model):
    for t in TEXTS:
        ref = reference(model, toks(model, t))
        assert cos(engine.embed(t), ref) >= 0.999, t


def test_skipping_the_output_layer_leaves_hidden_states_bit_identical(model):
    """The embedding context stops each graph at the hidden states (no vocabulary projection)."""
    t = toks(model, TEXTS[4])
    plain, logits = reference(model, t, B.LLAMA_POOLING_TYPE_NONE)
    skipped, no_logits = reference(model, t, B.LLAMA_POOLING_TYPE_NONE, skip=True)
    assert plain.shape == skipped.shape == (len(t), model.n_embd_out)
    assert np.array_equal(plain, skipped)
    assert not np.array_equal(logits, no_logits)  # the projection did not run
    with pytest.raises(ValueError, match="skip_output_layer"):
        Context(model, ContextParams(n_ctx=256, embeddings=True, skip_output_layer=True))  # pools


def test_long_input_split_across_decodes_agrees(engine, model):
    """An input longer than one embedding decode (128 tokens) goes in pieces; llama.cpp decodes
    it whole for the reference."""
    text = " ".join(f"word{i}" for i in range(120))
    t = toks(model, text)
    assert len(t) > 2 * engine.embedder.n_batch
    assert cos(engine.embed(text), reference(model, t)) >= 0.999


def test_other_poolings_and_normalisations(model, engine):
    t = toks(model, TEXTS[2])
    e = make_engine(model, pooling="none")
    try:
        rows = e.embed(TEXTS[2])
        ref, _ = reference(model, t, B.LLAMA_POOLING_TYPE_NONE)
        assert rows.shape == (len(t), model.n_embd_out)
        assert min(cos(a, b) for a, b in zip(rows, ref)) >= 0.999
        multi = e.embed(TEXTS[:2])  # pooling none: a list of per-token arrays
        assert isinstance(multi, list) and [len(r) for r in multi] == [len(toks(model, x)) for x in TEXTS[:2]]
    finally:
        e.close()
    e = make_engine(model, pooling="last")
    try:
        assert cos(e.embed(TEXTS[2]), ref[-1]) >= 0.999
    finally:
        e.close()
    raw = engine.embed(TEXTS[0], normalize=-1)
    assert abs(np.linalg.norm(raw) - 1) > 0.01
    assert cos(raw, engine.embed(TEXTS[0])) >= 0.99999
    assert np.isclose(np.abs(engine.embed(TEXTS[0], normalize=1)).sum(), 1.0, atol=1e-4)
    assert np.isclose(np.abs(engine.embed(TEXTS[0], normalize=0)).max(), 32760, rtol=1e-4)
    assert np.allclose(normalize(raw, 2), engine.embed(TEXTS[0]), atol=1e-6)


def test_bad_inputs_and_cancel(engine, model):
    for bad in ([], "", [[]], [""], [-1], [10**9], [1.5], {"a": 1}):
        with pytest.raises(ValueError):
            engine.embed(bad)
    with pytest.raises(EmbeddingTooLong, match=r"larger than the max context size"):
        engine.embed("word " * 3000)
    h = engine.submit_embedding(["word " * 400] * 16)
    h.cancel()
    assert h.wait(60) and h.cancelled
    with pytest.raises(RuntimeError, match="cancelled"):
        h.result()
    assert not engine.embedder.has_work() or engine.embedder.n_waiting == 0
    assert engine.embed("still works").shape == (model.n_embd_out,)
    plain = Engine(model, EngineConfig(n_parallel=1, n_ctx=512, n_threads=THREADS))
    try:
        with pytest.raises(RuntimeError, match="embeddings=True"):
            plain.embed("x")
    finally:
        plain.close()


def test_oai_route_refuses_pooling_none():
    with pytest.raises(ApiError) as e:
        parse_embedding({"input": "x"}, True, True)
    assert e.value.status == 400 and "not OAI compatible" in e.value.message


# -- the server -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("embeddings") / "server.log"
    with served(["--embedding", "--pooling", "mean", "--metrics", "-np", "2", "-c", "2048",
                 "-t", str(THREADS), "-tb", str(THREADS)], log, show_log=True) as s:
        yield s


def test_openai_sdk(srv, model):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.port}/v1", api_key="none")
    r = client.embeddings.create(model="any", input=TEXTS)  # the SDK asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert vecs.shape == (len(TEXTS), model.n_embd_out)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    assert r.usage.prompt_tokens == sum(len(toks(model, t)) for t in TEXTS)
    floats = client.embeddings.create(model="any", input=TEXTS, encoding_format="float")
    assert np.allclose(np.array([d.embedding for d in floats.data]), vecs, atol=1e-7)
    for i, t in enumerate(TEXTS):
        alone = client.embeddings.create(model="any", input=t).data[0].embedding
        assert cos(alone, vecs[i]) >= 0.9999
        ids = client.embeddings.create(model="any", input=[int(x) for x in toks(model, t)]).data[0].embedding
        assert cos(ids, vecs[i]) >= 0.99999


def test_base64_decodes_to_the_floats(srv):
    f = srv.post("/v1/embeddings", {"input": TEXTS[:2]}).json()
    b = srv.post("/v1/embeddings", {"input": TEXTS[:2], "encoding_format": "base64"}).json()
    for x, y in zip(f["data"], b["data"]):
        assert y["encoding_format"] == "base64"
        dec = np.frombuffer(base64.b64decode(y["embedding"]), dtype="<f4")
        assert np.array_equal(dec, np.array(x["embedding"], np.float32))
    assert f["object"] == "list" and f["data"][0]["object"] == "embedding"


def test_llama_server_shape(srv, model):
    r = srv.post("/embedding", {"content": TEXTS[3]})
    assert r.status_code == 200
    body = r.json()
    assert len(body) == 1 and body[0]["index"] == 0
    assert np.array(body[0]["embedding"]).shape == (1, model.n_embd_out)
    r = srv.post("/embeddings", {"content": [TEXTS[0], TEXTS[1]]})
    assert [x["index"] for x in r.json()] == [0, 1]
    # "content" on the OpenAI route answers llama-server's shape, as llama-server does
    assert isinstance(srv.post("/v1/embeddings", {"content": "hi"}).json(), list)


@pytest.mark.parametrize("body,message", [
    ({"input": []}, "Input content cannot be empty"),
    ({"input": ""}, "Input content cannot be empty"),
    ({"input": ["ok", ""]}, "Input content cannot be empty"),
    ({"input": [[]]}, "Input content cannot be empty"),
    ({}, '"input" or "content" must be provided'),
    ({"input": "x", "encoding_format": "hex"}, "Can be either float or base64"),
    ({"input": 5}, "must be a string"),
    ({"input": [{"a": 1}]}, "string or a list of token ids"),
    ({"input": [99999999]}, "out of range"),
    ({"input": "x", "embd_normalize": "two"}, "embd_normalize"),
    ({"input": "word " * 3000}, "larger than the max context size"),
])
def test_bad_inputs_are_400_and_the_server_keeps_serving(srv, body, message):
    r = srv.post("/v1/embeddings", body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert srv.post("/v1/embeddings", {"input": "fine"}).status_code == 200


def test_generation_props_models_metrics(srv):
    r = srv.post("/completion", {"prompt": "User: hi\nAssistant:", "n_predict": 4})
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 4
    props = srv.get("/props").json()
    assert props["embedding"] is True and props["pooling"] == "mean"
    models = srv.get("/v1/models").json()
    assert "embedding" in models["models"][0]["capabilities"]
    assert models["data"][0]["meta"]["pooling"] == "mean"
    before = srv.get("/metrics").text
    srv.post("/v1/embeddings", {"input": ["one", "two"]})
    after = srv.get("/metrics").text

    def value(text, name):
        return float(next(ln.split()[1] for ln in text.splitlines() if ln.startswith(f"llamacpp:{name} ")))
    assert value(after, "embedding_inputs_total") == value(before, "embedding_inputs_total") + 2
    assert value(after, "prompt_tokens_total") > value(before, "prompt_tokens_total")
