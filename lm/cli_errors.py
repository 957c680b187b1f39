"""One-line config errors for `lm fit|validate`.

jsonargparse reports a bad key or value after ~50 lines of usage text, wrapped in union-type noise. This parser
prints one line instead: the full key, what was wrong, and the allowed keys (or the expected type).
"""

import dataclasses
import difflib
import importlib
import inspect
import re
import sys

from lightning.pytorch.cli import LightningArgumentParser

from lm.errors import LMError

# An unknown key's characters take in "-": `--trainer.max-steps` was reported as the key trainer.max, with max_time as
# the key meant
_CLASS_OPTION = re.compile(
    r"Problem with given class_path '([\w.]+)':\s*"
    r"(?:Option '([\w.-]+)' is not accepted|unrecognized arguments: --([\w.-]+)"
    # a YAML's unknown key inside a dataclass argument (model.init_args.arch.n_layerz)
    r"|Group '([\w.]+)' does not accept option '([\w-]+)')"
)
_CLASS_VALUE = re.compile(r"Problem with given class_path '([\w.]+)':\s*Parser key \"([\w.]+)\":\s*(.+?)(?:\n|$)")
_GROUP_KEY = re.compile(r"Parser key \"([\w.]+)\"")
_CLASS_PROBLEM = re.compile(r"Problem with given class_path '([\w.]+)':\s*(.+?)(?:\n|$)")
_UNION_EXPECTED = re.compile(r"^\s*- Expected a (.+?)\s*$", re.M)
_GIVEN_VALUE = re.compile(r"^\s*Given value: (.+?)\s*$", re.M)
# "Group 'trainer' does not accept option 'max_stepz'": how --print_config reports a YAML's unknown key in a group
# and "Option 'checkpoints.monitor' is not accepted": how it reports a YAML's unknown group
_TOP_OPTION = re.compile(
    r"(?:Group '([\w.]+)' )?(?:does not accept option '|unrecognized arguments: --|^Option ')([\w.-]+)"
)
_TOP_VALUE = re.compile(r"Parser key \"([\w.]+)\":\s*(Expected .+?|File does not exist.+?)(?:\n|$)")


