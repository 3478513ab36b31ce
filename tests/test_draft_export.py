"""Draft-head folders: exact serving key sets, bit-identical round trips, refusals, and the EAGLE-3 folder
run by an independent re-implementation of what SGLang / vLLM compute from it."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.export import (
    check_export_keys,
    export_draft_head,
    export_eagle3,
    export_hyper_bagel,
    load_draft_head,
)

LAYERS = 6
COMPATIBLE = dict(aggregation="eagle3", num_layers=1, zero_init=False, eagle3_compatible=True)
SERVING_KEYS = {
    "fc.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.post_attention_layernorm.weight",
    "norm.weight",
    "lm_head.weight",
    "d2t",
    "t2d",
}


@pytest.fixture
def target(tiny_bagel_config) -> Bagel:
    config = tiny_bagel_config.copy()
    config.llm.num_hidden_layers = LAYERS
    torch.manual_seed(0)
    return Bagel(config).eval()


def _head(target: Bagel, **config) -> DraftHead:
    """A head with every weight random (so a round trip that drops or mixes a tensor shows)."""
    vocab = target.config.llm.vocab_size
    counts = torch.randint(0, 100, (vocab,), generator=torch.Generator().manual_seed(1))
    head = DraftHead.from_target(target, DraftHeadConfig(draft_vocab_size=24, **config), counts)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name != "embed_tokens.weight":
                p.normal_(1.0 if "norm" in name else 0.0, 0.3)
    return head.eval()


def _run(head: DraftHead, target: Bagel) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    vocab = target.config.llm.vocab_size
    ids = torch.randint(0, vocab, (1, 7), generator=torch.Generator().manual_seed(2))
    positions = torch.tensor([[0, 1, 2, 2, 2, 3, 4]])
    lm = target.language_model
    with torch.no_grad():
        states = lm.model(lm.model.embed_tokens(ids), positions, output_hidden_states=True).hidden_states
        logits, hidden = head(head.fuse(states, positions), ids, positions)
    return logits, hidden, [ids, positions, *states]


def _assert_same_head(a: DraftHead, b: DraftHead, same_config: bool = True) -> None:
    assert a.tap_layers == b.tap_layers and (a.config == b.config or not same_config)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert state_a[key].dtype == state_b[key].dtype and torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize("aggregation", ["eagle3", "meta_query"])
def test_hyper_bagel_round_trip_is_bit_identical(target, tmp_path, aggregation):
    head = _head(target, aggregation=aggregation)
    export_draft_head(head, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["architectures"] == ["HyperBagelDraftHead"]
    assert config["num_hidden_layers"] == 2 and config["draft_vocab_size"] == 24
    assert set(load_file(tmp_path / "head" / "model.safetensors")) == set(head.state_dict()) - {
        "embed_tokens.weight"
    }
    loaded = load_draft_head(tmp_path / "head", target)
    _assert_same_head(head, loaded)
    for a, b in zip(_run(head, target)[:2], _run(loaded, target)[:2]):
        assert torch.equal(a, b)


def test_eagle3_folder_has_the_serving_layout(target, tmp_path):
    head = _head(target, **COMPATIBLE)
    export_eagle3(head, tmp_path / "eagle3")
    tensors = load_file(tmp_path / "eagle3" / "model.safetensors")
    assert set(tensors) == SERVING_KEYS
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    hidden, vocab = target.config.hidden_size, target.config.llm.vocab_size
    assert tensors["fc.weight"].shape == (hidden, 3 * hidden)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * hidden
    assert tensors["lm_head.weight"].shape == (24, hidden) and tensors["t2d"].shape == (vocab,)
    config = json.loads((tmp_path / "eagle3" / "config.json").read_text())
    llm = target.config.llm
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    expected = {
        "hidden_size": hidden,
        "intermediate_size": llm.intermediate_size,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_key_value_heads,
        "head_dim": llm.head_dim,
        "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_parameters["rope_theta"],
        "max_position_embeddings": llm.max_position_embeddings,
        "vocab_size": vocab,
        "num_hidden_layers": 1,
        "draft_vocab_size": 24,
        "target_hidden_size": hidden,
    }
    assert {key: config[key] for key in expected} == expected
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]

    loaded = load_draft_head(tmp_path / "eagle3", target)
    _assert_same_head(head, loaded)
    del config["hyperbagel_draft"]  # a folder from another EAGLE-3 trainer loads from the Llama fields alone
    (tmp_path / "eagle3" / "config.json").write_text(json.dumps(config))
    _assert_same_head(head, load_draft_head(tmp_path / "eagle3", target), same_config=False)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _serving_engine_logits(folder, ids, positions, states, embed) -> torch.Tensor:
    """`LlamaForCausalLMEagle3` step 0 as SGLang / vLLM compute it, from the folder alone (causal)."""
    config = json.loads((folder / "config.json").read_text())
    w = load_file(folder / "model.safetensors")
    eps, heads, kv_heads, hd = (
        config[k] for k in ("rms_norm_eps", "num_attention_heads", "num_key_value_heads", "head_dim")
    )
    llama = LlamaConfig(
        **{
            k: config[k]
            for k in (
                "hidden_size",
                "num_attention_heads",
                "head_dim",
                "rope_theta",
                "max_position_embeddings",
            )
        }
    )
    taps = torch.cat([states[i] for i in config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]], -1)
    hidden = taps @ w["fc.weight"].T
    x = torch.cat(
        [
            _rms(embed[ids], w["midlayer.input_layernorm.weight"], eps),
            _rms(hidden, w["midlayer.hidden_norm.weight"], eps),
        ],
        -1,
    )
    seq = ids.shape[1]
    q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(1, seq, heads, hd).transpose(1, 2)
    k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(1, seq, kv_heads, hd).transpose(1, 2)
    v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(1, seq, kv_heads, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *LlamaRotaryEmbedding(llama)(x, positions))
    k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
    scores = (q @ k.transpose(-1, -2)) / hd**0.5
    scores = scores.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, seq, -1)
    residual = hidden + attn @ w["midlayer.self_attn.o_proj.weight"].T
    normed = _rms(residual, w["midlayer.post_attention_layernorm.weight"], eps)
    mlp = (
        F.silu(normed @ w["midlayer.mlp.gate_proj.weight"].T) * (normed @ w["midlayer.mlp.up_proj.weight"].T)
    ) @ w["midlayer.mlp.down_proj.weight"].T
    return _rms(residual + mlp, w["norm.weight"], eps) @ w["lm_head.weight"].T


def test_eagle3_folder_computes_what_the_head_computes(target, tmp_path):
    head = _head(target, **COMPATIBLE)
    export_eagle3(head, tmp_path / "eagle3")
    logits, _, (ids, positions, *states) = _run(head, target)
    embed = target.language_model.model.embed_tokens.weight.detach()
    with torch.no_grad():
        reference = _serving_engine_logits(tmp_path / "eagle3", ids, positions, states, embed)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    d2t = load_file(tmp_path / "eagle3" / "model.safetensors")["d2t"]
    draft_ids = reference.argmax(-1)
    assert torch.equal(draft_ids + d2t[draft_ids], head.to_target_ids(logits.argmax(-1)))


def test_bfloat16_export_loads_in_bfloat16(target, tmp_path):
    head = _head(target)
    export_hyper_bagel(head, tmp_path / "bf16", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    loaded = load_draft_head(tmp_path / "bf16", target)
    expected = {k: v for k, v in head.to(torch.bfloat16).state_dict().items()}
    for key, value in loaded.state_dict().items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


class Trainer(nn.Module):
    def __init__(self, head: DraftHead) -> None:
        super().__init__()
        self.draft = head


def test_refusals_write_nothing(target, tmp_path):
    head = _head(target)
    with pytest.raises(ValueError, match="is not EAGLE-3's architecture; train with DraftHeadConfig"):
        export_eagle3(head, tmp_path / "a")
    with pytest.raises(
        ValueError, match=r"not a Trainer \(its keys carry trainer prefixes such as \['draft\."
    ):
        export_hyper_bagel(Trainer(head), tmp_path / "b")
    with pytest.raises(ValueError, match="an EAGLE-3-compatible head exports with export_eagle3"):
        export_hyper_bagel(_head(target, **COMPATIBLE), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []

    good = {"fc.weight": torch.zeros(1), "d2t": torch.zeros(1)}
    check_export_keys(good, {"fc.weight", "d2t"}, "here")
    with pytest.raises(ValueError, match=r"missing required keys \['t2d'\]"):
        check_export_keys(good, {"fc.weight", "d2t", "t2d"}, "here")
    with pytest.raises(ValueError, match=r"trainer prefixes .* on \['_orig_mod.fc.weight'\]"):
        check_export_keys(
            {"_orig_mod.fc.weight": torch.zeros(1), "d2t": torch.zeros(1)}, {"fc.weight", "d2t"}, "here"
        )
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        check_export_keys({**good, "extra": torch.zeros(1)}, {"fc.weight", "d2t"}, "here")


def test_export_replaces_a_folder_whole(target, tmp_path):
    first, second = _head(target, aggregation="eagle3"), _head(target)
    export_draft_head(first, tmp_path / "head")
    (tmp_path / "head" / "stale.txt").write_text("left over")
    export_draft_head(second, tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "model.safetensors"]
    _assert_same_head(second, load_draft_head(tmp_path / "head", target))
    assert [p.name for p in tmp_path.iterdir()] == ["head"]


def test_loading_refuses_foreign_targets_and_broken_folders(target, tiny_bagel_config, tmp_path):
    export_draft_head(_head(target), tmp_path / "head")
    other = tiny_bagel_config.copy()
    other.llm.hidden_size, other.llm.vocab_size = 48, other.llm.vocab_size + 4
    with pytest.raises(
        ValueError,
        match="hidden_size: folder 32 vs target 48.*vocab_size.*num_target_layers: folder 6 vs target 2",
    ):
        load_draft_head(tmp_path / "head", Bagel(other))

    weights = tmp_path / "head" / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "fc2.weight"}, weights)
    with pytest.raises(ValueError, match=r"refusing to load .*missing required keys \['fc2.weight'\]"):
        load_draft_head(tmp_path / "head", target)
    save_file({**tensors, "draft.norm.weight": tensors["norm.weight"].clone()}, weights)
    with pytest.raises(ValueError, match=r"trainer prefixes .* \['draft.norm.weight'\]"):
        load_draft_head(tmp_path / "head", target)

    config = tmp_path / "head" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"architectures \['LlamaForCausalLM'\] is neither"):
        load_draft_head(tmp_path / "head", target)
    with pytest.raises(FileNotFoundError, match="no draft-head config.json"):
        load_draft_head(tmp_path / "missing", target)
