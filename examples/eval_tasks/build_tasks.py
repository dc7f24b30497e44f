"""Write the data of the local lm-eval tasks in this folder from text every Python has (no hub, no download).

    python examples/eval_tasks/build_tasks.py        # rewrites data/*.jsonl (committed; deterministic)

- data/builtins_mc.jsonl (task stdlib_builtins_mc, multiple choice): the first line of a builtin function's
  docstring, and four builtin names to choose from (the right one and three others, drawn with a fixed seed);
- data/zen.jsonl (tasks stdlib_zen_complete, generate_until, and stdlib_zen_rolling, loglikelihood_rolling):
  the lines of the Zen of Python (`import this`), split after their first half of words.
The committed files were written by CPython 3.11; another version may word a docstring differently, so rebuild
only on purpose.
"""

from __future__ import annotations

import builtins
import codecs
import inspect
import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from megatron.fileio import write_text_atomically  # noqa: E402


def builtin_questions(seed: int = 1234) -> list[dict]:
    names = sorted(n for n in dir(builtins) if not n.startswith("_") and inspect.isbuiltin(getattr(builtins, n)))
    docs = {}
    for name in names:
        doc = inspect.getdoc(getattr(builtins, name)) or ""
        first = next((line.strip() for line in doc.splitlines() if line.strip() and "(" not in line[:len(name) + 1]),
                     "")
        if first and name not in first:
            docs[name] = first
    rng = random.Random(seed)
    rows = []
    for name, doc in docs.items():
        others = rng.sample([n for n in docs if n != name], 3)
        choices = [name] + others
        rng.shuffle(choices)
        rows.append({"question": doc, "choices": choices, "answer": choices.index(name)})
    return rows


def zen_lines() -> list[dict]:
    import this  # noqa: F401  (prints the Zen once; its text is this.s, in rot13)

    text = codecs.decode(this.s, "rot13")
    rows = []
    for line in text.splitlines()[2:]:
        words = line.split()
        if len(words) < 4:
            continue
        half = len(words) // 2
        rows.append({"prompt": " ".join(words[:half]), "target": " " + " ".join(words[half:]), "text": line})
    return rows


def main() -> int:
    for name, rows in (("builtins_mc.jsonl", builtin_questions()), ("zen.jsonl", zen_lines())):
        path = os.path.join(HERE, "data", name)
        write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        print(f"{path}: {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
