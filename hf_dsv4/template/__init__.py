"""The DeepSeek-V4 chat format: encoder, tokenizer chat template, tokenization with labels, parsers."""

from .encoder import ChatFormatError, Segment, encode_messages, render_segments

__all__ = ["ChatFormatError", "Segment", "encode_messages", "render_segments"]

from .tokenization import ConversationTokenizer, OverlongSampleError, tokenize_conversation  # noqa: E402

__all__ += ["ConversationTokenizer", "OverlongSampleError", "tokenize_conversation"]
