"""``python -m serving``'s settings: one dataclass gives the flags, their defaults and the
``EMOTION_SERVE_*`` overrides; flag beats environment beats default; bad values are refused."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

import project
from serving.__main__ import build_parser, settings_of
from serving.settings import ENV_PREFIX, ServeSettings, parse_value


def test_defaults_come_from_the_contract():
    settings = ServeSettings()
    assert (settings.port, settings.metrics_port, settings.host) == (
        project.GATEWAY_PORT,
        project.GATEWAY_METRICS_PORT,
        project.LOOPBACK,
    )
    assert (settings.models, settings.model_store, settings.workdir) == (
        project.SERVED_MODELS,
        project.MODEL_STORE,
        project.SERVE_DIR,
    )


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = build_parser(ServeSettings())
    flags = {action.dest for action in parser._actions if action.option_strings and action.dest != "help"}
    assert flags == {item.name for item in dataclasses.fields(ServeSettings)}


def test_flag_beats_environment_beats_default():
    environ = {f"{ENV_PREFIX}PORT": "9100", f"{ENV_PREFIX}DRAIN": "7.5", f"{ENV_PREFIX}NO_KEYS": "true"}
    from_env = ServeSettings.from_env(environ)
    assert (from_env.port, from_env.drain, from_env.no_keys, from_env.tries) == (9100, 7.5, True, 3)
    args = build_parser(from_env).parse_args(["run", "--port", "9200"])
    settings = settings_of(args)
    assert (settings.port, settings.drain, settings.no_keys) == (9200, 7.5, True)
    assert settings.keys_file == settings.workdir / "keys.json"


def test_lists_from_the_environment_and_from_repeated_flags():
    settings = ServeSettings.from_env({f"{ENV_PREFIX}TRUSTED_PROXY": "10.0.0.0/8, 127.0.0.1"})
    assert settings.trusted_proxy == ("10.0.0.0/8", "127.0.0.1")
    args = build_parser(ServeSettings()).parse_args(["run", "--trusted-proxy", "10.1.0.0/16", "--trusted-proxy", "::1"])
    assert settings_of(args).gateway().trusted_proxies == ("10.1.0.0/16", "::1")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "0"),
        ("TRIES", "-1"),
        ("NO_KEYS", "maybe"),
        ("TRUSTED_PROXY", "not-a-net"),
        ("DRAIN", "-2"),
    ],
)
def test_a_bad_override_is_refused_with_its_name(name, value):
    with pytest.raises(ValueError, match=ENV_PREFIX + name):
        ServeSettings.from_env({ENV_PREFIX + name: value})


def test_the_cli_says_which_override_is_bad():
    run = subprocess.run(
        [sys.executable, "-m", "serving", "key"],
        cwd=project.PROJECT_ROOT, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", f"{ENV_PREFIX}PORT": "x"},
    )  # fmt: skip
    assert run.returncode == 2 and f"{ENV_PREFIX}PORT" in run.stderr


@given(st.integers(min_value=1, max_value=65535))
def test_any_port_round_trips_through_the_environment(port):
    assert ServeSettings.from_env({f"{ENV_PREFIX}PORT": str(port)}).gateway().port == port


@given(st.text())
def test_booleans_parse_or_are_refused(text):
    try:
        value = parse_value(bool, text)
    except ValueError:
        assert text.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", "")
    else:
        assert value is (text.strip().lower() in ("1", "true", "yes", "on"))
