"""BAGEL checkpoint folders: exact round trips, BAGEL's key names, clear errors, bf16 and 8/4-bit loads."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hyperbagel.backbone.autoencoder import BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import (
    from_pretrained,
    glue_config_dict,
    load_config,
    load_tokenizer,
    save_pretrained,
)
from hyperbagel.backbone.config import BagelConfig, SpecialTokenIds, tiny_config
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer


def _model(config: BagelConfig | None = None, seed: int = 0) -> Bagel:
    """A tiny Bagel with every tensor perturbed (norms not 1, llm2vae not 0) and an autoencoder attached."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = Bagel(config, BagelAutoencoder(config.vae))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
        for param in model.autoencoder.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _ids(vocab: int = 72) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def _rewrite_ema(folder: Path, edit) -> None:  # noqa: ANN001 - a callable editing the dict in place
    state = load_file(str(folder / "ema.safetensors"))
    edit(state)
    save_file(state, str(folder / "ema.safetensors"))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Bagel, Path]:
    model = _model()
    save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    tokenizer = build_shapes_tokenizer()
    model = _model(tiny_config(vocab_size=len(tokenizer)))
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, tokenizer=tokenizer)  # the method form of save_pretrained(model, ...)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left behind

    loaded = Bagel.from_pretrained(folder)
    expected, state = model.state_dict(), loaded.state_dict()
    assert list(state) == list(expected)  # the autoencoder stays outside the state dict
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    flux, loaded_flux = model.autoencoder.state_dict_flux(), loaded.autoencoder.state_dict_flux()
    assert loaded_flux.keys() == flux.keys() and all(torch.equal(loaded_flux[k], flux[k]) for k in flux)
    assert not any(p.requires_grad for p in loaded.autoencoder.parameters())
    assert not loaded.training
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    rope, loaded_rope = model.language_model.model.rotary_emb, loaded.language_model.model.rotary_emb
    assert torch.equal(loaded_rope.inv_freq, rope.inv_freq)

    assert loaded.config.llm.to_dict() == model.config.llm.to_dict()
    assert loaded.config.vit.to_dict() == model.config.vit.to_dict()
    assert loaded.config.vae == model.config.vae
    assert glue_config_dict(loaded.config) == glue_config_dict(model.config)

    ids = _ids(len(tokenizer))
    with torch.no_grad():
        assert torch.equal(loaded.language_model(ids), model.language_model(ids))
    reloaded = load_tokenizer(folder)
    assert reloaded("a red square").input_ids == tokenizer("a red square").input_ids


def test_saved_configs_look_like_bagels(saved: tuple[Bagel, Path]) -> None:
    model, folder = saved
    llm = json.loads((folder / "llm_config.json").read_text())
    vit = json.loads((folder / "vit_config.json").read_text())
    assert llm["rope_theta"] == model.config.llm.rope_parameters["rope_theta"]  # for transformers 4.x
    assert llm["rope_scaling"] is None and llm["tie_word_embeddings"] is False
    assert vit["num_hidden_layers"] == model.config.vit.num_hidden_layers + 1  # BAGEL drops one on load
    assert json.loads((folder / "bagel_config.json").read_text())["max_latent_size"] == 8
    assert (folder / "ae_config.json").is_file()  # the tiny autoencoder is not FLUX's


