"""Draft-head folders: EAGLE-3 for SGLang / vLLM, and our own format for the Hyper-Bagel head.

Both are Hugging Face style folders, `config.json` + `model.safetensors`, with the token embedding left
out (it is a frozen copy of the target's; the engines and `load_draft_head` take it from the target).

- `LlamaForCausalLMEagle3` (`DraftHeadConfig(eagle3_compatible=True)`): exactly the serving key set
  `fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d`, Llama config fields and
  `eagle_config.eagle_aux_hidden_state_layer_ids` = our tap layers (inputs of those layers). The module
  names of that variant are the serving names, so the export is the state dict itself, bit for bit.
- `HyperBagelDraftHead` (every other head): what does not map onto EAGLE-3 is the meta-query
  aggregation (`cross_attn.*`, `fc1`, `dec.*`), the residual fusion `fc2` with `embed_norm` /
  `feature_norm`, and draft layers with qkv bias and QK-norm (`layers.{i}.*`, the target's understanding
  expert) instead of the 2H-input midlayer; an engine would need this architecture added to run it.
  Same file layout, same Llama fields (so the dimensions read the same), `num_hidden_layers` = draft
  layers, the module's own key names. The EAGLE-3 exporter refuses these heads.
`config.json["hyperbagel_draft"]` records the `DraftHeadConfig` and the target's layer count for both.
Every write is checked first: the exact required key set, and no trainer prefix ("model.", "draft.",
"_orig_mod.", "module."), which a serving engine would silently skip.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Qwen2Config

from hyperbagel.backbone.checkpoint import llm_config_dict
from hyperbagel.backbone.language_model import head_dim_of
from hyperbagel.callbacks.export import replace_folder
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.vocab import check_maps

if TYPE_CHECKING:
    from hyperbagel.backbone.bagel import Bagel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
HYPER_BAGEL_ARCHITECTURE = "HyperBagelDraftHead"
TRAINER_PREFIXES = ("model.", "draft.", "_orig_mod.", "module.")
EMBEDDING_KEY = "embed_tokens.weight"  # never written: the target's own embedding is used
_MIDLAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MIDLAYER += ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_MIDLAYER += ("input_layernorm", "hidden_norm", "post_attention_layernorm")
EAGLE3_KEYS = frozenset(
    ["fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d"] + [f"midlayer.{n}.weight" for n in _MIDLAYER]
)
_REQUIRED_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "max_position_embeddings",
    "vocab_size",
    "hidden_act",
    "rope_theta",
)
_LLAMA_FIELDS = (*_REQUIRED_FIELDS[:-1], "initializer_range")


def check_export_keys(
    tensors: dict[str, torch.Tensor], required: set[str] | frozenset[str], where: str
) -> None:
    """Refuse (ValueError) a state dict whose keys are not exactly `required` or carry trainer prefixes."""
    keys = set(tensors)
    prefixed = sorted(k for k in keys if k.startswith(TRAINER_PREFIXES))
    missing, unexpected = sorted(required - keys), sorted(keys - required - set(prefixed))
    if prefixed or missing or unexpected:
        problems = []
        if prefixed:
            problems.append(
                f"trainer prefixes {TRAINER_PREFIXES} on {prefixed[:6]} (pass the unwrapped DraftHead)"
            )
        if missing:
            problems.append(f"missing required keys {missing[:6]}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:6]}")
        raise ValueError(f"refusing {where}: " + "; ".join(problems))


def _head_config_json(
    head: DraftHead, architecture: str, dtype: torch.dtype, training: dict[str, Any] | None
) -> dict[str, Any]:
    llm = head.llm_config
    rope = llm_config_dict(llm)
    eagle3 = architecture == EAGLE3_ARCHITECTURE
    config = {name: getattr(llm, name) for name in _LLAMA_FIELDS}
    config.update(
        architectures=[architecture],
        model_type="llama" if eagle3 else "hyperbagel_draft",
        head_dim=head_dim_of(llm),
        rope_theta=rope["rope_theta"],
        rope_scaling=rope["rope_scaling"],
        num_hidden_layers=1 if eagle3 else head.config.num_layers,
        draft_vocab_size=head.draft_vocab_size,
        target_hidden_size=head.hidden_size,
        tie_word_embeddings=False,
        attention_bias=not eagle3,
        torch_dtype=str(dtype).removeprefix("torch."),
        eagle_config={
            "eagle_aux_hidden_state_layer_ids": list(head.tap_layers),
            "use_aux_hidden_state": True,
        },
        hyperbagel_draft={**asdict(head.config), "num_target_layers": head.num_target_layers},
    )
    if training:
        config["hyperbagel_training"] = training  # how the head was trained (benchmark ablation rows)
    return config


def _required_keys(head: DraftHead) -> set[str] | frozenset[str]:
    if head.config.eagle3_compatible:
        return EAGLE3_KEYS
    return {key for key in head.state_dict() if key != EMBEDDING_KEY}


def _write_folder(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Write into a staging folder beside `folder`, then swap it in (a crash never leaves half a head)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        replace_folder(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export(
    head: nn.Module,
    folder: str | Path,
    architecture: str,
    dtype: torch.dtype | None,
    training: dict[str, Any] | None = None,
) -> None:
    folder = Path(folder)
    tensors = {key: value for key, value in head.state_dict().items() if key != EMBEDDING_KEY}
    if not isinstance(head, DraftHead):  # DDP / torch.compile wrappers, a trainer module holding the head
        prefixed = sorted(key for key in tensors if key.startswith(TRAINER_PREFIXES))
        raise ValueError(
            f"refusing to write {folder}: pass the DraftHead itself, not a {type(head).__name__} "
            f"(its keys carry trainer prefixes such as {prefixed[:3]})"
        )
    check_export_keys(tensors, _required_keys(head), f"to write {folder}")
    out_dtype = dtype or head.norm.weight.dtype
    tensors = {
        key: (value.to(out_dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in tensors.items()
    }
    _write_folder(folder, _head_config_json(head, architecture, out_dtype, training), tensors)


def export_eagle3(
    head: nn.Module,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write an EAGLE-3-compatible head as the `LlamaForCausalLMEagle3` folder SGLang / vLLM load."""
    config = getattr(head, "config", None)
    if isinstance(config, DraftHeadConfig) and not config.eagle3_compatible:
        raise ValueError(
            f"refusing to write {folder} as {EAGLE3_ARCHITECTURE}: this head "
            f"({config.aggregation} aggregation, {config.num_layers} target-style layers) is not "
            "EAGLE-3's architecture; train with "
            "DraftHeadConfig(eagle3_compatible=True) for a serving-engine head, or use export_hyper_bagel"
        )
    _export(head, folder, EAGLE3_ARCHITECTURE, dtype, training)


