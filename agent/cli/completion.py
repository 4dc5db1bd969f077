"""``completion bash|zsh``: shell completion scripts generated from the argument parser.

The parser is the one description of the command line: ``describe`` reads its subcommands,
their options and which arguments name files, and each shell's writer pours that into a
template, so a new subcommand or option completes without a change here. An argument completes
file names when its type is ``Path`` or its metavar names a file (``FILE``, ``IN``, ``OUT``,
``ARCHIVE``, ``KEY``, ``PATH``), directories when its metavar is ``DIR``, and its choices when
it has some; other values (an e-mail, a folder on the Resource API) complete nothing.

The Debian package ships both scripts (packaging/build-deb.sh):
``/usr/share/bash-completion/completions/azaion-loader`` and
``/usr/share/zsh/vendor-completions/_azaion-loader``.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

SHELLS = ("bash", "zsh")
FILE_METAVARS = frozenset({"FILE", "IN", "OUT", "ARCHIVE", "KEY", "PATH"})
DIR_METAVARS = frozenset({"DIR"})
# What a value completes to (Argument.values): file names, directories, the choices, nothing.
FILES, DIRS, CHOICES, NOTHING = "file", "dir", "choices", ""
PLAIN_WORD = re.compile(r"[A-Za-z0-9_.+-]+")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print the completion script for SHELL, generated from this command's own "
        "arguments. The package installs both; by hand: `source <(azaion-loader completion "
        "bash)` in ~/.bashrc, or save the zsh one as _azaion-loader in a directory of $fpath.",
    )
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=cmd_completion)


def cmd_completion(args: argparse.Namespace) -> int:
    from agent.cli import build_parser  # the whole command line, this command included

    print(script(args.shell, build_parser()), end="")
    return 0


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    program = describe(parser)
    return bash_script(program) if shell == "bash" else zsh_script(program)


# ---------------------------------------------------------------------------------------------
# What the parser accepts


@dataclass(frozen=True)
class Argument:
    """One option (``names`` set) or positional argument, as a completion sees it."""

    names: tuple[str, ...]
    label: str  # the metavar
    help: str
    takes_value: bool
    repeats: bool  # an option given more than once, or a positional taking several words
    values: str  # FILES, DIRS, CHOICES or NOTHING
    choices: tuple[str, ...]
    alone: bool  # --help, --version: nothing else goes with it


@dataclass(frozen=True)
class Command:
    name: str  # "" for the program itself
    help: str
    arguments: tuple[Argument, ...]

    @property
    def options(self) -> tuple[Argument, ...]:
        return tuple(arg for arg in self.arguments if arg.names)

    @property
    def positionals(self) -> tuple[Argument, ...]:
        return tuple(arg for arg in self.arguments if not arg.names)


@dataclass(frozen=True)
class Program:
    name: str
    root: Command  # the program's own options
    commands: tuple[Command, ...]


def describe(parser: argparse.ArgumentParser) -> Program:
    # argparse has no public way to walk a parser: its actions are the one record of it.
    root = Command("", parser.description or "", _arguments(parser))
    commands: list[Command] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                commands.append(Command(name, _one_line(helps.get(name)), _arguments(subparser)))
    return Program(parser.prog, root, tuple(commands))


def _arguments(parser: argparse.ArgumentParser) -> tuple[Argument, ...]:
    return tuple(
        _argument(action)
        for action in parser._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction)
    )


def _argument(action: argparse.Action) -> Argument:
    label = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    choices = tuple(str(choice) for choice in action.choices or ())
    if choices:
        values = CHOICES
    elif label.upper() in DIR_METAVARS:
        values = DIRS
    elif label.upper() in FILE_METAVARS or action.type is Path:
        values = FILES
    else:
        values = NOTHING
    return Argument(
        names=tuple(action.option_strings),
        label=label,
        help=_one_line(action.help),
        takes_value=action.nargs != 0,
        repeats=isinstance(action, argparse._AppendAction)
        or action.nargs in (argparse.ONE_OR_MORE, argparse.ZERO_OR_MORE),
        values=values,
        choices=choices,
        alone=isinstance(action, argparse._HelpAction | argparse._VersionAction),
    )


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split()).replace("%%", "%")


# ---------------------------------------------------------------------------------------------
# bash

BASH_TEMPLATE = """\
# bash completion for @PROG@                                       -*- shell-script -*-
# Generated from its argument parser by `@PROG@ completion bash`: do not edit.
# Installed as /usr/share/bash-completion/completions/@PROG@; by hand:
#   source <(@PROG@ completion bash)

