"""Shell completion generated from the parser, run in a real bash and a real zsh.

bash: the script is sourced (as printed by ``azaion-loader completion bash``, and through
bash-completion's on-demand loader from the path the package installs it at); COMP_WORDS and
COMP_CWORD are set as bash sets them, the function ``complete -p`` names is called and COMPREPLY
read back. zsh: ``zsh -n`` parses the script, and an interactive zsh on a pseudo-terminal (zpty)
presses Tab. Subcommands and options are taken from ``build_parser()``, never listed here.
Under CI=true a missing zsh or bash-completion fails instead of skipping.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import PROG, build_parser

REPO = Path(__file__).resolve().parent.parent
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")
TIMEOUT = 60

# Source the script ($1), then complete the words after it the way bash does: one line per
# candidate, after the line `complete -p` printed.
BASH_DRIVER = r"""
source "$1" || exit 3
shift
spec=$(complete -p azaion-loader) || exit 4
printf '%s\n' "$spec"
function=${spec#*-F }
function=${function%% *}
COMP_WORDS=("$@")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
COMP_LINE="$*"
COMP_POINT=${#COMP_LINE}
"$function" azaion-loader "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
for word in "${COMPREPLY[@]}"; do printf '%s\n' "$word"; done
"""

# With bash-completion loaded, let its default completion (`complete -D`) find the script by
# the command's name, as it does on a device for the first Tab after `azaion-loader`.
BASH_LOADER_DRIVER = r"""
source "$1" || exit 3
complete -p azaion-loader 2>/dev/null && exit 4
spec=$(complete -p -D) || exit 5
loader=${spec#*-F }
loader=${loader%% *}
"$loader" azaion-loader "" azaion-loader
complete -p azaion-loader
"""

# An interactive zsh on a pseudo-terminal with compinit and the script's directory ($1) in
# $fpath types line $2 and Tab; compadd prints each candidate as "HIT: word". Markers (READY,
# DONE, the prompt "zz> ") are spelled so that the echo of the typed commands never matches.
# The line is typed only once the prompt shows: before, the terminal is still in cooked mode
# and would take Ctrl-U as its own line kill.
ZSH_DRIVER = r"""
zmodload zsh/zpty || exit 3
zpty shell zsh -f -i
zpty -w shell "PS1='z%(?..)z> '; fpath=(${(q)1} \$fpath); autoload -Uz compinit; compinit -u -D"
zpty -w shell 'compadd() {
    if [[ ${@[1,(i)(-|--)]} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return; fi
    local -a hits; local hit; builtin compadd -A hits "$@"
    for hit in $hits; do print -r -- "${(U):-hit}: $hit"; done
}'
zpty -w shell 'print -r -- "${(U):-ready}"'
zpty -r shell output '*READY*zz> *'
zpty -w -n shell "$2"$'\t\C-u'
zpty -w shell 'print -r -- "${(U):-done}"'
zpty -r shell output '*DONE*'
print -r -- "$output"
zpty -d shell
"""


def require(program: str | None, what: str, package: str) -> str:
    """``program`` if found; else skip, or under CI=true fail, naming the Debian package."""
    if program:
        return program
    message = f"needs {what} (apt-get install {package})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's subcommands (argparse keeps them in its list of actions)."""
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions for name in action.option_strings}


COMMANDS = subcommands(build_parser())


@pytest.fixture(scope="module")
def scripts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both scripts, as the CLI prints them, at the paths the package installs them at."""
    root = tmp_path_factory.mktemp("completion")
    paths = {
        "bash": root / "usr/share/bash-completion/completions" / PROG,
        "zsh": root / "usr/share/zsh/vendor-completions" / f"_{PROG}",
    }
    for shell, path in paths.items():
        result = subprocess.run(
            [sys.executable, "-m", "agent", "completion", shell],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert result.returncode == 0, result.stderr
        path.parent.mkdir(parents=True)
        path.write_text(result.stdout)
    return paths


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Where the completions run: two files and a directory to offer."""
    (tmp_path / "alpha.key").write_text("")
    (tmp_path / "beta.enc").write_text("")
    (tmp_path / "models").mkdir()
    return tmp_path


def bash_complete(script: Path, *words: str, cwd: Path = REPO) -> list[str]:
    """What Tab offers after ``azaion-loader WORDS...`` (the last word is the one completed)."""
    bash = require(shutil.which("bash"), "bash", "bash")
    result = subprocess.run(
        [bash, "--norc", "--noprofile", "-c", BASH_DRIVER, "bash", str(script), PROG, *words],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    spec, *candidates = result.stdout.splitlines()
    assert spec.startswith("complete -F ") and spec.endswith(f" {PROG}"), spec
    return candidates


def zsh_complete(script: Path, line: str, cwd: Path = REPO) -> list[str]:
    zsh = require(shutil.which("zsh"), "zsh", "zsh")
    result = subprocess.run(
        [zsh, "-f", "-c", ZSH_DRIVER, "zsh", str(script.parent), line],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "TERM": "xterm", "HOME": str(cwd)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    hits = (line.split("HIT: ", 1)[1] for line in result.stdout.splitlines() if "HIT: " in line)
    return sorted({hit.strip() for hit in hits})


# -- bash ----------------------------------------------------------------------------------------


def test_bash_completes_a_subcommand_and_an_option(scripts: dict[str, Path]) -> None:
    assert bash_complete(scripts["bash"], "st") == ["status"]
    assert bash_complete(scripts["bash"], "load", "--fo") == ["--folder"]
    assert bash_complete(scripts["bash"], "completion", "") == ["bash", "zsh"]


def test_bash_offers_every_subcommand_and_every_option(scripts: dict[str, Path]) -> None:
    assert sorted(bash_complete(scripts["bash"], "")) == sorted(COMMANDS)
    for name, parser in COMMANDS.items():
        offered = bash_complete(scripts["bash"], name, "-")
        assert set(offered) == option_strings(parser), name


# As bash splits the line: --opt=value is three words; the last word is the one completed.
@pytest.mark.parametrize(
    "words",
    [
        ("keygen", "--out", ""),  # FILE
        ("encrypt", "--key-fragment", ""),  # FILE
        ("encrypt", "--key-fragment", "k", ""),  # IN
        ("decrypt", "--key-fragment", "=", "k", "in", ""),  # OUT
        ("upload", ""),  # FILE
        ("load", "model.bin", "-o", ""),  # OUT
        ("pack-images", "--out", ""),  # ARCHIVE
        ("pack-images", "--out", "=", ""),  # ARCHIVE, --out=<Tab>
        ("pack-images", "--fragment-out", ""),  # FILE
    ],
)
def test_bash_completes_file_arguments_with_paths(
    scripts: dict[str, Path], workdir: Path, words: tuple[str, ...]
) -> None:
    offered = bash_complete(scripts["bash"], *words, cwd=workdir)
    assert sorted(offered) == ["alpha.key", "beta.enc", "models"]
    if words[-2] != "=":
        assert bash_complete(scripts["bash"], *words[:-1], "al", cwd=workdir) == ["alpha.key"]


def test_bash_completes_directories_only_for_a_directory(
    scripts: dict[str, Path], workdir: Path
) -> None:
    assert bash_complete(scripts["bash"], "dev-api", "--data-dir", "", cwd=workdir) == ["models"]


def test_bash_offers_nothing_for_a_value_it_cannot_know(
    scripts: dict[str, Path], workdir: Path
) -> None:
    assert bash_complete(scripts["bash"], "login", "--email", "", cwd=workdir) == []
    assert bash_complete(scripts["bash"], "load", "--folder", "", cwd=workdir) == []


def test_bash_completion_loads_on_demand_from_the_package_path(
    scripts: dict[str, Path], tmp_path: Path
) -> None:
    loader = require(
        str(BASH_COMPLETION) if BASH_COMPLETION.exists() else None,
        str(BASH_COMPLETION),
        "bash-completion",
    )
    share = scripts["bash"].parents[2]  # .../usr/share, as /usr/share in XDG_DATA_DIRS
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", BASH_LOADER_DRIVER, "bash", loader],
        env={
            **os.environ,
            "XDG_DATA_DIRS": str(share),
            "BASH_COMPLETION_USER_DIR": str(tmp_path / "none"),
        },
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    loaded = result.stdout.splitlines()[-1]
    assert loaded.startswith("complete -F ") and loaded.endswith(f" {PROG}"), result.stdout


# -- zsh -----------------------------------------------------------------------------------------


def test_zsh_script_parses(scripts: dict[str, Path]) -> None:
    zsh = require(shutil.which("zsh"), "zsh", "zsh")
    result = subprocess.run(
        [zsh, "-n", str(scripts["zsh"])], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    assert scripts["zsh"].read_text().startswith(f"#compdef {PROG}\n")


def test_zsh_completes_subcommands_options_and_paths(
    scripts: dict[str, Path], workdir: Path
) -> None:
    script = scripts["zsh"]
    assert zsh_complete(script, f"{PROG} st", workdir) == ["status"]
    assert zsh_complete(script, f"{PROG} load --fo", workdir) == ["--folder"]
    assert zsh_complete(script, f"{PROG} ", workdir) == sorted(COMMANDS)
    assert zsh_complete(script, f"{PROG} keygen --out ", workdir) == [
        "alpha.key",
        "beta.enc",
        "models",
    ]
    assert zsh_complete(script, f"{PROG} dev-api --data-dir ", workdir) == ["models"]


def test_zsh_offers_every_option_of_every_subcommand(scripts: dict[str, Path]) -> None:
    for name, parser in COMMANDS.items():
        assert set(zsh_complete(scripts["zsh"], f"{PROG} {name} -")) == option_strings(parser)


def test_every_subcommand_is_in_both_scripts(scripts: dict[str, Path]) -> None:
    bash, zsh = scripts["bash"].read_text(), scripts["zsh"].read_text()
    for name in COMMANDS:
        assert f"\n    {name})\n" in bash, name  # its branch of the spec function
        assert f"\n        ({name})\n" in zsh, name  # its branch of the arguments
        assert f"\n        '{name}:" in zsh, name  # its line in the list of commands
