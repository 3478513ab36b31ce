"""Word-level tokenizer over the shapes world's closed vocabulary, with BAGEL's special tokens.

One token per world word keeps the demo model's vocabulary tiny (~90 ids) while the sequence layout
(``<|im_start|> ... <|im_end|>``, ``<|vision_start|> ... <|vision_end|>``) stays BAGEL's.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hyperbagel.datamodules.shapes_text import world_vocabulary

PAD_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"
# Ids 0..5 in this order, then the world words in world_vocabulary() order.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    UNK_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
)


def build_shapes_tokenizer() -> PreTrainedTokenizerFast:
    """Tokenizer whose decode(encode(text)) == text for every world text.

    Words are split on whitespace and punctuation is isolated, so "square?" and "square ?" both give
    the same two tokens; decoding joins tokens with single spaces (the world's text convention) and
    transformers' space clean-up is disabled so " ." is kept. Unknown words map to ``<unk>``; the pad
    token is ``<|endoftext|>`` and the end-of-turn token ``<|im_end|>`` is the eos token.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *world_vocabulary()))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token="<|im_end|>",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]),
        clean_up_tokenization_spaces=False,
    )
