"""Shell completion for bash and zsh: commands, flags, recipe files and ``--set`` recipe keys.

The script is generated once from the command line's argparse parser by shtab, with the
recipe's dotted keys (``ember.recipe_keys``) written into it, so a TAB answers at once and
never starts Python (ember imports torch: about 2 s). After an upgrade that adds commands or
keys, generate it again. Nothing here is imported by ``ember --help`` or ``import ember``.

Example::

    script = completion_script(build_parser(), "bash")   # ember completion bash > ~/.ember-complete.bash
    "train.max_steps=" in script                         # True
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from ember.errors import EmberError

SHELLS = ("bash", "zsh")
RECIPE_ARGS = ("recipe", "student", "space")  # positional arguments naming a YAML file
# bash appends a space after the one completion left; not after "train.max_steps=", where the value follows.
_BASH_NO_SPACE_AFTER_EQUALS = """
# ember: no space after a completed `--set` key (KEY=), so its value can follow at once
_ember_complete() {
  _shtab_ember "$@"
  if [[ ${#COMPREPLY[@]} -eq 1 && ${COMPREPLY[0]} == *= ]]; then
    compopt -o nospace 2>/dev/null || :
  fi
}
complete -o bashdefault -F _ember_complete ember
"""


def recipe_keys(section: str = "") -> list[str]:
    """Every key ``--set`` takes, as ``section.key`` (``plugins.NAME.key`` for plugin entries); with
    ``section``, the keys of that section without its name (``ember data prepare --set clean.min_chars=``)."""
    from ember.config import Recipe
    from ember.recipe_keys import dotted_keys, section_at

    return list(dotted_keys(section_at(Recipe, [section]) if section else Recipe))


# Commands whose --set names keys of one section, without the section's name.
SECTION_OVERRIDES = {("data", "prepare"): "data"}


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (bash or zsh) of the ``ember`` command ``parser`` builds:
    subcommands and flags from the parser, YAML files for recipe arguments, recipe keys after ``--set``.

    Example::

        completion_script(build_parser(), "zsh").startswith("#compdef ember")  # True
    """
    if shell not in SHELLS:
        raise EmberError(f"ember completion knows the shells {' and '.join(SHELLS)}, not {shell!r}.")
    try:
        import shtab
    except ImportError:
        raise EmberError(
            "ember completion needs the package shtab, a dependency of ember that is missing here; "
            "install it with `pip install shtab` (or reinstall ember)."
        ) from None
    recipe_files = shtab.glob("*.yaml", "*.yml")
    for command, action in _all_actions(parser):
        if "--set" in action.option_strings:
            section = SECTION_OVERRIDES.get(command, "")
            keys = [f"{key}=" for key in recipe_keys(section)]
            action.complete = _keys_completer(keys, f"_ember_{section or 'recipe'}_keys")  # type: ignore[attr-defined]
        elif command == ("recipe", "explain") and action.dest == "key":
            action.complete = _keys_completer(_explainable(), "_ember_explain_keys")  # type: ignore[attr-defined]
        elif not action.option_strings and action.dest in RECIPE_ARGS:
            action.complete = recipe_files  # type: ignore[attr-defined]
    script = shtab.complete(parser, shell=shell)
    return script + _BASH_NO_SPACE_AFTER_EQUALS if shell == "bash" else script


def _explainable() -> list[str]:
    """What ``ember recipe explain`` takes: the sections, ``base`` and every key."""
    from ember.config import Recipe

    return ["base", *Recipe.model_fields, *recipe_keys()]


def _keys_completer(keys: list[str], function: str) -> dict:
    """shtab's custom completion: a shell function named ``function`` listing ``keys``; zsh adds
    no space after a key ending in ``=`` (bash: ``_ember_complete``)."""
    words = " ".join(keys)
    suffix = "-S '' " if keys and keys[0].endswith("=") else ""
    return {
        "bash": function,
        "zsh": function,
        "preamble": {
            "bash": f'{function}() {{\n  compgen -W "{words}" -- "$1"\n}}\n',
            "zsh": f"{function}() {{\n  local -a keys=({words})\n  compadd {suffix}-- $keys\n}}\n",
        },
    }


def _all_actions(
    parser: argparse.ArgumentParser, command: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.Action]]:
    """Every argument of ``parser`` and of its subcommands at any depth, with the subcommand's names."""
    for action in parser._actions:
        yield command, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_actions(sub, (*command, name))
