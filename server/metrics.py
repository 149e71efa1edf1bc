"""The /metrics totals of finished requests, and llama-server's throughput window.

`prompt_tokens_seconds` and `predicted_tokens_seconds` are llama-server's windowed gauges: the
rate over the requests that finished since the last /metrics scrape (each scrape reports the
window and starts a new one; 0 when the window saw no tokens). The generation rate counts decode
steps, a request's tokens but its first (which comes from the prompt's last batch), as
llama-server does, so that a one-token answer does not inflate it. Everything else is cumulative.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Window:
    """Tokens (or decode steps) and seconds of one kind of work since the last scrape."""

    n: int = 0
    seconds: float = 0.0

    def rate(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Metrics:
    """Totals over finished requests, as llama-server keeps them for /metrics."""

    n_prompt_tokens: int = 0
    n_prompt_tokens_cached: int = 0
    t_prompt_s: float = 0.0
    n_predicted_tokens: int = 0
    t_predicted_s: float = 0.0
    n_tokens_max: int = 0
    n_requests: int = 0
    prompt_window: Window = dataclasses.field(default_factory=Window)
    predict_window: Window = dataclasses.field(default_factory=Window)

    def add_prompt(self, n_tokens: int, seconds: float) -> None:
        self.n_prompt_tokens += n_tokens
        self.t_prompt_s += seconds
        self.prompt_window.n += n_tokens
        self.prompt_window.seconds += seconds

    def add_generation(self, n_tokens: int, seconds: float) -> None:
        self.n_predicted_tokens += n_tokens
        self.t_predicted_s += seconds
        self.predict_window.n += max(0, n_tokens - 1)  # decode steps: the first token is free
        self.predict_window.seconds += seconds

    def copy(self) -> "Metrics":
        return dataclasses.replace(self, prompt_window=dataclasses.replace(self.prompt_window),
                                   predict_window=dataclasses.replace(self.predict_window))

    def reset_window(self) -> None:
        self.prompt_window, self.predict_window = Window(), Window()
