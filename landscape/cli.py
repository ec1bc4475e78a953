"""Dataclass configs mirrored 1:1 by argparse, with TOML files and one-line errors.

Every CLI of landscape is a dataclass whose fields are its flags::

    @dataclass
    class SurfaceConfig:
        checkpoint: str = arg(help="checkpoint to load", positional=True)
        x: str = arg("-1:1:51", help="x range start:stop:num")

``parse(SurfaceConfig, argv)`` builds the parser from the fields (``--batch-size`` for
``batch_size``), merges defaults < ``--config file.toml`` < command-line flags and returns
the config plus the names the user set explicitly. Values that start with ``-`` work as
typed (``--x -1:1:51``), which argparse alone rejects.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .utils import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

C = TypeVar("C")
INT_MIN, INT_MAX = -(2**63), 2**63 - 1


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``prog: error: ...``, status
    2), not the whole usage text."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def arg(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[str] | None = None,
    positional: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is also a command-line flag (list defaults are copied)."""
    meta = {"help": help, "choices": choices, "positional": positional, "metavar": metavar}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """``(type, optional)`` for ``X`` or ``X | None``."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _converter(tp: Any) -> Callable[[Any], Any]:
    """Turn a command-line string (or a TOML value) into a value of type ``tp``; raises
    ``ArgumentTypeError``, which argparse reports as a one-line usage error."""
    base, optional = _base_type(tp)
    origin = typing.get_origin(base)

    def convert(value: Any) -> Any:
        if optional and (value is None or (isinstance(value, str) and value.lower() == "none")):
            return None
        try:
            if base is bool:
                if isinstance(value, bool):
                    return value
                low = str(value).lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if origin is list:
                (item,) = typing.get_args(base)
                if isinstance(value, str):
                    value = [v for v in value.split(",") if v.strip()]
                return [item(v.strip() if isinstance(v, str) else v) for v in value]
            if origin is dict or base is dict:
                if isinstance(value, str):
                    value = json.loads(value) if value.strip() else {}
                if not isinstance(value, dict):
                    raise ValueError(value)
                return dict(value)
            if base in (int, float) and isinstance(value, bool):  # TOML `epochs = true`
                raise ValueError(value)
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            converted = base(value)
            if base is int and not INT_MIN <= converted <= INT_MAX:  # HDF5 and torch: int64
                raise argparse.ArgumentTypeError(
                    f"expected an int between {INT_MIN} and {INT_MAX}, got {value!r}"
                )
            return converted
        except (ValueError, TypeError, json.JSONDecodeError):
            kind = getattr(base, "__name__", str(base))
            if origin is list:
                kind = "comma-separated list"
            elif base is dict:
                kind = "JSON object"
            raise argparse.ArgumentTypeError(f"expected {kind}, got {value!r}") from None

    return convert


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("help")]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with one flag per field of the dataclass ``cls``. A class
    attribute ``SECTIONS = {first_field: title}`` groups the flags in ``--help``: each
    title covers its field and those after it, up to the next one."""
    parser = _Parser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--config",
        metavar="FILE.toml",
        help="read settings from a TOML file (keys are the flag names); flags given on the "
        "command line override it",
    )
    sections = getattr(cls, "SECTIONS", {})
    group: Any = parser
    for f, tp in _fields(cls):
        if f.name in sections:
            group = parser.add_argument_group(sections[f.name])
        meta = f.metadata
        base, _ = _base_type(tp)
        default = _default(f)
        text = meta["help"]
        if default is not dataclasses.MISSING and default not in (None, "", [], {}):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            text += f" (default: {json.dumps(shown) if isinstance(shown, dict) else shown})"
        kw: dict[str, Any] = {"help": text}
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        if meta["positional"]:
            if typing.get_origin(base) is list:  # FILE ...: one or more values
                (item,) = typing.get_args(base)
                kw["nargs"] = "+" if default is dataclasses.MISSING else "*"
                group.add_argument(f.name, type=_converter(item), **kw)
                continue
            if default is not dataclasses.MISSING:
                kw["nargs"] = "?"
            group.add_argument(f.name, type=_converter(tp), **kw)
        elif base is bool:
            group.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        else:
            group.add_argument(_flag(f.name), type=_converter(tp), dest=f.name, **kw)
    return parser


