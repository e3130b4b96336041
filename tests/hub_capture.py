"""`push_to_hub` without a network: the Hub API calls a push makes, intercepted, and every committed file captured.

Used in-process by the trainer tests and, through `HF_DSV4_HUB_CAPTURE=<folder>`, inside the recipe runs that
`accelerate launch` starts (tests/recipe_script.py), where each commit is written to `<folder>/commit-<n>/`.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from huggingface_hub import CommitInfo, HfApi, RepoUrl


@contextlib.contextmanager
def capture_hub_commits(uploads: list[dict], folder: Path | None = None) -> Iterator[list[dict]]:
    """Within the block, `HfApi` creates no repo and sends nothing: each commit is appended to `uploads` as
    {"repo_id", "files": {path in repo: bytes}, "message"} (and written under `folder/commit-<n>/` if given). One commit
    per push: hf_xet's streamed multi-commit pipeline is switched off. The card's YAML header is checked locally, as
    the Hub checks it server-side."""
    import huggingface_hub.hf_api
    import yaml

    counter = itertools.count()

    def create_repo(self, repo_id, **kwargs):
        if "/" not in repo_id:  # the Hub puts a bare name under the token's user
            repo_id = f"hub-user/{repo_id}"
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            source = getattr(op, "path_or_fileobj", None)
            if source is None:
                continue  # a deletion
            files[op.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
        uploads.append({"repo_id": repo_id, "files": files, "message": kwargs.get("commit_message")})
        if folder is not None:
            commit = Path(folder) / f"commit-{next(counter)}"
            for name, data in files.items():
                (commit / name).parent.mkdir(parents=True, exist_ok=True)
                (commit / name).write_bytes(data)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                          commit_description="", oid="0" * 40)  # fmt: skip

    def validate_yaml(self, content, **kwargs):
        assert content.startswith("---\n")
        yaml.safe_load(content.split("---\n")[1])

    with (
        mock.patch.object(huggingface_hub.hf_api, "is_xet_available", lambda: False),
        mock.patch.object(HfApi, "create_repo", create_repo),
        mock.patch.object(HfApi, "_validate_yaml", validate_yaml),
        mock.patch.object(HfApi, "create_commit", create_commit),
    ):
        yield uploads