@FN@_spec() { # the arguments of command $1 ("" for @PROG@ itself)
    case $1 in
@SPECS@
    *) options="" takes_value="" positionals="" repeats="" ;;
    esac
}

@FN@_kind() { # if option $1 takes a value, kind = what the value completes to
    local pair
    for pair in $takes_value; do
        if [[ ${pair%%=*} == "$1" ]]; then
            kind=${pair#*=}
            return 0
        fi
    done
    return 1
}

@FN@_position() { # n = positional words from index $1 to the cursor, first = where
    local j=$1 word kind
    n=0
    while ((j < COMP_CWORD)); do
        word=${COMP_WORDS[j]}
        if [[ ${COMP_WORDS[j + 1]-} == = ]]; then # --opt=value (bash splits words at '=')
            j=$((j + 3))
        elif @FN@_kind "$word"; then # an option and its value
            j=$((j + 2))
        else
            if [[ $word != -* ]]; then
                ((n == 0)) && first=$j
                n=$((n + 1))
            fi
            j=$((j + 1))
        fi
    done
}

@FN@_complete() { # COMPREPLY = what starts with $cur among kind $1 (file, dir, words:A,B)
    local words
    case $1 in
    file) compopt -o filenames 2>/dev/null # quoted and marked like file names
        mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
    dir) compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
    words:*) words=${1#words:}
        mapfile -t COMPREPLY < <(compgen -W "${words//,/ }" -- "$cur") ;;
    esac
}

