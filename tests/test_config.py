from __future__ import annotations

import importlib.util

import pytest

from neuronetz import config
from neuronetz.config import ConfigError, load, parse_backends
from tests.support import ROOT, env_file


def test_defaults_work_for_local_development() -> None:
    settings = load(None, environ={})
    assert settings.database_url == "postgresql://127.0.0.1:5432/neuronetz"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.ollama_backends == ("http://127.0.0.1:11434",)
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.max_body_bytes == 32 * 1024 * 1024
    assert settings.migrate_on_start is True


def test_process_environment_wins_over_env_file_which_wins_over_defaults() -> None:
    with env_file("GATEWAY_PORT=9000\nGATEWAY_WORKERS=3\n") as path:
        settings = load(path, environ={"GATEWAY_PORT": "9100"})
    assert settings.port == 9100
    assert settings.workers == 3
    assert settings.env_file == path


def test_a_renamed_setting_is_still_read_under_its_former_name() -> None:
    with env_file("GATEWAY_UPSTREAM_IDLE_TIMEOUT=7\nGATEWAY_UPSTREAM_TOTAL_TIMEOUT=70\n") as path:
        settings = load(path, environ={"GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "3", "GATEWAY_BACKEND_TOTAL_TIMEOUT": "90"})
    assert (settings.connect_timeout, settings.idle_timeout) == (3, 7)
    assert settings.total_timeout == 90  # the current name wins
    with pytest.raises(ConfigError, match=r"^GATEWAY_UPSTREAM_MAX_CONNECTIONS must be"):
        load(None, environ={"GATEWAY_UPSTREAM_MAX_CONNECTIONS": "many"})


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GATEWAY_PORT", "99999", "GATEWAY_PORT must be between 1 and 65535, got 99999."),
        ("GATEWAY_PORT", "eighty", "GATEWAY_PORT must be a whole number, got 'eighty'."),
        ("GATEWAY_WORKERS", "0", "GATEWAY_WORKERS must be between 1 and 64, got 0."),
        ("GATEWAY_MIGRATE_ON_START", "maybe", "GATEWAY_MIGRATE_ON_START must be true or false, got 'maybe'."),
        ("GATEWAY_READY_TIMEOUT", "soon", "GATEWAY_READY_TIMEOUT must be a number of seconds, got 'soon'."),
        ("GATEWAY_LOG_LEVEL", "loud", "GATEWAY_LOG_LEVEL must be one of debug, info, warning, error, got 'loud'."),
        ("DATABASE_URL", "mysql://x/y", "DATABASE_URL must be a URL like postgresql://"),
        ("REDIS_URL", "http://x", "REDIS_URL must be a URL like redis://host:6379/0"),
        ("OLLAMA_BACKENDS", "ftp://x", "OLLAMA_BACKENDS: 'ftp://x' must be an http:// or https:// URL"),
        ("OLLAMA_BACKENDS", "http://x:99999", "OLLAMA_BACKENDS: 'http://x:99999' is not a valid URL"),
        ("GATEWAY_HOST", "a b", "GATEWAY_HOST must be a host name or IP address"),
    ],
)
def test_a_bad_value_is_one_sentence_naming_the_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(None, environ={name: value})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_backends_are_validated_canonical_and_deduplicated() -> None:
    assert parse_backends(" http://a:11434/ , http://a:11434,https://B.example/ollama/,,") == (
        "http://a:11434",
        "https://b.example/ollama",
    )
    assert parse_backends("") == ()
    with pytest.raises(ConfigError, match="credentials"):
        parse_backends("http://user:pw@a:11434")


def test_missing_explicit_env_file_is_an_error() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.resolve_env_file("/nonexistent/.env")


def test_env_file_syntax_error_names_file_and_line() -> None:
    with env_file("GATEWAY_PORT=1\nthis is not an assignment\n") as path, pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert f"{path}, line 2" in str(caught.value)


def test_env_example_and_the_readme_table_are_written_from_the_variables() -> None:
    spec = importlib.util.spec_from_file_location("build", ROOT / "build.py")
    assert spec is not None
    assert spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for path, text in build.settings_documents().items():
        assert path.read_text() == text, f"{path.name} is out of date: run python3 build.py docs"
    # every variable has its one description, and the table cannot break on it
    assert all(variable.doc and "|" not in variable.doc for variable in config.VARIABLES)


def test_env_example_parses_and_holds_valid_values() -> None:
    settings = load(ROOT / ".env.example", environ={})
    assert settings.port == 8080
