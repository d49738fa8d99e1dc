"""``--config FILE``: flags read from a YAML/JSON file, and the run configs saved beside results."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Sequence


def config_file_args(argv: Sequence[str], commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """``argv`` with the flags of its ``--config FILE`` put before the command line's own, which win.

    ``commands`` maps each subcommand name to its parser (the flags a file may set).

    The file is a YAML or JSON mapping from flag names (``max-prompt-tokens`` or ``max_prompt_tokens``) to
    values; lists fill repeatable flags (``task: [a, b]``) unless the command line gives that flag itself.
    Positional arguments (a pipeline directory) stay on the command line: the file's are ignored.
    Raises ValueError for an unreadable file or a key the command does not have.
    """
    argv = list(argv)
    # a command without --config (list, fetch): argparse refuses the flag, rather than a file being read for it
    if not argv or argv[0] not in commands or "--config" not in commands[argv[0]]._option_string_actions:
        return argv
    given_at = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not given_at:
        return argv
    if len(given_at) > 1:  # only one file is read, and argparse would keep the other's name: one was dropped
        raise ValueError("--config is given twice: give one file (put the flags of both into it, or give the "
                         "other's as flags on the command line, which override the file)")
    at = given_at[0]
    path = argv[at].split("=", 1)[1] if "=" in argv[at] else (argv[at + 1] if at + 1 < len(argv) else "")
    values = read_config_file(path)
    flags = {}
    for action in commands[argv[0]]._actions:  # argparse keeps no public list of a parser's flags
        for option in action.option_strings:
            if option.startswith("--"):
                flags[option[2:].replace("-", "_")] = (option, action)
    positional = {action.dest for action in commands[argv[0]]._actions if not action.option_strings}
    values = {key: value for key, value in values.items() if key not in positional}  # given on the command line
    unknown = sorted(key for key in values if key.replace("-", "_") not in flags or key in ("config", "help"))
    if unknown:
        raise ValueError(f"config file {path}: cpet {argv[0]} has no flag {', '.join(unknown)}; its flags: "
                         f"{', '.join(sorted(k.replace('_', '-') for k in flags if k not in ('config', 'help')))}")
    spellings: dict[str, list[str]] = {}
    for key in values:
        spellings.setdefault(key.replace("-", "_"), []).append(key)
    twice = next((keys for keys in spellings.values() if len(keys) > 1), None)
    if twice:  # both would be passed on, and argparse would keep the later one without a word
        raise ValueError(f"config file {path}: {' and '.join(twice)} are one flag: give it once")
    given = {a.split("=", 1)[0] for a in argv[1:] if a.startswith("--")}
    injected: list[str] = []
    for key, value in values.items():
        option, action = flags[key.replace("-", "_")]
        if option in given:
            continue
        if value is None or (isinstance(value, list) and any(item is None for item in value)):
            # YAML reads `key:` and `key: null` as None, which would go to the flag as the string "None"
            raise ValueError(f"config file {path}: {key} has no value (null); give one, or remove the key to "
                             "leave the flag at its default")
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):  # a string "false" would be truthy and turn the flag on
                raise ValueError(f"config file {path}: {key} is a switch and takes true or false, got {value!r}")
            injected += [option] if value else []
        elif isinstance(value, list) and not isinstance(action, argparse._AppendAction):
            raise ValueError(f"config file {path}: {key} takes one value, got the list {value!r} (only repeatable "
                             "flags take lists)")
        else:
            for item in value if isinstance(value, list) else [value]:
                _check_scalar(path, key, item, action)
                # one token: a value starting with "-" (`split: -x`, `lr: -1e-4`) given apart would be read as
                # another flag ("expected one argument")
                injected.append(f"{option}={item}")
    return [argv[0], *injected, *argv[1:]]


def _check_scalar(path: str, key: str, value, action: argparse.Action) -> None:
    """Refuse a value that YAML read as something other than what was written for this flag: a boolean for a flag
    that is not a switch (``name: off`` would become ``--name False``), or a number for a flag that takes text
    (``name: 1.10`` would become ``1.1``, ``name: 010`` the octal 8)."""
    if isinstance(value, bool):
        raise ValueError(f"config file {path}: {key} was read as the boolean {value} (YAML takes an unquoted on, "
                         f"off, yes, no, true or false for one) and {key} is not a switch: quote it, e.g. "
                         f"{key}: \"off\"")
    if action.type is None and not isinstance(value, str):
        kind = "int" if isinstance(value, int) else type(value).__name__  # not _OddInt
        raise ValueError(f"config file {path}: {key} takes text, and YAML read {value!r} ({kind}) "
                         f"where its text may have been written otherwise: quote it, e.g. {key}: \"1.10\"")
    if isinstance(value, _OddInt):  # a number flag: the command line would read the same text otherwise, or not
        raise ValueError(f"config file {path}: {key}: YAML read {value.written} as {int(value)} (YAML 1.1 reads a "
                         "leading 0 as octal, 0x as hex and a:b as base 60): write it in decimal, e.g. "
                         f"{key}: {int(value)}")


# an integer as the command line reads it (int() of the text); YAML 1.1 reads other forms (010, 0x10, 0b10, 1:30)
_DECIMAL_INT = re.compile(r"[-+]?(0|[1-9][0-9_]*)")


class _OddInt(int):
    """An integer YAML read from text that is not plain decimal; ``written`` is that text."""

    written: str


def _config_loader():
    """YAML's safe loader, with integers not written in plain decimal marked (:class:`_OddInt`) so that they can be
    refused: `steps: 010` was read as the octal 8, where `--steps 010` is 10."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_int(loader, node):
        value = loader.construct_yaml_int(node)
        if _DECIMAL_INT.fullmatch(node.value):
            return value
        odd = _OddInt(value)
        odd.written = node.value
        return odd

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return Loader


