"""The documentation (README.md, docs/*.md, results/README.md) names only flags that exist, each with the script that
reads it, and every relative link reaches a file and a heading that exist."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "results"))
import compare  # noqa: E402

import flags  # noqa: E402

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "results" / "README.md"]
# Other programs' flags that the docs name: torchrun's, and the official code's behind a default (objectives.md).
OTHERS = {"--nproc_per_node", "--unsup-fraction", "--Lambda"}


def table_flags(table: list) -> set[str]:
    names = set()
    for row in table:
        if isinstance(row, str):
            continue
        names |= {n for n in row[0].split() if n.startswith("--")}
        if row[4].get("action") is flags.ON_OFF:
            names.add("--no-" + row[0][2:])
    return names


def source_flags(script: str) -> set[str]:
    """The flags a small script's parser names, read from its source (its parser is built where it runs)."""
    return set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", (REPO / script).read_text()))


def known() -> dict[str, set[str]]:
    scripts = {
        "train.py": table_flags(flags.TRAIN),
        "attack.py": table_flags(flags.ATTACK),
        "compare.py": set(compare.get_args([])[1]._option_string_actions),
    }
    for script in ("bench.py", "results/study.py", "results/late.py", "results/runner.py", "results/mechanism.py"):
        scripts[Path(script).name] = source_flags(script)
    return {k: v | {"--help"} for k, v in scripts.items()}


def commands(text: str) -> list[str]:
    """Every command the text shows: the lines of its code blocks (comments cut) and its `code spans`."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    lines = [line.split(" #")[0] for block in blocks for line in block.splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return lines + re.findall(r"`([^`\n]+)`", prose)


def flags_of(command: str, scripts: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(flag, script) for each flag the command gives one of our scripts, or ("--x", "") for a span that is flags
    alone; flags before the script (torchrun's) and commands of other programs are not ours to check."""
    words = [w.split("=")[0] for w in command.split()]
    script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    if script is None:
        bare = words[:1] and words[0].startswith("--")
        return [(w, "") for w in words if w.startswith("--") and len(w) > 2] if bare else []
    name, found = Path(words[script]).name, []
    if name not in scripts:
        return []
    for w in words[script + 1 :]:
        if w == "--" and name == "compare.py":
            name = "train.py"  # flags after -- go to every train.py command of the grid
        elif w.startswith("--") and len(w) > 2:
            found.append((w, name))
    return found


def test_every_flag_the_docs_name_is_read_by_its_script():
    scripts = known()
    every = set().union(*scripts.values()) | OTHERS
    wrong = []
    for doc in DOCS:
        for command in commands(doc.read_text()):
            for flag, script in flags_of(command, scripts):
                if flag not in (scripts[script] if script else every):
                    wrong.append(f"{doc.relative_to(REPO)}: {flag} in `{command}`")
    assert not wrong, "\n".join(wrong)


def test_the_links_of_a_run_are_counted_as_compare_py_chains_them(tmp_path):
    args, _ = compare.get_args(["--losses", "ce", "--seeds", "0", "--", "--dataset", "synthetic"])
    links = compare.runs(compare.grid_of(args), tmp_path, 0)[0]["links"]
    words = ["no", "one", "two", "three", "four", "five", "six", "seven"]
    for doc in (REPO / "README.md", REPO / "docs" / "comparison.md"):
        said = set(re.findall(r"\b(" + "|".join(words) + r") links\b", doc.read_text()))
        assert said == {words[len(links)]}, f"{doc.name} says {sorted(said)} links, a run has {len(links)}"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but - and _ dropped, spaces as -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(REPO)))
def test_every_relative_link_reaches_its_file_and_heading(doc):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            broken.append(target)
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}:
            broken.append(target)
    assert not broken, f"{doc.relative_to(REPO)}: " + ", ".join(broken)


def test_test_sovr_runs_beside_sovr_alone(tmp_path):
    """The card's copy-paste pair: test_sovr.py needs nothing but sovr.py, torch and pytest (no conftest fixture, no
    other module): in an empty folder, pytest collects it and sets up every fixture of its tests."""
    for name in ("sovr.py", "test_sovr.py"):
        shutil.copy(REPO / name, tmp_path / name)
    cmd = [sys.executable, "-m", "pytest", "-q", "--setup-only", "-p", "no:cacheprovider", "test_sovr.py"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert p.returncode == 0 and "error" not in p.stdout.splitlines()[-1], p.stdout[-2000:]


def test_the_root_holds_the_card_and_what_it_imports():
    """Every .py at the root is a script of the design card, test_sovr.py, or a module that one of them imports; the
    other tests are in tests/."""
    card = {"sovr.py", "test_sovr.py", "train.py", "attack.py", "bench.py", "models.py", "losses.py"}
    imported = set()
    for name in card:
        tree = ast.parse((REPO / name).read_text())
        imported |= {f"{a.name.split('.')[0]}.py" for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {
            f"{n.module.split('.')[0]}.py" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        }
    assert {p.name for p in REPO.glob("*.py")} - card - imported == set()
    assert not list(REPO.glob("conftest.py")) and len(list((REPO / "tests").glob("test_*.py"))) > 10


def test_no_function_outside_tests_is_over_40_lines():
    """Every function of the project's own code (the root, results/, .ci/) fits on a screen: 40 lines at most,
    from its def line to its last, the defs nested in it included."""
    files = [*REPO.glob("*.py"), *(REPO / "results").rglob("*.py"), *(REPO / ".ci").glob("*.py")]
    long = [
        f"{p.relative_to(REPO)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
        for p in sorted(files)
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 40
    ]
    assert not long, "functions over 40 lines: " + ", ".join(long)
