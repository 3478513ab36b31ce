"""Speculative decoding of a BAGEL checkpoint against plain decoding, measured side by side in one run.

    python benchmarks/speculative.py --model outputs/shapes/teacher --draft outputs/shapes/draft_head \\
        --out outputs/shapes/benchmarks/speculative.json [--ablation NAME=DIR ...] [--sweep]

Prompts: questions about images from the shapes world's test split, `--describe-fraction` of them
"describe the image" (answers of 40-90 tokens, where speculation matters), the rest short answers cycling
through colour / count / shape / position. Batch 1, float32, CPU by default, greedy throughout.
Per prompt, each decoder answers in turn (the order rotates from prompt to prompt, so slow phases of a
shared machine hit every decoder alike), after one warm-up prompt that every decoder answers unrecorded:
- `greedy`: our plain KV-cached decoding (`prefill` + `generate_text`), the baseline;
- `chain` / `tree`: speculative decoding with the draft head (`speculative_generate`);
- `hf_generate` / `hf_prompt_lookup`: Hugging Face `generate` on the same weights as Qwen3ForCausalLM
  (`hyperbagel.speculative.hf_reference`), plain greedy and with `prompt_lookup_num_tokens`;
- one chain decoder per `--ablation` head;
- with `--compile-draft`, `chain_compiled_draft` / `tree_compiled_draft`: the same settings over a copy of
  the head compiled with `DraftHead.compile` (the target stays eager, as in every other decoder), after
  `--compile-warmup-prompts` unrecorded prompts that trigger the compilation (its time is in `settings`).
Every time is wall clock from the context to the answer, prefill included (our prefill for the HF
decoders too, since transformers cannot encode BAGEL's images, plus the hand-over of its cache).
tokens_per_s counts the tokens each decoder produced, a closing `<|im_end|>` included; tau is committed
tokens per target forward (bonus token counted) over all rounds of all prompts. `identical_fraction`:
prompts whose answers from every chain and tree decoder equal plain greedy's.

`--sweep` first tries several chain lengths (each with every `--sweep-chain-min-probs` stop threshold)
and tree sizes on `--sweep-prompts` prompts and measures with the fastest (on a CPU verifying more tokens
is not free); every tried setting is recorded.
An ablation row's `ce_weight` is read from the head folder's `config.json` (`hyperbagel_training`); it is
null when the folder does not record it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import transformers

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.inference import generate_text, prefill
from hyperbagel.backbone.packing import Sample
from hyperbagel.datamodules.interleaved import load_tokenizer
from hyperbagel.datamodules.shapes import SHORT_ANSWER_CATEGORIES, ShapesWorld, VQASample
from hyperbagel.speculative.chat import chat_sample
from hyperbagel.speculative.decoding import SpeculativeConfig, speculative_generate
from hyperbagel.speculative.draft_head import DraftHead
from hyperbagel.speculative.export import CONFIG_FILE, load_draft_head
from hyperbagel.speculative.hf_reference import HFReference

DEFAULT_SWEEP_CHAIN = (2, 4, 6, 8, 12, 16)
DEFAULT_SWEEP_MIN_PROBS = (0.0, 0.4)
DEFAULT_SWEEP_TREES = ("4,4,16", "5,4,24", "6,6,32", "7,10,60")

Decoder = Callable[[Sample], tuple[list[int], int]]  # answer ids, target forwards (0: not counted)


def _ablation(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--ablation takes NAME=DIR, got {text!r}")
    return name, Path(folder)


def _tree(text: str) -> tuple[int, int, int]:
    try:
        depth, top_k, total = (int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a tree is DEPTH,TOP_K,TOTAL_TOKENS, got {text!r}") from err
    return depth, top_k, total


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="target checkpoint folder in BAGEL's layout")
    parser.add_argument("--draft", required=True, help="draft-head folder (export_draft_head)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--tokenizer", help="'shapes' or a tokenizer folder (default: the model folder's)")
    parser.add_argument(
        "--ablation", action="append", type=_ablation, default=[], metavar="NAME=DIR",
        help="another head measured with chain decoding (repeatable)",
    )  # fmt: skip
    parser.add_argument("--n-prompts", type=int, default=40, help="measured prompts")
    parser.add_argument("--describe-fraction", type=float, default=0.75, help="share of describe prompts")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--chain-steps", type=int, default=5, help="most chain drafts per round")
    parser.add_argument(
        "--chain-min-prob", type=float, default=0.0,
        help="stop a chain round at a draft probability below this (SpeculativeConfig.chain_min_prob)",
    )  # fmt: skip
    parser.add_argument("--tree-depth", type=int, default=5)
    parser.add_argument("--tree-top-k", type=int, default=4)
    parser.add_argument("--tree-total-tokens", type=int, default=24, help="verified per forward")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="HF prompt_lookup_num_tokens")
    parser.add_argument(
        "--compile-draft", action="store_true",
        help="also measure chain and tree with a torch.compile'd copy of the head (DraftHead.compile)",
    )  # fmt: skip
    parser.add_argument(
        "--compile-warmup-prompts", type=int, default=4,
        help="measured prompts the compiled decoders answer once, unrecorded, before measuring",
    )  # fmt: skip
    parser.add_argument("--sweep", action="store_true", help="pick chain steps and tree size by speed first")
    parser.add_argument("--sweep-chain-steps", type=int, nargs="+", default=list(DEFAULT_SWEEP_CHAIN))
    parser.add_argument(
        "--sweep-chain-min-probs", type=float, nargs="+", default=list(DEFAULT_SWEEP_MIN_PROBS),
        help="chain_min_prob values, each tried with every --sweep-chain-steps",
    )  # fmt: skip
    parser.add_argument(
        "--sweep-trees", type=_tree, nargs="+", default=[_tree(t) for t in DEFAULT_SWEEP_TREES],
        metavar="DEPTH,TOP_K,TOTAL",
    )  # fmt: skip
    parser.add_argument("--sweep-prompts", type=int, default=8, help="prompts each sweep setting runs")
    parser.add_argument("--world-seed", type=int, default=0, help="shapes-world seed drawing the prompts")
    parser.add_argument("--canvas-size", type=int, default=64, help="shapes-world canvas (pixels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.compile_warmup_prompts < 0:
        parser.error("--compile-warmup-prompts must be >= 0")
    for name in ("n_prompts", "max_new_tokens", "prompt_lookup_tokens", "sweep_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.describe_fraction <= 1.0:
        parser.error("--describe-fraction must lie in [0, 1]")
    names = [name for name, _ in args.ablation]
    if len(set(names)) != len(names):
        parser.error(f"--ablation names must be unique, got {names}")
    return args


def benchmark_questions(
    world: ShapesWorld, n: int, describe_fraction: float
) -> tuple[VQASample, list[VQASample]]:
    """(warm-up question, n measured questions): round(n * fraction) describe questions, the rest short
    ones cycling through the categories, interleaved so any prefix keeps the mix; all from the test split."""
    n_describe = round(n * describe_fraction)
    n_short = n - n_describe
    describe = world.samples("vqa", "test", n_describe + 1, category="describe")
    pools = {c: iter(world.samples("vqa", "test", n_short, category=c)) for c in SHORT_ANSWER_CATEGORIES}
    cycle = SHORT_ANSWER_CATEGORIES
    short = iter([next(pools[cycle[i % len(cycle)]]) for i in range(n_short)])
    measured = iter(describe[1:])
    questions = []
    for i in range(n):  # spread the short questions evenly among the describe ones
        take_short = (i + 1) * n_short // n > i * n_short // n
        questions.append(next(short) if take_short else next(measured))
    return describe[0], questions


@dataclass
class Tally:
    """One decoder's results over the measured prompts."""

    answers: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    tokens: int = 0
    forwards: int = 0

    def add(self, answer: list[int], forwards: int, seconds: float, max_new_tokens: int) -> None:
        self.answers.append(answer)
        self.seconds += seconds
        self.tokens += len(answer) + (len(answer) < max_new_tokens)  # the closing <|im_end|>
        self.forwards += forwards

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def tau(self) -> float:
        return self.tokens / self.forwards if self.forwards else float("nan")

    def identical(self, reference: Tally) -> list[bool]:
        return [a == b for a, b in zip(self.answers, reference.answers, strict=True)]


