"""Splitting generated text into reasoning and content (server/chat/reasoning.py): marker detection on
the real templates of the fetched llama.cpp source (read at test time), fixed splits, and the
streaming property the server relies on: what a prefix's split emitted is never taken back."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.chat.reasoning import (REASONING_FORMATS, THINK, ThinkMarkers, detect_markers, prompt_opens,
                              split_reasoning)

TEMPLATES = Path(__file__).resolve().parents[1] / ".llama/src/llama.cpp/models/templates"

SEED = ThinkMarkers("<seed:think>", "</seed:think>")
MISTRAL = ThinkMarkers("[THINK]", "[/THINK]")
COHERE = ThinkMarkers("<|START_THINKING|>", "<|END_THINKING|>")
GEMMA4 = ThinkMarkers("<|channel>thought", "<channel|>")
MINIMAX3 = ThinkMarkers("<mm:think>", "</mm:think>")
APERTUS = ThinkMarkers("<|inner_prefix|>", "<|inner_suffix|>")
APRIEL = ThinkMarkers("Here are my reasoning steps:", "[BEGIN FINAL RESPONSE]")
HY3 = ThinkMarkers("<think:opensource>", "</think:opensource>")
ALL_MARKERS = [THINK, SEED, MISTRAL, COHERE, GEMMA4, MINIMAX3, APERTUS, APRIEL, HY3]

EXPECTED = {
    "Qwen-Qwen3-0.6B.jinja": THINK,
    "Qwen-QwQ-32B.jinja": THINK,
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja": THINK,
    "deepseek-ai-DeepSeek-R1-Distill-Llama-8B.jinja": THINK,
    "HuggingFaceTB-SmolLM3-3B.jinja": THINK,
    "GLM-4.6.jinja": THINK,
    "MiniMax-M2.jinja": THINK,
    "ByteDance-Seed-OSS.jinja": SEED,
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja": COHERE,
    "Cohere2MoE.jinja": COHERE,
    "mistralai-Ministral-3-14B-Reasoning-2512.jinja": MISTRAL,
    "google-gemma-4-31B-it.jinja": GEMMA4,
    "MiniMax-M3.jinja": MINIMAX3,
    "Apertus-8B-Instruct.jinja": APERTUS,
    "Apriel-1.6-15b-Thinker-fixed.jinja": APRIEL,
    "tencent-Hy3.jinja": HY3,
    "meta-llama-Llama-3.1-8B-Instruct.jinja": None,
    "google-gemma-2-2b-it.jinja": None,
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": None,
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": None,
    "Qwen-Qwen2.5-7B-Instruct.jinja": None,
    "openai-gpt-oss-120b.jinja": None,  # harmony channels: not split
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_detect_markers_on_real_templates(name):
    if not TEMPLATES.is_dir():
        pytest.skip(f"llama.cpp source not fetched ({TEMPLATES} missing; run scripts/fetch_llama.sh)")
    path = TEMPLATES / name
    if not path.is_file():
        pytest.skip(f"{name} not in this llama.cpp version")
    assert detect_markers(path.read_text()) == EXPECTED[name]


def test_detect_markers_on_plain_text():
    assert detect_markers("") is None
    assert detect_markers("{{ messages[0]['content'] }}") is None
    assert detect_markers("{% set c = c.split('</think>')[-1] %}") == THINK


def test_prompt_opens():
    assert prompt_opens("<｜Assistant｜><think>\n", THINK)
    assert prompt_opens("<|im_start|>assistant\n<think>", THINK)
    assert not prompt_opens("<|im_start|>assistant\n", THINK)
    assert not prompt_opens("<｜Assistant｜><think>\n</think>", THINK)  # thinking switched off
    assert not prompt_opens("<think>\n", None)
    assert prompt_opens("<|begin_assistant|>\nHere are my reasoning steps:\n", APRIEL)


def split(text, opened=False, final=True, fmt="auto", markers=THINK):
    return split_reasoning(text, markers, opened, final, fmt)


def test_split_when_not_opened():
    assert split("<think>\nI'm thinking\n</think>\n\nHello") == ("I'm thinking", "Hello")
    assert split("  \n<think>a</think>b") == ("a", "b")
    assert split("Hello <think>x</think> there") == ("", "Hello <think>x</think> there")
    assert split("Hello") == ("", "Hello")
    assert split("  Hello ") == ("", "  Hello ")
    assert split("<think></think>") == ("", "")
    assert split("<think>a</think>b</think>c") == ("a", "b</think>c")


def test_split_when_opened():
    assert split("I'm\nthinking\n</think>\n\nHello, world! ", opened=True) == ("I'm\nthinking", "Hello, world! ")
    assert split("\n</think>\n\nHi", opened=True) == ("", "Hi")
    assert split("Hi", opened=True, final=False) == ("Hi", "")


def test_split_without_end_marker_keeps_it_all_as_reasoning():
    assert split("<think>\n still going \n") == ("still going", "")
    assert split("still going\n", opened=True) == ("still going", "")
    assert split("<think>", final=True) == ("", "")


def test_other_markers():
    assert split("[THINK]plan[/THINK]answer", markers=MISTRAL) == ("plan", "answer")
    assert split("<|channel>thought\nI'm\nthinking<channel|>Hello", markers=GEMMA4) == ("I'm\nthinking", "Hello")
    assert split("<|START_THINKING|>x<|END_THINKING|>y", markers=COHERE) == ("x", "y")
    assert split("steps\n[BEGIN FINAL RESPONSE]\nHi", opened=True, markers=APRIEL) == ("steps", "Hi")


def test_streaming_holds_back_what_may_still_change():
    assert split("  ", final=False) == ("", "")
    assert split("<thi", final=False) == ("", "")
    assert split("<thi", final=True) == ("", "<thi")
    assert split("<think>\n", final=False) == ("", "")
    assert split("<think>ab </thi", final=False) == ("ab", "")
    assert split("<think>ab </thi", final=True) == ("ab </thi", "")
    assert split("<think>ab\n", final=False) == ("ab", "")
    assert split("<think>ab\n", final=True) == ("ab", "")
    assert split("<think>a</think>\n", final=False) == ("a", "")
    assert split("<think>a</think>\nb ", final=False) == ("a", "b ")
    assert split("<tx", final=False) == ("", "<tx")
    assert split("a<", opened=True, final=False) == ("a", "")


def test_formats():
    text = "<think>r</think>c"
    assert split(text, fmt="none") == ("", text)
    assert split(text, fmt="deepseek") == ("r", "c")
    assert split(text, fmt="auto") == ("r", "c")
    assert split(text, fmt="deepseek-legacy") == ("r", text)
    assert split("r</think>c", opened=True, fmt="deepseek-legacy") == ("r", "r</think>c")
    assert split(text, markers=None) == ("", text)
    with pytest.raises(ValueError):
        split(text, fmt="bogus")


def pieces(m: ThinkMarkers) -> list[str]:
    """Fragments that exercise the markers: whole, partial, whitespace, words, look-alikes."""
    return [m.start, m.end, m.start[:2], m.start[:-1], m.end[:1], m.end[:3], m.end[:-1], m.end[1:],
            " ", "\n", "\n\n", "\t", "a", "word", "<", "/", "|", "[", ":", "<think>", "</think>"]


@st.composite
def case(draw):
    markers = draw(st.sampled_from(ALL_MARKERS))
    text = "".join(draw(st.lists(st.sampled_from(pieces(markers)), max_size=12)))
    return (markers, text, draw(st.booleans()), draw(st.sampled_from(REASONING_FORMATS)))


def is_prefix(a: tuple[str, str], b: tuple[str, str]) -> bool:
    return b[0].startswith(a[0]) and b[1].startswith(a[1])


@settings(max_examples=400, deadline=None)
@given(case())
def test_streamed_parts_are_never_retracted(c):
    markers, text, opened, fmt = c
    final = split_reasoning(text, markers, opened, True, fmt)
    previous = ("", "")
    for i in range(len(text) + 1):
        partial = split_reasoning(text[:i], markers, opened, False, fmt)
        assert is_prefix(partial, final), (text[:i], partial, final)
        assert is_prefix(previous, partial), (text[:i], previous, partial)
        previous = partial

