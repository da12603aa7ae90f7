"""Writes the small SFT / DPO files the sft.py and dpo.py recipes train on (committed, so the
recipes do not depend on this interpreter's standard library version):

    python experiments/data/make_finetune_data.py

From functions of the standard library (sorted files, the first functions that fit):
  sft_stdlib.jsonl   {prompt: a `def` line, completion: the function's next two lines}
  dpo_stdlib.jsonl   {prompt, chosen: those two lines, rejected: the same two lines swapped}
so chosen and rejected hold the same tokens and differ only in their order.
"""

import ast
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from jaxlm.data.sources import stdlib_files  # noqa: E402

ROWS = 600
MAX_LINE = 60


def examples():
    for path in sorted(stdlib_files()):
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.end_lineno - node.lineno < 3:
                continue
            head = lines[node.lineno - 1]
            body = lines[node.lineno:node.lineno + 2]
            if (not head.rstrip().endswith(":") or len(head) > MAX_LINE
                    or any(not b.strip() or len(b) > MAX_LINE for b in body)
                    or body[0].strip() == body[1].strip()):
                continue
            yield head + "\n", body[0] + "\n" + body[1] + "\n", body[1] + "\n" + body[0] + "\n"


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    rows = []
    for prompt, chosen, rejected in examples():
        rows.append((prompt, chosen, rejected))
        if len(rows) == ROWS:
            break
    with open(os.path.join(here, "sft_stdlib.jsonl"), "w", encoding="utf-8") as f:
        for prompt, chosen, _ in rows:
            f.write(json.dumps({"prompt": prompt, "completion": chosen}) + "\n")
    with open(os.path.join(here, "dpo_stdlib.jsonl"), "w", encoding="utf-8") as f:
        for prompt, chosen, rejected in rows:
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n")
    print(f"wrote {len(rows)} rows each to {here}/sft_stdlib.jsonl and dpo_stdlib.jsonl")


if __name__ == "__main__":
    main()