def export_hyper_bagel(
    head: nn.Module,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write a Hyper-Bagel head in our own folder format (see the module docstring)."""
    config = getattr(head, "config", None)
    if isinstance(config, DraftHeadConfig) and config.eagle3_compatible:
        raise ValueError(f"refusing to write {folder}: an EAGLE-3-compatible head exports with export_eagle3")
    _export(head, folder, HYPER_BAGEL_ARCHITECTURE, dtype, training)


def export_draft_head(
    head: DraftHead,
    folder: str | Path,
    dtype: torch.dtype | None = None,
    training: dict[str, Any] | None = None,
) -> None:
    """Write `head` in the format its architecture has: EAGLE-3 if compatible, else Hyper-Bagel;
    `training` (e.g. the loss settings) is recorded as `hyperbagel_training` in config.json."""
    if not isinstance(head, DraftHead):
        raise ValueError(
            f"refusing to write {folder}: pass the DraftHead itself, not a {type(head).__name__}"
        )
    export = export_eagle3 if head.config.eagle3_compatible else export_hyper_bagel
    export(head, folder, dtype, training)


# --- loading ---------------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no draft-head {CONFIG_FILE} in {folder}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"malformed JSON in {path}: {err}") from err


def _head_config(config: dict[str, Any], path: Path) -> tuple[DraftHeadConfig, int | None]:
    """DraftHeadConfig and the target's layer count (None when a foreign EAGLE-3 folder lacks it)."""
    architectures = config.get("architectures") or []
    if architectures not in ([EAGLE3_ARCHITECTURE], [HYPER_BAGEL_ARCHITECTURE]):
        raise ValueError(
            f"{path}: architectures {architectures} is neither [{EAGLE3_ARCHITECTURE!r}] nor "
            f"[{HYPER_BAGEL_ARCHITECTURE!r}]"
        )
    ours = config.get("hyperbagel_draft")
    if ours is not None:
        known = {f.name for f in fields(DraftHeadConfig)}
        head_config = DraftHeadConfig(**{k: v for k, v in ours.items() if k in known})
        return head_config, ours.get("num_target_layers")
    if architectures != [EAGLE3_ARCHITECTURE]:
        raise ValueError(
            f"{path} lacks the 'hyperbagel_draft' section a {HYPER_BAGEL_ARCHITECTURE} folder needs"
        )
    if config.get("num_hidden_layers", 1) != 1:
        raise ValueError(
            f"{path}: only one-midlayer EAGLE-3 heads load, "
            f"not num_hidden_layers={config['num_hidden_layers']}"
        )
    taps = config.get("eagle_config", {}).get("eagle_aux_hidden_state_layer_ids")
    head_config = DraftHeadConfig(
        aggregation="eagle3",
        num_layers=1,
        zero_init=False,
        draft_vocab_size=config.get("draft_vocab_size"),
        tap_layers=tuple(taps) if taps else None,
        eagle3_compatible=True,
    )
    return head_config, None


def _llm_config(config: dict[str, Any], path: Path) -> Qwen2Config:
    missing = [name for name in _REQUIRED_FIELDS if name not in config]
    if missing:
        raise ValueError(f"{path} lacks the config fields {missing}")
    values = {name: config[name] for name in _LLAMA_FIELDS if name in config}
    return Qwen2Config(
        **values,
        head_dim=config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        rope_theta=config["rope_theta"],
        rope_scaling=config.get("rope_scaling"),
    )


def load_draft_head(folder: str | Path, target: Bagel, dtype: torch.dtype | None = None) -> DraftHead:
    """Load a head written by `export_*` (or a one-midlayer EAGLE-3 folder from elsewhere) for `target`.

    The token embedding is copied from `target`; a head built for another model (hidden size, vocabulary,
    layer count) is refused. Tensors load bit for bit in the stored dtype unless `dtype` is given."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    config = _read_config(folder)
    head_config, num_target_layers = _head_config(config, path)
    llm = target.config.llm
    checks = {
        "hidden_size": (config.get("hidden_size"), llm.hidden_size),
        "target_hidden_size": (config.get("target_hidden_size", llm.hidden_size), llm.hidden_size),
        "vocab_size": (config.get("vocab_size"), llm.vocab_size),
        "num_target_layers": (num_target_layers or llm.num_hidden_layers, llm.num_hidden_layers),
    }
    wrong = {name: pair for name, pair in checks.items() if pair[0] != pair[1]}
    if wrong:
        detail = ", ".join(f"{name}: folder {f} vs target {t}" for name, (f, t) in wrong.items())
        raise ValueError(f"draft head {folder} does not match the target model ({detail})")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {folder}")
    with safe_open(str(weights), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    draft_vocab = tensors["lm_head.weight"].shape[0] if "lm_head.weight" in tensors else llm.vocab_size
    head = DraftHead(head_config, _llm_config(config, path), llm.num_hidden_layers, draft_vocab)
    check_export_keys(tensors, _required_keys(head), f"to load {weights}")
    stored = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    head = head.to(dtype or stored)
    tensors[EMBEDDING_KEY] = target.language_model.model.embed_tokens.weight.detach().cpu()
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the head its {CONFIG_FILE} describes: {err}") from err
    check_maps(head.d2t, head.t2d)
    return head.to(target.device)