def _join_dash_values(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--x -1:1:51`` -> ``--x=-1:1:51`` for flags that take a value."""
    takes_value = {
        s
        for a in parser._actions
        if a.option_strings and a.nargs is None and not isinstance(a, argparse._StoreConstAction)
        for s in a.option_strings
    }
    known = set(parser._option_string_actions)
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if (
            tok in takes_value
            and nxt is not None
            and nxt.startswith("-")
            and nxt.split("=")[0] not in known
            and nxt != "--"
        ):
            out.append(f"{tok}={nxt}")
            i += 2
        else:
            out.append(tok)
            i += 1
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing, unreadable or malformed file (a directory,
    binary or not UTF-8) is a :class:`UserError`."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"config file {path} is a directory") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UserError(
            f"cannot parse {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"cannot parse {path}: {e}") from None


def check_output(path: str | Path, flag: str, directory: bool = False) -> None:
    """A :class:`UserError` before any work if ``path`` cannot become the output file
    (``directory=False``) or directory ``flag`` names: it exists as the other kind, what
    should be a directory above it is a file, or the directory to write in is read-only."""
    path = Path(path)
    want = "directory" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        raise UserError(
            f"{flag} {path}: not a {want} (a {'file' if directory else 'directory'} is there)"
        )
    nearest = next((p for p in [path, *path.parents][not directory :] if p.exists()), None)
    if nearest is None:
        return
    if not nearest.is_dir():
        raise UserError(f"{flag} {path}: {nearest} is a file, not a directory")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the directory {nearest} is not writable")


def parse(
    cls: type[C], argv: Sequence[str] | None, prog: str, description: str = ""
) -> tuple[C, set[str]]:
    """Parse ``argv`` into a ``cls`` instance; also return the field names set explicitly
    (on the command line or in the TOML file)."""
    parser = build_parser(cls, prog, description or (cls.__doc__ or ""))
    argv = list(sys.argv[1:] if argv is None else argv)
    renamed = getattr(cls, "RENAMED", {})
    for token in argv:
        name = token.split("=")[0]
        if name.startswith("--") and name[2:].replace("-", "_") in renamed:
            raise UserError(f"{name} was renamed: use {renamed[name[2:].replace('-', '_')]}")
    ns = vars(parser.parse_intermixed_args(_join_dash_values(parser, argv)))
    fields = {f.name: (f, tp) for f, tp in _fields(cls)}
    values: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    if config_file:
        for key, value in load_toml(config_file).items():
            name = key.replace("-", "_")
            if name in renamed:
                raise UserError(f"{config_file}: {key} was renamed: use {renamed[name]}")
            if name not in fields:
                raise UserError(
                    f"{config_file}: unknown setting {key!r}; valid: {', '.join(sorted(fields))}"
                )
            f, tp = fields[name]
            try:
                values[name] = _converter(tp)(value)
            except argparse.ArgumentTypeError as e:
                raise UserError(f"{config_file}: {key}: {e}") from None
            if f.metadata["choices"] and values[name] not in f.metadata["choices"]:
                raise UserError(
                    f"{config_file}: {key} must be one of {', '.join(f.metadata['choices'])}"
                )
    values.update(ns)
    return cls(**values), set(values)


def to_dict(config: Any) -> dict[str, Any]:
    """A config as a JSON-serializable dict (the form stored in checkpoints and HDF5)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a config from :func:`to_dict`; unknown keys (from other versions) are ignored."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def run(main: Callable[[], int | None], prog: str) -> None:
    """Call ``main`` and exit; a :class:`UserError` becomes one line on stderr (status 2),
    and so does a file system error (a read-only or full disk, a directory where a file
    is expected...: status 1)."""
    try:
        code = main()
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        where += f" -> {e.filename2}" if e.filename2 else ""  # a rename's target
        text = (str(e.strerror or e).splitlines() or [type(e).__name__])[0]
        print(f"{prog}: error: {text}{where}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
