"""Gateway keys: creation, rotation with a grace period, expiry, and bad files."""

from __future__ import annotations

import json
import stat

import pytest

from serving import keys


def test_the_first_start_creates_one_private_key(tmp_path):
    path = tmp_path / "keys.json"
    created = keys.ensure(path)
    assert len(created) == 1 and len(created[0].key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.ensure(path) == created  # a second start keeps it


def test_rotation_keeps_old_keys_for_the_grace_period_only(tmp_path):
    path = tmp_path / "keys.json"
    old = keys.ensure(path)[0].key
    new = keys.rotate(path, grace_s=60)
    assert new != old
    assert keys.valid_keys(path) == [new, old]  # newest first: what `key` prints
    later = keys.load(path)[1].expires + 1
    assert keys.valid_keys(path, now=later) == [new]
    newest = keys.rotate(path, grace_s=0)
    assert keys.valid_keys(path)[0] == newest
    assert old not in keys.valid_keys(path)


@pytest.mark.parametrize(
    "content",
    ["not json", json.dumps({"nokeys": []}), json.dumps({"keys": [{"key": "has space", "created": 0}]}),
     json.dumps({"keys": [{"key": "", "created": 0}]}), json.dumps({"keys": [{"created": 0}]}),
     json.dumps({"keys": [{"key": "a" * 31, "created": 0}]}),  # too short to resist guessing
     json.dumps({"keys": [{"key": "\u00e9" * 40, "created": 0}]}),  # a letter, but not ASCII
     json.dumps({"keys": [{"key": 12345678901234567890123456789012345, "created": 0}]})],
)  # fmt: skip
def test_a_bad_keys_file_is_named_in_the_error(tmp_path, content):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=r"keys\.json"):
        keys.load(path)


def test_an_unreadable_keys_file_never_turns_the_keys_off(tmp_path):
    from serving.stack import Stack

    keys_file = tmp_path / "keys.json"
    keys.ensure(keys_file)
    stack = Stack(tmp_path / "store", tmp_path / "stack", keys_file=keys_file)
    keys_file.write_text("not json")
    assert stack.client_keys() == []  # nothing in force yet: no key is valid (fail closed)
    stack.gateway.client_keys = ["in-force"]
    assert stack.client_keys() == ["in-force"]  # the keys in force stay
    assert Stack(tmp_path / "store", tmp_path / "open").client_keys() is None  # no keys file: keys off


def test_new_keys_are_long_enough_and_a_32_character_key_is_accepted(tmp_path):
    assert len(keys.new_key()) >= keys.MIN_KEY_LENGTH
    path = tmp_path / "keys.json"
    keys.save(path, [keys.GatewayKey("k" * keys.MIN_KEY_LENGTH, 0.0)])
    assert keys.valid_keys(path) == ["k" * keys.MIN_KEY_LENGTH]
