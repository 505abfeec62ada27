"""Read and atomically update `.env` files.

The format is the common docker-compose / systemd subset: `KEY=VALUE` lines, an optional
`export ` prefix, `#` comments, blank lines, and values that may be single-quoted (taken
literally), double-quoted (with `\\n`, `\\"` and `\\\\` escapes) or bare (a ` #` starts an
inline comment). Updating a variable rewrites only its own line, so every other line,
comment and the ordering survive an `add-backend`.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
_DOUBLE_ESCAPES = {"n": "\n", '"': '"', "\\": "\\", "$": "$"}


class EnvFileError(Exception):
    """A .env file could not be read or parsed; the message names the file and line."""


def _unquote(raw: str) -> str:
    if raw.startswith("'"):
        end = raw.find("'", 1)
        return raw[1:end] if end > 0 else raw[1:]
    if raw.startswith('"'):
        out: list[str] = []
        i = 1
        while i < len(raw):
            ch = raw[i]
            if ch == "\\" and i + 1 < len(raw):
                nxt = raw[i + 1]
                out.append(_DOUBLE_ESCAPES.get(nxt, "\\" + nxt))
                i += 2
                continue
            if ch == '"':
                break
            out.append(ch)
            i += 1
        return "".join(out)
    # A bare value ends at an inline comment, which needs whitespace before the '#'
    # so that URLs with fragments or passwords containing '#' stay intact.
    cut = re.search(r"\s#", raw)
    return (raw[: cut.start()] if cut else raw).strip()


def parse(text: str, *, source: str = ".env") -> dict[str, str]:
    """Parse .env text into a dict; later assignments win, as in a shell."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise EnvFileError(f"{source}, line {number}: expected KEY=VALUE, found {stripped[:40]!r}")
        values[match.group(1)] = _unquote(match.group(2))
    return values


def read(path: Path) -> dict[str, str]:
    """Read a .env file; a missing or unreadable file is an EnvFileError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EnvFileError(f"The env file {path} does not exist.") from None
    except UnicodeDecodeError:
        raise EnvFileError(f"The env file {path} is not UTF-8 text.") from None
    except OSError as exc:
        raise EnvFileError(f"The env file {path} cannot be read: {exc.strerror}.") from None
    return parse(text, source=str(path))


def _format_value(value: str) -> str:
    if re.fullmatch(r"[A-Za-z0-9_./:,@%+=-]*", value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("$", "\\$")
    return f'"{escaped}"'


def render_assignment(key: str, value: str) -> str:
    """The line `set_variable` writes, e.g. `OLLAMA_BACKENDS=http://a:11434,http://b:11434`."""
    return f"{key}={_format_value(value)}"


def with_variable(text: str, key: str, value: str) -> str:
    """Return `text` with `key` set to `value`: its last assignment is replaced in place
    (earlier duplicates are left alone, they are already overridden), or a line is appended."""
    lines = text.splitlines(keepends=True)
    last = None
    for index, line in enumerate(lines):
        match = _LINE.match(line.rstrip("\r\n"))
        if match is not None and match.group(1) == key and not line.lstrip().startswith("#"):
            last = index
    assignment = render_assignment(key, value)
    if last is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        lines.append(assignment + "\n")
    else:
        ending = "\r\n" if lines[last].endswith("\r\n") else "\n" if lines[last].endswith("\n") else ""
        lines[last] = assignment + ending
    return "".join(lines)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: write `<name>.tmp` beside it with the same mode, fsync,
    then rename over the original, so readers see the old file or the new one, never half.

    Raises OSError (PermissionError included) when the directory or file is not writable;
    the original file is untouched in that case and no temporary file is left behind.
    """
    tmp = path.with_name(path.name + ".tmp")
    original = path.stat() if path.exists() else None
    mode = original.st_mode & 0o7777 if original is not None else 0o600
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask; the copy must match.
        if original is not None and (original.st_uid, original.st_gid) != (os.getuid(), os.getgid()):
            # Run as root in the container (`docker exec -u root`), the new file would belong
            # to root and a gateway reading it as uid 10001 through its group could not.
            with contextlib.suppress(PermissionError):
                os.chown(tmp, original.st_uid, original.st_gid)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
