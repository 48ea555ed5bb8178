"""Write the generated tables of docs/configuration.md from the code, so the page cannot drift from it.

The flag table comes from the `--kv-*` argument group exactly as `vllm serve --help=infokv` builds it
(`infokv_vllm.cli.add_cli_args` on a plain argparse parser: flag, choices, help text), with each flag's
`additional_config` key and default read from its field (`CompressionConfig`'s, or a policy's); the policy table
from the registry (`scoring.POLICIES`); the per-request table from `REQUEST_SETTINGS`.
Everything between the `<!-- generated: NAME -->` and `<!-- end generated: NAME -->` markers is replaced; the prose
around them is hand-written.

    .venv/bin/python scripts/gen_config_docs.py           # rewrite docs/configuration.md
    .venv/bin/python scripts/gen_config_docs.py --check   # exit 1 if the page is not what the code generates

`tests/test_docs.py` runs the check in CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def _cell(text: str) -> str:
    """Help text as one Markdown table cell: argparse's `%%` unescaped, pipes escaped, whitespace folded."""
    return " ".join(text.replace("%%", "%").replace("|", "\\|").split())


def _flag_actions() -> list[argparse.Action]:
    from infokv_vllm.cli import CLI_GROUP_TITLE, add_cli_args

    parser = argparse.ArgumentParser(add_help=False)
    add_cli_args(parser)
    group = next(group for group in parser._action_groups if group.title == CLI_GROUP_TITLE)
    return list(group._group_actions)


def flag_table() -> str:
    from infokv_vllm.config import flag_name
    from infokv_vllm.cli import flag_settings

    fields = {flag_name(name): field for name, (_, field, _) in flag_settings().items()}
    rows = ["| flag | `additional_config` key | default | values | meaning |", "| --- | --- | --- | --- | --- |"]
    for action in _flag_actions():
        flag = next(option for option in action.option_strings if option in fields)
        field = fields[flag]
        if isinstance(action, argparse.BooleanOptionalAction):
            shown, values = f"`{flag}`, `--no-{flag[2:]}`", "switch"
        elif action.choices is not None:
            shown, values = f"`{flag}`", ", ".join(f"`{choice}`" for choice in action.choices)
        else:
            shown, values = f"`{flag} {action.metavar}`", action.type.__name__
        if field.default is None:
            default = "–"
        else:
            default = f"`{str(field.default).lower() if isinstance(field.default, bool) else field.default}`"
        # The help ends with argparse's " Default: ..." suffix; the default has its own column.
        meaning = re.sub(r" Default: [^ ]+\.$", "", action.help)
        rows.append(f"| {shown} | `{field.name}` | {default} | {values} | {_cell(meaning)} |")
    return "\n".join(rows)


# What each request key accepts, in words. A key of REQUEST_SETTINGS without an entry here stops the generator, so a
# new per-request setting cannot reach the code without reaching the page.
REQUEST_VALUES = {
    "kv_compression": ('`"none"` (or the server\'s method)', "`none`: this request keeps its full KV cache"),
    "kv_budget": ("integer > sinks + window", "KV tokens this request keeps (replaces the server's budget and ratio)"),
    "kv_budget_ratio": ("number in (0, 1]", "keep this fraction of the request's length instead; given with "
                                            "`kv_budget`, that is its floor"),
    "kv_keep_prompt": ("true / false", "keep this request's whole prompt beside its budget"),
}


def request_table() -> str:
    from infokv_vllm.config import REQUEST_SETTINGS, flag_name

    missing = sorted(set(REQUEST_SETTINGS) - set(REQUEST_VALUES))
    if missing:
        raise SystemExit(f"scripts/gen_config_docs.py: describe the request keys {missing} in REQUEST_VALUES")
    rows = ["| request key | value | meaning | overrides the server's |", "| --- | --- | --- | --- |"]
    for key, setting in REQUEST_SETTINGS.items():
        value, meaning = REQUEST_VALUES[key]
        rows.append(f"| `{key}` | {value} | {meaning} | `{flag_name(setting)}` (`{setting}`) |")
    return "\n".join(rows)


def policy_table() -> str:
    from infokv_vllm.config import flag_name
    from infokv_vllm.scoring import POLICIES

    rows = ["| `--kv-compression` | what it keeps | its parameters |", "| --- | --- | --- |",
            "| `none` | everything: vLLM unchanged (the default) | – |"]
    for name, cls in POLICIES.items():
        parameters = ", ".join(f"`{flag_name(field.name)}`" for field in dataclasses.fields(cls)) or "–"
        rows.append(f"| `{name}` | {_cell(cls.summary)} | {parameters} |")
    return "\n".join(rows)


TABLES = {"flags": flag_table, "policies": policy_table, "request-settings": request_table}


def render(page: str) -> str:
    """`page` with every generated block replaced by what the code generates now."""
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- generated: {name} [^\n]*-->\n).*?(<!-- end generated: {name} -->)", re.S)
        if not pattern.search(page):
            raise SystemExit(f"{PAGE}: no generated block named {name!r}")
        page = pattern.sub(lambda match: match.group(1) + make() + "\n" + match.group(2), page)
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    parser.add_argument("--page", type=Path, default=PAGE)
    args = parser.parse_args(argv)
    current = args.page.read_text()
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(f"{args.page} is out of date: run .venv/bin/python scripts/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
