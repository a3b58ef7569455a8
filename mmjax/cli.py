"""What every command-line entry point shares: flag parsing whose config errors are one line naming the nearest valid
fields, and the end of a run as one line on stderr (`error: ...`, exit status 2).

    app.run(main, flags_parser=cli.parse_flags)
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, NoReturn, Sequence

from absl import flags


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")  # what --images folders are searched for


def list_images(folder: str) -> list[str]:
    """Every image file under `folder` (recursively), sorted; an empty or missing folder is an error."""
    if not os.path.isdir(folder):
        raise ValueError(f"--images={folder!r} is not a directory")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names
                   if name.lower().endswith(IMAGE_SUFFIXES))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder!r}")
    return paths


def fail(message: str, status: int = 2) -> NoReturn:
    """Prints `error: message` on stderr and exits (status 2: bad input)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _flag_value(argv: Sequence[str], name: str) -> str | None:
    """The value of --name=V or --name V in argv (the last one given), else None."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def _load_config(spec: str) -> Any:
    """The ConfigDict of `--config=FILE[:ARG]` (as config_flags loads it), or None when it does not load."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        return None
    try:
        module_spec = importlib.util.spec_from_file_location("mmjax_cli_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception:  # the config's own error is reported by config_flags' message
        return None


def unknown_field(config: Any, dotted: str) -> str | None:
    """For an override path the config lacks: "unknown config field X; nearest valid: ..." (else None)."""
    node, walked = config, []
    for part in dotted.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = ".".join(walked)
            if not keys:
                return f"config field {where} is a value ({node!r}), not a section: it has no field {part!r}"
            prefix = f"{where}." if where else ""
            near = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
            valid = (f"nearest valid: {', '.join(prefix + k for k in near)}" if near
                     else f"the fields of {where or 'the config'}: {', '.join(sorted(keys))}")
            return f"unknown config field {dotted!r}; {valid}"
        walked.append(part)
        node = node[part]
    return None


def config_error(argv: Sequence[str], error: Exception) -> str:
    """One line for a failed flag parse: an unknown --config.FIELD names the nearest valid fields; other errors keep
    config_flags' message, cleaned of tracebacks and repr escapes."""
    spec = _flag_value(argv, "config")
    config = _load_config(spec) if spec else None
    if config is not None:
        for arg in argv:
            if arg.startswith("--config."):
                problem = unknown_field(config, arg[len("--config."):].split("=", 1)[0])
                if problem:
                    return problem
    message = str(error.args[0] if getattr(error, "args", None) else error)
    if "Traceback" in message:  # an error inside get_config, wrapped with its traceback: keep what it said
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        message = f"{message.split('Traceback')[0].strip()} {lines[-1]}"
    # A KeyError's message arrives as its repr: literal \' and \n sequences.
    message = message.replace("\\n", " ").replace("\\'", "'").replace("\n", " ").strip()
    if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":  # a quoted whole
        message = message[1:-1]
    return message


def config_flag(name: str = "config") -> Any:
    """The ConfigDict of a config_flags flag (None when not given), loaded now: a missing file or an error inside
    get_config is one line instead of config_flags' traceback."""
    try:
        config = flags.FLAGS[name].value
        if config is not None:
            config.keys()  # config_flags may load the file only when the config is first read
        return config
    except Exception as e:  # config_flags wraps a missing file or a get_config error with its traceback text
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(f"--{name}: {lines[-1] if lines else type(e).__name__}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing in which a config error (unknown field, bad value, missing file) is one line."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # config_flags raises various types; all are user input errors here
        fail(config_error(argv, e))