def plain_greedy(model: Bagel, max_new_tokens: int) -> Decoder:
    def decode(sample: Sample) -> tuple[list[int], int]:
        cache = prefill(model, [sample], capacity_margin=max_new_tokens + 2)
        answer = generate_text(model, cache, max_new_tokens)[0]
        return answer, len(answer) + (len(answer) < max_new_tokens)

    return decode


def speculative(model: Bagel, head: DraftHead, config: SpeculativeConfig, max_new_tokens: int) -> Decoder:
    def decode(sample: Sample) -> tuple[list[int], int]:
        answers, stats = speculative_generate(model, head, [sample], config, max_new_tokens)
        return answers[0], stats.target_forwards

    return decode


def hf_decoder(reference: HFReference, max_new_tokens: int, **generate_kwargs: Any) -> Decoder:
    def decode(sample: Sample) -> tuple[list[int], int]:
        answer = reference.answer(sample, max_new_tokens, **generate_kwargs)
        return answer, 0  # generate does not expose its forwards

    return decode


def measure(
    decoders: dict[str, Decoder], warmup: Sample, samples: Sequence[Sample], max_new_tokens: int
) -> dict[str, Tally]:
    """Run every decoder on the warm-up sample (unrecorded), then on each sample in a rotating order."""
    for decode in decoders.values():
        decode(warmup)
    names = list(decoders)
    tallies = {name: Tally() for name in names}
    for i, sample in enumerate(samples):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            started = time.perf_counter()
            answer, forwards = decoders[name](sample)
            tallies[name].add(answer, forwards, time.perf_counter() - started, max_new_tokens)
    return tallies


