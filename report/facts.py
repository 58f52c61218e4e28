"""Print the counts the exam report quotes, measured on the working tree, so they can be re-checked.

python report/facts.py

* tests: what ``pytest --collect-only`` collects (question 7);
* public functions with full type hints, a docstring, and Google-style sections (question 6);
* commits, merge commits and author identities in git history (questions 9 and 27).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("training", "handler", "serving", "monitoring", "loadtest", "bench")


def git(*args: str) -> list[str]:
    """Lines of a git command's output in the project root."""
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()


def function_documentation() -> dict[str, int]:
    """Public functions and methods of the source packages: how many are typed and documented."""
    counts = {"public functions": 0, "fully type-hinted": 0, "with a docstring": 0, "with Google-style sections": 0}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
                    continue
                counts["public functions"] += 1
                args = [a for a in node.args.args + node.args.kwonlyargs if a.arg not in ("self", "cls")]
                counts["fully type-hinted"] += node.returns is not None and all(a.annotation for a in args)
                doc = ast.get_docstring(node) or ""
                counts["with a docstring"] += bool(doc)
                counts["with Google-style sections"] += any(s in doc for s in ("Args:", "Returns:", "Raises:"))
    return counts


def collected_tests() -> str:
    """pytest's summary line of a collection-only run."""
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return out.splitlines()[-1] if out else "no output"


def main() -> int:
    """Print every fact, one per line."""
    print(f"tests: {collected_tests()}")
    for name, value in function_documentation().items():
        print(f"{name}: {value}")
    print(f"commits: {len(git('log', '--format=%h'))}, merge commits: {len(git('log', '--merges', '--format=%h'))}")
    print(f"author identities: {sorted(set(git('log', '--format=%an <%ae>')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