def import_class(class_path: str):
    """The object a config's class_path names ("lm.data.PretrainData"), or None where it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):  # ValueError: no module part ("", an empty path)
        return None


def _init_params(class_path: str, nested: list[str]) -> list[str]:
    """Constructor arguments of class_path, or the fields of a dataclass argument of it (nested=["arch"])."""
    target = import_class(class_path)
    if target is None:
        return []
    for attribute in nested:
        hints = inspect.get_annotations(target.__init__, eval_str=True)
        target = hints.get(attribute)
        if not dataclasses.is_dataclass(target):
            return []
    if dataclasses.is_dataclass(target):
        return [f.name for f in dataclasses.fields(target)]
    return [p for p in inspect.signature(target.__init__).parameters if p not in ("self", "args", "kwargs")]


def _arguments_key(group: str, class_path: str) -> str:
    """Where a class's arguments sit in the config: group.init_args, or the group itself for a dataclass, which is
    written as its fields (EvalCallback's `tasks: [{task: lm, data: ...}]`, a list of EvalSpec)."""
    return group if dataclasses.is_dataclass(import_class(class_path)) else f"{group}.init_args"


def _nested_block(message: str, start: int) -> str:
    """The error jsonargparse nests under a key: the line holding `start`, from there, and the lines after it that are
    indented at least as deeply, dedented."""
    line_start = message.rfind("\n", 0, start) + 1
    indent = start - line_start
    lines = [message[start:].split("\n")[0]]
    for line in message[start:].split("\n")[1:]:
        if len(line) - len(line.lstrip(" ")) < indent:
            break
        lines.append(line[indent:])
    return "\n".join(lines)


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# What subclass_mode needs: a config without class_path leaves the base class, which takes no arguments
_SUBCLASSES = {
    "data": ("lm.data.PretrainData", "lm.chat_data.ChatData", "lm.preference.PreferenceData"),
    "model": ("lm.module.LanguageModel", "lm.preference.PreferenceModel"),
}
_YAML_MARK = re.compile(r"line (\d+), column (\d+)")


def _type_name(expected: str) -> str:
    """jsonargparse's "typing.Literal['a', 'b']" / "<class 'float'>" as a reader writes it: 'a', 'b' / float."""
    if literal := re.fullmatch(r"typing\.Literal\[(.*)\]", expected):
        return literal.group(1)
    if cls := re.fullmatch(r"<class '(?:[\w.]+\.)?(\w+)'>", expected):
        return "null" if cls.group(1) == "NoneType" else cls.group(1)
    return expected


def _config_files(args: list[str]) -> list[str]:
    """The files given with --config FILE (or -c FILE) or --config=FILE, in order."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def _unparsable(files: list[str]) -> str | None:
    """The first of the files that is not valid YAML (jsonargparse's syntax error names none)."""
    import yaml

    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                yaml.safe_load(f)
        except yaml.YAMLError:
            return file
        except OSError:
            continue
    return None


def _not_a_mapping(files: list[str]) -> tuple[str, object] | None:
    """The first of the files whose YAML is not a mapping of keys, with what it holds instead."""
    import yaml

    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                content = yaml.safe_load(f)
        except (OSError, ValueError, yaml.YAMLError):  # ValueError: UnicodeDecodeError, reported elsewhere
            continue
        if not isinstance(content, dict):
            return file, content
    return None


def _repeated_key(files: list[str]) -> str | None:
    """`FILE, line N: ...` for the first key given twice in one mapping of the files. YAML loaders keep the last of
    them without a word: a file with two `trainer:` sections (two configs pasted into one) dropped the first whole."""
    import yaml

    def first_repeat(node) -> tuple[str, int, int] | None:  # (key, its first line, the repeat's line), in file order
        if isinstance(node, yaml.SequenceNode):
            return next(filter(None, map(first_repeat, node.value)), None)
        if not isinstance(node, yaml.MappingNode):
            return None
        lines: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # `<<` merges are meant to be overridden
                if key.value in lines:
                    return key.value, lines[key.value], key.start_mark.line + 1
                lines[key.value] = key.start_mark.line + 1
            if found := first_repeat(value):
                return found
        return None

    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                found = first_repeat(yaml.compose(f, Loader=yaml.SafeLoader))
        except (OSError, ValueError, yaml.YAMLError):  # reported as they are parsed (UnicodeDecodeError: ValueError)
            continue
        if found:
            key, first, again = found
            return (
                f"{file}, line {again}: '{key}' is given a second time (first on line {first}), and YAML keeps only "
                "the second: merge the two, or put one in another --config file"
            )
    return None


def _keys_set(file: str) -> dict[tuple[str, ...], str]:
    """The keys a config file sets, each as its path without `init_args` (`--model.lr` is `--model.init_args.lr`)
    mapped to the key as written. A mapping is followed down; any other value (a list, a scalar) is one key."""
    import yaml

    try:
        with open(file, encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):  # reported as the file is parsed
        return {}
    return _keys_of(content)


def _keys_of(node, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], str]:
    """The keys a mapping sets, as _keys_set gives them, each under `path` (the keys as written from there)."""
    keys = {}

    def walk(node, path: tuple[str, ...]):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, (*path, str(key)))
        elif path:
            keys[tuple(part for part in path if part != "init_args")] = ".".join(path)

    walk(node, path)
    return keys