def _bagel_key_shapes(config: BagelConfig) -> dict[str, tuple[int, ...]]:
    """BAGEL's checkpoint names (reference/BAGEL.md) and shapes, built from the tiny sizes alone."""
    llm, vit = config.llm, config.vit
    h, inter, hd = llm.hidden_size, llm.intermediate_size, llm.head_dim
    q, kv = llm.num_attention_heads * hd, llm.num_key_value_heads * hd
    shapes = {
        "language_model.model.embed_tokens.weight": (llm.vocab_size, h),
        "language_model.model.norm.weight": (h,),
        "language_model.model.norm_moe_gen.weight": (h,),
        "language_model.lm_head.weight": (llm.vocab_size, h),
    }
    for i in range(llm.num_hidden_layers):
        p = f"language_model.model.layers.{i}"
        for e in ("", "_moe_gen"):
            for name, out in (("q", q), ("k", kv), ("v", kv)):
                shapes[f"{p}.self_attn.{name}_proj{e}.weight"] = (out, h)
                shapes[f"{p}.self_attn.{name}_proj{e}.bias"] = (out,)
            shapes[f"{p}.self_attn.o_proj{e}.weight"] = (h, q)
            shapes[f"{p}.self_attn.q_norm{e}.weight"] = (hd,)
            shapes[f"{p}.self_attn.k_norm{e}.weight"] = (hd,)
            shapes[f"{p}.mlp{e}.gate_proj.weight"] = (inter, h)
            shapes[f"{p}.mlp{e}.up_proj.weight"] = (inter, h)
            shapes[f"{p}.mlp{e}.down_proj.weight"] = (h, inter)
            shapes[f"{p}.input_layernorm{e}.weight"] = (h,)
            shapes[f"{p}.post_attention_layernorm{e}.weight"] = (h,)
    v, vi, side = vit.hidden_size, vit.intermediate_size, config.vit_max_num_patch_per_side
    vm = "vit_model.vision_model"
    shapes[f"{vm}.embeddings.patch_embedding.weight"] = (v, 3 * vit.patch_size**2)
    shapes[f"{vm}.embeddings.patch_embedding.bias"] = (v,)
    shapes[f"{vm}.embeddings.position_embedding.weight"] = (side * side, v)
    for i in range(vit.num_hidden_layers):  # SigLIP's encoder layer names
        p = f"{vm}.encoder.layers.{i}"
        for name, shape in (("layer_norm1", (v,)), ("layer_norm2", (v,))):
            shapes[f"{p}.{name}.weight"], shapes[f"{p}.{name}.bias"] = shape, shape
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"], shapes[f"{p}.self_attn.{proj}.bias"] = (v, v), (v,)
        shapes[f"{p}.mlp.fc1.weight"], shapes[f"{p}.mlp.fc1.bias"] = (vi, v), (vi,)
        shapes[f"{p}.mlp.fc2.weight"], shapes[f"{p}.mlp.fc2.bias"] = (v, vi), (v,)
    shapes[f"{vm}.post_layernorm.weight"] = shapes[f"{vm}.post_layernorm.bias"] = (v,)
    token_dim = config.latent_patch_size**2 * config.vae.z_channels
    for name, (out, inp) in {
        "connector.fc1": (h, v),
        "connector.fc2": (h, h),
        "time_embedder.mlp.0": (h, 256),
        "time_embedder.mlp.2": (h, h),
        "vae2llm": (h, token_dim),
        "llm2vae": (token_dim, h),
    }.items():
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)
    shapes["vit_pos_embed.pos_embed"] = (side * side, h)
    shapes["latent_pos_embed.pos_embed"] = (config.max_latent_size**2, h)
    return shapes


def test_hand_written_bagel_checkpoint_loads_strictly(tmp_path: Path) -> None:
    config = tiny_config()
    shapes = _bagel_key_shapes(config)
    with torch.device("meta"):
        model_shapes = {k: tuple(t.shape) for k, t in Bagel(config).state_dict().items()}
    assert shapes == model_shapes

    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=generator).to(torch.bfloat16) for k, s in shapes.items()}
    folder = tmp_path / "bagel"
    folder.mkdir()
    save_file(tensors, str(folder / "ema.safetensors"))
    llm = config.llm
    (folder / "llm_config.json").write_text(
        json.dumps(
            {  # transformers 4.x style, as BAGEL ships it
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "hidden_act": "silu",
                "hidden_size": llm.hidden_size,
                "intermediate_size": llm.intermediate_size,
                "num_hidden_layers": llm.num_hidden_layers,
                "num_attention_heads": llm.num_attention_heads,
                "num_key_value_heads": llm.num_key_value_heads,
                "head_dim": llm.head_dim,
                "vocab_size": llm.vocab_size,
                "max_position_embeddings": 512,
                "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0,
                "rope_scaling": None,
                "sliding_window": 131072,
                "use_sliding_window": False,
                "tie_word_embeddings": True,
                "torch_dtype": "bfloat16",
                "transformers_version": "4.43.1",
            }
        )
    )
    vit = config.vit
    (folder / "vit_config.json").write_text(
        json.dumps(
            {
                "model_type": "siglip_vision_model",
                "hidden_size": vit.hidden_size,
                "intermediate_size": vit.intermediate_size,
                "num_hidden_layers": vit.num_hidden_layers + 1,
                "num_attention_heads": vit.num_attention_heads,
                "patch_size": vit.patch_size,
                "image_size": 16,
                "hidden_act": "gelu_pytorch_tanh",
                "layer_norm_eps": 1e-6,
            }
        )
    )
    (folder / "ae_config.json").write_text(json.dumps(config.vae.to_dict()))
    (folder / "bagel_config.json").write_text(
        json.dumps(
            {
                "max_latent_size": 8,
                "vit_max_num_patch_per_side": 8,
                "special_tokens": config.special_tokens.to_dict(),
            }
        )
    )
    autoencoder = _model().autoencoder
    autoencoder.save_file(folder / "ae.safetensors")

    loaded = from_pretrained(folder, strict=True)
    state = loaded.state_dict()
    assert all(torch.equal(state[k], t) for k, t in tensors.items())
    assert loaded.dtype == torch.bfloat16  # dtype=None keeps what the file stores
    flux = autoencoder.state_dict_flux()
    assert all(torch.equal(loaded.autoencoder.state_dict_flux()[k], t) for k, t in flux.items())
    cfg = loaded.config
    assert cfg.llm.rope_parameters["rope_theta"] == 1e6
    assert cfg.llm.qk_norm and not cfg.llm.tie_word_embeddings
    assert cfg.vit.num_hidden_layers == vit.num_hidden_layers and cfg.latent_patch_size == 2
    assert torch.isfinite(loaded.language_model(_ids()).float()).all()


