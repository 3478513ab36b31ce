"""Chat over images from `hyperbagel predict`: answers decoded speculatively (with a draft head) or plainly.

    hyperbagel predict --model hyperbagel.speculative.chat.ChatModule \\
        --model.model outputs/shapes/teacher --model.draft outputs/shapes/draft_head \\
        --model.output answers.jsonl \\
        --data hyperbagel.speculative.chat.ChatDataModule \\
        --data.prompts '["describe the image ."]' --data.images '["scene.png"]' \\
        --trainer.accelerator cpu --trainer.logger false

`ChatDataModule` reads prompts with image paths (one image per prompt, or none) or an understanding jsonl
(LLaVA rows as `VLMReader` reads them; the human turn before the first gpt turn is the prompt, the gpt
turn is kept as the reference). `ChatModule` builds each context like `BagelInferencer.chat` / the
reader (ViT blocks where the `<image>` placeholders are, images first when there is none), answers with
`SpeculativeGenerator` when a draft head is given (batch 1, exactly lossless when greedy) and with
batched `generate_text` otherwise, and returns one dict per prompt. With `output` set, its
`ChatAnswerWriter` appends them to a jsonl file as each batch finishes (a long run keeps what it did).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.image_transforms import vit_input
from hyperbagel.backbone.inference import generate_text, prefill
from hyperbagel.backbone.packing import Sample, TextBlock, VitImage
from hyperbagel.datamodules.interleaved import load_tokenizer
from hyperbagel.datamodules.readers import IMAGE_PLACEHOLDER, open_image
from hyperbagel.speculative.decoding import SpeculativeConfig, SpeculativeGenerator
from hyperbagel.speculative.draft_head import DraftHead
from hyperbagel.speculative.export import load_draft_head

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def chat_sample(
    config: BagelConfig,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    images: Image.Image | Sequence[Image.Image] = (),
) -> Sample:
    """The context of a question about images: ViT blocks where `<image>` placeholders stand (as the
    understanding jsonl reader builds it), or all images before the text when there is no placeholder
    (as `BagelInferencer.chat` does)."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    placeholders = prompt.count(IMAGE_PLACEHOLDER)
    if placeholders and placeholders != len(images):
        raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images")
    blocks = [VitImage(vit_input(image, config)) for image in images]
    if not placeholders:
        return [*blocks, TextBlock(tokenizer.encode(prompt, add_special_tokens=False))]
    sample: Sample = []
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    for k, piece in enumerate(pieces):
        if piece.strip():
            sample.append(TextBlock(tokenizer.encode(piece.strip(), add_special_tokens=False)))
        if k < len(blocks):
            sample.append(blocks[k])
    return sample


@dataclass
class ChatRequest:
    """One prompt: its position in the input, its text, image paths and optional reference answer."""

    index: int
    prompt: str
    images: list[str] = field(default_factory=list)
    reference: str | None = None


def _jsonl_requests(path: Path, image_root: Path | None) -> list[ChatRequest]:
    """The first human turn (up to the first gpt turn) of every row of an understanding jsonl."""
    requests = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON: {err}") from err
            turns = row.get("conversations") if isinstance(row, dict) else None
            if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
                raise ValueError(f"{where}: needs a non-empty 'conversations' list of turns")
            if turns[0].get("from") != "human" or not isinstance(turns[0].get("value"), str):
                raise ValueError(f"{where}: conversations[0] must be a human turn with a string 'value'")
            paths = row.get("image") or []
            paths = [paths] if isinstance(paths, str) else list(paths)
            reference = turns[1].get("value") if len(turns) > 1 and turns[1].get("from") == "gpt" else None
            images = [str(image_root / p) if image_root is not None else str(p) for p in paths]
            requests.append(ChatRequest(len(requests), turns[0]["value"], images, reference))
    return requests


