"""Key format and hashing."""

from __future__ import annotations

from hub.keys import PREFIX, generate_key, hash_key, key_id_of, matches


def test_generated_keys_parse_and_match_only_their_digest() -> None:
    first, second = generate_key(), generate_key()
    assert first.secret.startswith(PREFIX) and first.secret != second.secret
    assert key_id_of(first.secret) == first.key_id
    assert first.key_id not in first.secret[len(PREFIX) + len(first.key_id) :]
    assert first.digest == hash_key(first.secret) and len(first.digest) == 64
    assert first.secret not in first.digest
    assert matches(first.secret, first.digest)
    assert not matches(second.secret, first.digest)


def test_malformed_keys_have_no_id() -> None:
    good = generate_key().secret
    for bad in ("", "sk-other", good[:-1], good + "x", good.replace(PREFIX, "sk-saib-"),
                good[:20] + "!" + good[21:], PREFIX + "ABCDEFGHIJKL" + good[20:]):  # fmt: skip
        assert key_id_of(bad) is None, bad
