"""The documentation stays true: links resolve, the flag table is the code's, the quick start runs, and the
Grafana dashboard asks only for metrics a running server serves.

The static checks take a second or two. The e2e checks run the README's offline snippet (one eager engine in a
subprocess), then start the README's `vllm serve` command (eager) once, run the README's OpenAI client snippet
against it and read its `/metrics` for every metric the dashboard plots.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"
DASHBOARD = DOCS / "grafana" / "infokv-dashboard.json"

LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_SOURCE = re.compile(r"<(?:img|a)\s[^>]*(?:src|href)=\"([^\"]+)\"")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def pages() -> list[Path]:
    return [README, ROOT / "CHANGELOG.md", *sorted(DOCS.rglob("*.md"))]


def prose(path: Path) -> str:
    """A page without its code blocks (a `[x](y)` inside code is not a link)."""
    return FENCE.sub("", path.read_text())


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path).splitlines() if line.startswith("#")}


def links(path: Path) -> list[str]:
    text = prose(path)
    return LINK.findall(text) + HTML_SOURCE.findall(text)


def broken_links(path: Path) -> list[str]:
    """The links and image paths of one page that do not resolve (files, folders and `#anchors` in this
    repository; web links are not fetched)."""
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target} (no {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    return broken


def test_every_page_links_only_to_what_exists():
    assert (broken := {str(path.relative_to(ROOT)): broken_links(path) for path in pages()
                       if broken_links(path)}) == {}, broken


def test_the_link_check_sees_a_broken_link_and_a_broken_anchor(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](page.md#title) [gone](missing.md) ![plot](missing.png) [bad](#nowhere)\n"
                    "```\n[in code](not-checked.md)\n```\n")
    assert [entry.split(" ")[0] for entry in broken_links(page)] == ["missing.md", "missing.png", "#nowhere"]


def cited_results() -> set[Path]:
    """The files and folders under benchmarks/results/ that a page names (as a link, an image or in text)."""
    text = "\n".join(path.read_text() for path in pages())
    return {RESULTS / name.rstrip("/") for name in re.findall(r"benchmarks/results/([\w.\-/]+)", text)}


def uncited_results() -> list[str]:
    """Result files no page cites; a file inside a cited folder is cited with it. Smoke outputs are not kept."""
    tracked = subprocess.run(["git", "ls-files", str(RESULTS)], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    cited = cited_results()
    return sorted(name for name in tracked
                  if not any((ROOT / name) == path or path in (ROOT / name).parents for path in cited))


def test_every_result_file_is_cited_by_a_page():
    """A result that no page cites is superseded: it leaves benchmarks/results/ (git keeps it)."""
    assert uncited_results() == []


def test_the_readme_has_no_dated_narrative():
    """The README says what is true now; dates belong to results (with their machine) and the changelog."""
    text = prose(README)
    for phrase in ("this morning", "in git history", "before this change", "this session", "issue "):
        assert phrase not in text.lower(), phrase
    assert len(README.read_text().splitlines()) <= 260
    assert "../shared" not in "\n".join(path.read_text() for path in pages())


# --- the flag table ------------------------------------------------------------------------------------------


@cache
def config_docs():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_what_the_code_generates():
    page = (DOCS / "configuration.md").read_text()
    assert config_docs().render(page) == page, "run .venv/bin/python scripts/gen_config_docs.py"


def test_the_generated_table_has_every_flag_and_choice_of_the_cli_group():
    from infokv_vllm.config import REQUEST_SETTINGS, method_names

    page = (DOCS / "configuration.md").read_text()
    for action in config_docs()._flag_actions():
        assert f"`{action.option_strings[0]}" in page, action.option_strings
        for choice in action.choices or ():
            assert f"`{choice}`" in page, (action.option_strings, choice)
    # The methods table names exactly the `--kv-compression` choices.
    methods = re.findall(r"^\| `(\w+)` \|", page.split("## Methods", 1)[1].split("\n## ", 1)[0], re.M)
    assert methods and sorted(methods) == sorted(method_names())
    for key in REQUEST_SETTINGS:
        assert f"| `{key}` |" in page


def test_the_flag_check_sees_a_stale_table():
    page = (DOCS / "configuration.md").read_text()
    stale = page.replace("| `--kv-sinks SINKS` | `sinks` | `4` |", "| `--kv-sinks SINKS` | `sinks` | `8` |")
    assert stale != page and config_docs().render(stale) == page


def test_every_kv_flag_the_pages_mention_exists(vllm_plugins_loaded, monkeypatch):
    """A flag renamed in the code cannot live on in the prose: every `--kv-...` / `--no-kv-...` the pages
    mention is one of ours or one of vLLM's `vllm serve` flags (with the example policy of docs/adding-a-policy.md
    registered, whose flags that page shows)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from infokv_vllm.scoring import POLICIES
    from tests.test_policy_registry import guide_policy

    monkeypatch.setitem(POLICIES, guide_policy().name, guide_policy())

    known = {option for action in make_arg_parser(FlexibleArgumentParser())._actions
             for option in action.option_strings}
    mentioned = set()
    for path in pages():
        if path.name != "CHANGELOG.md":  # history may name flags that are gone
            mentioned |= set(re.findall(r"(--(?:no-)?kv-[a-z0-9-]*[a-z0-9])", path.read_text()))
    assert mentioned and mentioned <= known, sorted(mentioned - known)


