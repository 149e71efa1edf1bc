"""A resent conversation decodes only its new turn (server/chat/continuations.py), and a tool
call cut by max_tokens before its name was whole is neither a call nor text.

The memo is checked on the real vocabulary with tokens the tokenizer would never give for their
text (one token per character): a prompt that repeats them reuses them, so the engine's prompt
cache, which compares tokens, finds the answer it decoded. End to end, a forced tool call sent
back with its result is read from the cache up to the call's last token."""

from __future__ import annotations

import requests

from server.chat.continuations import Continuations
from server.chat.tool_formats import FORMATS
from server_util import served_with_template

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
ASK = [{"role": "system", "content": "You are a helpful assistant that calls tools when asked."},
       {"role": "user", "content": "What is the weather in Paris?"}]


def _memo(vocab, max_bytes: int = 1 << 20) -> Continuations:
    return Continuations(lambda toks: vocab.detokenize(toks, unparse_special=True), max_bytes)


def _rest(vocab):
    return lambda text: [int(t) for t in vocab.tokenize(text, add_special=False, parse_special=True)]


def _per_char(vocab, text: str) -> list[int]:
    out = []
    for ch in text:
        toks = vocab.tokenize(ch, add_special=False, parse_special=False)
        assert len(toks) == 1
        out.append(int(toks[0]))
    return out


def test_a_prompt_that_repeats_an_answer_reuses_its_own_tokens(vocab):
    memo = _memo(vocab)
    prompt = "<start_of_turn>user\nWeather in Paris?<end_of_turn>\n<start_of_turn>model\n"
    p_toks = [int(t) for t in vocab.tokenize(prompt, add_special=True, parse_special=True)]
    answer = "Sunny in Paris"
    gen = _per_char(vocab, answer)  # not how the tokenizer would write it
    assert gen != _rest(vocab)(answer)
    memo.remember(prompt, p_toks, gen)
    follow = prompt + answer + "<end_of_turn>\n<start_of_turn>user\nAnd Rome?<end_of_turn>\n"
    got = memo.tokens(follow, _rest(vocab))
    assert got is not None
    assert got[:len(p_toks) + len(gen)] == p_toks + gen
    assert vocab.detokenize(got, unparse_special=True).endswith("And Rome?<end_of_turn>\n")
    assert memo.n_hits == 1 and memo.n_reused_tokens == len(gen)


def test_only_the_repeated_part_of_an_answer_is_reused(vocab):
    memo = _memo(vocab)
    prompt = "Q: colours?\nA:"
    p_toks = [int(t) for t in vocab.tokenize(prompt, add_special=True, parse_special=False)]
    gen = _per_char(vocab, " red and blue")
    memo.remember(prompt, p_toks, gen)
    got = memo.tokens(prompt + " red or green\nQ: more?", _rest(vocab))  # the client edited the answer
    assert got is not None and got[:len(p_toks) + 5] == p_toks + gen[:5]  # " red "
    assert memo.n_reused_tokens == 5
    assert vocab.detokenize(got[len(p_toks):]) == " red or green\nQ: more?"


def test_nothing_to_reuse_means_the_usual_tokenization(vocab):
    memo = _memo(vocab)
    memo.remember("Q: a?\nA:", [2, 10], _per_char(vocab, " yes"))
    assert memo.tokens("Q: b?\nA: yes", _rest(vocab)) is None       # another prompt
    assert memo.tokens("Q: a?\nA:no", _rest(vocab)) is None          # the answer is not repeated
    assert memo.tokens("Q: a?\nA:", _rest(vocab)) is None            # the prompt itself again


def test_the_memo_is_bounded_and_prefers_the_longest_prompt(vocab):
    gen = _per_char(vocab, " ok")
    memo = _memo(vocab, max_bytes=400)
    for k in range(20):
        memo.remember(f"prompt number {k}:", [2], gen)
    assert 0 < len(memo) < 20  # the oldest went
    memo.remember("A:", [2, 3], gen)
    memo.remember("A: ok B:", [2, 3, 4], gen)
    got = memo.tokens("A: ok B: ok C:", _rest(vocab))
    assert got[:3 + len(gen)] == [2, 3, 4] + gen


def test_a_call_cut_before_its_name_is_whole_is_not_text():
    hermes = FORMATS["hermes"]
    done = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    for cut in ('\n<tool_call>\n{"name": "get_', "\n<tool_call>\n", '\n<tool_call>\n{"na'):
        final = hermes.parse(done + cut, True)
        assert final.content == "" and [c.name for c in final.calls if c.whole_name] == ["get_weather"]
    alone = hermes.parse('<tool_call>\n{"name": "get_wea', True)  # a name's start, for ChatOutput to read
    assert alone.content == "" and [(c.name, c.whole_name) for c in alone.calls] == [("get_wea", False)]
    prose = hermes.parse("Use <tool_call> tags, like <tool_call> hello", True)  # not a call object
    assert "hello" in prose.content


def test_a_resent_tool_turn_reads_the_call_from_the_cache(tmp_path_factory):
    with served_with_template(tmp_path_factory, "Qwen-Qwen2.5-7B-Instruct.jinja", ctx=4096) as s:
        body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False,
                "max_tokens": 60, "temperature": 0}
        first = requests.post(s.url + "/v1/chat/completions", json=body, timeout=300).json()
        msg = first["choices"][0]["message"]
        assert msg["tool_calls"], first
        n_prompt = first["usage"]["prompt_tokens"]
        n_gen = first["usage"]["completion_tokens"]
        follow = {**body, "tool_choice": "auto", "max_tokens": 8,
                  "messages": ASK + [msg, {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"],
                                           "content": "18 degrees, light rain"}]}
        second = requests.post(s.url + "/v1/chat/completions", json=follow, timeout=300).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        # the whole first prompt and the call as generated (all but its closing tokens)
        assert cached >= n_prompt + n_gen - 3, (cached, n_prompt, n_gen)
        # cut inside the name: finish "length", and the markup is not shown as content
        cut = requests.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=300).json()
        choice = cut["choices"][0]
        assert choice["finish_reason"] == "length"
        assert not (choice["message"].get("content") or "").strip(), choice