def sweep(
    model: Bagel,
    head: DraftHead,
    base: SpeculativeConfig,
    args: argparse.Namespace,
    warmup: Sample,
    samples: Sequence[Sample],
) -> tuple[SpeculativeConfig, dict[str, Any]]:
    """Try the sweep's chain lengths and trees; return the base config with the fastest of each."""
    chains = {
        f"chain:{k}" + (f",p>={p}" if p else ""): replace(base, mode="chain", num_steps=k, chain_min_prob=p)
        for p in args.sweep_chain_min_probs
        for k in args.sweep_chain_steps
    }
    trees = {
        f"tree:{d},{k},{t}": replace(base, mode="tree", tree_depth=d, tree_top_k=k, tree_total_tokens=t)
        for d, k, t in args.sweep_trees
    }
    configs = {**chains, **trees}
    decoders = {
        name: speculative(model, head, config, args.max_new_tokens) for name, config in configs.items()
    }
    tallies = measure(decoders, warmup, samples, args.max_new_tokens)

    def row(name: str) -> dict[str, Any]:
        config, tally = configs[name], tallies[name]
        shape = (
            {"num_steps": config.num_steps, "chain_min_prob": config.chain_min_prob}
            if config.mode == "chain"
            else {
                "tree_depth": config.tree_depth,
                "tree_top_k": config.tree_top_k,
                "tree_total_tokens": config.tree_total_tokens,
            }
        )
        return {**shape, "tau": tally.tau, "tokens_per_s": tally.tokens_per_s}

    best_chain = max(chains, key=lambda name: tallies[name].tokens_per_s)
    best_tree = max(trees, key=lambda name: tallies[name].tokens_per_s)
    chosen = replace(
        base,
        num_steps=configs[best_chain].num_steps,
        chain_min_prob=configs[best_chain].chain_min_prob,
        tree_depth=configs[best_tree].tree_depth,
        tree_top_k=configs[best_tree].tree_top_k,
        tree_total_tokens=configs[best_tree].tree_total_tokens,
    )
    report = {
        "prompts": len(samples),
        "chain": [row(name) for name in chains],
        "tree": [row(name) for name in trees],
        "best_chain": row(best_chain),
        "best_tree": row(best_tree),
    }
    return chosen, report


def compiled_draft_decoders(
    model: Bagel,
    folder: Path,
    configs: dict[str, SpeculativeConfig],
    max_new_tokens: int,
    warmup: Sequence[Sample],
) -> tuple[dict[str, Decoder], float]:
    """Decoders over a compiled copy of the head (`<name>_compiled_draft`), and the seconds spent
    compiling: every decoder answers the `warmup` samples once, so that the kinds of draft call a
    measured prompt makes (prefill, extension, step, tree step) have compiled before timing starts."""
    started = time.perf_counter()
    head = load_draft_head(folder, model, torch.float32).eval()
    head.compile()
    decoders = {
        f"{name}_compiled_draft": speculative(model, head, config, max_new_tokens)
        for name, config in configs.items()
    }
    for decode in decoders.values():
        for sample in warmup:
            decode(sample)
    return decoders, time.perf_counter() - started


def ablation_row(name: str, folder: Path, head: DraftHead, tally: Tally, greedy: Tally) -> dict[str, Any]:
    recorded = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    return {
        "name": name,
        "draft": str(folder),
        "aggregation": head.config.aggregation,
        "zero_init": head.config.zero_init,
        "ce_weight": (recorded.get("hyperbagel_training") or {}).get("ce_weight"),
        "tau_chain": tally.tau,
        "tokens_per_s_chain": tally.tokens_per_s,
        "speedup_chain": tally.tokens_per_s / greedy.tokens_per_s,
        "identical_fraction": sum(tally.identical(greedy)) / len(greedy.answers),
    }


