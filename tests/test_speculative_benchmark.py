"""The HF reference model (shared weights, BAGEL's RoPE ids through `generate`) and the speculative
benchmark run end to end on tiny checkpoints."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import save_pretrained
from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.backbone.inference import generate_text, prefill
from hyperbagel.backbone.packing import TextBlock, VitImage
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.speculative.chat import chat_sample
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.export import export_draft_head
from hyperbagel.speculative.hf_reference import HFReference, understanding_causal_lm

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "speculative.py"
SUMMARY_KEYS = {
    "identical_fraction",
    "tau_chain",
    "tau_tree",
    "tokens_per_s",
    "speedup_chain",
    "speedup_tree",
    "ablation",
    "settings",
}
ABLATION_KEYS = {"name", "aggregation", "zero_init", "ce_weight", "tau_chain", "tokens_per_s_chain"}
ABLATION_KEYS |= {"speedup_chain"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core alone)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _benchmark():
    """The benchmark script as a module (registered first: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("speculative_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sharp_bagel(tiny_bagel: Bagel) -> Bagel:
    """The tiny model with non-trivial norms (as in test_language_model), so that QK-norm matters and
    greedy answers vary instead of repeating one token."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in tiny_bagel.language_model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return tiny_bagel


def _image_sample(model: Bagel, tokenizer) -> list:
    """A describe question about a test-split scene: ViT block, then the question."""
    question = ShapesWorld(64, 0).samples("vqa", "test", 1, category="describe")[0]
    ids = tokenizer.encode(question.question, add_special_tokens=False)
    return [VitImage(vit_input(question.image, model.config)), TextBlock(ids)]


def test_reference_shares_the_understanding_weights(sharp_bagel: Bagel) -> None:
    reference = understanding_causal_lm(sharp_bagel)
    ours = {p.data_ptr() for p in sharp_bagel.parameters()}
    shared = [name for name, p in reference.named_parameters() if p.data_ptr() in ours]
    assert len(shared) == len(list(reference.parameters())) - sharp_bagel.config.llm.num_hidden_layers
    assert all(
        not p.any() for name, p in reference.named_parameters() if name.endswith("o_proj.bias")
    )  # the only new parameters: o_proj biases, zero
    layer = sharp_bagel.language_model.model.layers[0]
    assert reference.model.layers[0].mlp.up_proj.weight.data_ptr() == layer.mlp.up_proj.weight.data_ptr()
    ids = torch.randint(0, sharp_bagel.config.llm.vocab_size, (2, 9))
    with torch.no_grad():
        expected = sharp_bagel.language_model(ids)
        actual = reference(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_hf_generate_on_an_image_context_equals_generate_text(sharp_bagel, shapes_tokenizer) -> None:
    model, budget = sharp_bagel, 24
    sample = _image_sample(model, shapes_tokenizer)
    cache = prefill(model, [sample], capacity_margin=budget + 2)
    assert cache.rope_cursor[0] < cache.lengths[0]  # the image block shares one RoPE id
    expected = generate_text(model, cache, budget)[0]
    assert len(set(expected)) > 3, "the test model should not answer with one repeated token"

    reference = HFReference(model)
    assert reference.answer(sample, budget) == expected
    verified = []  # new tokens per forward: prompt lookup verifies several at once, past the cache
    hook = reference.lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: verified.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    assert reference.answer(sample, budget, prompt_lookup_num_tokens=3) == expected
    hook.remove()
    assert 1 < max(verified) <= 1 + 3  # never the cached context again, at most 3 lookup tokens

    # HF's per-step logits against ours teacher-forced over the same answer, and with HF's default
    # positions (cache length) instead of BAGEL's RoPE cursor the first step differs.
    context = reference.prepare(sample)
    out = reference.lm.generate(
        context.input_ids,
        attention_mask=torch.ones_like(context.input_ids),
        position_ids=context.position_ids,
        cache=context.cache,
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    forced = prefill(model, [sample], capacity_margin=16)
    im_start = model.config.special_tokens.im_start
    ids = torch.tensor([[im_start, *out.sequences[0, context.input_ids.shape[1] :].tolist()[:7]]])
    with torch.no_grad():
        ours = model.language_model.lm_head(model.forward_tokens(ids, forced).hidden)[0]
    torch.testing.assert_close(torch.cat(out.logits), ours, atol=1e-5, rtol=1e-5)
    default = reference.prepare(sample)
    with torch.no_grad():
        shifted = reference.lm(input_ids=default.input_ids[:, -1:], cache=default.cache).logits[0, -1]
    assert (shifted - ours[0]).abs().max() > 1e-3


def test_benchmark_questions_are_test_split_and_describe_weighted() -> None:
    world = ShapesWorld(64, 0)
    warmup, questions = _benchmark().benchmark_questions(world, 8, 0.75)
    categories = [q.category for q in questions]
    assert categories.count("describe") == 6
    assert sorted(c for c in categories if c != "describe") == ["color", "count"]
    assert categories[:4] == ["describe", "describe", "describe", "color"]  # short ones spread out
    describe = world.samples("vqa", "test", 7, category="describe")
    assert warmup == describe[0] and [q for q in questions if q.category == "describe"] == describe[1:]
    assert questions[3] == world.samples("vqa", "test", 2, category="color")[0]


def test_tally_counts_the_closing_token_and_commits_per_forward() -> None:
    tally = _benchmark().Tally()
    tally.add([5, 6, 7], forwards=2, seconds=0.5, max_new_tokens=8)  # closed: 3 tokens + <|im_end|>
    tally.add([1] * 8, forwards=3, seconds=1.5, max_new_tokens=8)  # cut at the budget: 8 tokens
    assert (tally.tokens, tally.forwards) == (12, 5)
    assert tally.tau == pytest.approx(12 / 5) and tally.tokens_per_s == pytest.approx(6.0)


def _checkpoints(tmp_path: Path, model: Bagel, tokenizer) -> tuple[Path, Path, Path]:
    save_pretrained(model, tmp_path / "teacher", tokenizer=tokenizer)
    export_draft_head(DraftHead.from_target(model, DraftHeadConfig()), tmp_path / "draft")
    ablation = DraftHead.from_target(model, DraftHeadConfig(aggregation="eagle3", zero_init=False))
    export_draft_head(ablation, tmp_path / "eagle3")
    config_file = tmp_path / "eagle3" / "config.json"
    recorded = json.loads(config_file.read_text())
    recorded["hyperbagel_training"] = {"ce_weight": 0.0}
    config_file.write_text(json.dumps(recorded))
    return tmp_path / "teacher", tmp_path / "draft", tmp_path / "eagle3"


def test_benchmark_runs_on_tiny_checkpoints(tmp_path: Path, sharp_bagel, shapes_tokenizer) -> None:
    teacher, draft, eagle3 = _checkpoints(tmp_path, sharp_bagel, shapes_tokenizer)
    out = tmp_path / "report" / "speculative.json"
    argv = ["--model", str(teacher), "--draft", str(draft), "--out", str(out), "--n-prompts", "2"]
    argv += ["--describe-fraction", "0.5", "--max-new-tokens", "6", "--chain-steps", "3"]
    argv += ["--tree-depth", "3", "--tree-top-k", "2", "--tree-total-tokens", "6", "--threads", "1"]
    argv += ["--ablation", f"e3={eagle3}", "--ablation", f"mq={draft}"]
    module = _benchmark()
    summary = module.main(argv)

    assert json.loads(out.read_text()) == summary
    assert SUMMARY_KEYS <= set(summary)
    assert set(summary["tokens_per_s"]) == {"greedy", "chain", "tree", "hf_generate", "hf_prompt_lookup"}
    assert all(speed > 0 for speed in summary["tokens_per_s"].values())
    assert summary["identical_fraction"] == 1.0  # greedy speculative decoding is lossless
    assert summary["identical_fraction_per_decoder"]["hf_generate"] == 1.0
    assert 1.0 <= summary["tau_chain"] <= 4.0 and 1.0 <= summary["tau_tree"] <= 4.0
    speed = summary["tokens_per_s"]
    assert summary["speedup_chain"] == pytest.approx(speed["chain"] / speed["greedy"])
    assert summary["speedup_tree"] == pytest.approx(speed["tree"] / speed["greedy"])

    # Tokens counted independently: plain greedy on the same two test questions (one short, one describe).
    _, questions = module.benchmark_questions(ShapesWorld(64, 0), 2, 0.5)
    expected_tokens = 0
    for question in questions:
        sample = chat_sample(sharp_bagel.config, shapes_tokenizer, question.question, question.image)
        answer = generate_text(sharp_bagel, prefill(sharp_bagel, [sample], 8), 6)[0]
        expected_tokens += len(answer) + (len(answer) < 6)
    assert set(summary["tokens"].values()) == {expected_tokens}

    rows = {row["name"]: row for row in summary["ablation"]}
    assert set(rows) == {"e3", "mq"} and all(ABLATION_KEYS <= set(row) for row in rows.values())
    assert (rows["e3"]["aggregation"], rows["e3"]["zero_init"], rows["e3"]["ce_weight"]) == (
        "eagle3",
        False,
        0.0,
    )
    assert (rows["mq"]["aggregation"], rows["mq"]["zero_init"], rows["mq"]["ce_weight"]) == (
        "meta_query",
        True,
        None,
    )
    assert rows["mq"]["tau_chain"] == summary["tau_chain"]  # the same head, the same rounds
    settings = summary["settings"]
    assert (settings["n_prompts"], settings["n_describe"], settings["max_new_tokens"]) == (2, 1, 6)
    assert (settings["chain_steps"], settings["tree_total_tokens"], settings["dtype"]) == (3, 6, "float32")


def test_compiled_draft_decoders_are_measured_beside_the_eager_ones(
    tmp_path: Path, sharp_bagel, shapes_tokenizer, monkeypatch
) -> None:
    """--compile-draft, with dynamo's aot_eager backend standing in for inductor (no C++ toolchain)."""
    compile_head = DraftHead.compile
    monkeypatch.setattr(DraftHead, "compile", lambda head: compile_head(head, backend="aot_eager"))
    teacher, draft, _ = _checkpoints(tmp_path, sharp_bagel, shapes_tokenizer)
    argv = ["--model", str(teacher), "--draft", str(draft), "--out", str(tmp_path / "c.json")]
    argv += ["--n-prompts", "2", "--max-new-tokens", "6", "--chain-steps", "3", "--tree-depth", "3"]
    argv += ["--tree-top-k", "2", "--tree-total-tokens", "6", "--threads", "1", "--compile-draft"]
    argv += ["--compile-warmup-prompts", "1"]
    summary = _benchmark().main(argv)
    speed = summary["tokens_per_s"]
    for name in ("chain_compiled_draft", "tree_compiled_draft"):
        assert summary[f"speedup_{name}"] == pytest.approx(speed[name] / speed["greedy"])
        assert summary["identical_fraction_per_decoder"][name] == 1.0
    assert summary["identical_fraction"] == 1.0
    settings = summary["settings"]
    assert settings["compile_draft"] and settings["compile_warmup_prompts"] == 1
    assert settings["compile_warmup_s"] > 0


def test_sweep_records_every_setting_and_measures_with_the_fastest(
    tmp_path: Path, sharp_bagel, shapes_tokenizer
) -> None:
    teacher, draft, _ = _checkpoints(tmp_path, sharp_bagel, shapes_tokenizer)
    argv = ["--model", str(teacher), "--draft", str(draft), "--out", str(tmp_path / "s.json")]
    argv += ["--n-prompts", "1", "--max-new-tokens", "4", "--threads", "1", "--sweep"]
    argv += ["--sweep-chain-steps", "1", "2", "--sweep-chain-min-probs", "0", "0.5"]
    argv += ["--sweep-trees", "2,2,3", "2,3,5", "--sweep-prompts", "1"]
    summary = _benchmark().main(argv)
    sweep, settings = summary["sweep"], summary["settings"]
    assert [(row["num_steps"], row["chain_min_prob"]) for row in sweep["chain"]] == [
        (1, 0.0),
        (2, 0.0),
        (1, 0.5),
        (2, 0.5),
    ]
    assert [(r["tree_depth"], r["tree_top_k"], r["tree_total_tokens"]) for r in sweep["tree"]] == [
        (2, 2, 3),
        (2, 3, 5),
    ]
    fastest_chain = max(sweep["chain"], key=lambda row: row["tokens_per_s"])
    fastest_tree = max(sweep["tree"], key=lambda row: row["tokens_per_s"])
    assert sweep["best_chain"] == fastest_chain
    assert (settings["chain_steps"], settings["chain_min_prob"]) == (
        fastest_chain["num_steps"],
        fastest_chain["chain_min_prob"],
    )
    assert sweep["best_tree"] == fastest_tree
    assert (settings["tree_top_k"], settings["tree_total_tokens"]) == (
        fastest_tree["tree_top_k"],
        fastest_tree["tree_total_tokens"],
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--ablation", "no-equals-sign"], "NAME=DIR"),
        (["--sweep-trees", "4,4"], "DEPTH,TOP_K,TOTAL_TOKENS"),
        (["--n-prompts", "0"], "--n-prompts must be >= 1"),
        (["--describe-fraction", "1.5"], "--describe-fraction"),
        (["--compile-warmup-prompts", "-1"], "--compile-warmup-prompts must be >= 0"),
    ],
)
def test_bad_flags_are_refused(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit):
        _benchmark().parse_args(["--model", "m", "--draft", "d", "--out", "o.json", *flags])
    assert message in capsys.readouterr().err


def test_reference_refuses_an_empty_context(tiny_bagel: Bagel) -> None:
    with pytest.raises(ValueError, match="non-empty context"):
        HFReference(tiny_bagel).prepare([])
