"""Regenerate the answers of an understanding jsonl with the target itself (greedy, batched).

EAGLE-3 and Hyper-Bagel train the draft on the target's own answers rather than the data set's: the
draft is then taught the distribution it will be asked to predict at decoding time. This keeps each
row's images, questions and other fields, replaces every `gpt` turn by the target's greedy answer
(later turns see the regenerated earlier ones) and writes the same LLaVA format
(`hyperbagel.datamodules.readers.VLMReader`). Rows that cannot be used are counted and reported, not
written: rows the reader rejects (bad JSON, missing image, placeholder mismatch, ...) and rows with an
answer cut off at `max_new_tokens`.

    python -m hyperbagel.speculative.regenerate --model DIR --data FILE.jsonl --out FILE.jsonl \\
        [--image-root DIR] [--batch-size 16] [--max-new-tokens 512] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.inference import generate_text, prefill
from hyperbagel.backbone.packing import Sample, TextBlock
from hyperbagel.datamodules.interleaved import load_tokenizer
from hyperbagel.datamodules.readers import BadRow, VLMReader

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHOWN_BAD_ROWS = 20


@dataclass
class RegenerationReport:
    """What happened to the rows of the input file."""

    rows_read: int = 0
    rows_written: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)
    truncated_rows: list[int] = field(default_factory=list)  # line numbers of rows with a cut-off answer

    def to_dict(self) -> dict[str, Any]:
        reasons = Counter(bad.reason.split(":")[0] for bad in self.bad_rows)
        return {
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "bad_rows": len(self.bad_rows),
            "bad_row_reasons": dict(reasons.most_common()),
            "first_bad_rows": [str(bad) for bad in self.bad_rows[:SHOWN_BAD_ROWS]],
            "truncated_rows": len(self.truncated_rows),
            "first_truncated_rows": self.truncated_rows[:SHOWN_BAD_ROWS],
        }


@dataclass
class _Row:
    """A usable input row: its JSON object, its sample, and where its gpt turns are."""

    line: int
    data: dict[str, Any]
    sample: Sample
    answer_blocks: list[int]  # indexes in `sample` of the gpt turns, in order
    answers: list[list[int]] = field(default_factory=list)


def _rows(reader: VLMReader, report: RegenerationReport) -> Iterator[_Row]:
    """Usable rows in file order; the others go to the report."""
    for unit in reader.units:
        for line, raw in reader.load_unit(unit):
            report.rows_read += 1
            result = reader.decode(unit.file, line, raw, np.random.default_rng(line))
            if isinstance(result, BadRow):
                report.bad_rows.append(result)
                continue
            answer_blocks = [k for k, b in enumerate(result) if isinstance(b, TextBlock) and b.loss]
            yield _Row(line, json.loads(raw), result, answer_blocks)


def _answer_batch(model: Bagel, rows: list[_Row], max_new_tokens: int) -> None:
    """Fill `row.answers`, turn by turn: turn k of every row that has one, in one batched generation."""
    for turn in range(max(len(row.answer_blocks) for row in rows)):
        pending = [row for row in rows if turn < len(row.answer_blocks)]
        contexts = []
        for row in pending:
            blocks = list(row.sample[: row.answer_blocks[turn]])
            for k, answer in enumerate(row.answers):  # earlier turns: the target's own answers
                blocks[row.answer_blocks[k]] = TextBlock(answer, loss=True)
            contexts.append(blocks)
        cache = prefill(model, contexts, capacity_margin=max_new_tokens + 2)
        for row, answer in zip(pending, generate_text(model, cache, max_new_tokens)):
            row.answers.append(answer)


def _with_answers(row: _Row, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    data = dict(row.data)
    answers = iter(row.answers)
    data["conversations"] = [
        {**turn, "value": tokenizer.decode(next(answers))} if turn["from"] == "gpt" else turn
        for turn in row.data["conversations"]
    ]
    return data


def regenerate(
    model: Bagel,
    tokenizer: PreTrainedTokenizerBase,
    data: str | Path,
    out: str | Path,
    image_root: str | Path | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 512,
) -> RegenerationReport:
    """Write `out` (jsonl) with every usable row of `data` answered by `model`; returns the report.

    The file appears complete or not at all (written under a temporary name, then renamed).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    model.eval()
    reader = VLMReader(
        [str(data)], tokenizer, model.config, image_root=None if image_root is None else str(image_root)
    )
    report = RegenerationReport()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:

            def answer_and_write(batch: list[_Row]) -> None:
                _answer_batch(model, batch, max_new_tokens)
                for row in batch:
                    if any(len(answer) >= max_new_tokens for answer in row.answers):
                        report.truncated_rows.append(row.line)
                        continue
                    handle.write(json.dumps(_with_answers(row, tokenizer)) + "\n")
                    report.rows_written += 1

            batch: list[_Row] = []
            for row in _rows(reader, report):
                batch.append(row)
                if len(batch) == batch_size:
                    answer_and_write(batch)
                    batch = []
            if batch:
                answer_and_write(batch)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the target: a BAGEL checkpoint folder")
    parser.add_argument("--data", required=True, help="understanding jsonl (LLaVA format)")
    parser.add_argument("--out", required=True, help="jsonl to write")
    parser.add_argument("--image-root", default=None, help="folder the rows' image paths are relative to")
    parser.add_argument("--tokenizer", default=None, help="'shapes' or a folder; default: the model's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: as stored")
    parser.add_argument("--quantize", choices=["8bit", "4bit"], default=None)
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = from_pretrained(
        args.model,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        quantize=args.quantize,
        load_autoencoder=False,
    )
    report = regenerate(
        model, tokenizer, args.data, args.out, args.image_root, args.batch_size, args.max_new_tokens
    )
    print(json.dumps(report.to_dict(), indent=1))


if __name__ == "__main__":
    main()
