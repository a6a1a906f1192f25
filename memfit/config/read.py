"""Reading a config file into a dict: UTF-8 JSON or, as DeepSpeed reads its config files, Hjson
(JSON with comments, unquoted keys and strings, optional commas), with no duplicate keys and
bounded nesting. Every failure is one ConfigError line naming the file; nothing escapes as a
traceback."""

import json

import hjson

from memfit.config.errors import ConfigError, join_path

MAX_DEPTH = 32  # real configs nest 4 levels; deeper input is a mistake or an attack on the parser
# Real configs are a few KiB; DeepSpeed's largest examples stay under 20 KiB. A cap far above that
# keeps a wrong path (a dataset, a checkpoint) from being read whole into memory and parsed.
MAX_CONFIG_BYTES = 1 << 20


def read_config_file(path: str):
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError([f"cannot read: {error.strerror}"], path) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [f"larger than the {MAX_CONFIG_BYTES} bytes a config may hold; is this the config file?"], path
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            [f"line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})"], path
        ) from None

    def reject_duplicates(pairs):
        seen, duplicates = set(), set()
        for key, _ in pairs:
            (duplicates if key in seen else seen).add(key)
        if duplicates:
            duplicates = sorted(duplicates)
            raise ValueError(f"duplicate keys {duplicates}")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=reject_duplicates)
    except json.JSONDecodeError as error:
        if not text.strip():  # Hjson reads a blank file as {}: an empty config is a mistake, not a default
            raise ConfigError([f"line {error.lineno}, column {error.colno}: invalid JSON: {error.msg}"], path) from None
    except ValueError as error:
        raise ConfigError([f"invalid JSON: {error}"], path) from None
    except RecursionError:
        raise ConfigError([f"invalid JSON: nested more than {MAX_DEPTH} levels deep"], path) from None
    try:
        return hjson.loads(text, object_pairs_hook=reject_duplicates)
    except hjson.HjsonDecodeError as error:
        raise ConfigError(
            [f"line {error.lineno}, column {error.colno}: neither JSON nor Hjson: {error.msg}"], path
        ) from None
    except ValueError as error:
        raise ConfigError([f"invalid Hjson: {error}"], path) from None
    except RecursionError:
        raise ConfigError([f"invalid Hjson: nested more than {MAX_DEPTH} levels deep"], path) from None


def nesting_problem(value) -> str | None:
    """The first path nested deeper than MAX_DEPTH, as a problem line (walked without recursion)."""
    pending = [(value, ())]
    while pending:
        item, path = pending.pop()
        if len(path) > MAX_DEPTH:
            return f"{join_path(*path[:MAX_DEPTH])}: nested more than {MAX_DEPTH} levels deep"
        if isinstance(item, dict):
            pending.extend((child, (*path, str(key))) for key, child in item.items())
        elif isinstance(item, (list, tuple)):
            pending.extend((child, (*path, index)) for index, child in enumerate(item))
    return None
