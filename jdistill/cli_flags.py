"""The command lines' flag parser: a bad flag, config file or `--config.key` override ends the
process in one line, `error: <cause>`, exit status 2, before anything is loaded.
"""

import os
import re
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from jdistill import exits

# The parser of every `DEFINE_config_file` flag (public in ml_collections' inner module only).
_FILE_PARSER = config_flags.config_flags.ConfigFileFlagParser


def parse_flags(argv, flag_values=None):
    """`app.run`'s `flags_parser` for the command lines: parses the flags and the `--config.key`
    overrides, or ends the process with one line, `error: <cause>`, and exit status 2.

    Without it absl ends a bad flag in its usage text and ml_collections raises a config file's
    own error with a traceback, or defers it: a config path that does not exist, a syntax
    error, no `get_config`, an error inside it, a `get_config` that returns None, an unknown
    `:arg`, a misspelt or mistyped `--config.key`, a missing required flag and a stray
    positional argument each end here, naming the flag, before anything is loaded.

    Returns:
      argv[:1]: the commands take no positional arguments.
    """
    fv = flags.FLAGS if flag_values is None else flag_values
    given = {}  # config-file flag -> its argument on the command line
    for name in list(fv):
        if isinstance(fv[name].parser, _FILE_PARSER):
            value = _flag_argument(argv, name)
            if value is not None:
                given[name] = value
    for name, value in given.items():  # before parsing: ml_collections defers a missing file
        cause = config_file_problem(value.split(":", 1)[0])
        if cause:
            _usage_error(f"--{name}={value}: {cause}")
    try:
        rest = fv(argv)
    except Exception as e:  # noqa: BLE001 (SystemExit from --help passes)
        _usage_error(_flag_error_line(e, argv, given, fv))
    for name, value in given.items():
        config = fv[name].value
        if not isinstance(config, ml_collections.ConfigDict):
            _usage_error(f"--{name}={value}: {_not_a_config(config)}")
    if len(rest) > 1:
        _usage_error(
            f"unexpected arguments {rest[1:]}: every input is a flag (--name=value); "
            "a value with spaces or parentheses needs quotes"
        )
    return rest[:1]


def config_file_problem(path):
    """Why `path` cannot be a config file (it is missing, a folder, unreadable, or not Python
    that compiles), or '' when it may be one. Compiling runs nothing."""
    if not path:
        return "the path is empty"
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        return f"no such file{where}"
    if os.path.isdir(path):
        return "is a folder, not a config file (configs/<name>.py)"
    try:
        with open(path, "rb") as f:
            source = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as e:
        return f"not valid Python: line {e.lineno}: {e.msg}"
    except ValueError as e:  # null bytes, an undecodable encoding: not a Python file at all
        return f"not a Python file ({e})"
    return ""


def _flag_argument(argv, name):
    """The command line's argument of flag `name` (`--name=x`, `--name x`), or None."""
    value = None
    args = list(argv[1:])
    for i, arg in enumerate(args):
        if arg == "--":
            break
        for dashes in ("--", "-"):
            if arg.startswith(f"{dashes}{name}="):
                value = arg[len(dashes) + len(name) + 1 :]
            elif arg == f"{dashes}{name}" and i + 1 < len(args):
                value = args[i + 1]
    return value


def _usage_error(line):
    print(f"error: {line}", file=sys.stderr)
    sys.exit(exits.EXIT_USAGE)


def _chain(e):
    """`e` and the exceptions it was raised from or while handling, outermost first."""
    out = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _lines(e):
    msg = str(e.args[0] if e.args else e).replace("\\n", "\n").replace("\\'", "'")
    return [ln.strip() for ln in msg.splitlines() if ln.strip()] or [type(e).__name__]


def _loading_flag(chain):
    """The config-file flag whose file was being loaded when the error was raised, or None."""
    for exc in chain:
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            parser = frame.f_locals.get("self")
            if isinstance(parser, _FILE_PARSER):
                return parser.name
    return None


def _parsed_configs(chain, flag):
    """The configs `flag` had loaded when an exception of `chain` was raised while it parsed."""
    for exc in chain:
        for frame, _ in traceback.walk_tb(exc.__traceback__):
            if frame.f_locals.get("self") is flag and "config" in frame.f_locals:
                yield frame.f_locals["config"]


def _flag_error_line(e, argv, given, fv):
    """The one line naming the cause of an exception from parsing `argv`."""
    chain = _chain(e)
    name = _loading_flag(chain)
    if name is not None:  # the config file itself: its import or its get_config failed
        value = given.get(name, "")
        path = os.path.abspath(value.split(":", 1)[0])
        root = chain[-1]
        if isinstance(root, AttributeError) and "get_config" in str(root):
            return f"--{name}={value}: the file defines no get_config(arg) function"
        if isinstance(root, ValueError):  # config_lib's own refusals (an unknown :arg) say it
            return f"--{name}={value}: {_lines(root)[0]}"
        # Anything else is the file's code failing: where in the file, and the exception's type.
        lines = [
            f.lineno
            for f in traceback.extract_tb(root.__traceback__)
            if os.path.abspath(f.filename) == path
        ]
        where = f"line {lines[-1]}: " if lines else ""
        return f"--{name}={value}: {where}{type(root).__name__}: {_lines(root)[0]}"
    for name, value in given.items():
        # An override of a config that get_config did not give (None): ml_collections applies
        # the overrides inside the config flag's own parse, where the loaded config is a local.
        for config in _parsed_configs(chain, fv[name]):
            if not isinstance(config, ml_collections.ConfigDict):
                return f"--{name}={value}: {_not_a_config(config)}"
        if fv[name].present and fv[name].value is None:  # parsed, but get_config gave nothing
            return f"--{name}={value}: {_not_a_config(None)}"
    lines = _lines(e)
    if isinstance(e, AttributeError | KeyError):  # a misspelt --config.key override
        key = lines[0].strip("'\"")
        hint = " ".join(lines[1:]).rstrip("'\"")
        where = [a for a in argv if a.startswith("--config.") and key in a]
        flag = where[0] if where else "--config"
        return f"{flag}: the config has no key {key!r}. {hint}".strip()
    required = re.fullmatch(
        r"flag --(\S+)=None: Flag --\1 must have a value other than None\.", lines[-1]
    )
    if required:
        return f"--{required.group(1)} is required (--helpshort lists the flags)"
    # absl's message is one line; an override's parse error ends in its cause.
    return lines[-1]


def _not_a_config(config):
    if config is None:
        return "get_config() returned None (a missing return statement?)"
    try:
        config.keys()  # ml_collections' stand-in for a file it could not load raises its error
    except OSError as e:
        return _lines(e)[-1]
    except AttributeError:
        pass
    return f"get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict"