def _json_ready(value: Any) -> Any:
    """NaN / inf become null (strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_ready(v) for v in value]
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write --out, print and return the summary."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = from_pretrained(args.model, dtype=torch.float32, device=args.device, load_autoencoder=False)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    head = load_draft_head(args.draft, model, torch.float32).eval()
    ablations = {
        name: (folder, load_draft_head(folder, model, torch.float32).eval()) for name, folder in args.ablation
    }
    world = ShapesWorld(args.canvas_size, args.world_seed)
    warmup_question, questions = benchmark_questions(world, args.n_prompts, args.describe_fraction)

    def to_sample(question: VQASample) -> Sample:
        return chat_sample(model.config, tokenizer, question.question, question.image)

    warmup, samples = to_sample(warmup_question), [to_sample(q) for q in questions]
    config = SpeculativeConfig(
        mode="chain",
        num_steps=args.chain_steps,
        chain_min_prob=args.chain_min_prob,
        tree_depth=args.tree_depth,
        tree_top_k=args.tree_top_k,
        tree_total_tokens=args.tree_total_tokens,
    )
    sweep_report = None
    if args.sweep:
        config, sweep_report = sweep(model, head, config, args, warmup, samples[: args.sweep_prompts])
    chain, tree = replace(config, mode="chain"), replace(config, mode="tree")
    reference = HFReference(model)
    budget = args.max_new_tokens
    decoders = {
        "greedy": plain_greedy(model, budget),
        "chain": speculative(model, head, chain, budget),
        "tree": speculative(model, head, tree, budget),
        "hf_generate": hf_decoder(reference, budget),
        "hf_prompt_lookup": hf_decoder(reference, budget, prompt_lookup_num_tokens=args.prompt_lookup_tokens),
    }
    for name, (_, ablation_head) in ablations.items():
        decoders[f"ablation:{name}"] = speculative(model, ablation_head, chain, budget)
    compile_s = None
    if args.compile_draft:
        compiled, compile_s = compiled_draft_decoders(
            model,
            Path(args.draft),
            {"chain": chain, "tree": tree},
            budget,
            [warmup, *samples[: args.compile_warmup_prompts]],
        )
        decoders.update(compiled)
    tallies = measure(decoders, warmup, samples, budget)

    greedy = tallies["greedy"]
    same = {name: tallies[name].identical(greedy) for name in tallies if name != "greedy"}
    speculative_names = [name for name in same if name.startswith(("chain", "tree"))]
    lossless = [all(flags) for flags in zip(*(same[name] for name in speculative_names))]
    timed = ["greedy", "chain", "tree", "hf_generate", "hf_prompt_lookup"]
    timed += [name for name in tallies if name.endswith("_compiled_draft")]
    speed = {name: tallies[name].tokens_per_s for name in timed}
    speedups = {
        f"speedup_{name}": speed[name] / speed["greedy"]
        for name in timed
        if name.startswith(("chain", "tree"))
    }
    summary = {
        "identical_fraction": sum(lossless) / len(lossless),
        "tau_chain": tallies["chain"].tau,
        "tau_tree": tallies["tree"].tau,
        "tokens_per_s": speed,
        **speedups,
        "ablation": [
            ablation_row(name, folder, ablation_head, tallies[f"ablation:{name}"], greedy)
            for name, (folder, ablation_head) in ablations.items()
        ],
        "identical_fraction_per_decoder": {name: sum(flags) / len(flags) for name, flags in same.items()},
        "greedy_over_hf_generate": speed["greedy"] / speed["hf_generate"],
        "chain_over_hf_prompt_lookup": speed["chain"] / speed["hf_prompt_lookup"],
        "tree_over_hf_prompt_lookup": speed["tree"] / speed["hf_prompt_lookup"],
        "seconds": {name: tally.seconds for name, tally in tallies.items()},
        "tokens": {name: tally.tokens for name, tally in tallies.items()},
        "sweep": sweep_report,
        "settings": {
            "model": str(args.model),
            "draft": str(args.draft),
            "draft_config": {
                "aggregation": head.config.aggregation,
                "num_layers": head.config.num_layers,
                "zero_init": head.config.zero_init,
                "draft_vocab_size": head.draft_vocab_size,
            },
            "n_prompts": len(samples),
            "n_describe": sum(q.category == "describe" for q in questions),
            "max_new_tokens": budget,
            "chain_steps": chain.num_steps,
            "chain_min_prob": chain.chain_min_prob,
            "tree_depth": tree.tree_depth,
            "tree_top_k": tree.tree_top_k,
            "tree_total_tokens": tree.tree_total_tokens,
            "prompt_lookup_num_tokens": args.prompt_lookup_tokens,
            "world_seed": args.world_seed,
            "canvas_size": args.canvas_size,
            "batch_size": 1,
            "dtype": "float32",
            "device": args.device,
            "threads": torch.get_num_threads(),
            "warmup_prompts": 1,
            "compile_draft": args.compile_draft,
            "compile_warmup_prompts": args.compile_warmup_prompts if args.compile_draft else 0,
            "compile_warmup_s": compile_s,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "total_s": time.perf_counter() - started,
        },
    }
    summary = _json_ready(summary)
    text = json.dumps(summary, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return summary


if __name__ == "__main__":
    main()
