"""The documentation is executed: every Python example of README.md and docs/, the docstring examples of the
modules the API reference renders, and the generated reference tables against the declarations.

Each ```` ```python ```` block runs on its own, as a reader would paste it, in a fresh interpreter (CPU,
no downloads: ``HF_HUB_OFFLINE=1``, W&B offline, no ``MASK_MONITOR_*`` variables) in a temporary folder.
A block that cannot run here (a GPU, a hub download, a W&B login) must be preceded by the line
``<!-- not-run: why -->``; it is reported as a skip with that reason, never dropped silently.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.rglob("*.md"))]

NOT_RUN = re.compile(r"^<!-- not-run: (\S.*?) -->$")
NOT_RUN_LIKE = re.compile(r"^\s*<!--\s*not[\s_-]*run", re.IGNORECASE)
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repo
    line: int  # line of the opening fence (1-based)
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of one Markdown file, with the not-run reason written on the line before."""
    lines = path.read_text(encoding="utf-8").splitlines()
    rel = str(path.relative_to(REPO))
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].strip())
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        i += 1
        body: list[str] = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py"):
            continue
        prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.match(prev)
        blocks.append(Block(rel, start + 1, "\n".join(body) + "\n", mark.group(1) if mark else None))
    return blocks


BLOCKS = [b for page in PAGES for b in python_blocks(page)]
RUN = [b for b in BLOCKS if b.not_run is None]
NOT_RUN_BLOCKS = [b for b in BLOCKS if b.not_run is not None]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASK_MONITOR_")}
    env.update({"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env


def test_examples_found():
    # the README's quickstart and the plain-loop example are among them: a parser that finds nothing fails here
    assert len(RUN) >= 5, [b.id for b in BLOCKS]
    assert any(b.page == "README.md" and "MaskMonitorCallback()" in b.code for b in RUN)
    assert any(b.page == "docs/how-it-works.md" and "MaskAuditor()" in b.code for b in RUN)


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_example_runs(block: Block, tmp_path: Path):
    script = tmp_path / (re.sub(r"\W", "_", block.id) + ".py")
    script.write_text(block.code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{block.id} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("block", NOT_RUN_BLOCKS or [None], ids=lambda b: b.id if b else "none")
def test_example_not_run(block: Block | None):
    if block is None:
        pytest.skip("no example is marked not-run")
    pytest.skip(f"{block.id} not run here: {block.not_run}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_not_run_markers_are_well_formed(page: Path):
    """Every not-run marker is spelled exactly and sits right before a python block."""
    marked = {b.line for b in python_blocks(page) if b.not_run is not None}
    lines = page.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not NOT_RUN_LIKE.search(line):
            continue
        assert NOT_RUN.match(line.strip()), f"{page.name}:{n}: write it as <!-- not-run: reason -->, got {line!r}"
        nxt = next((k for k in range(n, len(lines)) if lines[k].strip()), None)
        assert nxt is not None and nxt + 1 in marked, f"{page.name}:{n}: a not-run marker must precede a python block"


# ------------------------------------------------------------------------------ generated reference tables
def _hooks():
    """docs/hooks.py, the MkDocs hook that writes the tables, loaded under a name of its own."""
    name = "mask_monitor_docs_hooks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DOCS / "hooks.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def _rows(table: str) -> dict[str, list[str]]:
    """First-column name -> cells, for a generated Markdown table."""
    out = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        out[re.search(r"`([^`]+)`", cells[0]).group(1)] = cells
    return out


def test_settings_table_is_the_declarations():
    from mask_monitor.config import SETTINGS

    rows = _rows(_hooks().render("settings"))
    assert list(rows) == list(SETTINGS)
    for name, s in SETTINGS.items():
        default = ("true" if s.default else "false") if isinstance(s.default, bool) else str(s.default)
        assert rows[name][1] == f"`{default}`" and rows[name][3] == f"`MASK_MONITOR_{name.upper()}`", rows[name]
        assert rows[name][4] == s.doc.replace("|", "\\|")


def test_checks_table_and_reference_are_the_declarations():
    from mask_monitor.checks import CHECKS

    hooks = _hooks()
    rows = _rows(hooks.render("checks"))
    assert list(rows) == list(CHECKS)  # priority order
    for name, c in CHECKS.items():
        assert rows[name][1].strip("*") == c.default and rows[name][3] == c.watches
    details = hooks.render("check-details")
    headings = re.findall(r"^### `(\w+)` \{ #check-([\w-]+) \}$", details, re.MULTILINE)
    assert headings == [(n, n.replace("_", "-")) for n in CHECKS]
    for c in CHECKS.values():  # every cause, thing to check and fix is printed
        for item in (*c.causes, *c.to_check, *c.fix):
            assert f"- {item}\n" in details + "\n"


def test_counter_tables_are_the_declarations():
    from mask_monitor.counters import COUNTERS, RATIOS

    hooks = _hooks()
    rows = _rows(hooks.render("counters"))
    assert list(rows) == [c.name for c in COUNTERS]
    for c in COUNTERS:
        assert rows[c.name][2] == c.reduce
        assert rows[c.name][3] == (f"`mask_monitor_{c.name}_total`" if c.prometheus else "")
    ratios = _rows(hooks.render("ratios"))
    assert {n: cells[1] for n, cells in ratios.items()} == {r.name: f"`{r.numerator}` / `{r.denominator}`"
                                                            for r in RATIOS}


def test_environment_table_is_complete():
    from mask_monitor.config import ENVIRONMENT

    assert list(_rows(_hooks().render("environment"))) == list(ENVIRONMENT)


def test_pages_ask_for_the_tables():
    hooks = _hooks()
    wanted = {"configuration.md": {"checks", "settings", "environment", "check-details"},
              "how-it-works.md": {"counters", "ratios"}}
    for page, names in wanted.items():
        text = (DOCS / page).read_text(encoding="utf-8")
        assert set(hooks.MARKER.findall(text)) >= names, page
    for page in DOCS.rglob("*.md"):  # an unknown table name fails (the build fails the same way)
        hooks.expand(page.read_text(encoding="utf-8"), str(page))
    with pytest.raises(ValueError, match="unknown generated table 'setings'"):
        hooks.expand("<!-- generated: setings -->")


def test_readme_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, missing


# ------------------------------------------------------------------------------ docstring examples
API_MODULES = [
    "mask_monitor.counters", "mask_monitor.checks", "mask_monitor.config", "mask_monitor.reports",
    "mask_monitor.policy", "mask_monitor.auditor", "mask_monitor.stats", "mask_monitor.errors",
    "mask_monitor.callback", "mask_monitor.templates.chat_template", "mask_monitor.templates.detect",
    "mask_monitor.templates.registry", "mask_monitor.templates.derive", "mask_monitor.templates.render",
]


@pytest.mark.parametrize("name", API_MODULES)
def test_docstring_examples(name: str):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
