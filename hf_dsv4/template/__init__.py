"""The DeepSeek-V4 chat format: encoder, tokenizer chat template, tokenization with labels, parsers."""

from .encoder import ChatFormatError, Segment, encode_messages, render_segments

__all__ = ["ChatFormatError", "Segment", "encode_messages", "render_segments"]

from .tokenization import ConversationTokenizer, OverlongSampleError, tokenize_conversation  # noqa: E402

__all__ += ["ConversationTokenizer", "OverlongSampleError", "tokenize_conversation"]

from .parser import DSMLParseError, parse_completion  # noqa: E402
from .react import (  # noqa: E402
    AgentKeyword,
    ToolDesc,
    format_react,
    parse_react,
    parse_react_step,
    react_to_messages,
)

__all__ += ["DSMLParseError", "parse_completion"]
__all__ += ["AgentKeyword", "ToolDesc", "format_react", "parse_react", "parse_react_step", "react_to_messages"]

from .chat_template import CHAT_TEMPLATE, install_chat_template  # noqa: E402

__all__ += ["CHAT_TEMPLATE", "install_chat_template"]
