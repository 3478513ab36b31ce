"""Speculative-decoding stage: train a draft head against the frozen target with training-time test.

The target is the BAGEL in `model` (a checkpoint folder; presets give a random one, for tests), run with
its understanding expert only (the generation expert is freed: the draft reads understanding data) and
optionally held in 8 / 4 bit through bitsandbytes. It is never trained and kept out of the stage's
state dict and checkpoints. The draft head (`DraftHead.from_target`: the target's last layers, final
norm and lm-head rows of the draft vocabulary, the most frequent answer tokens of the training data) is
the only thing that trains. Each step runs the target (or reads its cached hidden states), fuses them
into draft inputs, and takes EAGLE-3's training-time-test loss over K chained draft steps
(`hyperbagel.speculative.ttt`). Validation also logs the exact per-step accuracies of the epoch and the
acceptance length they imply under chain drafting. `DraftHeadExport` writes the head during and after
training.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import EMA_FILE, from_pretrained, quantize_decoder_layers
from hyperbagel.backbone.config import PRESETS
from hyperbagel.callbacks.export import FolderExport
from hyperbagel.datamodules.readers import expand_paths
from hyperbagel.lightning_modules.base import BagelStage, default_optimizer
from hyperbagel.lightning_modules.pretrain import packed_of
from hyperbagel.speculative.draft_head import DraftHead, DraftHeadConfig
from hyperbagel.speculative.export import export_draft_head
from hyperbagel.speculative.features import (
    FeatureStore,
    TargetFeatures,
    drop_generation_expert,
    target_logits,
)
from hyperbagel.speculative.ttt import DraftVocabulary, TTTResult, acceptance_length, ttt_loss
from hyperbagel.speculative.vocab import count_tokens

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def answer_token_counts(
    files: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    im_end: int,
    max_rows: int | None = None,
) -> torch.Tensor:
    """How often each token id is a label of the answers (gpt turns, plus each turn's `<|im_end|>`) in
    LLaVA jsonl files: the counts the draft vocabulary is chosen from. Reads text only (no image);
    `max_rows` caps the rows read per file. Unparsable rows are skipped (the data module reports them)."""

    def answers() -> Iterator[list[int]]:
        for file in files:
            with open(file, encoding="utf-8") as handle:
                lines = (line for line in handle if line.strip())
                for line in itertools.islice(lines, max_rows):
                    try:
                        turns = json.loads(line).get("conversations") or []
                    except (json.JSONDecodeError, AttributeError):
                        continue
                    for turn in turns:
                        if (
                            isinstance(turn, dict)
                            and turn.get("from") == "gpt"
                            and isinstance(turn.get("value"), str)
                        ):
                            yield [*tokenizer.encode(turn["value"], add_special_tokens=False), im_end]

    return count_tokens(answers(), vocab_size)


class DraftHeadModule(BagelStage):
    """Trains a `DraftHead` for the frozen target with EAGLE-3's training-time test.

    Args:
        model: the target, a BAGEL checkpoint folder (or a preset name: random, for tests).
        tokenizer: "shapes" or a tokenizer folder; default the checkpoint's own ("shapes" for presets).
        draft: the head's configuration (aggregation, num_layers, num_queries, zero_init,
            draft_vocab_size, tap_layers, ...); default `DraftHeadConfig()`.
        num_steps: training-time-test steps K (EAGLE-3: 7).
        step_decay: weight of step j is step_decay^j (EAGLE-3: 0.8).
        ce_weight: lambda of the CE(argmax target) term (Hyper-Bagel: 0.1; 0 turns it off).
        target_dtype: "bfloat16" / "float16" / "float32" for the target; default as stored.
        quantize: "8bit" or "4bit" holds the target's decoder layers in bitsandbytes layers.
        feature_cache: folder for offline target features: each sample's target hidden states are
            computed once and read back in later epochs (None: online, every step).
        feature_cache_dtype: dtype the cache stores ("bfloat16" halves it); default the target's.
        token_counts: a `.pt` file holding the [V] token counts that choose the draft vocabulary;
            default: counted from the answers of the data module's vlm groups.
        count_rows: rows read per jsonl file when counting (None: all).
        optimizer / lr_scheduler / max_nonfinite_losses: as in `BagelStage`.
    """

    def __init__(
        self,
        model: str = "tiny",
        tokenizer: str | None = None,
        draft: DraftHeadConfig | None = None,
        num_steps: int = 7,
        step_decay: float = 0.8,
        ce_weight: float = 0.1,
        target_dtype: str | None = None,
        quantize: Literal["8bit", "4bit"] | None = None,
        feature_cache: str | None = None,
        feature_cache_dtype: str | None = None,
        token_counts: str | None = None,
        count_rows: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        lr_scheduler: LRSchedulerCallable | None = None,
        max_nonfinite_losses: int = 10,
    ) -> None:
        super().__init__(
            model=model,
            tokenizer=tokenizer,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            max_nonfinite_losses=max_nonfinite_losses,
        )
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        for name, value in (("target_dtype", target_dtype), ("feature_cache_dtype", feature_cache_dtype)):
            if value is not None and value not in DTYPES:
                raise ValueError(f"{name} must be one of {sorted(DTYPES)} or None, got {value!r}")
        self.draft_config = draft or DraftHeadConfig()
        self.num_steps = num_steps
        self.step_decay = step_decay
        self.ce_weight = ce_weight
        self.target_dtype = DTYPES[target_dtype] if target_dtype else None
        self.quantize = quantize
        self.feature_cache = feature_cache
        self.feature_cache_dtype = DTYPES[feature_cache_dtype] if feature_cache_dtype else None
        self.token_counts_file = token_counts
        self.count_rows = count_rows
        self.draft_head: DraftHead | None = None
        self._set_target(None)
        self.features: TargetFeatures | None = None
        self._val_correct = torch.zeros(num_steps, dtype=torch.long)
        self._val_count = torch.zeros(num_steps, dtype=torch.long)

    # --- the frozen target, outside the state dict --------------------------------------------------
    def _set_target(self, target: Bagel | None) -> None:
        object.__setattr__(self, "target", target)  # never a submodule: not trained, not checkpointed

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DraftHeadModule:
        """Move / cast the target with the stage; a quantized one stays where bitsandbytes put it."""
        super()._apply(fn, recurse)
        if self.target is not None and self.quantize is None:
            self.target._apply(fn, recurse)
        return self

    def _root_device(self) -> torch.device:
        trainer = self._trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def build_target(self) -> Bagel:
        """The float target on the CPU when it will be quantized (bitsandbytes quantizes while moving
        it), else on the training device."""
        device = torch.device("cpu") if self.quantize else self._root_device()
        if self.model_source in PRESETS:
            target = super().build_model()
            target.autoencoder = None
            target.to(device, self.target_dtype)
        else:
            target = from_pretrained(
                self.model_source, dtype=self.target_dtype, device=device, load_autoencoder=False
            )
        return target.requires_grad_(False).eval()

    def target_fingerprint(self, target: Bagel) -> dict[str, Any]:
        """What identifies the target's features: its weights file (path, size, time) or, for a random
        preset target, a digest of its weights; its shape and quantization."""
        fingerprint: dict[str, Any] = {
            "model": self.model_source,
            "num_layers": target.config.llm.num_hidden_layers,
            "hidden_size": target.config.hidden_size,
            "quantize": self.quantize,
        }
        weights = Path(self.model_source) / EMA_FILE
        if weights.is_file():
            stat = weights.stat()
            fingerprint.update(model=str(weights.resolve()), size=stat.st_size, mtime_ns=stat.st_mtime_ns)
        else:
            digest = hashlib.sha1()
            for tensor in target.state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            fingerprint["weights_sha1"] = digest.hexdigest()
        return fingerprint

    # --- model construction -------------------------------------------------------------------------
    def draft_token_counts(self, vocab_size: int) -> torch.Tensor | None:
        """Token counts for a reduced draft vocabulary (None when the draft keeps the full one)."""
        if self.draft_config.draft_vocab_size is None:
            return None
        if self.token_counts_file is not None:
            counts = torch.load(self.token_counts_file, weights_only=True)
            if not isinstance(counts, torch.Tensor) or counts.shape != (vocab_size,):
                raise ValueError(
                    f"token_counts {self.token_counts_file} must hold a tensor of shape [{vocab_size}]"
                )
            return counts
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        groups = [g for g in getattr(datamodule, "groups", []) if g.kind == "vlm"]
        if not groups:
            raise ValueError(
                f"draft_vocab_size={self.draft_config.draft_vocab_size} needs token counts: set token_counts "
                "to a .pt file of [vocab] counts, or train with a data module that has vlm groups"
            )
        files = [file for g in groups for file in expand_paths(g.paths, ".jsonl")]
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        return answer_token_counts(files, self.tokenizer, vocab_size, im_end, self.count_rows)

    def configure_model(self) -> None:
        if self.draft_head is not None:
            return
        target = self.build_target()
        counts = self.draft_token_counts(target.config.llm.vocab_size)
        self.draft_head = DraftHead.from_target(target, self.draft_config, counts).float()
        drop_generation_expert(target)
        if self.quantize:
            quantize_decoder_layers(target, self.quantize, self._root_device())
            target.to(self._root_device())
        self._set_target(target)
        store = None
        if self.feature_cache is not None:
            store = FeatureStore(
                self.feature_cache, self.target_fingerprint(target), self.feature_cache_dtype
            )
        self.features = TargetFeatures(target, store)

    # --- steps --------------------------------------------------------------------------------------
    def ttt(self, batch: Any) -> TTTResult:
        """The training-time-test loss of one batch (a `TrainingPack` or a bare `PackedSequence`)."""
        packed = packed_of(batch)
        hidden_states = self.features(packed, getattr(batch, "origins", None))
        head = self.draft_head
        dtype = next(head.parameters()).dtype
        if not torch.is_autocast_enabled(hidden_states[0].device.type) and hidden_states[0].dtype != dtype:
            hidden_states = [h.to(dtype) for h in hidden_states]  # e.g. a bf16 target, a float32 draft
        return ttt_loss(
            head,
            hidden_states,
            packed,
            partial(target_logits, self.target),
            DraftVocabulary.from_maps(head.d2t, head.t2d),
            num_steps=self.num_steps,
            decay=self.step_decay,
            ce_weight=self.ce_weight,
        )

    def compute_losses(self, batch: Any, stage: str) -> dict[str, torch.Tensor]:
        return self.ttt(batch).terms()

    def on_validation_epoch_start(self) -> None:
        self._val_correct.zero_()
        self._val_count.zero_()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            result = self.ttt(batch)
        for j, step in enumerate(result.steps):
            self._val_correct[j] += step.correct
            self._val_count[j] += step.count
        terms = {name: value for name, value in result.terms().items() if not name.startswith("acc_")}
        self._log_terms(terms, "val", batch)

    def on_validation_epoch_end(self) -> None:
        """Exact per-step accuracies of the epoch (all ranks) and the acceptance length they imply."""
        totals = torch.stack([self._val_correct, self._val_count]).to(self.device)
        totals = self.trainer.strategy.reduce(totals, reduce_op="sum").cpu()
        accuracies = (totals[0] / totals[1].clamp(min=1)).tolist()
        for j, accuracy in enumerate(accuracies):
            self.log(f"val/acc_{j}", accuracy, sync_dist=False)
        self.log("val/acceptance_length", acceptance_length(accuracies), prog_bar=True, sync_dist=False)


# --- writing the head ------------------------------------------------------------------------------
class DraftHeadExport(FolderExport):
    """Writes the stage's draft head with `hyperbagel.speculative.export.export_draft_head` (EAGLE-3's
    serving folder for an EAGLE-3-compatible head, our own format otherwise), on `FolderExport`'s schedule."""

    def ready(self, pl_module: LightningModule) -> bool:
        return getattr(pl_module, "draft_head", None) is not None

    def write(self, pl_module: LightningModule, collected: Any) -> None:
        training = {
            "ce_weight": pl_module.ce_weight,
            "num_steps": pl_module.num_steps,
            "step_decay": pl_module.step_decay,
        }
        export_draft_head(pl_module.draft_head, self.dirpath, self.dtype, training)
