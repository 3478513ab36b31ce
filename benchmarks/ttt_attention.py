"""Training-time test step: per-position chain attention (`TTTCache`) vs EAGLE-3's dense (j + 1) S mask.

Both paths run the same draft head over the same random features of one S-token causal row for K steps,
forward and backward, alternately, in one process; prints a JSON summary with seconds per pass and the
largest difference between their logits (they compute the same attention).

    python benchmarks/ttt_attention.py --seq 1200 --steps 7 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import preset
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.ttt import shift_left, ttt_steps


class DenseMaskCache:
    """The plain formulation: keys of every step concatenated, attended under EAGLE-3's full mask."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def write(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            keys = torch.cat([self.keys[layer], keys], dim=2)
            values = torch.cat([self.values[layer], values], dim=2)
        self.keys[layer], self.values[layer] = keys, values
        return keys, values


def dense_steps(
    draft: DraftHead,
    features: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    block_mask: torch.Tensor,
    num_steps: int,
) -> Iterator[torch.Tensor]:
    """`ttt_steps` with EAGLE-3's mask: step j attends over j + 1 concatenated key sets."""
    cache, hidden, seq = DenseMaskCache(), features, block_mask.shape[-1]
    eye = torch.eye(seq, dtype=torch.bool).expand_as(block_mask)
    for step in range(num_steps):
        mask = torch.cat([block_mask, *[eye] * step], dim=-1).unsqueeze(1)
        logits, hidden = draft(hidden, shift_left(input_ids, step + 1), position_ids + step, cache, mask)
        yield logits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seq", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    target = Bagel(preset("shapes"))
    draft = DraftHead.from_target(target, DraftHeadConfig(num_layers=1, zero_init=False))
    features = torch.randn(1, args.seq, target.config.llm.hidden_size)
    ids = torch.randint(0, target.config.llm.vocab_size, (1, args.seq))
    pos = torch.arange(args.seq)[None]
    mask = torch.ones(args.seq, args.seq, dtype=torch.bool).tril()[None]
    paths = {"ttt_cache": ttt_steps, "dense_mask": dense_steps}

    def run(path):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = list(paths[path](draft, features, ids, pos, mask, args.steps))
        sum(x.float().sum() for x in logits).backward()
        draft.zero_grad()
        return logits

    outputs = {name: run(name) for name in paths}  # warm-up, and the outputs to compare
    seconds = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name in paths:
            start = time.perf_counter()
            run(name)
            seconds[name].append(time.perf_counter() - start)
    median = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*outputs.values()))
    print(
        json.dumps(
            {
                "seq": args.seq,
                "steps": args.steps,
                "repeats": args.repeats,
                "threads": torch.get_num_threads(),
                "seconds_per_pass": median,
                "speedup": median["dense_mask"] / median["ttt_cache"],
                "max_abs_logit_difference": diff,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
