"""Chat SFT data: Qwen3 / Qwen3.5 chat rendering, the assistant-only loss mask token by token,
packing whole examples into rows, over-long examples, malformed lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwenjax.cli import main
from qwenjax.data.chat import encode_record, render_chat
from qwenjax.data.qwen_vocab import qwen_tokenizer
from qwenjax.data.sft import SFTDataset, read_sft_files
from qwenjax.errors import ConfigError

CHAT = {
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n5"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "reasoning_content": "It said sunny.", "content": "Sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
}
TOOL_CALLS = {
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "qwen3.5": ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                "</function>\n</tool_call>"),
}


def _pieces(kind: str) -> list[tuple[str, bool]]:
    """The expected rendering after the system/tools turn, cut where the mask changes: (text,
    is it assistant output). The first assistant turn loses its (historical) thinking block."""
    return [
        ("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n", False),
        ("5<|im_end|>", True),
        ("\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n", False),
        (TOOL_CALLS[kind] + "<|im_end|>", True),
        (("\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
          "<|im_start|>assistant\n"), False),
        ("<think>\nIt said sunny.\n</think>\n\nSunny.<|im_end|>", True),
        ("\n", False),
    ]


@pytest.mark.parametrize("kind", ["qwen3", "qwen3.5"])
def test_assistant_mask_token_by_token(kind):
    tok = qwen_tokenizer(kind)
    text = render_chat(tok, CHAT["messages"], CHAT["tools"])
    system, _, _ = text.partition("<|im_end|>\n")
    assert system.startswith("<|im_start|>system\nYou are terse.\n\n# Tools")
    assert '"name": "get_weather"' in system  # the tool list, as JSON
    pieces = [(system + "<|im_end|>\n", False)] + _pieces(kind)
    assert text == "".join(p for p, _ in pieces)
    ids, mask = encode_record(tok, CHAT)
    # Expected, built independently: each piece tokenised alone (every cut is at a special token
    # or a newline, where the pre-tokeniser cuts anyway), masked as a whole.
    want_ids, want_mask = [], []
    for piece, learnt in pieces:
        piece_ids = tok.encode(piece)
        want_ids += piece_ids
        want_mask += [learnt] * len(piece_ids)
    assert ids.tolist() == want_ids
    assert mask.tolist() == want_mask
    im_end = tok.backend.token_to_id("<|im_end|>")
    learnt_ends = [i for i in np.flatnonzero(ids == im_end) if mask[i]]
    assert len(learnt_ends) == 3  # each assistant turn's end-of-turn token, and no other
    assert tok.decode(ids[mask]).count("Paris") == 1  # the call's argument, not the question


def test_generation_prompt_and_thinking_switch():
    msgs = [{"role": "user", "content": "hi"}]
    q3, q35 = qwen_tokenizer("qwen3"), qwen_tokenizer("qwen3.5")
    head = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(q3, msgs, add_generation_prompt=True) == head
    assert render_chat(q35, msgs, add_generation_prompt=True) == head + "<think>\n"
    off = head + "<think>\n\n</think>\n\n"
    assert render_chat(q3, msgs, add_generation_prompt=True, enable_thinking=False) == off
    assert render_chat(q35, msgs, add_generation_prompt=True, enable_thinking=False) == off


def test_prompt_completion_text_and_loss_on_all():
    tok = qwen_tokenizer("qwen3")
    ids, mask = encode_record(tok, {"prompt": "2+2=", "completion": "4"})
    n_prompt = len(tok.encode("2+2="))
    assert mask.tolist() == [False] * n_prompt + [True, True] and ids[-1] == tok.eos_id
    ids, mask = encode_record(tok, {"text": "hello world"})
    assert mask.all() and ids[-1] == tok.eos_id
    _, mask = encode_record(tok, CHAT, loss_on="all")
    assert mask.all()


def _examples():
    # (ids, mask) with recognisable ids: example i is [100i, 100i+1, ...]
    out = []
    for i, n in enumerate([5, 3, 7, 12, 4]):
        ids = np.arange(n, dtype=np.int32) + 100 * (i + 1)
        mask = np.zeros(n, bool)
        mask[n // 2:] = True
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_packing_whole_examples_with_segments(overlong):
    ds = SFTDataset(_examples(), 10, seed=3, batch_size=4, overlong=overlong, pad_id=0)
    assert ds.stats["sft_truncated"] == (overlong == "truncate")
    assert ds.stats["sft_dropped"] == (overlong == "drop")
    it = iter(ds)
    batch = it.next_batch(4)
    by_first = {int(ids[0]): (ids, mask) for ids, mask in ds.examples}
    for r in range(4):
        seg = batch["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            ids, mask = by_first[int(batch["input_ids"][r, where[0]])]
            assert where.tolist() == list(range(where[0], where[0] + len(ids)))  # whole
            assert batch["input_ids"][r, where].tolist() == ids.tolist()
            assert batch["positions"][r, where].tolist() == list(range(len(ids)))
            assert batch["targets"][r, where[:-1]].tolist() == ids[1:].tolist()
            assert batch["loss_mask"][r, where].tolist() == [*mask[1:], 0.0]
        pad = seg == 0
        assert not batch["loss_mask"][r, pad].any()
    # Resuming from the saved state gives the same next batch.
    state = it.get_state()
    nxt = it.next_batch(4)
    again = iter(SFTDataset(_examples(), 10, seed=3, batch_size=4, overlong=overlong))
    again.set_state(state)
    resumed = again.next_batch(4)
    assert all(np.array_equal(nxt[k], resumed[k]) for k in nxt)


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    bad = json.dumps({"messages": [{"role": "robot", "content": "a"}]})
    path.write_text(f"{good}\n\n{bad}\n")
    with pytest.raises(ConfigError, match=r"chat\.jsonl:3: messages\[0\] must be"):
        read_sft_files([str(path)], qwen_tokenizer("qwen3"))
    path.write_text(f"{good}\n{{not json\n")
    run = tmp_path / "run"
    code = main(["train", "experiments/tiny_test.yaml", "--run-dir", str(run), "--set",
                 "data.source=sft", "--set", f"data.paths=[{path}]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err[-1].startswith("qwenjax: error: ") and f"{path}:2: not valid JSON" in err[-1]
    assert not run.exists()


@pytest.mark.parametrize("kind", ["qwen3", "qwen3.5"])
def test_transformers_renders_our_templates_the_same(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    tok = qwen_tokenizer(kind)
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for add in (False, True):
        msgs = CHAT["messages"] if not add else CHAT["messages"][:-1]
        theirs = hf.apply_chat_template(msgs, tools=CHAT["tools"], tokenize=False,
                                        add_generation_prompt=add)
        assert theirs == render_chat(tok, msgs, CHAT["tools"], add_generation_prompt=add)
