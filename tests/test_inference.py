"""Inference primitives: cached contexts, batched text generation and CFG image sampling."""

import numpy as np
import pytest
import torch
from PIL import Image

from hyperbagel.backbone.flow import CFGConfig, cfg_combine, count_nfe, sampling_schedule
from hyperbagel.backbone.image_transforms import vae_input, vit_input
from hyperbagel.backbone.inference import (
    BagelInferencer,
    build_image_contexts,
    generate_text,
    initial_noise,
    prefill,
)
from hyperbagel.backbone.packing import TextBlock, VaeImage, VitImage, pack


def _picture(color: str, size: tuple[int, int] = (16, 16)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste("white", (4, 4, 10, 12))
    return image


def test_cached_context_and_decoding_equal_one_full_forward(tiny_bagel) -> None:
    """Prefill (VAE + ViT + text blocks) then token-by-token decoding reproduces the packed forward."""
    cfg = tiny_bagel.config
    context = [
        VaeImage(pixels=vae_input(_picture("red"), cfg)),
        VitImage(vit_input(_picture("red"), cfg)),
        TextBlock([10, 11, 12]),
    ]
    answer = [cfg.special_tokens.im_start, 20, 21, 22]
    full = pack([[context + [TextBlock(answer[1:])]]], cfg)
    with torch.no_grad():
        tokens = torch.cat(tiny_bagel.encode_latent_tokens(full.vae_images))
        reference = tiny_bagel.forward_packed(full, tokens, torch.zeros(len(tokens))).hidden[0]
        cache = prefill(tiny_bagel, [context])
        steps = [tiny_bagel.forward_tokens(torch.tensor([[token]]), cache).hidden[0, 0] for token in answer]
    start = cache.lengths[0] - len(answer)
    torch.testing.assert_close(
        torch.stack(steps), reference[start : start + len(answer)], atol=1e-5, rtol=1e-5
    )


def test_batched_chat_equals_one_prompt_at_a_time(tiny_bagel, shapes_tokenizer) -> None:
    inferencer = BagelInferencer(tiny_bagel, shapes_tokenizer)
    prompts = ["what color is the circle ?", "how many shapes are there ?"]
    images = [[_picture("red")], [_picture("blue", (24, 16)), _picture("green")]]
    batched = inferencer.chat(prompts, images, max_new_tokens=6)
    single = [inferencer.chat([p], [i], max_new_tokens=6)[0] for p, i in zip(prompts, images)]
    assert batched == single and all(batched)


def test_generation_stops_at_im_end(tiny_bagel) -> None:
    im_end = tiny_bagel.config.special_tokens.im_end
    with torch.no_grad():
        tiny_bagel.language_model.lm_head.bias = None
        tiny_bagel.language_model.lm_head.weight.zero_()
        tiny_bagel.language_model.lm_head.weight[im_end] = 1.0  # im_end always wins under greedy decoding
    cache = prefill(tiny_bagel, [[TextBlock([9, 10])]])
    assert generate_text(tiny_bagel, cache, max_new_tokens=5) == [[]]
    assert cache.lengths == [4 + 1]  # the context plus the <|im_start|> that opened the answer


def _separate_velocity(model, contexts, grid, x, t):
    """Velocity of each context prefilled on its own (no stacking), for comparison."""
    out = []
    for sample in contexts:
        ctx = build_image_contexts(model, [sample], None, None, grid)
        out.append(ctx.raw_velocity(x, t, 1))
    return out


@pytest.mark.parametrize("sequential_cfg", [False, True], ids=["batched", "sequential"])
def test_stacked_cfg_contexts_match_separate_passes(tiny_bagel, sequential_cfg: bool) -> None:
    cfg_model = tiny_bagel.config
    source = _picture("red")
    image_blocks = [VaeImage(pixels=vae_input(source, cfg_model)), VitImage(vit_input(source, cfg_model))]
    text = TextBlock([30, 31, 32, 33])
    grid = (4, 4)
    x = initial_noise(tiny_bagel, 1, grid, seed=3)
    t = torch.tensor(0.8)
    guidance = CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.4, 1.0), renorm_type="text_channel")
    with torch.no_grad():
        contexts = build_image_contexts(
            tiny_bagel, [image_blocks + [text]], [image_blocks], [[text]], grid, sequential_cfg
        )
        committed = list(contexts.cache.lengths)
        guided = contexts.velocity(x, t, guidance)
        v_cond, v_no_text, v_no_img = _separate_velocity(
            tiny_bagel, [image_blocks + [text], image_blocks, [text]], grid, x, t
        )
        outside = contexts.velocity(x, torch.tensor(0.2), guidance)
        v_cond_outside = _separate_velocity(tiny_bagel, [image_blocks + [text]], grid, x, torch.tensor(0.2))[
            0
        ]
    torch.testing.assert_close(
        guided, cfg_combine(v_cond, v_no_text, v_no_img, guidance, t), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(outside, v_cond_outside, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_cond, v_no_img, atol=1e-4)  # the image context really matters
    assert contexts.cache.lengths == committed  # queries never commit the noisy block
    assert contexts.cache.lengths[0] == pack([[image_blocks + [text]]], cfg_model).valid_lengths[0]


def test_text_to_image_batch_seed_and_explicit_noise(tiny_bagel, shapes_tokenizer) -> None:
    inferencer = BagelInferencer(tiny_bagel, shapes_tokenizer)
    prompts = ["a red circle", "two blue squares in a row"]
    batch = inferencer.text_to_image(prompts, height=16, width=24, num_timesteps=4, seed=5)
    assert [image.size for image in batch] == [(24, 16), (24, 16)]
    second = inferencer.text_to_image(prompts[1], height=16, width=24, num_timesteps=4, seed=[6])[0]
    assert list(second.getdata()) == list(batch[1].getdata())
    noise = torch.randn(
        1, tiny_bagel.config.latent_channels, 8, 12, generator=torch.Generator().manual_seed(0)
    )
    first = inferencer.text_to_image(prompts[0], height=16, width=24, num_timesteps=4, noise=noise)[0]
    again = inferencer.text_to_image(prompts[0], height=16, width=24, num_timesteps=4, noise=noise)[0]
    assert list(first.getdata()) == list(again.getdata())
    with pytest.raises(ValueError, match="multiple of the image stride"):
        inferencer.text_to_image(prompts[0], height=18, width=16)


def test_unipc_solver_keeps_one_forward_a_step(tiny_bagel, shapes_tokenizer) -> None:
    """Same model evaluations as Euler; its first step is Euler's, so at one step the images agree."""
    inferencer = BagelInferencer(tiny_bagel, shapes_tokenizer)
    calls = []
    handle = tiny_bagel.llm2vae.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] // 16))
    guidance = CFGConfig(text_scale=4.0, interval=(0.4, 1.0))
    kwargs = {"height": 16, "width": 16, "seed": 3, "cfg": guidance}
    unipc = inferencer.text_to_image("a red circle", num_timesteps=6, solver="unipc", **kwargs)[0]
    handle.remove()
    assert sum(calls) == count_nfe(sampling_schedule(6, 3.0), guidance)
    euler = inferencer.text_to_image("a red circle", num_timesteps=6, **kwargs)[0]
    assert list(unipc.getdata()) != list(euler.getdata())
    one_step = [
        np.asarray(inferencer.text_to_image("a red circle", num_timesteps=2, solver=s, **kwargs)[0], float)
        for s in ("euler", "unipc")
    ]
    assert np.abs(one_step[0] - one_step[1]).max() <= 1


