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


def test_the_watcher_reads_the_file_only_when_there_is_something_new(tmp_path):
    path = tmp_path / "keys.json"
    now = [1000.0]
    first = keys.GatewayKey("a" * keys.MIN_KEY_LENGTH, 900.0)
    keys.save(path, [first])
    watcher = keys.KeyWatcher(path, clock=lambda: now[0])
    assert watcher.valid() == [first.key]
    for _ in range(5):
        assert watcher.valid() == [first.key]
    assert watcher.reads == 1  # unchanged: one stat per call, no read
    # a rotation replaces the file: read again, both keys valid for the grace period
    now[0] = 1010.0
    new = keys.GatewayKey("b" * keys.MIN_KEY_LENGTH, 1010.0)
    keys.save(path, [new, keys.GatewayKey(first.key, first.created, 1040.0)])
    assert watcher.valid() == [new.key, first.key] and watcher.reads == 2
    # the old key expires with no change to the file: dropped at its expiry, read once more
    now[0] = 1039.0
    assert watcher.valid() == [new.key, first.key] and watcher.reads == 2
    now[0] = 1040.0
    assert watcher.valid() == [new.key] and watcher.reads == 3
    assert watcher.valid() == [new.key] and watcher.reads == 3
    watcher.refresh()  # SIGHUP
    assert watcher.valid() == [new.key] and watcher.reads == 4


def test_the_watcher_refuses_a_broken_file_and_reads_it_again_once_mended(tmp_path):
    path = tmp_path / "keys.json"
    good = keys.GatewayKey("c" * keys.MIN_KEY_LENGTH, 1.0)
    keys.save(path, [good])
    watcher = keys.KeyWatcher(path)
    assert watcher.valid() == [good.key]
    path.write_text("{not json")
    with pytest.raises(ValueError):
        watcher.valid()
    with pytest.raises(ValueError):  # still broken: still refused, never the broken keys
        watcher.valid()
    keys.save(path, [good])
    assert watcher.valid() == [good.key]
    path.unlink()
    with pytest.raises(OSError):
        watcher.valid()
