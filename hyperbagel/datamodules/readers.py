"""Readers for BAGEL's three training-data formats, turning raw rows into packing `Sample`s.

- text-to-image parquet: ``image`` (bytes), ``captions`` (JSON dict, one value picked at random)
  -> ``[TextBlock(caption), VaeImage(image, noisy)]``;
- editing parquet: ``image_list`` (bytes list), ``instruction_list`` (one list of alternative phrasings per
  transition) -> per turn ``[VaeImage(source), VitImage(source), TextBlock(instruction),
  VaeImage(target, noisy)]``; in a chain each target is the next turn's source, so it re-enters as a clean
  VAE image and a ViT image before the next instruction, as in BAGEL's unified editing data;
- LLaVA-style jsonl: ``image`` (path or list, relative to an image root), ``conversations`` of ``human``
  / ``gpt`` turns; human turns become text blocks without loss with a ViT image at each ``<image>``
  placeholder, gpt turns text blocks with loss.

Rows are addressed lazily in *units* (a parquet row group, a chunk of jsonl lines) so that a data stream
reads only the units it needs and can be positioned anywhere. A row that cannot become a sample (an
undecodable image, a missing field, an empty conversation, a placeholder/image count mismatch, more
tokens than the per-sample budget) is returned as a `BadRow` naming its file and row, never raised, so
the caller can skip and count it.
"""

from __future__ import annotations

import glob
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.config import BagelConfig
from hyperbagel.backbone.image_transforms import vae_input, vit_input
from hyperbagel.backbone.packing import Sample, TextBlock, VaeImage, VitImage, sample_length

IMAGE_PLACEHOLDER = "<image>"


class Origin(NamedTuple):
    """Where a sample came from: file and 0-based row (parquet row in the file, jsonl line number)."""

    file: str
    row: int


