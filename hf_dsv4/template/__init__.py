"""The DeepSeek-V4 chat format: encoder, tokenizer chat template, tokenization with labels, parsers."""

from .chat_template import CHAT_TEMPLATE, chat_template, install_chat_template
from .encoder import ChatFormatError, Segment, attach_tools, effort_prefix, encode_messages, render_segments
from .parser import DSMLParseError, parse_completion
from .profiles import detect_effort_profile
from .react import AgentKeyword, ToolDesc, format_react, parse_react, parse_react_step, react_to_messages
from .tokenization import ConversationTokenizer, OverlongSampleError, tokenize_conversation

__all__ = [
    "CHAT_TEMPLATE",
    "AgentKeyword",
    "ChatFormatError",
    "ConversationTokenizer",
    "DSMLParseError",
    "OverlongSampleError",
    "Segment",
    "ToolDesc",
    "attach_tools",
    "chat_template",
    "detect_effort_profile",
    "effort_prefix",
    "encode_messages",
    "format_react",
    "install_chat_template",
    "parse_completion",
    "parse_react",
    "parse_react_step",
    "react_to_messages",
    "render_segments",
    "tokenize_conversation",
]