class ChatDataModule(LightningDataModule):
    """Prompts to answer, from the command line or an understanding jsonl (`predict` only).

    Args:
        prompts: questions; with `images`, one image path per prompt ("" for none).
        images: image paths, aligned with `prompts`.
        jsonl: an understanding jsonl (LLaVA rows) instead of prompts.
        image_root: folder the jsonl's image paths are relative to.
        batch_size: prompts per batch (speculative decoding still answers them one by one).
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        images: list[str] | None = None,
        jsonl: str | None = None,
        image_root: str | None = None,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if (prompts is None) == (jsonl is None):
            raise ValueError(
                "give either prompts (with optional images) or a jsonl file, not both or neither"
            )
        if images is not None and prompts is not None and len(images) != len(prompts):
            raise ValueError(f"got {len(images)} image paths for {len(prompts)} prompts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.prompts, self.images, self.jsonl = prompts, images, jsonl
        self.image_root = Path(image_root) if image_root is not None else None
        self.batch_size = batch_size
        self.requests: list[ChatRequest] = []

    def setup(self, stage: str) -> None:
        if self.jsonl is not None:
            path = Path(self.jsonl)
            if not path.is_file():
                raise FileNotFoundError(f"jsonl file {path} not found")
            self.requests = _jsonl_requests(path, self.image_root)
        else:
            paths = self.images or [""] * len(self.prompts)
            self.requests = [
                ChatRequest(i, prompt, [path] if path else [])
                for i, (prompt, path) in enumerate(zip(self.prompts, paths))
            ]
        missing = [p for request in self.requests for p in request.images if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"image files not found: {missing[:5]}")

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.requests, batch_size=self.batch_size, shuffle=False, collate_fn=list)


class ChatAnswerWriter(BasePredictionWriter):
    """Appends every answered prompt (a JSON object per line) to `output` after each batch; with several
    processes each writes `output` with a `.rank{r}` suffix."""

    def __init__(self, output: str | Path, echo: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.echo = echo

    def _path(self, trainer: Trainer) -> Path:
        if trainer.world_size == 1:
            return self.output
        return self.output.with_name(f"{self.output.name}.rank{trainer.global_rank}")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self._path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")  # a fresh file per run

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: list[dict[str, Any]],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        with self._path(trainer).open("a", encoding="utf-8") as handle:
            for answer in prediction:
                handle.write(json.dumps(answer) + "\n")
        if self.echo:
            for answer in prediction:
                print(f"[{answer['index']}] {answer['prompt']}\n-> {answer['answer']}")


class ChatModule(LightningModule):
    """Answers `ChatDataModule` prompts about their images with a BAGEL checkpoint (`predict` only).

    Args:
        model: BAGEL checkpoint folder (the target).
        draft: draft-head folder (`export_draft_head`); None decodes plainly (batched `generate_text`).
        tokenizer: "shapes" or a tokenizer folder; default the checkpoint's own.
        max_new_tokens: answer length cap.
        mode / num_steps / chain_min_prob / tree_depth / tree_top_k / tree_total_tokens: `SpeculativeConfig`.
        temperature / top_p: 0 = greedy (speculative output then identical to plain); > 0 samples.
        seed: sampling seed of the first prompt (prompt i uses seed + i).
        dtype: "float32" / "bfloat16" / "float16"; default as stored.
        output: jsonl file the answers are written to (a `ChatAnswerWriter`); None only returns them.
        compile_draft: `torch.compile` the draft head (`DraftHead.compile`); pays off over many prompts.
    """

    def __init__(
        self,
        model: str,
        draft: str | None = None,
        tokenizer: str | None = None,
        max_new_tokens: int = 256,
        mode: Literal["chain", "tree"] = "chain",
        num_steps: int = 5,
        chain_min_prob: float = 0.0,
        tree_depth: int = 5,
        tree_top_k: int = 4,
        tree_total_tokens: int = 24,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        dtype: str | None = None,
        output: str | None = None,
        compile_draft: bool = False,
    ) -> None:
        super().__init__()
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {max_new_tokens}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, not {dtype!r}")
        self.save_hyperparameters()
        self.model_source, self.draft_source = model, draft
        self.speculative = SpeculativeConfig(
            mode=mode,
            num_steps=num_steps,
            chain_min_prob=chain_min_prob,
            tree_depth=tree_depth,
            tree_top_k=tree_top_k,
            tree_total_tokens=tree_total_tokens,
            temperature=temperature,
            top_p=top_p,
        )
        self.max_new_tokens, self.seed, self.dtype_name, self.output = max_new_tokens, seed, dtype, output
        self.compile_draft = compile_draft
        self.tokenizer = load_tokenizer(tokenizer or model)
        self.target: Bagel | None = None
        self.draft_head: DraftHead | None = None
        self.generator: SpeculativeGenerator | None = None

    def configure_model(self) -> None:
        if self.target is not None:
            return
        dtype = DTYPES[self.dtype_name] if self.dtype_name else None
        self.target = from_pretrained(self.model_source, dtype=dtype, load_autoencoder=False)
        if self.draft_source is not None:
            self.draft_head = load_draft_head(self.draft_source, self.target, dtype)
            if self.compile_draft:
                self.draft_head.compile()
            self.generator = SpeculativeGenerator(
                self.target, self.draft_head, self.tokenizer, self.speculative
            )

    def configure_callbacks(self) -> list[Callback]:
        return [ChatAnswerWriter(self.output)] if self.output else []

    def _images(self, request: ChatRequest) -> list[Image.Image]:
        return [open_image(path, path) for path in request.images]

    def predict_step(self, batch: list[ChatRequest], batch_idx: int = 0) -> list[dict[str, Any]]:
        samples = [chat_sample(self.target.config, self.tokenizer, r.prompt, self._images(r)) for r in batch]
        if self.generator is None:
            return self._plain(batch, samples)
        return [self._speculative(request, sample) for request, sample in zip(batch, samples)]

    def _record(self, request: ChatRequest, ids: list[int], seconds: float, **stats: Any) -> dict[str, Any]:
        record = asdict(request)
        record.update(answer=self.tokenizer.decode(ids), answer_tokens=len(ids), seconds=seconds, **stats)
        return record

    def _plain(self, batch: list[ChatRequest], samples: list[Sample]) -> list[dict[str, Any]]:
        """Batched plain decoding (one shared seed per batch when sampling: that of its first prompt)."""
        started = time.perf_counter()
        cache = prefill(self.target, samples, capacity_margin=self.max_new_tokens + 2)
        config = self.speculative
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed + batch[0].index)
        answers = generate_text(
            self.target, cache, self.max_new_tokens, config.temperature, config.top_p, generator
        )
        seconds = (time.perf_counter() - started) / len(batch)
        return [self._record(r, ids, seconds) for r, ids in zip(batch, answers)]

    def _speculative(self, request: ChatRequest, sample: Sample) -> dict[str, Any]:
        started = time.perf_counter()
        seed = self.seed + request.index if self.seed is not None else None
        ids, stats = self.generator.generate(sample, self.max_new_tokens, seed)
        return self._record(
            request,
            ids,
            time.perf_counter() - started,
            acceptance_length=stats.acceptance_length,
            target_forwards=stats.target_forwards,
        )
