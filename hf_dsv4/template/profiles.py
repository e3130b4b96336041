"""Which DeepSeek-V4 release a checkpoint is, as far as the prompt format goes: its effort profile.

DeepSeek ships the prompt format as a Python encoder beside the weights (`encoding/encoding_dsv4.py`). The releases
differ only in the reasoning-effort block (`tokens.EFFORT_PROFILES`): the April release defines
`REASONING_EFFORT_MAX` (one text, for "max"); DeepSeek-V4-Flash-0731 defines `REASONING_EFFORT_PROMPTS` with "low",
"high" and "max" and `DEFAULT_REASONING_EFFORT = "low"`. `detect_effort_profile` reads that file as a syntax tree
(never executing it), as SGLang does to choose between the two.
"""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

from .encoder import ChatFormatError
from .tokens import DEFAULT_EFFORT_PROFILE

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoding/encoding_dsv4.py"


def effort_profile_of_encoder(source: str, where: str = ENCODER_FILE) -> str:
    """ "0731" or "0424" for the text of a DeepSeek-V4 encoder file; ChatFormatError naming `where` otherwise."""
    try:
        tree = ast.parse(source, filename=where)
    except SyntaxError as exc:
        raise ChatFormatError(f"{where}: not Python ({exc.msg}, line {exc.lineno}); pass the effort profile") from exc
    values = {}
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Name) and node.value is not None:
                try:
                    values[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    values[target.id] = ...  # defined, but not a literal (e.g. built from other names)
    prompts = values.get("REASONING_EFFORT_PROMPTS")
    if (
        isinstance(prompts, dict)
        and {"low", "high", "max"} <= set(prompts)
        and values.get("DEFAULT_REASONING_EFFORT") == "low"
    ):
        return "0731"
    if "REASONING_EFFORT_MAX" in values and "REASONING_EFFORT_PROMPTS" not in values:
        return "0424"
    raise ChatFormatError(
        f"{where}: neither the April encoder (REASONING_EFFORT_MAX) nor the 0731 one (REASONING_EFFORT_PROMPTS with "
        'low/high/max and DEFAULT_REASONING_EFFORT = "low"); pass the effort profile ("0424" or "0731")'
    )


def detect_effort_profile(
    model: str | os.PathLike, revision: str | None = None, token: str | bool | None = None
) -> str:
    """The effort profile of a checkpoint (a local folder or a Hub id): from its `encoding/encoding_dsv4.py`, parsed,
    never run; "0424" when it ships none.

    Args:
        model: a local checkpoint folder or a Hub id (its file is fetched through the Hugging Face cache).
        revision: the Hub revision.
        token: the Hub token.

    Returns:
        "0424" or "0731".

    Raises:
        ChatFormatError: the encoder file is of neither shape (the error names the file).
    """
    folder = Path(model)
    if folder.is_dir():
        path = folder / ENCODER_FILE
        if not path.is_file():
            return DEFAULT_EFFORT_PROFILE
        return effort_profile_of_encoder(path.read_text(encoding="utf-8"), str(path))
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(str(model), ENCODER_FILE, revision=revision, token=token)
    except EntryNotFoundError:
        return DEFAULT_EFFORT_PROFILE
    return effort_profile_of_encoder(Path(path).read_text(encoding="utf-8"), f"{model}/{ENCODER_FILE}")