def flag_a_later_config_overrides(args: list[str]) -> str | None:
    """Why a flag given before a --config that sets the same key is refused, or None. Later arguments win, so
    `--trainer.max_steps 5 --config debug.yaml` trained debug's 40 steps without a word."""
    flags: list[tuple[str, str | None, str]] = []  # (the option, its value, both as typed), before the --config
    for i, arg in enumerate(args):
        option, has_value, value = arg.partition("=")
        if option in ("--config", "-c"):
            file = value if has_value else (args[i + 1] if i + 1 < len(args) else "")
            keys = _keys_set(file)
            for flag, flag_value, typed in flags:
                written_flag = tuple(flag[2:].rstrip("+").split("."))
                key = tuple(part for part in written_flag if part != "init_args")
                # A mapping (`--trainer '{max_steps: 3}'`) sets the keys inside it: a file's other keys in that group
                # are merged with them (trainer.precision leaves max_steps 3), not put in their place
                mapping = _mapping(flag_value)
                flag_keys = list(_keys_of(mapping, written_flag)) if mapping else [key]
                for path, written in keys.items():
                    # a key the flag sets, or a key holding one (trainer.logger: false); or, inside the flag's group, a
                    # class_path (the file's class replaces the flag's, and its arguments with it)
                    holds = any(flag_key[: len(path)] == path for flag_key in flag_keys)
                    inside = len(path) > len(key) and path[: len(key)] == key
                    if holds or (inside and path[len(key)] == "class_path"):
                        return (
                            f"{typed} comes before --config {file}, which sets {written} and would override it (later "
                            "arguments win): put it after the --config"
                        )
        elif option.startswith("--") and option != "--":
            value_given = value if has_value else (args[i + 1] if i + 1 < len(args) else None)
            if not has_value and value_given is not None and value_given.startswith("--"):
                value_given = None  # a flag without a value (--print_config)
            typed = arg if has_value or value_given is None else f"{arg} {value_given}"
            flags.append((option, value_given, typed))
    return None


def _mapping(value: str | None) -> dict | None:
    """A flag's value when it is a mapping (`--model.init_args.arch '{n_layer: 4}'`), which sets the keys inside."""
    import yaml

    try:
        content = yaml.safe_load(value or "")
    except yaml.YAMLError:
        return None
    return content if isinstance(content, dict) and content else None


def _not_text(files: list[str]) -> str | None:
    """The first of the files that is not UTF-8 text."""
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                f.read()
        except UnicodeDecodeError:
            return file
        except OSError:
            continue
    return None


