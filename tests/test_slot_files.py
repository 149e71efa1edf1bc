"""Slot save / restore / erase (`--slot-save-path`, `POST /slots/{id}?action=...`) on the real
model: a saved slot restored into another slot serves the same prompt from its cache, with the
same greedy answer as computing it; erase drops the cache; bad ids, actions, filenames and files
are 400, and a server without the flag answers 501."""

from __future__ import annotations

import threading

import pytest
import requests

from server_util import served

PROMPT = "User: What is the capital of France? Answer in one word.\nAssistant:"
SEED_BODY = {"prompt": PROMPT, "n_predict": 12, "temperature": 0, "cache_prompt": True}


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    base = tmp_path_factory.mktemp("slots")
    # --no-prefix-share, --cache-ram 0: an erased slot would otherwise copy the prompt from the
    # other slot, or load the RAM copy --cache-idle-slots made of it
    with served(["-np", "2", "-c", "2048", "--slot-save-path", str(base / "saved"), "--no-prefix-share",
                 "--cache-ram", "0"],
                base / "server.log") as s:
        s.save_dir = base / "saved"
        yield s


def complete(srv, slot: int, **extra) -> dict:
    r = srv.post("/completion", {**SEED_BODY, "id_slot": slot, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def action(srv, slot, what: str, body=None) -> requests.Response:
    return srv.post(f"/slots/{slot}?action={what}", body)


def test_save_restore_erase_round_trip(srv):
    first = complete(srv, 1)
    n_prompt = first["timings"]["prompt_n"]
    assert first["timings"]["cache_n"] == 0
    saved = action(srv, 1, "save", {"filename": "slot1.bin"})
    assert saved.status_code == 200, saved.text
    body = saved.json()
    # the sequence holds the prompt and the answer but its last token (never decoded)
    assert body["id_slot"] == 1 and body["filename"] == "slot1.bin"
    assert body["n_saved"] == n_prompt + first["tokens_predicted"] - 1
    assert body["n_written"] == (srv.save_dir / "slot1.bin").stat().st_size > 0
    assert body["timings"]["save_ms"] >= 0
    restored = action(srv, 0, "restore", {"filename": "slot1.bin"}).json()
    assert restored["n_restored"] == body["n_saved"] and restored["n_read"] > 0 and "restore_ms" in restored["timings"]
    # slot 0 now serves the prompt from the restored cache: one token decoded, the same answer
    again = complete(srv, 0)
    assert again["timings"]["cache_n"] == n_prompt - 1 and again["timings"]["prompt_n"] == 1
    assert again["content"] == first["content"]
    erased = action(srv, 0, "erase").json()
    assert erased == {"id_slot": 0, "n_erased": n_prompt + first["tokens_predicted"] - 1}
    fresh = complete(srv, 0)
    assert fresh["timings"]["cache_n"] == 0 and fresh["timings"]["prompt_n"] == n_prompt
    assert fresh["content"] == first["content"]


def test_save_waits_for_the_request_in_the_slot(srv):
    done = {}

    def run():
        done["r"] = complete(srv, 1, n_predict=40, prompt=PROMPT + " Paris.\nUser: And of Italy?\nAssistant:")
    t = threading.Thread(target=run)
    t.start()
    for _ in range(200):  # until the request holds the slot
        if any(s["id"] == 1 and s["is_processing"] for s in srv.get("/slots").json()):
            break
    saved = action(srv, 1, "save", {"filename": "busy.bin"})
    t.join()
    assert saved.status_code == 200
    r = done["r"]
    assert saved.json()["n_saved"] == r["tokens_evaluated"] + r["tokens_predicted"] - 1


def test_bad_slot_actions_are_400_and_the_server_keeps_serving(srv):
    (srv.save_dir / "garbage.bin").write_bytes(b"not a state file" * 10)
    cases = [
        (1, "save", {"filename": "../escape.bin"}, "Invalid filename"),
        (1, "save", {"filename": "a/b.bin"}, "Invalid filename"),
        (1, "save", {"filename": ".."}, "Invalid filename"),
        (1, "save", {}, "Invalid filename"),
        (1, "save", {"filename": 7}, "Invalid filename"),
        (99, "save", {"filename": "x.bin"}, "Invalid slot ID"),
        ("abc", "save", {"filename": "x.bin"}, "Invalid slot ID"),
        (1, "bogus", {"filename": "x.bin"}, "Invalid action"),
        (0, "restore", {"filename": "missing.bin"}, "Unable to restore slot"),
        (0, "restore", {"filename": "garbage.bin"}, "Unable to restore slot"),
    ]
    for slot, what, body, needle in cases:
        r = action(srv, slot, what, body)
        assert r.status_code == 400, (slot, what, body, r.text)
        assert needle in r.json()["error"]["message"]
    assert not (srv.save_dir.parent / "escape.bin").exists()
    assert complete(srv, 0)["content"]  # a failed restore left slot 0 usable
    assert requests.get(srv.url + "/health", timeout=5).status_code == 200


def test_without_slot_save_path_actions_are_501(tmp_path):
    with served(["-np", "1", "-c", "512"], tmp_path / "server.log") as s:
        r = s.post("/slots/0?action=save", {"filename": "x.bin"})
        assert r.status_code == 501 and "--slot-save-path" in r.json()["error"]["message"]


def test_a_symlink_in_the_folder_is_never_followed(srv, tmp_path):
    """Issue 30: a symlink planted in --slot-save-path, to a file outside the folder or inside it,
    is refused (400) by save and restore, and the file it points to is left as it was."""
    complete(srv, 1)
    assert action(srv, 1, "save", {"filename": "real.bin"}).status_code == 200
    real = srv.save_dir / "real.bin"
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious, not a slot")
    stolen = tmp_path / "saved-elsewhere.bin"
    stolen.write_bytes(real.read_bytes())  # a valid slot file, outside the folder
    links = {"out.bin": outside, "stolen.bin": stolen, "inner.bin": real}
    for name, target in links.items():
        (srv.save_dir / name).symlink_to(target)
    try:
        for name in links:
            r = action(srv, 1, "save", {"filename": name})
            assert r.status_code == 400 and "symbolic link" in r.json()["error"]["message"], (name, r.text)
        for name in ("stolen.bin", "inner.bin"):
            r = action(srv, 0, "restore", {"filename": name})
            assert r.status_code == 400 and "symbolic link" in r.json()["error"]["message"], (name, r.text)
        assert action(srv, 0, "erase").status_code == 200
        assert outside.read_bytes() == b"precious, not a slot"
        assert stolen.read_bytes() == real.read_bytes()
        assert all((srv.save_dir / name).is_symlink() for name in links)
        assert action(srv, 0, "restore", {"filename": "real.bin"}).status_code == 200
    finally:
        for name in links:
            (srv.save_dir / name).unlink()


def test_files_are_llama_state_seq_save_file_bytes(model, tmp_path):
    """The file written through a no-follow descriptor is byte for byte what libllama's
    llama_state_seq_save_file writes (files stay interchangeable with llama-server's), and it
    loads back into another sequence."""
    import numpy as np

    from conftest import N_THREADS
    from llama_lib import Batch, Context, state_file

    tokens = np.asarray(model.vocab.tokenize("The capital of France is Paris."), np.int32)
    with Context(model, n_ctx=512, n_batch=512, n_ubatch=512, n_seq_max=2, kv_unified=True,
                 n_threads=N_THREADS, n_threads_batch=N_THREADS) as ctx, Batch(512, 2) as batch:
        batch.add_sequence(tokens, 0, 1)
        assert ctx.decode(batch.c_batch) == 0
        ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
        n = state_file.write(str(ours), 1, tokens, ctx.seq_state_view(1))
        assert n == ctx.seq_save_file(str(theirs), 1, tokens) == ours.stat().st_size
        assert ours.read_bytes() == theirs.read_bytes()
        read_tokens, state, n_read = state_file.read(str(theirs), 0, 512)
        assert n_read == n and np.array_equal(read_tokens, tokens)
        assert ctx.set_seq_state(0, state) and ctx.memory.seq_pos_max(0) == len(tokens) - 1
