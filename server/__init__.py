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
  llama-server does. OpenAI streams end as llama-server's: a chat stream starts with the delta
  `{"role": "assistant", "content": null}` and ends with a chunk with `finish_reason` and an
  empty delta, then (only with `stream_options.include_usage`) a chunk with `"choices": []`,
  `usage` and `timings`; a `/v1/completions` stream's last chunk always carries `usage`; then
  `data: [DONE]`. `system_fingerprint` is "b0-pyllama-VERSION" (llama-server's "b<build>-<commit>" form).
- server-parallel's `system_prompt` + `anti_prompt` + `assistant_name` (all three in one
  `/completion` body) replace the shared system prompt (decoded once, copied into each slot's
  KV) and the server's anti-prompt list (`-r`) for the requests that follow; requests in flight
  keep theirs. The anti-prompts apply to every generation endpoint. `/props` shows them.
- Chat: `--chat-template NAME` (one of llama.cpp's built-ins) or a template text
  (`--chat-template TEXT`, `--chat-template-file FNAME`) that llama.cpp recognises (Jinja is
  never executed: other texts are a CLI error; `--jinja` is accepted and only logs a note),
  else the model's template when llama.cpp recognises it, else (the default Gemma 3 270M base model has none) a plain
  transcript: "System: ...\\nUser: ...\\nAssistant:" with stops "\\nUser:" / "User:" and the
  answer's leading whitespace dropped. llama-server would use chatml there, which a base model
  does not follow.
- `n` (llama-server's `n_cmpl`) up to `--parallel`, and several prompts in one request (a list
  of strings / token-id lists) run as one engine request each, as llama-server's tasks: the
  k-th completion of a prompt samples with seed + k. OpenAI answers get one choice each (by
  `index`; `usage` sums the completions, a prompt counted once), `/completion` a JSON list;
  streams interleave the choices' chunks and end with one `[DONE]`. A prompt mixing strings
  and token ids is refused (400).
- Chat requests follow llama-server's prefill rules: a final assistant message is continued
  (no generation prompt after it; the answer holds only the continuation); two assistant
  messages at the end, or `add_generation_prompt` with `continue_final_message`, are 400.
  `logit_bias` keys may be texts (tokenized without BOS, each token biased); `ignore_eos`
  bans the end-of-generation tokens, listed in `generation_settings.logit_bias` with bias null.
- Structured output: `grammar` (GBNF), `json_schema` and `response_format` are read on every
  generation endpoint (llama-server reads `response_format` only in chat); a grammar together
  with a schema is 400 everywhere (on `/completion` llama-server lets the grammar win). Our own
  JSON Schema converter (`llama_lib.json_schema`) refuses keywords it cannot enforce (`not`,
  `if`, `uniqueItems`, `multipleOf`, `minimum` on `number`, ...) with a 400 naming them, where
  llama.cpp ignores some; a `pattern` without `^`/`$` is a search, as JSON Schema defines it.
- Token probabilities (`n_probs` on /completion, `logprobs`/`top_logprobs` in OpenAI requests)
  are the softmax of the raw logits, before logit bias, penalties and samplers;
  `post_sampling_probs` is accepted but gives these same pre-sampling figures. `top_logprobs`
  is at most 20 and a negative `n_probs` is 400. The end-of-generation token that ends a
  request gets no entry.
- Prompt cache: a finished request's tokens stay in its slot's KV; a new request goes to the
  idle slot whose cache shares the largest part of its prompt (`-sps`, default 0.1; else the
  lowest free one, where llama-server takes the least recently used: llama.cpp splits a batch
  whose sequences have gaps into several ubatches, so keeping them contiguous is faster) and
  decodes the rest. A cancelled or failed request's cells are freed.
  With Gemma 3's sliding-window cache a prefix whose window is gone is decoded again (no
  checkpoints here). `--cache-reuse` (chunk reuse by KV shifting) is accepted and not used.
