"""Writes the small format examples next to this script from the bundled sample's first 24 records
(python assets/formats/make_formats.py). Tests read them to prove each format loads, trains and inspects."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent
records = json.loads((HERE.parent / "sample" / "train.json").read_text(encoding="utf-8"))[:24]
pairs = [(r["instruction"], r["output"]) for r in records]

# ShareGPT: two-turn dialogues (records 2k and 2k+1), roles human/gpt, a system turn on the first
sharegpt = []
for k in range(0, len(pairs), 2):
    turns = [{"from": "system", "value": "你是一个有帮助的助手"}] if k == 0 else []
    for q, a in pairs[k:k + 2]:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    sharegpt.append({"conversations": turns})
(HERE / "sharegpt.json").write_text(json.dumps(sharegpt, ensure_ascii=False, indent=1), encoding="utf-8")

# OpenAI messages, one conversation per line
with open(HERE / "messages.jsonl", "w", encoding="utf-8") as f:
    for q, a in pairs:
        f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
                           ensure_ascii=False) + "\n")

# A table whose columns are not alpaca's: question / answer
with open(HERE / "qa.csv", "w", encoding="utf-8", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["id", "question", "answer"])
    writer.writerows([i, q, a] for i, (q, a) in enumerate(pairs))

# Parquet with prompt / response columns
pq.write_table(pa.table({"prompt": [q for q, _ in pairs], "response": [a for _, a in pairs]}), HERE / "qa.parquet")
