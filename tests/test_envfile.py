from __future__ import annotations

import os
from pathlib import Path

import pytest

from neuronetz import envfile
from neuronetz.envfile import EnvFileError


def test_the_common_dotenv_forms_parse() -> None:
    text = """
# a comment
PLAIN=value
export EXPORTED=yes
SPACED = around
SINGLE='kept # literally \\n'
DOUBLE="line\\nbreak \\"quoted\\" # kept"
INLINE=bare # comment
URL=postgresql://u:p#ss@h/db
EMPTY=
DUP=first
DUP=second
"""
    assert envfile.parse(text) == {
        "PLAIN": "value",
        "EXPORTED": "yes",
        "SPACED": "around",
        "SINGLE": "kept # literally \\n",
        "DOUBLE": 'line\nbreak "quoted" # kept',
        "INLINE": "bare",
        "URL": "postgresql://u:p#ss@h/db",
        "EMPTY": "",
        "DUP": "second",
    }


def test_a_line_that_is_no_assignment_is_named() -> None:
    with pytest.raises(EnvFileError, match=r"x.env, line 2: expected KEY=VALUE"):
        envfile.parse("A=1\nnot an assignment\n", source="x.env")


def test_setting_a_variable_touches_only_its_last_line() -> None:
    text = "# head\nA=1\r\nB=2\nA=3\n# tail"
    assert envfile.with_variable(text, "A", "x y") == '# head\nA=1\r\nB=2\nA="x y"\n# tail'
    assert envfile.with_variable(text, "C", "z") == text + "\nC=z\n"
    assert envfile.with_variable("", "C", "") == "C=\n"


def test_writing_replaces_atomically_and_keeps_the_mode(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    path.chmod(0o640)
    envfile.write_atomically(path, "A=2\n")
    assert path.read_text() == "A=2\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_writing_as_root_keeps_the_files_owner(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    os.chown(path, 0, 10001)  # root:gateway, as the production README sets it up
    envfile.write_atomically(path, "A=2\n")
    assert (path.stat().st_uid, path.stat().st_gid) == (0, 10001)
    os.chown(path, 65534, 65534)
    envfile.write_atomically(path, "A=3\n")
    assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534)


def test_an_unwritable_directory_leaves_the_file_and_no_temporary(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere; tests/test_binary.py proves this case as an unprivileged user")
    path = tmp_path / ".env"
    path.write_text("A=1\n")
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            envfile.write_atomically(path, "A=2\n")
    finally:
        tmp_path.chmod(0o755)
    assert path.read_text() == "A=1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]


def test_reading_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EnvFileError, match="does not exist"):
        envfile.read(tmp_path / "nope.env")