# --- the Grafana dashboard ------------------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs and all(exprs)
    return {name for expr in exprs for name in re.findall(r"\b((?:infokv|vllm):[a-zA-Z_:]+)", expr)}


def test_the_dashboard_plots_every_infokv_metric():
    """Every series `infokv_vllm/metrics.py` declares has a panel (the e2e test below checks the server serves
    every series a panel asks for)."""
    from infokv_vllm import metrics

    source = Path(metrics.__file__).read_text()
    declared = (set(re.findall(r'per_engine\(\w+, "(\w+)"', source))
                | set(re.findall(r'METRIC_PREFIX \+ "(\w+)"', source)))
    plotted = {name.removeprefix("infokv:").removesuffix("_total") for name in dashboard_metrics()
               if name.startswith("infokv:")}
    assert len(declared) == 9 and declared == plotted, (declared, plotted)


# --- the quick start, run --------------------------------------------------------------------------------------

EAGER_LLM = """
import vllm
_LLM = vllm.LLM
vllm.LLM = lambda *args, **kwargs: _LLM(*args, enforce_eager=True, **kwargs)  # the test skips compilation
"""


@pytest.mark.e2e
def test_the_offline_snippet_runs(smollm2_dir):
    """Before the server below starts: never two engines at once."""
    snippet = next(block for block in code_blocks(README, "python") if "from vllm import LLM" in block)
    done = subprocess.run([sys.executable, "-c", EAGER_LLM + snippet], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "MODEL": str(smollm2_dir), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip(), done.stderr[-4000:]


def readme_serve_flags() -> list[str]:
    """The flags of the README's `vllm serve "$MODEL" ...` command."""
    command = next(block for block in code_blocks(README, "bash") if 'vllm serve "$MODEL"' in block)
    words = shlex.split(command.split("vllm serve", 1)[1].replace("\\\n", " "))
    assert words[0] == "$MODEL"
    return words[1:]


@pytest.fixture(scope="module")
def readme_server(smollm2_dir, tmp_path_factory):
    from infokv_testing.local_server import EAGER, vllm_server

    log = tmp_path_factory.mktemp("docs") / "vllm-serve.log"
    with vllm_server(smollm2_dir, [*readme_serve_flags(), *EAGER], log, base_flags=[]) as url:
        yield url


@pytest.mark.e2e
def test_the_openai_snippet_runs_against_the_readme_server(readme_server):
    snippet = next(block for block in code_blocks(README, "python") if "OpenAI(" in block)
    assert "http://127.0.0.1:8000" in snippet
    done = subprocess.run([sys.executable, "-c", snippet.replace("http://127.0.0.1:8000", readme_server)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip()


@pytest.mark.e2e
def test_every_dashboard_metric_is_on_the_servers_metrics(readme_server, smollm2_dir):
    from openai import OpenAI
    from prometheus_client.parser import text_string_to_metric_families

    # A prompt longer than the budget: the server compacts it, so the counters have moved, not only exist.
    client = OpenAI(base_url=readme_server + "/v1", api_key="unused")
    client.completions.create(model=str(smollm2_dir), prompt="The grass is green. The sky is blue. " * 40,
                              max_tokens=8, temperature=0)
    with urllib.request.urlopen(readme_server + "/metrics", timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    served = {sample.name for family in families for sample in family.samples} | {family.name for family in families}
    assert (missing := sorted(dashboard_metrics() - served)) == [], missing
    values = {sample.name: sample.value for family in families for sample in family.samples}
    assert values["infokv:compression_events_total"] >= 1
