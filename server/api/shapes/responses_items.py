"""A Responses answer's output items, built from chat deltas (server.chat.output), with the
stream events that open, grow and close them.

Items come one after another: `reasoning` (rs_...), `message` (msg_..., one `output_text`
part), `function_call` (fc_..., with the call's `call_id`); a delta of another kind closes the
open item first. Every event carries its `sequence_number`, counted from 0 over the whole
stream (the response events' too: `Items.event` numbers them all).
"""

from __future__ import annotations

from .common import new_id


class Items:
    """The output items of one answer, and the events that build them."""

    def __init__(self):
        self.output: list[dict] = []
        self.open: dict | None = None  # the item growing now
        self.seq = 0

    def event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def _start(self, item: dict) -> list[dict]:
        evs = self.close()
        self.output.append(item)
        self.open = item
        shown = {k: (list(v) if isinstance(v, list) else v) for k, v in item.items()}
        evs.append(self.event("response.output_item.added", output_index=len(self.output) - 1, item=shown))
        return evs

    @property
    def index(self) -> int:
        return len(self.output) - 1

    def add(self, delta: dict) -> list[dict]:
        """The events of one chat delta (reasoning_content, content or a tool_calls fragment)."""
        evs: list[dict] = []
        if "reasoning_content" in delta:
            text = delta["reasoning_content"]
            if self.open is None or self.open["type"] != "reasoning":
                evs += self._start({"id": new_id("rs_"), "type": "reasoning", "summary": [], "content": [],
                                    "encrypted_content": None, "status": "in_progress"})
                self.open["_text"] = ""
            self.open["_text"] += text
            evs.append(self.event("response.reasoning_text.delta", item_id=self.open["id"],
                                  output_index=self.index, content_index=0, delta=text))
        if "content" in delta and delta["content"]:
            text = delta["content"]
            if self.open is None or self.open["type"] != "message":
                item = {"id": new_id("msg_"), "type": "message", "role": "assistant", "content": [],
                        "status": "in_progress"}
                evs += self._start(item)
                self.open["_text"] = ""
                evs.append(self.event("response.content_part.added", item_id=item["id"], output_index=self.index,
                                      content_index=0, part=_text_part("")))
            self.open["_text"] += text
            evs.append(self.event("response.output_text.delta", item_id=self.open["id"], output_index=self.index,
                                  content_index=0, delta=text, logprobs=[]))
        for call in delta.get("tool_calls", ()):
            fn = call.get("function", {})
            if "id" in call:  # a call's header: a new item
                cid = call["id"]
                evs += self._start({"id": "fc_" + cid.removeprefix("call_"), "type": "function_call",
                                    "call_id": cid, "name": fn.get("name", ""), "arguments": "",
                                    "status": "in_progress"})
            if fn.get("arguments"):
                self.open["arguments"] += fn["arguments"]
                evs.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                      output_index=self.index, delta=fn["arguments"]))
        return evs

    def close(self, status: str = "completed") -> list[dict]:
        """The events that finish the open item (none when nothing is open)."""
        item, self.open = self.open, None
        if item is None:
            return []
        evs: list[dict] = []
        i, iid = self.index, item["id"]
        if item["type"] == "reasoning":
            text = item.pop("_text")
            evs.append(self.event("response.reasoning_text.done", item_id=iid, output_index=i,
                                  content_index=0, text=text))
            item["content"] = [{"type": "reasoning_text", "text": text}]
        elif item["type"] == "message":
            text = item.pop("_text")
            part = _text_part(text)
            evs.append(self.event("response.output_text.done", item_id=iid, output_index=i, content_index=0,
                                  text=text, logprobs=[]))
            evs.append(self.event("response.content_part.done", item_id=iid, output_index=i, content_index=0,
                                  part=part))
            item["content"] = [part]
        else:
            evs.append(self.event("response.function_call_arguments.done", item_id=iid, output_index=i,
                                  name=item["name"], arguments=item["arguments"]))
        item["status"] = status
        evs.append(self.event("response.output_item.done", output_index=i, item=item))
        return evs


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