- The model name in responses is `-a/--alias` (a comma list, kept sorted and deduplicated as
  llama-server's set: the first in sorted order), else the model's file name.
- llama-server's flags are accepted with its spellings and meanings where we have the feature
  (sampling defaults such as `--top-k`, `-fa`, `-ctk/-ctv`, `--host a,b` with one listener per
  address). A few are accepted without effect, and say so in `--help` and the log: `--offline`,
  `--no-jinja`, `--no-context-shift`, `--keep`, `--cache-reuse`, `--mlock`. Flags for features we
  lack (`--embedding`, `--reranking`, `--lora`, `--mmproj`, `-md`, `--slot-save-path`,
  `--context-shift`, `-hf`, ...) exit 2 naming the flag. Every key of `--api-key a,b` and
  `--api-key-file` is accepted.
- With `--api-key`, every endpoint needs the key (`Authorization: Bearer KEY` or `X-Api-Key`)
  but `/health`, `/v1/health` and the built-in chat page (`/`, `/index.html`; it asks for the
  key and sends it). Files under `--path DIR` need the key. llama-server's web UI asset names
  (`/sw.js`, `/manifest.webmanifest`, `/_app/version.json`), which it serves without the key,
  are 404 without it (we have no such files).
- A client that goes away is noticed at once, streamed or not, queued, prefilling or
  generating: one thread watches the sockets of running requests (select, then a peek that
  reads EOF) and cancels the request, whose slot is freed at the engine's next step. A
  stream also notices at its next failed write. (A client that half-closes its sending side
  after the request counts as gone.)
- When all slots are busy requests wait in the engine's queue (`--max-queue`, default 256,
  our addition); beyond it: 503 `unavailable_error` with `Retry-After: 1`. Every request
  accepted gets its answer or, in a stream, a final event (with `error` when it failed).
- At most `--threads-http N` connections are handled at once (one thread each; default
  --parallel + --max-queue + 8, at most 1024). A connection beyond that waits a quarter
  second for a thread, then gets 503 `unavailable_error` with `Retry-After: 1`.
- `-to/--timeout N`: a request's line, headers and body must arrive within N s of its first
  byte (else 408 JSON while the body is read; the connection is closed while the head is);
  an idle kept-alive connection is closed after 5 s (cpp-httplib's keep-alive time-out).
- Bodies: Content-Length or `Transfer-Encoding: chunked`, at most 8 MiB (413 beyond); a
  body that never reaches its Content-Length is 408 when the time-out ends the wait.
- `n_predict`/`max_tokens`: -1 (the default) generates until EOS or the slot is full, as
  llama-server; below -1 or above 2^31-1 is 400; any value in between is accepted and in
  effect capped by the slot's context (finish reason "length"). An empty prompt ("" or [])
  and token ids outside the vocabulary are 400 (llama-server would generate from BOS alone).
- `-kvu/--kv-unified`: one KV buffer of `-c` cells any slot may fill (the system prompt's
  cells are shared). When it runs out, the prompt caches of idle slots are dropped first
  (least recently used first, as llama-server); then the request owning the token that found
  no room ends with an error (stream: a final event with `error`; otherwise 500
  `server_error` "the KV cache is full ..."); the others go on.
- CORS is off unless `--cors-origin ORIGIN` (repeatable, or `*`; or llama-server's
  `--cors-origins a,b`) is given: then responses to an allowed origin carry
  Access-Control-Allow-Origin (`*` echoes the origin, as llama-server with credentials;
  `localhost` allows http(s) origins on localhost / 127.0.0.1 / [::1], any port) and every
  OPTIONS is answered 200 before the API key check, with llama-server's Allow-Credentials /
  Allow-Methods / Allow-Headers (with `--api-key`, "Authorization, X-Api-Key" are added to
  "*", which browsers do not read as covering them); other origins get no Allow-Origin.
  Without CORS, OPTIONS is 405 (404 for unknown paths), never 401, and no CORS header is sent.
- The API key is accepted from `Authorization: Bearer KEY` or `X-Api-Key: KEY`, each
  compared with hmac.compare_digest. Binding to anything but loopback without `--api-key`
  logs a warning. The Server header says "pyllama-server", nothing more.
- /slots carries `kv_pos_max` (our addition): the slot's largest KV position as read by the
  engine thread when the slot was last released (n_system_tokens - 1 when it holds only the
  system prompt).
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