def explain(message: str, known_keys: list[str], args: list[str] = ()) -> str:
    """Turn a jsonargparse error message into one line naming the key; falls back to the message's first line.
    args: the command line, to name the config file that holds a YAML syntax error."""
    group = _GROUP_KEY.search(message)
    group = group.group(1) if group else "?"
    # A value error inside the class the user gave comes before an unknown-option error of a class they did not
    # give (a callback's bad float is also "not accepted" by the plain lightning.Callback of the union)
    if m := _CLASS_VALUE.search(message):
        key = f"{_arguments_key(group, m.group(1))}.{m.group(2)}"
        inner = _nested_block(message, m.start(3))
        if inner.startswith("Problem with given class_path"):
            # a class inside the class's argument (EvalCallback's tasks, EvalSpecs): its key and problem, not "bad
            # value for trainer.callbacks.init_args.tasks: Problem with given class_path 'lm.eval.EvalSpec':"
            return explain(f'Parser key "{key}":\n{inner}', known_keys, args)
        if (expected := _UNION_EXPECTED.findall(inner)) and (given := _GIVEN_VALUE.search(inner)):
            # an optional argument (decay_steps: int | None): it read "Does not validate against any of the Union
            # subtypes", without the value given or the type expected
            return f"bad value for {key}: {given.group(1)}; expected one of {' | '.join(map(_type_name, expected))}"
        return f"bad value for {key}: {m.group(3).strip()}"
    if m := _CLASS_OPTION.search(message):
        dotted = m.group(2) or m.group(3) or f"{m.group(4)}.{m.group(5)}"
        *nested, option = dotted.split(".")
        options = _init_params(m.group(1), nested)
        key = ".".join([_arguments_key(group, m.group(1)), *nested, option])
        owner = ".".join([m.group(1), *nested])
        if not options and not nested and group in _SUBCLASSES:  # the base class: no class_path was given
            # ... yet: `--data.init_args.num_workers 2 --config debug.yaml` was told to give a class_path the file gives
            later = [f for f in _config_files(list(args)) if (group, "class_path") in _keys_set(f)]
            if later:
                return f"{key} is given before --config {later[0]}, which sets {group}.class_path: put it after that"
            return f"{key}: {group}.class_path is missing; give one of {', '.join(_SUBCLASSES[group])}"
        return f"unknown key {key}{_suggest(option, options)}; {owner} accepts: {', '.join(options)}"
    if m := _CLASS_PROBLEM.search(message):  # e.g. a class_path that does not import
        return f"{group}: class_path '{m.group(1)}': {m.group(2).strip()}"
    if m := _TOP_OPTION.search(message):
        key = f"{m.group(1)}.{m.group(2)}" if m.group(1) else m.group(2)
        prefix = key.rpartition(".")[0]
        siblings = [k for k in known_keys if k.rpartition(".")[0] == prefix]
        group, _, rest = key.partition(".")
        top = [k for k in known_keys if "." not in k]
        if not siblings and group not in top:
            # a misspelt group (checkpoints.monitor, trainr.max_steps) has no siblings: the top level's keys instead
            near = difflib.get_close_matches(group, top, n=1)
            hint = f" (did you mean '{near[0]}.{rest}'?)" if near else ""
            return f"unknown key {key}{hint}; top level accepts: {', '.join(top)}"
        allowed = f"; {prefix or 'top level'} accepts: {', '.join(s.rpartition('.')[2] for s in siblings)}"
        return f"unknown key {key}{_suggest(key, siblings)}{allowed if siblings else ''}"
    if m := _TOP_VALUE.search(message):
        return f"bad value for {m.group(1)}: {m.group(2).strip()}"
    if (expected := _UNION_EXPECTED.findall(message)) and (given := _GIVEN_VALUE.search(message)):
        # a union of types (Lightning's precision: int or str literals, or None): what was given, what would do
        return f"bad value for {group}: {given.group(1)}; expected one of {' | '.join(map(_type_name, expected))}"
    if message.startswith("Unexpected config:") and (found := _not_a_mapping(_config_files(list(args)))):
        # jsonargparse's "Unexpected config: # my overrides" named no file
        file, content = found
        holds = "nothing (only comments?)" if content is None else f"a {type(content).__name__}"
        return f"{file} holds {holds}, not the keys of a config (trainer:, model:, data:, ...)"
    if message.startswith("Problems parsing config") and (mark := _YAML_MARK.search(message)):
        file = _unparsable(_config_files(list(args)))
        where = f"{file}, line" if file else "at line"
        return f"{message.strip().splitlines()[0]} (YAML syntax, {where} {mark.group(1)}, column {mark.group(2)})"
    return message.strip().splitlines()[0]


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser, printing config errors as one line (`--debug` on the lm command shows jsonargparse's
    full report)."""

    verbose_errors = False
    _args: list[str] = []

    def parse_args(self, args=None, *rest, **kwargs):
        self._args = list(sys.argv[1:] if args is None else args)  # to name a config file in an error
        if repeated := _repeated_key(_config_files(self._args)):
            raise LMError(repeated)
        if overridden := flag_a_later_config_overrides(self._args):
            raise LMError(overridden)
        try:
            return super().parse_args(args, *rest, **kwargs)
        except UnicodeDecodeError as e:
            # jsonargparse reads a config file as UTF-8 and lets the decode error through as a traceback: a checkpoint
            # given as --config (for --ckpt_path), a YAML saved in another encoding
            file = _not_text(_config_files(self._args)) or "a config file"
            raise LMError(
                f"{file}: not UTF-8 text ({e.reason} at byte {e.start}); a config is a YAML file (a checkpoint goes to "
                "--ckpt_path)"
            ) from None

    def error(self, message: str, ex: Exception | None = None):
        if self.verbose_errors or not getattr(self, "exit_on_error", True):
            return super().error(message, ex)  # inner parsers raise, and the outer one reports
        # the keys of the subcommands (fit, validate), where a config's keys go; not the root's own (subcommand, ...)
        parsers = _parsers(self)[1:] or [self]
        known = [a.dest for p in parsers for a in p._actions if a.dest and not a.dest.startswith("help")]
        known = list(dict.fromkeys(known))  # fit's and validate's parsers share most keys
        print(f"error: {explain(message, known, self._args).rstrip('.')}. See `lm fit --help`.", file=sys.stderr)
        sys.exit(2)


def _parsers(parser) -> list:
    """The parser and its subcommand parsers (`fit`, `validate`), if any."""
    parsers = [parser]
    action = getattr(parser, "_subcommands_action", None)
    if action is not None:
        parsers += list(action.choices.values())
    return parsers
