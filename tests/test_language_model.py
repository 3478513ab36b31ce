"""BAGEL's Qwen2-MoT language model against transformers' Qwen3, and the KV cache's exactness."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from hyperbagel.backbone.config import tiny_config
from hyperbagel.backbone.language_model import Qwen2MoTForCausalLM


def _model(seed: int = 0) -> Qwen2MoTForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2MoTForCausalLM(tiny_config().llm).eval()
    with torch.no_grad():  # non-trivial norms so QK-norm and expert choice matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _expert_key(key: str, expert: str) -> str:
    """Our name of a Qwen3 parameter inside the chosen expert ('' or '_moe_gen')."""
    if not expert or not ("layers." in key or key.endswith("model.norm.weight")):
        return key
    if ".mlp." in key:
        return key.replace(".mlp.", f".mlp{expert}.")
    stem, leaf = key.rsplit(".", 1)
    return f"{stem}{expert}.{leaf}"


def _reference(model: Qwen2MoTForCausalLM, expert: str = "") -> Qwen3ForCausalLM:
    """Qwen3 (QK-norm, biased attention with a zero o_proj bias) carrying one expert's weights."""
    cfg = model.config
    ref_cfg = Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rope_parameters=dict(cfg.rope_parameters),
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        attention_bias=True,
        tie_word_embeddings=False,
    )
    ref_cfg._attn_implementation = "eager"
    ref = Qwen3ForCausalLM(ref_cfg).eval()
    ours = model.state_dict()
    state = {}
    for key in ref.state_dict():
        if key.endswith("o_proj.bias"):
            state[key] = torch.zeros_like(ref.state_dict()[key])
            continue
        state[key] = ours[_expert_key(key, expert)]
    ref.load_state_dict(state, strict=True)
    return ref


def test_understanding_path_matches_qwen3() -> None:
    model = _model()
    ids = torch.randint(0, 60, (2, 11))
    with torch.no_grad():
        expected = _reference(model)(input_ids=ids).logits
        actual = model(ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_generation_expert_routing_matches_qwen3_with_generation_weights() -> None:
    model = _model()
    embeds = torch.randn(1, 9, model.config.hidden_size)
    positions = torch.arange(9)[None]
    gen_mask = torch.ones(1, 9, dtype=torch.bool)
    with torch.no_grad():
        ref = _reference(model, "_moe_gen")
        expected = ref.model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        actual = model.model(embeds, positions, gen_mask=gen_mask).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_mixed_routing_gathers_and_scatters_in_order() -> None:
    """With both experts identical, any routing must give the plain result; with distinct ones it must not."""
    model = _model()
    embeds = torch.randn(2, 7, model.config.hidden_size)
    positions = torch.arange(7)[None].expand(2, 7)
    gen_mask = torch.rand(2, 7) > 0.5
    with torch.no_grad():
        routed_distinct = model.model(embeds, positions, gen_mask=gen_mask).last_hidden_state
        for name, p in model.named_parameters():
            if "_moe_gen" in name:
                p.copy_(model.get_parameter(name.replace("_moe_gen", "")))
        plain = model.model(embeds, positions).last_hidden_state
        routed_same = model.model(embeds, positions, gen_mask=gen_mask).last_hidden_state
    torch.testing.assert_close(routed_same, plain, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(routed_distinct[gen_mask], plain[gen_mask], atol=1e-3)


def _step(model, cache, ids):
    """Forward `ids` [B, k] past the cache causally, commit them, return logits."""
    batch, k = ids.shape
    positions = torch.tensor(cache.rope_cursor)[:, None] + torch.arange(k)[None]
    cache.reserve(k)
    out = model.model(model.model.embed_tokens(ids), positions, cache=cache)
    cache.commit(k, k)
    return model.lm_head(out.last_hidden_state)


def test_incremental_decoding_equals_full_forward() -> None:
    model = _model()
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, capacity=4)  # forces the buffer to grow
        pieces = [_step(model, cache, ids[:, :5])] + [
            _step(model, cache, ids[:, i : i + 1]) for i in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.lengths == [12, 12] and cache.capacity >= 12


def test_verify_append_equals_single_appends_and_rollback_is_exact() -> None:
    model = _model()
    prompt, draft = torch.randint(0, 60, (1, 6)), torch.randint(0, 60, (1, 4))
    with torch.no_grad():
        cache = model.new_cache()
        _step(model, cache, prompt)
        verify = _step(model, cache, draft)
        cache.rollback(6)
        singles = torch.cat([_step(model, cache, draft[:, i : i + 1]) for i in range(4)], dim=1)
        cache.rollback(8)
        assert cache.rope_cursor == [8]
        again = _step(model, cache, draft[:, 2:])
    torch.testing.assert_close(verify, singles, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, singles[:, 2:], atol=1e-6, rtol=1e-6)


def test_ragged_batch_matches_separate_samples() -> None:
    """Samples with different committed lengths decode in one batch exactly as they would alone."""
    model = _model()
    a, b = torch.randint(0, 60, (1, 7)), torch.randint(0, 60, (1, 4))
    nxt = torch.randint(0, 60, (2, 3))
    with torch.no_grad():
        alone = [model(torch.cat([a, nxt[:1]], 1))[:, -3:], model(torch.cat([b, nxt[1:]], 1))[:, -3:]]
        cache = model.new_cache(batch_size=2)
        padded = torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)])
        positions = torch.arange(7)[None].expand(2, 7)
        mask = cache.attention_mask(7, valid_new=[7, 4])
        cache.reserve(7)
        model.model(model.model.embed_tokens(padded), positions, attention_mask=mask, cache=cache)
        cache.commit([7, 4], [7, 4])
        batched = torch.cat([_step(model, cache, nxt[:, i : i + 1]) for i in range(3)], dim=1)
    torch.testing.assert_close(batched[:1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1:], alone[1], atol=1e-5, rtol=1e-5)


def test_rollback_past_length_is_refused() -> None:
    cache = _model().new_cache()
    cache.commit(3, 3)
    with pytest.raises(ValueError, match="cannot roll back"):
        cache.rollback(5)
