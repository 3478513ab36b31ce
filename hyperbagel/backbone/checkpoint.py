"""Read and write BAGEL's checkpoint folder, so a released BAGEL checkpoint loads and ours load in BAGEL.

Layout (BAGEL's own): `ema.safetensors` (the model's state dict, no prefix), `ae.safetensors` (FLUX
autoencoder, FLUX key names), `llm_config.json` (Qwen2), `vit_config.json` (SigLIP with one layer more
than is used: BAGEL's loader drops the last one), tokenizer files. hyperbagel adds `bagel_config.json`
(the glue settings of `BagelConfig` and the special token ids; BAGEL ignores it) and, only for a
non-FLUX autoencoder, `ae_config.json`. A folder without them loads with BAGEL-7B-MoT's values.

Loading builds the model on the meta device and assigns the tensors read from disk, so a 14B model
never exists twice in memory; every mismatch between the checkpoint and the configs is reported in
one error naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2Config, SiglipVisionConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from hyperbagel.backbone.autoencoder import AutoencoderConfig, BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import BagelConfig, SpecialTokenIds, adjust_loaded_configs

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"
AE_FILE = "ae.safetensors"
LLM_CONFIG_FILE = "llm_config.json"
VIT_CONFIG_FILE = "vit_config.json"
VIT_WEIGHTS_FILE = "vit.safetensors"  # a pretrained vision encoder alone (the demo's SigLIP stand-in)
AE_CONFIG_FILE = "ae_config.json"
GLUE_CONFIG_FILE = "bagel_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")

# BagelConfig fields stored in bagel_config.json (besides special_tokens).
GLUE_FIELDS = tuple(
    f.name for f in fields(BagelConfig) if f.name not in ("llm", "vit", "vae", "special_tokens")
)
_SHOWN_KEYS = 20
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_BNB_BLOCKSIZE = 64  # bitsandbytes' default 4-bit block size
_INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold (transformers' default llm_int8_threshold)

Quantization = Literal["8bit", "4bit"]


# --- writing ---------------------------------------------------------------------------------------
def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary name in the same folder so a crash never leaves a half file at `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def llm_config_dict(llm: Qwen2Config) -> dict[str, Any]:
    """The Qwen2 config with every field explicit, plus the `rope_theta` / `rope_scaling` keys of
    transformers 4.x (5.x keeps them in `rope_parameters`), which BAGEL's own loader reads."""
    data = llm.to_dict()
    rope = dict(llm.rope_parameters)
    data["rope_theta"] = rope.pop("rope_theta")
    data["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    return data


def vit_config_dict(vit: SiglipVisionConfig) -> dict[str, Any]:
    """The SigLIP config with the layer BAGEL's loader drops added back, as in BAGEL's own file."""
    data = vit.to_dict()
    data["num_hidden_layers"] = vit.num_hidden_layers + 1
    return data


def glue_config_dict(config: BagelConfig) -> dict[str, Any]:
    """Contents of `bagel_config.json`: the settings BAGEL hard-codes, and the special token ids."""
    data = {name: getattr(config, name) for name in GLUE_FIELDS}
    data["special_tokens"] = config.special_tokens.to_dict()
    return data


def _write_ema(
    path: Path, model: Bagel, dtype: torch.dtype | None, state: Mapping[str, torch.Tensor] | None
) -> None:
    """The state dict as contiguous CPU tensors (optionally cast) in `ema.safetensors`; float layers only."""
    state = model.state_dict() if state is None else state
    quantized = [key for key, tensor in state.items() if not tensor.is_floating_point()]
    if quantized:
        raise ValueError(
            f"cannot write quantized (bitsandbytes) layers in BAGEL's float layout: {quantized[:5]}; "
            "save the float model instead"
        )
    state = {key: tensor.detach().to("cpu", dtype).contiguous() for key, tensor in state.items()}
    _write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def _save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=folder))
    try:
        tokenizer.save_pretrained(str(staging))
        for file in staging.iterdir():
            os.replace(file, folder / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save_pretrained(
    model: Bagel,
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: torch.dtype | None = None,
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Write `model` in BAGEL's folder layout (`dtype`, e.g. bf16, casts `ema.safetensors` only).
    `state` replaces `model.state_dict()` as the weights written (a sharded model's gathered weights).

    The autoencoder is written when one is attached; `ae_config.json` exists only for a non-FLUX one
    (a stale one is removed). A tokenizer whose marker ids differ from the config's is refused.
    """
    folder = Path(folder)
    config = model.config
    if tokenizer is not None and SpecialTokenIds.from_tokenizer(tokenizer) != config.special_tokens:
        raise ValueError(
            f"tokenizer's special token ids {SpecialTokenIds.from_tokenizer(tokenizer)} differ from the "
            f"model config's {config.special_tokens}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    # first: refuses a quantized model before anything is written
    _write_ema(folder / EMA_FILE, model, dtype, state)
    _write_json(folder / LLM_CONFIG_FILE, llm_config_dict(config.llm))
    _write_json(folder / VIT_CONFIG_FILE, vit_config_dict(config.vit))
    _write_json(folder / GLUE_CONFIG_FILE, glue_config_dict(config))
    if config.vae != AutoencoderConfig.flux():
        _write_json(folder / AE_CONFIG_FILE, config.vae.to_dict())
    else:
        (folder / AE_CONFIG_FILE).unlink(missing_ok=True)
    if model._autoencoder is not None:
        _write_atomic(folder / AE_FILE, model._autoencoder.save_file)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, folder)


def save_vision_encoder(folder: str | Path, vit_model: nn.Module, vit: SiglipVisionConfig) -> None:
    """A pretrained encoder alone: `vit.safetensors` under BAGEL's `vit_model.*` keys (float32) and its
    `vit_config.json` in BAGEL's convention, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {
        f"vit_model.{k}": v.detach().float().cpu().contiguous() for k, v in vit_model.state_dict().items()
    }
    _write_atomic(folder / VIT_WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    _write_json(folder / VIT_CONFIG_FILE, vit_config_dict(vit))


# --- reading configs -------------------------------------------------------------------------------
def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in checkpoint folder {path.parent} ({path})")
    return path


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(_require(path).read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"malformed JSON in {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _read_hf_config(cls: type[Qwen2Config] | type[SiglipVisionConfig], path: Path) -> Any:
    _read_json(path)  # clear errors for a missing file or malformed JSON
    try:
        return cls.from_json_file(path)
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid {cls.__name__} in {path}: {err}") from err


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint folder (BAGEL ships Qwen2's)."""
    folder = Path(folder)
    if not _has_tokenizer(folder):
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {folder}")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _special_tokens(folder: Path, stored: Any) -> SpecialTokenIds:
    if stored is not None:
        try:
            return SpecialTokenIds(**stored)
        except TypeError as err:
            raise ValueError(f"invalid special_tokens in {folder / GLUE_CONFIG_FILE}: {err}") from err
    if not _has_tokenizer(folder):
        raise FileNotFoundError(
            f"cannot tell BAGEL's special token ids for {folder}: it has neither {GLUE_CONFIG_FILE} with "
            f"special_tokens nor tokenizer files ({', '.join(TOKENIZER_FILES)})"
        )
    return SpecialTokenIds.from_tokenizer(load_tokenizer(folder))


def autoencoder_config(folder: str | Path) -> AutoencoderConfig:
    """The folder's `ae_config.json`, or FLUX's autoencoder when there is none (BAGEL's own layout)."""
    ae_path = Path(folder) / AE_CONFIG_FILE
    if not ae_path.is_file():
        return AutoencoderConfig.flux()
    try:
        return AutoencoderConfig.from_dict(_read_json(ae_path))
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid autoencoder config in {ae_path}: {err}") from err


def load_autoencoder(folder: str | Path) -> BagelAutoencoder:
    """The frozen autoencoder of a folder (`ae.safetensors` + optional `ae_config.json`)."""
    folder = Path(folder)
    autoencoder = BagelAutoencoder.from_file(_require(folder / AE_FILE), autoencoder_config(folder))
    return autoencoder.requires_grad_(False).eval()


def load_vision_encoder(folder: str | Path, vit_model: nn.Module) -> None:
    """Load a folder written by `save_vision_encoder` into `vit_model` (a `SiglipNaViT`, e.g. a `Bagel`'s
    `vit_model`); every key must match in name and shape (an encoder pretrained for another preset is
    refused with the offending keys listed)."""
    path = _require(Path(folder) / VIT_WEIGHTS_FILE)
    expected = {f"vit_model.{k}": tuple(v.shape) for k, v in vit_model.state_dict().items()}
    reference = next(vit_model.parameters())
    state, _, _ = _read_weights(path, expected, strict=True, device=reference.device, dtype=reference.dtype)
    vit_model.load_state_dict({k.removeprefix("vit_model."): v for k, v in state.items()})


def load_config(folder: str | Path) -> BagelConfig:
    """The `BagelConfig` of a checkpoint folder, with BAGEL's loader adjustments applied.

    Glue settings come from `bagel_config.json` (BAGEL-7B-MoT's defaults without it), the autoencoder
    from `ae_config.json` (FLUX without it), the special token ids from `bagel_config.json` or else
    from the folder's tokenizer.
    """
    folder = Path(folder)
    llm = _read_hf_config(Qwen2Config, folder / LLM_CONFIG_FILE)
    vit = _read_hf_config(SiglipVisionConfig, folder / VIT_CONFIG_FILE)
    if vit.num_hidden_layers < 2:
        raise ValueError(
            f"{folder / VIT_CONFIG_FILE} has {vit.num_hidden_layers} layers; BAGEL drops the last one, so "
            "it needs at least 2"
        )
    adjust_loaded_configs(llm, vit)
    llm._attn_implementation = "sdpa"  # as in the presets; the MoT attention always runs SDPA
    glue_path = folder / GLUE_CONFIG_FILE
    glue = _read_json(glue_path) if glue_path.is_file() else {}
    unknown = sorted(set(glue) - set(GLUE_FIELDS) - {"special_tokens"})
    if unknown:
        raise ValueError(f"unknown fields {unknown} in {glue_path}; known fields are {sorted(GLUE_FIELDS)}")
    special_tokens = _special_tokens(folder, glue.pop("special_tokens", None))
    vae = autoencoder_config(folder)
    too_big = {k: v for k, v in special_tokens.to_dict().items() if not 0 <= v < llm.vocab_size}
    if too_big:
        raise ValueError(
            f"special token ids {too_big} of {folder} lie outside the vocabulary ({llm.vocab_size})"
        )
    return BagelConfig(llm=llm, vit=vit, vae=vae, special_tokens=special_tokens, **glue)


# --- reading weights -------------------------------------------------------------------------------
def _listing(kind: str, items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN_KEYS])
    more = f", ... and {len(items) - _SHOWN_KEYS} more" if len(items) > _SHOWN_KEYS else ""
    return f"{len(items)} {kind}: {shown}{more}"


def _check_keys(
    path: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], strict: bool
) -> list[str]:
    """Raise one ValueError listing every problem; return the missing keys (tolerated when not strict)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    mis_shaped = sorted(
        f"{key} (checkpoint {found[key]} vs model {expected[key]})"
        for key in set(found) & set(expected)
        if found[key] != expected[key]
    )
    problems = [_listing("mis-shaped keys", mis_shaped)] if mis_shaped else []
    if strict:
        problems += [_listing("missing keys", missing)] if missing else []
        problems += [_listing("unexpected keys", unexpected)] if unexpected else []
    if problems:
        raise ValueError(
            f"{path} does not match the model its folder's configs describe:\n  "
            + "\n  ".join(problems)
            + "\n(strict=False tolerates missing and unexpected keys, never shape mismatches)"
        )
    if unexpected:
        logger.warning("%s: ignoring %s", path, _listing("unexpected keys", unexpected))
    if missing:
        logger.warning("%s: initialising %s", path, _listing("missing keys", missing))
    return missing


def _stored_float_dtype(handle: Any, keys: Iterable[str]) -> torch.dtype | None:
    """The floating dtype the checkpoint stores its tensors in, when it uses only one."""
    dtypes = {handle.get_slice(key).get_dtype() for key in keys} & set(_FLOAT_DTYPES)
    return _FLOAT_DTYPES[dtypes.pop()] if len(dtypes) == 1 else None


def _read_weights(
    path: Path,
    expected: dict[str, tuple[int, ...]],
    strict: bool,
    device: torch.device,
    dtype: torch.dtype | None,
) -> tuple[dict[str, torch.Tensor], list[str], torch.dtype | None]:
    """Checked tensors of `path` on `device` (floating ones in `dtype`, default: as stored), the missing
    keys, and the dtype used."""
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            missing = _check_keys(path, found, expected, strict)
            dtype = dtype or _stored_float_dtype(handle, found)
            state = {}
            for key in sorted(set(found) & set(expected)):
                tensor = handle.get_tensor(key)
                state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {path} (corrupt or truncated safetensors?): {err}") from err
    return state, missing, dtype


def _quantized_linear(
    bnb: Any, linear: nn.Linear, mode: Quantization, compute_dtype: torch.dtype
) -> nn.Module:
    """A frozen bitsandbytes copy of `linear` on the meta device; it quantizes when moved with `.to()`."""
    has_bias = linear.bias is not None
    size = (linear.in_features, linear.out_features)
    if mode == "8bit":
        layer = bnb.nn.Linear8bitLt(
            *size, bias=has_bias, has_fp16_weights=False, threshold=_INT8_THRESHOLD, device="meta"
        )
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            *size, bias=has_bias, compute_dtype=compute_dtype, quant_type="nf4", device="meta"
        )
        layer.weight = bnb.nn.Params4bit(
            linear.weight.data, requires_grad=False, quant_type="nf4", blocksize=_BNB_BLOCKSIZE, module=layer
        )
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


def quantize_decoder_layers(model: Bagel, mode: Quantization, device: torch.device) -> None:
    """Replace the Linear layers of both experts in every decoder layer by frozen bitsandbytes ones on
    `device` (embeddings, lm_head and everything outside the decoder layers stay as they are).

    Weights must be on the CPU: bitsandbytes quantizes them while moving them to `device`, so a GPU
    never holds the float layers.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ImportError(f"quantize={mode!r} needs bitsandbytes (pip install bitsandbytes)") from err
    layers = model.language_model.model.layers
    linears = [(name, m) for name, m in layers.named_modules() if isinstance(m, nn.Linear)]
    if mode == "4bit" and device.type == "cpu":
        odd = [
            f"language_model.model.layers.{name} ({m.in_features})"
            for name, m in linears
            if m.in_features % _BNB_BLOCKSIZE
        ]
        if odd:
            raise ValueError(
                f"bitsandbytes' CPU 4-bit kernel needs input sizes divisible by {_BNB_BLOCKSIZE}; these "
                f"layers are not: {odd[:5]}. Use quantize='8bit' or a CUDA device"
            )
    compute_dtype = model.dtype
    for name, linear in linears:
        parent_name, _, child = name.rpartition(".")
        layer = _quantized_linear(bnb, linear, mode, compute_dtype).to(device)
        setattr(layers.get_submodule(parent_name), child, layer)


def _meta_tensors(module: nn.Module) -> list[str]:
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, tensor in tensors if tensor.is_meta]


def from_pretrained(
    folder: str | Path,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: Quantization | None = None,
    strict: bool = True,
    load_autoencoder: bool = True,
) -> Bagel:
    """Load a BAGEL checkpoint folder into a `Bagel` (eval mode) on `device` (default CPU).

    dtype: floating tensors are cast to it; by default the model keeps the dtype `ema.safetensors`
    stores (bf16 for BAGEL's release) and the autoencoder is float32.
    quantize: '8bit' (LLM.int8) or '4bit' (NF4) decoder-layer Linears via bitsandbytes, frozen; for
    frozen teachers. strict=False tolerates missing keys (freshly initialised) and unexpected keys
    (ignored), never mis-shaped ones.
    """
    folder = Path(folder)
    device = torch.device(device or "cpu")
    if quantize not in (None, "8bit", "4bit"):
        raise ValueError(f"quantize must be None, '8bit' or '4bit', not {quantize!r}")
    ema_path = _require(folder / EMA_FILE)
    config = load_config(folder)
    autoencoder = None
    if load_autoencoder:  # small: read it first so a bad file fails before the big one is read
        autoencoder = BagelAutoencoder.from_file(_require(folder / AE_FILE), config.vae, dtype, device)

    with torch.device("meta"):
        model = Bagel(config)
    expected = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    read_device = torch.device("cpu") if quantize else device
    state, missing, dtype = _read_weights(ema_path, expected, strict, read_device, dtype)
    if missing:  # a real initialisation for what the checkpoint lacks
        with torch.device(read_device):
            model = Bagel(config)
        if dtype is not None:
            model.to(dtype)
    model.load_state_dict(state, strict=not missing, assign=True)
    del state
    # Non-persistent buffers are not in the checkpoint: rebuild RoPE (kept float32, as transformers does).
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config.llm).to(read_device)
    if quantize:
        quantize_decoder_layers(model, quantize, device)
    model.to(device)
    left_on_meta = _meta_tensors(model)
    if left_on_meta:
        raise RuntimeError(f"tensors not materialised after loading {ema_path}: {left_on_meta}")
    # Frozen and attached directly (not through the property), so it never becomes a submodule (nn.Module's
    # __setattr__ takes Module values before the property setter runs).
    model._autoencoder = autoencoder.requires_grad_(False) if autoencoder is not None else None
    return model.eval()
