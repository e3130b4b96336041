"""The four official DeepSeek-V4 encoding fixtures, byte for byte."""

import pytest
from samples import load_fixture

from hf_dsv4.template import encode_messages


@pytest.mark.parametrize("case", [1, 2, 3, 4])
def test_encode_messages_matches_official_fixture_byte_for_byte(case):
    messages, mode, expected = load_fixture(case)
    assert encode_messages(messages, thinking_mode=mode) == expected
