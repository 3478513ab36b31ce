"""Guidance embedders, one-pass guided sampling and shared generation weights (CFG distillation, step A)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from hyperbagel.backbone.checkpoint import from_pretrained, save_pretrained
from hyperbagel.backbone.flow import CFGConfig, count_nfe, sampling_schedule
from hyperbagel.backbone.inference import (
    BagelInferencer,
    build_image_contexts,
    default_edit_cfg,
    guidance_scales,
    sample_latent_tokens,
    sampling_nfe,
)
from hyperbagel.backbone.packing import TextBlock, VaeImage, pack
from hyperbagel.distillation.generation_weights import (
    GENERATION_PATTERNS,
    GenerationWeights,
    check_generation_keys,
    is_generation_key,
)

GRID = (2, 2)
T2I_CFG = CFGConfig(text_scale=4.0, interval=(0.4, 1.0), renorm_type="global")


def _contexts(model, prompts=((7, 8, 9), (7, 8)), with_cfg: bool = True):
    conditional = [[TextBlock(list(p))] for p in prompts]
    return build_image_contexts(model, conditional, [[] for _ in prompts] if with_cfg else None, None, GRID)


def _noise(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, GRID[0] * GRID[1], 16, generator=torch.Generator().manual_seed(1))


def _randomise_guidance(model) -> None:
    with torch.no_grad():
        for embedder in (model.text_guidance_embedder, model.img_guidance_embedder):
            for p in embedder.parameters():
                p.normal_(0.0, 0.3)


# --- guidance embedders --------------------------------------------------------------------------------
def test_zero_initialised_student_is_exactly_the_teachers_conditional_branch(tiny_bagel) -> None:
    contexts = _contexts(tiny_bagel)
    x, t = _noise(), torch.tensor(0.7)
    with torch.no_grad():
        conditional = contexts.raw_velocity(x, t, 2)
    tiny_bagel.add_guidance_embedders()
    assert tiny_bagel.has_guidance_embedders and tiny_bagel.config.guidance_embedders
    for embedder in (tiny_bagel.text_guidance_embedder, tiny_bagel.img_guidance_embedder):
        assert not embedder.mlp[2].weight.any() and not embedder.mlp[2].bias.any()
    student = contexts.velocity(x, t, T2I_CFG)  # one pass, scales 4 / 1 embedded, with gradients
    assert torch.equal(student, conditional)
    edit_like = contexts.velocity(x, t, CFGConfig(text_scale=3.0, img_scale=2.0, interval=(0.0, 1.0)))
    assert torch.equal(edit_like, conditional)


def test_scales_are_embedded_per_latent_token(tiny_bagel) -> None:
    tiny_bagel.add_guidance_embedders()
    _randomise_guidance(tiny_bagel)
    tokens = torch.randn(3, 16)
    t = torch.tensor([0.2, 0.5, 0.9])
    positions = torch.tensor([0, 1, 2])
    text, img = torch.tensor([1.0, 2.0, 4.5]), torch.tensor([1.0, 1.0, 2.5])
    with torch.no_grad():
        plain = tiny_bagel.embed_latents(tokens, t, positions)
        guided = tiny_bagel.embed_latents(tokens, t, positions, text, img)
        expected = plain.clone()
        for i in range(3):  # each token gets the embedding of its own scales
            expected[i] += tiny_bagel.text_guidance_embedder(text[i : i + 1])[0]
            expected[i] += tiny_bagel.img_guidance_embedder(img[i : i + 1])[0]
    torch.testing.assert_close(guided, expected)
    assert not torch.allclose(guided[0], plain[0])
    with pytest.raises(ValueError, match="both text_scales and img_scales"):
        tiny_bagel.embed_latents(tokens, t, positions, text, None)
    with pytest.raises(ValueError, match=r"img_scales must hold one scale per latent token, shape \(3,\)"):
        tiny_bagel.embed_latents(tokens, t, positions, text, img[:2])


def test_scales_need_guidance_embedders(tiny_bagel) -> None:
    with pytest.raises(ValueError, match="no guidance embedders"):
        tiny_bagel.embed_latents(
            torch.randn(1, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.ones(1)
        )


def test_add_guidance_embedders_does_not_touch_a_shared_config(tiny_bagel_config, tiny_bagel) -> None:
    tiny_bagel.config = tiny_bagel_config
    tiny_bagel.add_guidance_embedders()
    assert tiny_bagel.config.guidance_embedders and not tiny_bagel_config.guidance_embedders
    before = tiny_bagel.text_guidance_embedder
    assert tiny_bagel.add_guidance_embedders().text_guidance_embedder is before  # idempotent


def test_guidance_embedders_round_trip_through_the_checkpoint(tmp_path: Path, tiny_bagel, shapes_tokenizer):
    save_pretrained(tiny_bagel, tmp_path / "teacher", tokenizer=shapes_tokenizer)
    assert json.loads((tmp_path / "teacher" / "bagel_config.json").read_text())["guidance_embedders"] is False
    assert not from_pretrained(tmp_path / "teacher").has_guidance_embedders

    tiny_bagel.add_guidance_embedders()
    _randomise_guidance(tiny_bagel)
    save_pretrained(tiny_bagel, tmp_path / "student", tokenizer=shapes_tokenizer)
    assert json.loads((tmp_path / "student" / "bagel_config.json").read_text())["guidance_embedders"] is True
    with safe_open(str(tmp_path / "student" / "ema.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    for prefix in ("text_guidance_embedder", "img_guidance_embedder"):
        assert {f"{prefix}.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")} <= keys
    loaded = from_pretrained(tmp_path / "student")
    assert loaded.has_guidance_embedders
    for name, tensor in tiny_bagel.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_folder_without_the_flag_loads_as_a_cfg_teacher(tmp_path: Path, tiny_bagel, shapes_tokenizer) -> None:
    save_pretrained(tiny_bagel, tmp_path / "old", tokenizer=shapes_tokenizer)
    glue_path = tmp_path / "old" / "bagel_config.json"
    glue = json.loads(glue_path.read_text())
    del glue["guidance_embedders"]  # a folder written before guidance embedders existed
    glue_path.write_text(json.dumps(glue))
    assert not from_pretrained(tmp_path / "old").has_guidance_embedders


# --- one-pass guided sampling ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "t", "expected"),
    [
        (T2I_CFG, 0.5, (4.0, 1.0)),
        (T2I_CFG, 0.4, (1.0, 1.0)),  # the interval is (0.4, 1]: its lower edge runs the conditional alone
        (T2I_CFG, 0.3, (1.0, 1.0)),
        (CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.0, 1.0)), 0.1, (4.0, 2.0)),
        (CFGConfig(text_scale=1.0, img_scale=2.0, interval=(0.0, 1.0)), 0.5, (1.0, 1.0)),  # no text CFG
        (CFGConfig(text_scale=3.0, img_scale=1.0, interval=(0.0, 1.0)), 0.5, (3.0, 1.0)),
    ],
)
def test_guidance_scales_follow_the_teachers_passes(cfg: CFGConfig, t: float, expected) -> None:
    assert guidance_scales(cfg, torch.tensor(t)) == expected


class PassCounter:
    """Counts language-model forwards and the rows of each, and records the text scales embedded."""

    def __init__(self, model) -> None:
        self.rows: list[int] = []
        self.text_scales: list[float] = []
        model.language_model.model.register_forward_hook(self._forward)
        if model.has_guidance_embedders:
            model.text_guidance_embedder.register_forward_hook(self._scales)

    def _forward(self, module, args, output) -> None:
        self.rows.append(args[0].shape[0])

    def _scales(self, module, args, output) -> None:
        self.text_scales.append(float(args[0].unique().item()))


def test_distilled_sampler_runs_one_pass_per_step_with_the_scales_inside_the_interval(tiny_bagel) -> None:
    tiny_bagel.add_guidance_embedders()
    _randomise_guidance(tiny_bagel)
    contexts = _contexts(tiny_bagel, with_cfg=False)
    counter = PassCounter(tiny_bagel)
    grid = sampling_schedule(5, 3.0)  # 4 steps: t = 1, 0.9, 0.75, 0.5 (the last outside (0.4, 1]? no: 0.5 in)
    x = sample_latent_tokens(contexts, _noise(), grid, T2I_CFG)
    assert x.shape == (2, 4, 16)
    assert counter.rows == [2] * 4  # one conditional pass of the B rows per step
    expected = [4.0 if float(t) > 0.4 else 1.0 for t in grid[:-1]]
    assert counter.text_scales == expected
    assert sampling_nfe(tiny_bagel, grid, T2I_CFG) == 4
    low = sampling_schedule(5, 0.3)  # some steps below the interval get scale 1
    counter.text_scales.clear()
    sample_latent_tokens(contexts, _noise(), low, T2I_CFG)
    assert counter.text_scales == [4.0 if float(t) > 0.4 else 1.0 for t in low[:-1]]
    assert 1.0 in counter.text_scales and 4.0 in counter.text_scales


def test_distilled_step_equals_one_raw_pass_with_the_scales(tiny_bagel) -> None:
    tiny_bagel.add_guidance_embedders()
    _randomise_guidance(tiny_bagel)
    contexts = _contexts(tiny_bagel, with_cfg=False)
    x, cfg = _noise(), CFGConfig(text_scale=3.0, img_scale=1.5, interval=(0.0, 1.0))
    with torch.no_grad():
        got = contexts.velocity(x, torch.tensor(0.6), cfg)
        expected = contexts.raw_velocity(x, torch.tensor(0.6), 2, 3.0, 1.5)
        unguided = contexts.raw_velocity(x, torch.tensor(0.6), 2)
    assert torch.equal(got, expected) and not torch.allclose(got, unguided)


def test_inferencer_skips_unconditional_contexts_of_a_distilled_model(tiny_bagel, shapes_tokenizer) -> None:
    teacher = copy.deepcopy(tiny_bagel)
    tiny_bagel.add_guidance_embedders()
    source = Image.new("RGB", (32, 32), "red")
    rows = {}
    for name, model in (("teacher", teacher), ("student", tiny_bagel)):
        counter = PassCounter(model)
        inferencer = BagelInferencer(model, shapes_tokenizer)
        inferencer.text_to_image(["a red circle"], num_timesteps=3, seed=0, cfg=T2I_CFG)
        inferencer.edit(source, "make it blue", num_timesteps=3, seed=0, cfg=default_edit_cfg())
        rows[name] = counter.rows
    # t2i: prefill (context rows), 2 steps; then the same for the edit. Both grids' steps lie inside CFG.
    assert rows["student"] == [1, 1, 1] + [1, 1, 1]
    assert rows["teacher"] == [2, 2, 2] + [3, 3, 3]
    grid = sampling_schedule(3, 3.0)
    assert sampling_nfe(teacher, grid, default_edit_cfg()) == count_nfe(grid, default_edit_cfg()) == 6
    assert sampling_nfe(tiny_bagel, grid, default_edit_cfg()) == 2


def test_per_sample_guidance_equals_the_sampler_on_each_sample(tiny_bagel) -> None:
    prompts = ((7, 8, 9), (7, 8), (9,))
    contexts = _contexts(tiny_bagel, prompts)
    x = _noise(3)
    cfgs = [
        CFGConfig(text_scale=4.0, interval=(0.0, 1.0), renorm_type="global"),
        CFGConfig(text_scale=2.5, interval=(0.4, 1.0), renorm_type="channel"),
        CFGConfig(text_scale=1.5, interval=(0.0, 1.0), renorm_type="global", renorm_min=0.5),
    ]
    times = torch.tensor([0.9, 0.3, 0.5])  # sample 1 lies outside its interval: conditional only
    with torch.no_grad():
        together = contexts.velocity(x, times, cfgs)
        for i, prompt in enumerate(prompts):
            alone = _contexts(tiny_bagel, (prompt,)).velocity(x[i : i + 1], times[i], cfgs[i])
            torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)
        same = contexts.velocity(x, torch.full((3,), 0.9), [cfgs[0]] * 3)
        assert torch.equal(same, contexts.velocity(x, torch.tensor(0.9), cfgs[0]))
    with pytest.raises(ValueError, match="one time and one CFG setting per sample"):
        contexts.velocity(x, times, cfgs[:2])


def test_gradients_flow_through_a_cached_context(tiny_bagel) -> None:
    """A query against a cache back-propagates exactly like the same sample run in one uncached pack."""
    ids, x, t = [7, 8, 9, 10], _noise(1), torch.tensor(0.6)
    tiny_bagel.train()
    contexts = _contexts(tiny_bagel, (ids, (7, 8)), with_cfg=False)  # rows of unequal length
    cached = contexts.raw_velocity(torch.cat([x, x]), t, 2)[:1]
    cached.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in tiny_bagel.named_parameters() if "moe_gen" in n or "llm2vae" in n}
    tiny_bagel.zero_grad()

    latents = tiny_bagel.tokens_to_latents(x, GRID)[0]
    packed = pack([[[TextBlock(ids), VaeImage(latents=latents, noisy=True)]]], tiny_bagel.config)
    timesteps = t.expand(4)
    clean_tokens = torch.zeros(0, 16)
    out = tiny_bagel.forward_packed(packed, torch.cat([clean_tokens, x[0]]), timesteps)
    whole = tiny_bagel.velocity(out, packed)[None]
    torch.testing.assert_close(cached, whole, rtol=1e-4, atol=1e-5)
    whole.square().sum().backward()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, tiny_bagel.get_parameter(name).grad, rtol=1e-4, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads.values())


# --- shared generation weights --------------------------------------------------------------------------
def test_generation_patterns_select_exactly_the_generation_side(tiny_bagel) -> None:
    tiny_bagel.add_guidance_embedders()
    chosen = {n for n, _ in tiny_bagel.named_parameters() if is_generation_key(n)}
    per_layer = [f"self_attn.{p}_proj_moe_gen.{w}" for p in "qkv" for w in ("weight", "bias")] + [
        "self_attn.o_proj_moe_gen.weight",
        "self_attn.q_norm_moe_gen.weight",
        "self_attn.k_norm_moe_gen.weight",
        "mlp_moe_gen.gate_proj.weight",
        "mlp_moe_gen.up_proj.weight",
        "mlp_moe_gen.down_proj.weight",
        "input_layernorm_moe_gen.weight",
        "post_attention_layernorm_moe_gen.weight",
    ]
    expected = {f"language_model.model.layers.{i}.{name}" for i in range(2) for name in per_layer}
    expected.add("language_model.model.norm_moe_gen.weight")
    for module in ("time_embedder", "text_guidance_embedder", "img_guidance_embedder"):
        expected |= {f"{module}.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expected |= {f"{m}.{p}" for m in ("vae2llm", "llm2vae") for p in ("weight", "bias")}
    assert chosen == expected
    assert len(GENERATION_PATTERNS) == 7 and not is_generation_key("latent_pos_embed.pos_embed")


def test_applied_weights_compute_like_a_model_holding_them(tiny_bagel) -> None:
    other = copy.deepcopy(tiny_bagel)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if is_generation_key(name):
                p.add_(0.05 * torch.randn_like(p))
    weights = GenerationWeights.from_model(other)
    x, t = _noise(), torch.tensor(0.8)
    with torch.no_grad():
        own = _contexts(tiny_bagel).velocity(x, t, T2I_CFG)
        reference = _contexts(other).velocity(x, t, T2I_CFG)
        with weights.applied(tiny_bagel) as model:
            assert model is tiny_bagel
            swapped = _contexts(tiny_bagel).velocity(x, t, T2I_CFG)
        after = _contexts(tiny_bagel).velocity(x, t, T2I_CFG)
    assert torch.equal(swapped, reference) and torch.equal(after, own) and not torch.allclose(own, reference)
    assert dict(tiny_bagel.named_parameters())["llm2vae.weight"] is tiny_bagel.llm2vae.weight


def test_gradients_reach_a_trainable_copy_and_not_the_model(tiny_bagel) -> None:
    fake = GenerationWeights.from_model(tiny_bagel, trainable=True)
    tiny_bagel.requires_grad_(False)  # the shared frozen part (the image markers run through it)
    contexts = _contexts(tiny_bagel, with_cfg=False)
    with fake.applied(tiny_bagel):
        contexts.raw_velocity(_noise(), torch.tensor(0.5), 2).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())
    assert all(p.grad is None for p in tiny_bagel.parameters())


def test_a_cfg_teacher_copy_hides_the_students_guidance_embedders(tiny_bagel) -> None:
    teacher = GenerationWeights.from_model(tiny_bagel)
    contexts = _contexts(tiny_bagel)
    x, t = _noise(), torch.tensor(0.8)
    with torch.no_grad():
        guided = contexts.velocity(x, t, T2I_CFG)  # CFG: two passes combined
        tiny_bagel.add_guidance_embedders()
        _randomise_guidance(tiny_bagel)
        with teacher.applied(tiny_bagel):
            assert not tiny_bagel.has_guidance_embedders
            assert torch.equal(contexts.velocity(x, t, T2I_CFG), guided)
        assert tiny_bagel.has_guidance_embedders
        student = GenerationWeights.from_model(tiny_bagel)
    assert student.has_guidance_embedders and not teacher.has_guidance_embedders
    bare = copy.deepcopy(tiny_bagel)
    bare.text_guidance_embedder = bare.img_guidance_embedder = None
    with pytest.raises(ValueError, match="8 unexpected: img_guidance_embedder.mlp.0.bias"):
        with student.applied(bare):
            pass


def test_mismatched_generation_keys_are_refused_with_the_keys_listed(tiny_bagel) -> None:
    reference = {n: tuple(p.shape) for n, p in tiny_bagel.named_parameters()}
    candidate = dict(reference)
    del candidate["llm2vae.bias"]
    candidate["vae2llm.weight"] = (1, 2)
    candidate["language_model.model.layers.7.mlp_moe_gen.up_proj.weight"] = (64, 32)
    with pytest.raises(ValueError) as error:
        check_generation_keys(reference, candidate, "student")
    message = str(error.value)
    assert "1 missing: llm2vae.bias" in message
    assert "1 unexpected: language_model.model.layers.7.mlp_moe_gen.up_proj.weight" in message
    assert "vae2llm.weight ((1, 2) vs (32, 16))" in message
    check_generation_keys(reference, {k: s for k, s in reference.items() if k != "connector.fc1.weight"}, "x")


def test_save_and_load_round_trip_and_shared_weights_check(tmp_path: Path, tiny_bagel, shapes_tokenizer):
    weights = GenerationWeights.from_model(tiny_bagel)
    weights.save(tmp_path / "gen.safetensors")
    loaded = GenerationWeights.load(tmp_path / "gen.safetensors", tiny_bagel)
    original = dict(weights.named_parameters())
    assert dict(loaded.named_parameters()).keys() == original.keys()
    assert all(torch.equal(p, original[n]) for n, p in loaded.named_parameters())

    save_pretrained(tiny_bagel, tmp_path / "folder", tokenizer=shapes_tokenizer)
    GenerationWeights.load(tmp_path / "folder", tiny_bagel, check_shared=True)
    changed = copy.deepcopy(tiny_bagel)
    with torch.no_grad():
        changed.connector.fc1.bias.add_(1.0)
    with pytest.raises(ValueError, match=r"1 differing: connector\.fc1\.bias"):
        GenerationWeights.load(tmp_path / "folder", changed, check_shared=True)


def test_copy_to_writes_the_copy_into_the_model(tiny_bagel) -> None:
    weights = GenerationWeights.from_model(tiny_bagel)
    with torch.no_grad():
        weights.get_parameter("llm2vae.bias").fill_(3.0)
    weights.copy_to(tiny_bagel)
    assert torch.equal(tiny_bagel.llm2vae.bias, torch.full((16,), 3.0))