def test_model_evaluations_match_the_nfe_count(tiny_bagel, shapes_tokenizer) -> None:
    """Forwards per sampling step follow BAGEL's pass rule (counted as rows of the noisy-block queries)."""
    inferencer = BagelInferencer(tiny_bagel, shapes_tokenizer)
    calls = []
    handle = tiny_bagel.llm2vae.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] // 16))
    guidance = CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.4, 1.0), renorm_type="text_channel")
    inferencer.edit(
        _picture("red"), "make the square blue", num_timesteps=8, timestep_shift=3.0, cfg=guidance
    )
    handle.remove()
    assert sum(calls) == count_nfe(sampling_schedule(8, 3.0), guidance)
    assert set(calls) == {1, 3}


def test_sequential_cfg_runs_one_context_per_forward_and_draws_the_same_images(
    tiny_bagel, shapes_tokenizer
) -> None:
    """BAGEL's inferencer runs each CFG pass as its own forward: as many forwards as the NFE count, each
    holding one context of every sample, and the images of the batched passes."""
    guidance = CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.4, 1.0), renorm_type="text_channel")
    images = [_picture("red"), _picture("blue")]
    edit = {
        "instructions": ["make the square blue", "remove the square"],
        "num_timesteps": 8,
        "cfg": guidance,
    }
    batched = BagelInferencer(tiny_bagel, shapes_tokenizer).edit(images, seed=[1, 2], **edit)
    calls = []
    handle = tiny_bagel.llm2vae.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0] // 16))
    sequential = BagelInferencer(tiny_bagel, shapes_tokenizer, sequential_cfg=True).edit(
        images, seed=[1, 2], **edit
    )
    handle.remove()
    assert set(calls) == {2}  # two samples, one context each
    assert len(calls) == count_nfe(sampling_schedule(8, 3.0), guidance)
    for one, other in zip(batched, sequential, strict=True):
        difference = torch.tensor(list(one.getdata())) - torch.tensor(list(other.getdata()))
        assert difference.abs().max() <= 1  # a rounding step of the 8-bit pixels at most


