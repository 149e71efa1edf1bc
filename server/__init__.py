"""An HTTP server in front of llama_lib's continuous-batching engine.

llama.cpp's server-parallel example done again, with llama-server's (v0.5.0) and OpenAI's API:
`python -m server -m model.gguf -np 4` (or the `pyllama-server` console script).

Layout: `server.api` parses and validates request bodies and builds response objects (pure
functions, `ApiError` for every refusal); `server.service` holds the state between HTTP and the
engine (settings, model, metrics) and hands requests to the engine thread with
`Engine.submit()`; `server.http` is the stdlib `ThreadingHTTPServer` (routing, API key, SSE,
static files); `server.__main__` is the command line. All model work happens in the engine
thread; handler threads only tokenize (read-only) and block on request handles.

Choices worth knowing (where llama-server leaves room or we differ):

- `-c N` is llama-server's: the total over the slots, each slot gets N / np tokens (0: the
  model's training context). The engine allocates one more sequence of that size for the
  shared system prompt, N / np * (np + 1) cells in all.
- `/completion` streams only when asked (`"stream": true`), as llama-server; server-parallel
  always streamed, but its old page is not served here. A streamed `/completion` ends with the
  full result object with `"stop": true` and `"content": ""` (the text came in the chunks), as
  llama-server does. OpenAI streams end with a chunk carrying `finish_reason` and `usage`,
  then `data: [DONE]`.
- server-parallel's `system_prompt` + `anti_prompt` + `assistant_name` (all three in one
  `/completion` body) replace the shared system prompt (decoded once, copied into each slot's
  KV) and the server's anti-prompt list (`-r`) for the requests that follow; requests in flight
  keep theirs. The anti-prompts apply to every generation endpoint. `/props` shows them.
- Chat: `--chat-template NAME` (one of llama.cpp's built-ins), else the model's template when
  llama.cpp recognises it, else (the default Gemma 3 270M base model has none) a plain
  transcript: "System: ...\\nUser: ...\\nAssistant:" with stops "\\nUser:" / "User:" and the
  answer's leading whitespace dropped. llama-server would use chatml there, which a base model
  does not follow.
- `n` must be 1; several prompts in one request are refused (400): send one request each.
- The model name in responses is `-a/--alias`, else the model's file name.
- With `--api-key`, every endpoint needs the key (`Authorization: Bearer KEY` or `X-Api-Key`)
  but `/health`, `/v1/health` and the built-in chat page (`/`, `/index.html`; it asks for the
  key and sends it). Files under `--path DIR` need the key.
- A client that goes away is noticed when the next event of its stream is written (its
  request is then cancelled and its slot freed at the engine's next step). A non-streamed
  request runs to its end even if its client has left.
- When all slots are busy requests wait in the engine's queue (`--max-queue`, default 256,
  our addition); beyond it: 503 `unavailable_error` with `Retry-After: 1`.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