def test_key_problems_are_reported_in_one_error(saved: tuple[Bagel, Path]) -> None:
    _, folder = saved

    def edit(state: dict[str, torch.Tensor]) -> None:
        del state["language_model.model.norm_moe_gen.weight"]
        state["language_model.model.extra.weight"] = torch.zeros(3)
        state["vae2llm.weight"] = torch.zeros(5, 5)

    _rewrite_ema(folder, edit)
    with pytest.raises(ValueError) as err:
        from_pretrained(folder)
    message = str(err.value)
    assert "ema.safetensors" in message
    assert "1 missing keys: language_model.model.norm_moe_gen.weight" in message
    assert "1 unexpected keys: language_model.model.extra.weight" in message
    assert "vae2llm.weight (checkpoint (5, 5) vs model (32, 16))" in message

    with pytest.raises(ValueError, match="mis-shaped") as err:  # never tolerated
        from_pretrained(folder, strict=False)
    assert "missing keys" not in str(err.value)


def test_long_key_lists_are_truncated(saved: tuple[Bagel, Path]) -> None:
    _, folder = saved
    _rewrite_ema(folder, lambda s: [s.pop(k) for k in list(s) if k.startswith("language_model.model.layers")])
    with pytest.raises(ValueError) as err:
        from_pretrained(folder)
    assert "56 missing keys:" in str(err.value) and "... and 36 more" in str(err.value)


def test_strict_false_initialises_missing_and_ignores_unexpected(saved: tuple[Bagel, Path]) -> None:
    model, folder = saved

    def edit(state: dict[str, torch.Tensor]) -> None:
        del state["language_model.model.norm_moe_gen.weight"]
        state["unused.weight"] = torch.zeros(2)

    _rewrite_ema(folder, edit)
    loaded = from_pretrained(folder, strict=False)
    state = loaded.state_dict()
    assert "unused.weight" not in state
    assert torch.equal(state["language_model.model.norm_moe_gen.weight"], torch.ones(32))  # RMSNorm init
    assert torch.equal(state["vae2llm.weight"], model.state_dict()["vae2llm.weight"])
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]


@pytest.mark.parametrize("name", ["ema.safetensors", "llm_config.json", "vit_config.json", "ae.safetensors"])
def test_missing_file_is_named(saved: tuple[Bagel, Path], name: str) -> None:
    _, folder = saved
    (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match=name):
        from_pretrained(folder)


def test_autoencoder_is_optional(saved: tuple[Bagel, Path]) -> None:
    _, folder = saved
    (folder / "ae.safetensors").unlink()
    assert from_pretrained(folder, load_autoencoder=False)._autoencoder is None


def test_truncated_weights_are_named(saved: tuple[Bagel, Path]) -> None:
    _, folder = saved
    path = folder / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="ema.safetensors"):
        from_pretrained(folder)


@pytest.mark.parametrize(
    "name", ["llm_config.json", "vit_config.json", "bagel_config.json", "ae_config.json"]
)
def test_malformed_json_is_named(saved: tuple[Bagel, Path], name: str) -> None:
    _, folder = saved
    (folder / name).write_text('{"hidden_size": 32,')
    with pytest.raises(ValueError, match=name):
        from_pretrained(folder)