def test_per_sample_guidance_is_the_same_with_sequential_passes(tiny_bagel) -> None:
    """Distillation targets guide each sample at its own time and scales; sequential passes agree."""
    source = _picture("red")
    cfg_model = tiny_bagel.config
    image_blocks = [VaeImage(pixels=vae_input(source, cfg_model)), VitImage(vit_input(source, cfg_model))]
    texts = [TextBlock([30, 31, 32]), TextBlock([34, 35])]
    grid = (4, 4)
    x = initial_noise(tiny_bagel, 2, grid, seed=4)
    times = torch.tensor([0.9, 0.3])
    settings = [
        CFGConfig(text_scale=3.0, img_scale=1.5, interval=(0.4, 1.0), renorm_type="text_channel"),
        CFGConfig(text_scale=2.0, img_scale=1.0, interval=(0.0, 1.0), renorm_type="global"),
    ]
    velocities = []
    with torch.no_grad():
        for sequential in (False, True):
            contexts = build_image_contexts(
                tiny_bagel,
                [image_blocks + [text] for text in texts],
                [image_blocks] * 2,
                [[text] for text in texts],
                grid,
                sequential,
            )
            velocities.append(contexts.velocity(x, times, settings))
    torch.testing.assert_close(velocities[0], velocities[1], atol=1e-5, rtol=1e-5)


def test_bfloat16_model_runs_every_path(tiny_bagel, shapes_tokenizer) -> None:
    """The GPU dtype: a bf16 model (autoencoder included) generates, edits and answers, tracking float32."""
    inferencer = BagelInferencer(tiny_bagel, shapes_tokenizer)
    reference = inferencer.text_to_image("a red circle", height=16, width=16, num_timesteps=3, seed=0)[0]
    inferencer = BagelInferencer(tiny_bagel.to(torch.bfloat16), shapes_tokenizer)
    assert tiny_bagel.autoencoder.vae.dtype == torch.bfloat16
    image = inferencer.text_to_image("a red circle", height=16, width=16, num_timesteps=3, seed=0)[0]
    difference = (torch.tensor(list(image.getdata())) - torch.tensor(list(reference.getdata()))).abs().float()
    assert difference.mean() < 8.0  # out of 255: bf16 rounding, not a different image
    assert inferencer.edit(_picture("red"), "make it blue", num_timesteps=3, seed=0)[0].size == (16, 16)
    assert isinstance(inferencer.chat("what color is it ?", [_picture("red")], max_new_tokens=3)[0], str)


def test_cached_noisy_block_equals_the_same_tokens_in_one_full_forward(tiny_bagel) -> None:
    """The sampler's query of a noisy block against a cached prompt gives the velocity that the noisy image
    gets inside one packed forward with that prompt."""
    grid = (4, 4)
    prompt = [TextBlock([30, 31, 32, 33])]
    x = initial_noise(tiny_bagel, 1, grid, seed=5)
    t = torch.tensor(0.7)
    latents = tiny_bagel.tokens_to_latents(x, grid)[0]
    full = pack([[prompt + [VaeImage(latents=latents, noisy=True)]]], tiny_bagel.config)
    with torch.no_grad():
        output = tiny_bagel.forward_packed(full, x[0], t.expand(x.shape[1]))
        reference = tiny_bagel.velocity(output, full)
        queried = build_image_contexts(tiny_bagel, [prompt], None, None, grid).raw_velocity(x, t, 1)[0]
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(queried, reference, atol=1e-5, rtol=1e-5)
