"""The request class a client may ask for (X-Saia-Priority), checked by the hub."""

from __future__ import annotations

import pytest

from hub.errors import ApiError
from hub.usage.admission import request_class


def test_a_client_asks_for_a_class_with_a_header() -> None:
    assert request_class({}) == ""
    assert request_class({"x-saia-priority": " Batch "}) == "batch"
    assert request_class({"x-saia-priority": "interactive"}) == "interactive"


def test_an_unknown_class_is_a_400_naming_the_header() -> None:
    with pytest.raises(ApiError) as caught:
        request_class({"x-saia-priority": "urgent"})
    assert caught.value.status == 400
    assert "X-Saia-Priority" in str(caught.value)