class BadRow(NamedTuple):
    """A skipped row and why."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file} row {self.row}: {self.reason}"


class Unit(NamedTuple):
    """A lazily read block of rows: a parquet row group or a chunk of jsonl lines."""

    file: str
    index: int


class BadRowError(ValueError):
    """Raised inside a reader while building a sample; turned into a `BadRow` by `Reader.decode`."""


def expand_paths(paths: Sequence[str], suffix: str) -> list[str]:
    """Files named by `paths`: files as given, folders expanded to their sorted `*suffix` files, globs."""
    files: list[str] = []
    for entry in paths:
        if glob.has_magic(entry):
            matches = sorted(glob.glob(entry))
        elif Path(entry).is_dir():
            matches = sorted(str(m) for m in Path(entry).glob(f"*{suffix}"))
        elif Path(entry).is_file():
            matches = [entry]
        else:
            raise FileNotFoundError(f"data path {entry} does not exist")
        if not matches:
            raise FileNotFoundError(f"no {suffix} files in {entry}")
        files += [str(Path(m).resolve()) for m in matches]
    return files


def _field(raw: dict[str, Any], name: str) -> Any:
    value = raw.get(name)
    if value is None:
        raise BadRowError(f"missing field {name!r}")
    return value


def open_image(data: bytes | str | Path, what: str) -> Image.Image:
    """Decode an image fully (bytes or a path), so a truncated file fails here and not in training."""
    if not isinstance(data, bytes | str | Path):
        raise BadRowError(f"{what} holds {type(data).__name__}, not image bytes")
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
        image.load()
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise BadRowError(f"undecodable image in {what}: {err}") from err


class Reader(ABC):
    """Rows of one data set in one format, read unit by unit, turned into samples."""

    kind: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(
        self,
        paths: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        config: BagelConfig,
        max_tokens_per_sample: int | None = None,
    ) -> None:
        self.paths = list(paths)
        self.tokenizer = tokenizer
        self.config = config
        self.max_tokens_per_sample = max_tokens_per_sample

    @cached_property
    def files(self) -> list[str]:
        files = expand_paths(self.paths, self.suffix)
        if not files:
            raise ValueError(f"no {self.kind} data files in {self.paths}")
        return files

    @cached_property
    def units(self) -> list[Unit]:
        """Every unit of every file, in file order (listed once per process)."""
        return self.list_units()

    @abstractmethod
    def list_units(self) -> list[Unit]:
        """Every unit of every file, in file order."""

    @abstractmethod
    def load_unit(self, unit: Unit) -> list[tuple[int, Any]]:
        """The raw rows of a unit with their row numbers in the file."""

    @abstractmethod
    def build(self, raw: Any, rng: np.random.Generator) -> Sample:
        """The sample of a raw row; raises `BadRowError` for a row that cannot become one."""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, file: str, row: int, raw: Any, rng: np.random.Generator) -> Sample | BadRow:
        """The sample of a raw row, or the `BadRow` saying why it has none."""
        try:
            sample = self.build(raw, rng)
            length = sample_length(sample, self.config)
        except (BadRowError, ValueError) as err:
            return BadRow(file, row, str(err))
        if self.max_tokens_per_sample is not None and length > self.max_tokens_per_sample:
            budget = self.max_tokens_per_sample
            return BadRow(file, row, f"sample of {length} tokens exceeds the per-sample budget {budget}")
        return sample

    def __iter__(self) -> Iterator[tuple[Origin, Sample | BadRow]]:
        """One pass over every row in file order (random choices seeded by row), for inspection and tests."""
        for unit in self.units:
            for row, raw in self.load_unit(unit):
                rng = np.random.default_rng(row)
                yield Origin(unit.file, row), self.decode(unit.file, row, raw, rng)


class ParquetReader(Reader):
    """Parquet files read one row group at a time; `parquet_info` (BAGEL's row-group index
    ``{path: {"num_row_groups", "num_rows"}}``) avoids opening every file to list the units, and with no
    `paths` names the files itself."""

    suffix = ".parquet"
    columns: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        paths: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        config: BagelConfig,
        max_tokens_per_sample: int | None = None,
        parquet_info: str | None = None,
    ) -> None:
        super().__init__(paths, tokenizer, config, max_tokens_per_sample)
        self.parquet_info = parquet_info

    @cached_property
    def _index(self) -> dict[str, dict[str, int]]:
        if self.parquet_info is None:
            return {}
        try:
            index = json.loads(Path(self.parquet_info).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the parquet index {self.parquet_info}: {err}") from err
        return {str(Path(path).resolve()): entry for path, entry in index.items()}

    @cached_property
    def files(self) -> list[str]:
        if self.paths:
            return super().files
        if not self._index:
            raise ValueError(f"a {self.kind} group needs paths or a non-empty parquet_info")
        return list(self._index)

    def list_units(self) -> list[Unit]:
        units = []
        for file in self.files:
            entry = self._index.get(file)
            try:
                groups = entry["num_row_groups"] if entry else pq.ParquetFile(file).num_row_groups
            except (OSError, KeyError, TypeError) as err:
                raise ValueError(f"cannot list the row groups of {file}: {err}") from err
            units += [Unit(file, g) for g in range(groups)]
        return units

    def load_unit(self, unit: Unit) -> list[tuple[int, Any]]:
        try:
            handle = pq.ParquetFile(unit.file)
            metadata = handle.metadata
            start = sum(metadata.row_group(g).num_rows for g in range(unit.index))
            present = [c for c in self.columns if c in handle.schema_arrow.names]
            if present:
                rows = handle.read_row_group(unit.index, columns=present).to_pylist()
            else:
                rows = [{} for _ in range(metadata.row_group(unit.index).num_rows)]
        except (OSError, IndexError) as err:
            raise ValueError(f"cannot read row group {unit.index} of {unit.file}: {err}") from err
        return [(start + j, row) for j, row in enumerate(rows)]


class T2IReader(ParquetReader):
    """Text-to-image parquet: a caption (no loss, droppable for CFG) then the image to generate."""

    kind = "t2i"
    columns = ("image", "captions")

    def build(self, raw: dict[str, Any], rng: np.random.Generator) -> Sample:
        image = open_image(_field(raw, "image"), "image")
        captions = _field(raw, "captions")
        if isinstance(captions, str):
            try:
                captions = json.loads(captions)
            except json.JSONDecodeError as err:
                raise BadRowError(f"captions is not JSON: {err}") from err
        if not isinstance(captions, dict) or not captions:
            raise BadRowError("captions must be a non-empty JSON object")
        texts = list(captions.values())
        if not all(isinstance(t, str) for t in texts):
            raise BadRowError("captions values must be strings")
        caption = texts[int(rng.integers(len(texts)))]
        return [TextBlock(self.encode(caption)), VaeImage(pixels=vae_input(image, self.config), noisy=True)]


class EditReader(ParquetReader):
    """Editing parquet: chains source -> target -> ..., one instruction (picked among phrasings) per turn."""

    kind = "edit"
    columns = ("image_list", "instruction_list")

    def build(self, raw: dict[str, Any], rng: np.random.Generator) -> Sample:
        images = _field(raw, "image_list")
        instructions = _field(raw, "instruction_list")
        if not isinstance(images, list) or not isinstance(instructions, list):
            raise BadRowError("image_list and instruction_list must be lists")
        if len(images) < 2:
            raise BadRowError(f"image_list holds {len(images)} images; an edit needs at least 2")
        if len(instructions) != len(images) - 1:
            raise BadRowError(
                f"instruction_list has {len(instructions)} turns for {len(images)} images "
                f"(expected {len(images) - 1})"
            )
        decoded = [open_image(data, f"image_list[{i}]") for i, data in enumerate(images)]
        vae = [vae_input(image, self.config) for image in decoded]
        sample: Sample = []
        for turn, phrasings in enumerate(instructions):
            if not (isinstance(phrasings, list) and phrasings and all(isinstance(p, str) for p in phrasings)):
                raise BadRowError(f"instruction_list[{turn}] must be a non-empty list of strings")
            instruction = phrasings[int(rng.integers(len(phrasings)))]
            sample += [
                VaeImage(pixels=vae[turn]),
                VitImage(vit_input(decoded[turn], self.config)),
                TextBlock(self.encode(instruction)),
                VaeImage(pixels=vae[turn + 1], noisy=True),
            ]
        return sample


class VLMReader(Reader):
    """LLaVA-style jsonl; images are read from `image_root` (paths in rows are relative to it)."""

    kind = "vlm"
    suffix = ".jsonl"

    def __init__(
        self,
        paths: Sequence[str],
        tokenizer: PreTrainedTokenizerBase,
        config: BagelConfig,
        max_tokens_per_sample: int | None = None,
        image_root: str | None = None,
        lines_per_unit: int = 64,
    ) -> None:
        super().__init__(paths, tokenizer, config, max_tokens_per_sample)
        self.image_root = Path(image_root) if image_root is not None else None
        self.lines_per_unit = lines_per_unit

    @cached_property
    def _lines(self) -> dict[str, list[tuple[int, int]]]:
        """(line number, byte offset) of every non-blank line of every file."""
        lines = {}
        for file in self.files:
            entries, offset = [], 0
            with open(file, "rb") as handle:
                for number, line in enumerate(handle):
                    if line.strip():
                        entries.append((number, offset))
                    offset += len(line)
            lines[file] = entries
        return lines

    def list_units(self) -> list[Unit]:
        return [
            Unit(file, k)
            for file, entries in self._lines.items()
            for k in range(-(-len(entries) // self.lines_per_unit))
        ]

    def load_unit(self, unit: Unit) -> list[tuple[int, Any]]:
        entries = self._lines[unit.file][unit.index * self.lines_per_unit :][: self.lines_per_unit]
        rows = []
        with open(unit.file, "rb") as handle:
            for number, offset in entries:
                handle.seek(offset)
                rows.append((number, handle.readline()))
        return rows

    def _image(self, path: Any) -> Image.Image:
        if not isinstance(path, str):
            raise BadRowError(f"image entry {path!r} is not a path")
        full = Path(path) if self.image_root is None else self.image_root / path
        if not full.is_file():
            raise BadRowError(f"image file {full} not found")
        return open_image(full, str(full))

    def build(self, raw: bytes, rng: np.random.Generator) -> Sample:
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRowError(f"invalid JSON: {err}") from err
        if not isinstance(row, dict):
            raise BadRowError("row is not a JSON object")
        conversations = _field(row, "conversations")
        if not isinstance(conversations, list) or not conversations:
            raise BadRowError("empty conversations")
        paths = row.get("image") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        turns = []
        for k, turn in enumerate(conversations):
            speaker, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
            if speaker not in ("human", "gpt") or not isinstance(value, str):
                raise BadRowError(f"conversations[{k}] needs 'from' human|gpt and a string 'value'")
            if speaker == "gpt" and IMAGE_PLACEHOLDER in value:
                raise BadRowError(f"conversations[{k}] is a gpt turn holding {IMAGE_PLACEHOLDER}")
            turns.append((speaker, value))
        if all(speaker == "human" for speaker, _ in turns):
            raise BadRowError("no gpt turn to train on")
        placeholders = sum(value.count(IMAGE_PLACEHOLDER) for _, value in turns)
        if placeholders != len(paths):
            raise BadRowError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(paths)} images")
        images = iter([VitImage(vit_input(self._image(p), self.config)) for p in paths])
        sample: Sample = []
        for speaker, value in turns:
            if speaker == "gpt":
                sample.append(TextBlock(self.encode(value), loss=True))
                continue
            pieces = value.split(IMAGE_PLACEHOLDER)
            for k, piece in enumerate(pieces):
                if piece.strip():
                    sample.append(TextBlock(self.encode(piece.strip())))
                if k < len(pieces) - 1:
                    sample.append(next(images))
        return sample


READERS: dict[str, type[Reader]] = {cls.kind: cls for cls in (T2IReader, EditReader, VLMReader)}