@FN@() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD - 1]-}
    if [[ $cur == = ]]; then # --opt=<TAB>: complete the value of --opt
        cur=""
    elif [[ $prev == = ]]; then
        prev=${COMP_WORDS[COMP_CWORD - 2]-}
    fi
    local options takes_value positionals repeats n=0 first=0 kind
    COMPREPLY=()
    @FN@_spec ""
    @FN@_position 1
    if ((n > 0)); then # the first positional word is the command
        @FN@_spec "${COMP_WORDS[first]}"
        @FN@_position $((first + 1))
    fi
    if @FN@_kind "$prev"; then
        @FN@_complete "$kind"
    elif [[ $cur == -* ]]; then
        @FN@_complete "words:${options// /,}"
    else
        local -a kinds=($positionals)
        if ((n < ${#kinds[@]})); then
            @FN@_complete "${kinds[n]}"
        elif [[ -n $repeats ]]; then
            @FN@_complete "${kinds[-1]}"
        else # no argument left to give: the options
            @FN@_complete "words:${options// /,}"
        fi
    fi
    return 0
}

complete -F @FN@ @PROG@
"""


def bash_script(program: Program) -> str:
    names = [_plain(command.name) for command in program.commands]
    specs = [_bash_spec('""', program.root, ["words:" + ",".join(names)])] + [
        _bash_spec(name, command, [_bash_kind(arg) for arg in command.positionals])
        for name, command in zip(names, program.commands, strict=True)
    ]
    function = "_" + re.sub(r"\W", "_", program.name)
    return (
        BASH_TEMPLATE.replace("@SPECS@", "\n".join(specs))
        .replace("@FN@", function)
        .replace("@PROG@", program.name)
    )


def _bash_spec(pattern: str, command: Command, positionals: list[str]) -> str:
    options = [name for arg in command.options for name in arg.names]
    takes_value = [
        f"{name}={_bash_kind(arg)}"
        for arg in command.options
        if arg.takes_value
        for name in arg.names
    ]
    repeats = "1" if command.positionals and command.positionals[-1].repeats else ""
    return (
        f"    {pattern})\n"
        f'        options="{" ".join(map(_plain, options))}"\n'
        f'        takes_value="{" ".join(takes_value)}"\n'
        f'        positionals="{" ".join(positionals)}"\n'
        f'        repeats="{repeats}"\n'
        "        ;;"
    )


def _bash_kind(arg: Argument) -> str:
    if arg.values == CHOICES:
        return "words:" + ",".join(map(_plain, arg.choices))
    return arg.values or "-"


def _plain(word: str) -> str:
    """A word the scripts can hold without quoting (names, choices)."""
    if not PLAIN_WORD.fullmatch(word):
        raise ValueError(f"{word!r} cannot be completed: use letters, digits and . _ + -")
    return word


# ---------------------------------------------------------------------------------------------
# zsh

ZSH_TEMPLATE = """\
#compdef @PROG@
# zsh completion for @PROG@, generated from its argument parser by
# `@PROG@ completion zsh`: do not edit.
# Installed as /usr/share/zsh/vendor-completions/_@PROG@; by hand: save it as
# _@PROG@ in a directory of $fpath before compinit runs.

_@PROG@() {
    local curcontext=$curcontext state state_descr line ret=1
    typeset -A opt_args
    _arguments -C -S \\
@ROOT@
        '1:command:_@PROG@_commands' \\
        '*:: :->argument' && ret=0
    if [[ $state == argument ]]; then
        curcontext=${curcontext%:*:*}:@PROG@-$words[1]:
        case $words[1] in
@COMMANDS@
        esac
    fi
    return ret
}

_@PROG@_commands() {
    local -a commands
    commands=(
@DESCRIPTIONS@
    )
    _describe -t commands '@PROG@ command' commands
}

if [[ $funcstack[1] == _@PROG@ ]]; then
    _@PROG@ "$@"
else
    compdef _@PROG@ @PROG@
fi
"""


def zsh_script(program: Program) -> str:
    root = "".join(f"        {spec} \\\n" for spec in _zsh_specs(program.root)).rstrip("\n")
    commands = "\n".join(
        f"        ({_plain(command.name)})\n"
        "            _arguments -S \\\n"
        + "".join(f"                {spec} \\\n" for spec in _zsh_specs(command))
        + "                && ret=0\n"
        "            ;;"
        for command in program.commands
    )
    descriptions = "\n".join(
        "        " + _zsh_quote(f"{_plain(command.name)}:{command.help}")
        for command in program.commands
    )
    return (
        ZSH_TEMPLATE.replace("@ROOT@", root)
        .replace("@COMMANDS@", commands)
        .replace("@DESCRIPTIONS@", descriptions)
        .replace("@PROG@", program.name)
    )


def _zsh_specs(command: Command) -> list[str]:
    specs = [_zsh_option(arg) for arg in command.options]
    for index, arg in enumerate(command.positionals, start=1):
        position = "*" if arg.repeats else str(index)
        specs.append(_zsh_quote(f"{position}:{_zsh_message(arg.label)}:{_zsh_action(arg)}"))
    return specs


def _zsh_option(arg: Argument) -> str:
    """``'(-o --output)'{-o,--output}'[help]:OUT:_files'``: names, exclusions, value."""
    names = [_plain(name) for name in arg.names]
    if arg.alone:
        exclusions = "(- *)"  # nothing else after --help or --version
    elif arg.repeats:
        exclusions = "*"  # may be given again
    elif len(names) > 1:
        exclusions = f"({' '.join(names)})"  # one spelling excludes the others
    else:
        exclusions = ""
    spec = f"[{_zsh_description(arg.help)}]" if arg.help else ""
    if arg.takes_value:
        spec += f":{_zsh_message(arg.label)}:{_zsh_action(arg)}"
    spelled = names[0] if len(names) == 1 else "{" + ",".join(names) + "}"
    return (_zsh_quote(exclusions) if exclusions else "") + spelled + _zsh_quote(spec)


def _zsh_action(arg: Argument) -> str:
    if arg.values == CHOICES:
        return "(" + " ".join(map(_plain, arg.choices)) + ")"
    if arg.values == DIRS:
        return "_path_files -/"  # directories only (_files -/ falls back to all files)
    if arg.values == FILES:
        return "_files"
    return " "  # a value to type: its message is shown, nothing is completed


def _zsh_description(text: str) -> str:
    return re.sub(r"([\\\[\]])", r"\\\1", text)


def _zsh_message(text: str) -> str:
    return re.sub(r"([\\:])", r"\\\1", text)


def _zsh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
