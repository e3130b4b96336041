"""hf_dsv4: fine-tune DeepSeek-V4 with the Hugging Face stack."""

from .template import ChatFormatError, encode_messages

__version__ = "0.1.0"
__all__ = ["ChatFormatError", "encode_messages"]