def test_unknown_glue_field_is_refused(saved: tuple[Bagel, Path]) -> None:
    _, folder = saved
    glue = json.loads((folder / "bagel_config.json").read_text())
    (folder / "bagel_config.json").write_text(json.dumps({**glue, "latent_patch": 4}))
    with pytest.raises(ValueError, match="latent_patch"):
        load_config(folder)


def test_config_defaults_and_tokenizer_ids(tmp_path: Path) -> None:
    """Without bagel_config.json: BAGEL-7B-MoT's glue values and the tokenizer's marker ids."""
    model = _model()
    save_pretrained(model, tmp_path)
    (tmp_path / "bagel_config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_config(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    tokenizer = build_shapes_tokenizer()
    tokenizer.save_pretrained(str(tmp_path))
    config = load_config(tmp_path)
    assert config.special_tokens == SpecialTokenIds(im_start=2, im_end=3, vision_start=4, vision_end=5)
    glue = (config.max_latent_size, config.vit_max_num_patch_per_side, config.latent_patch_size)
    assert glue == (64, 70, 2)


def test_save_refuses_a_tokenizer_with_other_marker_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="special token ids"):
        other_ids = SpecialTokenIds(im_start=60, im_end=61, vision_start=62, vision_end=63)
        model = _model(tiny_config(special_tokens=other_ids))
        save_pretrained(model, tmp_path, tokenizer=build_shapes_tokenizer())
    assert not tmp_path.joinpath("ema.safetensors").exists()


def test_bf16_save_and_load(saved: tuple[Bagel, Path], tmp_path: Path) -> None:
    model, folder = saved
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "ema.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}

    loaded = from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.autoencoder.parameters()} == {torch.bfloat16}
    assert loaded.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        reference = model.language_model(ids)
        torch.testing.assert_close(loaded.language_model(ids).float(), reference, atol=0.05, rtol=0.05)


def _quantized(folder: Path, mode: str) -> Bagel:
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' fp32 -> fp16 cast notice
        return from_pretrained(folder, quantize=mode)


def _logits(model: Bagel) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return model.language_model(_ids(model.config.llm.vocab_size))


def test_8bit_load_runs_frozen_quantized_layers(saved: tuple[Bagel, Path]) -> None:
    import bitsandbytes as bnb

    model, folder = saved
    loaded = _quantized(folder, "8bit")
    layer = loaded.language_model.model.layers[1]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj_moe_gen, layer.mlp.down_proj):
        assert isinstance(linear, bnb.nn.Linear8bitLt) and linear.weight.dtype == torch.int8
        assert not linear.weight.requires_grad and (linear.bias is None or not linear.bias.requires_grad)
    assert type(loaded.language_model.lm_head) is torch.nn.Linear
    assert loaded.language_model.lm_head.weight.dtype == torch.float32
    error = (_logits(loaded) - _logits(model)).abs().max()
    assert 0 < error < 0.05  # really quantized, and close: ~0.01 seen on logits of order 2


def test_4bit_load_matches_its_dequantized_weights(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    config = tiny_config()  # widened: bitsandbytes' CPU 4-bit kernel needs input sizes divisible by 64
    config.llm.hidden_size, config.llm.intermediate_size, config.llm.head_dim = 64, 128, 16
    model = _model(config)
    save_pretrained(model, tmp_path)
    loaded = _quantized(tmp_path, "4bit")
    dequantized = _model(config)
    layers = loaded.language_model.model.layers
    linears = {name: m for name, m in layers.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(linears) == 2 * 2 * 7  # layers x experts x (q, k, v, o, gate, up, down)
    for name, linear in linears.items():  # before any forward: the CPU kernel repacks weights in place
        weight = bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
        dequantized.language_model.model.layers.get_submodule(name).weight.data.copy_(weight)
    logits, reference = _logits(loaded), _logits(model)
    assert (logits - _logits(dequantized)).abs().max() < 0.1  # ~0.03 seen (bf16 CPU kernel)
    assert 0 < (logits - reference).norm() / reference.norm() < 0.3  # NF4 on random weights: ~0.16 seen


def test_4bit_on_cpu_refuses_unaligned_sizes(saved: tuple[Bagel, Path]) -> None:
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match="divisible by 64"):
        from_pretrained(saved[1], quantize="4bit")


def test_quantized_model_cannot_be_saved(saved: tuple[Bagel, Path], tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    loaded = _quantized(saved[1], "8bit")
    with pytest.raises(ValueError, match="quantized"):
        save_pretrained(loaded, tmp_path / "q")
    assert not (tmp_path / "q" / "llm_config.json").exists()
