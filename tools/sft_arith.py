"""The CPU SFT demo's synthetic chat task and its held-out exact-match score.

    python tools/sft_arith.py data DIR [--task add|sub|sub-numlog] [--train 4000 --heldout 200]
        write DIR/{train,heldout}.jsonl
    python tools/sft_arith.py eval HF_DIR DIR/heldout.jsonl [--adapter PEFT_DIR]   one JSON line

Each example is a chat: a system prompt, a user asking for the sum of two 2-digit numbers (in
one of several phrasings), the assistant answering with the number alone. For the mask
ablation on a pretrained base (NOTES Session 8), task `sub` asks for a - b (a > b) after a
reference of 12 random letters (a long, unpredictable prompt before a short answer), and
`sub-numlog` after a log of 8 random 2-digit numbers instead. A held-out example counts as
exact when the greedy reply, up to `<|im_end|>`, is the right number (the prompt ends with the
empty think block of Qwen3's non-thinking mode, as the training turns have it). Train and
held-out pairs are disjoint.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

PHRASES = ["What is {a}+{b}?", "Add {a} and {b}.", "{a} plus {b} = ?", "Sum of {a} and {b}?"]
SUB_PHRASES = ["What is {a}-{b}?", "Subtract {b} from {a}.", "{a} minus {b} = ?",
               "Difference of {a} and {b}?"]
LOG_NUMBERS = 8  # random 2-digit numbers before a `sub-numlog` question
REF_LETTERS = 12  # random letters before a `sub` question
SYSTEM = "Answer with the number only."


def chat(user: str, answer: int) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": user},
                         {"role": "assistant", "content": str(answer)}]}


def add_example(a: int, b: int, rng: random.Random) -> dict:
    return chat(rng.choice(PHRASES).format(a=a, b=b), a + b)


def sub_example(a: int, b: int, rng: random.Random) -> dict:
    ref = "".join(rng.choice(string.ascii_lowercase) for _ in range(REF_LETTERS))
    return chat(f"Ref {ref}. " + rng.choice(SUB_PHRASES).format(a=a, b=b), a - b)


def sub_numlog_example(a: int, b: int, rng: random.Random) -> dict:
    log = " ".join(str(rng.randint(10, 99)) for _ in range(LOG_NUMBERS))
    return chat(f"Log: {log}. " + rng.choice(SUB_PHRASES).format(a=a, b=b), a - b)


TASKS = {"add": add_example, "sub": sub_example, "sub-numlog": sub_numlog_example}


def write_data(out: Path, n_train: int, n_heldout: int, seed: int = 0, task: str = "add") -> None:
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if task == "add" or a > b]
    rng.shuffle(pairs)
    out.mkdir(parents=True, exist_ok=True)
    for name, chunk in (("heldout", pairs[:n_heldout]), ("train", pairs[n_heldout:][:n_train])):
        lines = [json.dumps(TASKS[task](a, b, rng)) for a, b in chunk]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def exact_match(hf_dir: str, heldout: str, adapter: str | None = None, batch: int = 50) -> dict:
    from qwenjax.data.chat import render_chat
    from qwenjax.infer.generate import generate, load_for_inference

    model, tok = load_for_inference(hf_dir, None)
    if adapter:
        from qwenjax.hf.peft import load_peft_adapter

        load_peft_adapter(model, adapter)
    records = [json.loads(line) for line in Path(heldout).read_text().splitlines() if line]
    end = tok.backend.token_to_id("<|im_end|>")
    right = 0
    for i in range(0, len(records), batch):
        chunk = records[i:i + batch]
        # Qwen3's template gives the last assistant turn an empty think block; asking for no
        # thinking puts that block in the prompt, as the model saw it in training.
        prompts = [tok.encode(render_chat(tok, r["messages"][:-1], add_generation_prompt=True,
                                          enable_thinking=False)) for r in chunk]
        outs = generate(model, prompts, max_new_tokens=6, temperature=0.0,
                        stop_tokens=[end, tok.eos_id])
        for r, out in zip(chunk, outs):
            reply = tok.decode([t for t in out if t not in (end, tok.eos_id)]).strip()
            right += reply == r["messages"][-1]["content"]
    return {"exact_match": right / len(records), "n": len(records), "model": hf_dir,
            "adapter": adapter}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("out")
    d.add_argument("--task", choices=sorted(TASKS), default="add")
    d.add_argument("--train", type=int, default=4000)
    d.add_argument("--heldout", type=int, default=200)
    e = sub.add_parser("eval")
    e.add_argument("hf_dir")
    e.add_argument("heldout")
    e.add_argument("--adapter")
    args = p.parse_args(argv)
    if args.cmd == "data":
        write_data(Path(args.out), args.train, args.heldout, task=args.task)
    else:
        print(json.dumps(exact_match(args.hf_dir, args.heldout, args.adapter)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
