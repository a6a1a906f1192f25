"""ConfigError and the translation of validation failures into one line per problem, each naming
its JSON path."""

import difflib


class ConfigError(ValueError):
    """Every problem found in one config, reported together. .problems holds one line each."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}"
        else:
            message = f"{source}: {len(self.problems)} problems\n" + "\n".join(f"  {p}" for p in self.problems)
        super().__init__(message)


def join_path(*parts) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


# Each "did you mean" is a fuzzy match against every valid key; past this many unknown keys in one
# section the file is not a config with a typo, and suggesting for each would make reading it slow.
MAX_SUGGESTIONS = 20


def unknown_keys(path: str, keys, valid: list[str]) -> list[str]:
    """One problem line per unknown key, with a suggestion for the first MAX_SUGGESTIONS of them."""
    return [unknown_key(path, key, valid if index < MAX_SUGGESTIONS else []) for index, key in enumerate(keys)]


def unknown_key(path: str, key: str, valid: list[str]) -> str:
    where = join_path(path, str(key)) if path else key
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6) if valid else []
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}: unknown key{hint}"


def describe_pydantic_error(error: dict) -> str:
    path = join_path(*error["loc"])
    message = error["msg"]
    if message.startswith("Value error, "):
        return f"{path}: {message[len('Value error, ') :]}"
    if message.startswith("Input should be "):
        message = "expected " + message[len("Input should be ") :]
    elif message == "Field required":
        return f"{path}: required key missing"
    return f"{path}: {message}, got {error['input']!r}"