def read_config_file(path: str) -> dict:
    """The mapping in a YAML or JSON file (FileNotFoundError / ValueError naming the file otherwise)."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {path!r} does not exist")
    try:
        values = yaml.load(file.read_text(encoding="utf-8"), Loader=_config_loader())  # JSON is YAML too
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"config file {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of flag names to values")
    for key in values:
        if isinstance(key, bool):  # YAML 1.1 reads an unquoted on / off / yes / no key as a boolean
            raise ValueError(f"config file {path}: a key was read as {key} (YAML takes an unquoted on, off, yes "
                             f"or no for a boolean): quote it, e.g. \"on\": original")
        if not isinstance(key, str):
            raise ValueError(f"config file {path}: the key {key!r} is not a flag name")
    return values


def save_run_config(args: argparse.Namespace, directory) -> Path:
    """Write the command's effective flags to ``DIRECTORY/configs/<command>-<UTC time>.json`` (atomically).

    The file can be given back with ``--config`` to run the same command again. Returns its path.
    """
    import datetime
    import json
    from ..assets import write_text_atomic

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    values = {key: value for key, value in sorted(vars(args).items())
              if key not in ("func", "command", "config", "runtime", "json") and value is not None}
    path = Path(directory) / "configs" / f"{args.command}-{stamp}.json"
    write_text_atomic(path, json.dumps(values, indent=2))
    return path


def directories_to_be_made(directory) -> list[Path]:
    """The directories :func:`save_run_config` would create for ``directory`` (deepest first), so that a refused run
    can remove them again with :func:`discard_run_config` and no others."""
    directory = Path(directory)
    return [d for d in (directory / "configs", directory) if not d.exists()]


def discard_run_config(path: Path, made: list[Path]) -> None:
    """Remove a refused run's saved flags (:func:`save_run_config`) and, where they are still empty, the directories
    in ``made`` (:func:`directories_to_be_made`, taken before saving): never a directory that was there before."""
    path.unlink(missing_ok=True)
    for directory in made:
        try:
            directory.rmdir()  # only an empty directory goes
        except OSError:
            return
