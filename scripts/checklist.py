"""The README's "Checklist → tests" table, made from the tests' own citations.

A test cites a checklist item of guides/security.md as `security.md N` (or `security.md N, M`) in its
docstring or in a comment inside it; the table's Tests column lists, for each item, every test that cites
it. The Requirement and Notes columns are written by hand and kept.

    .venv/bin/python scripts/checklist.py          # rewrite the Tests column in README.md
    .venv/bin/python scripts/checklist.py --check  # exit 1 if README.md is not what the tests cite

tests/test_checklist.py runs the check, so the table cannot drift from the tests.
"""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"security\.md ((?:\d+(?:(?:, | and |-)(?=\d))?)+)")
ROW = re.compile(r"^\| (\d+) \| (.*?) \| (.*?) \| (.*) \|$")
ITEMS = 44  # the checklist's items (guides/security.md, next to the checkout, not part of it)


def _items(text):
    """The item numbers one citation names: "16, 18", "9 and 32", "25-27"."""
    numbers = set()
    for part in re.split(r", | and ", text):
        low, _, high = part.partition("-")
        numbers.update(range(int(low), int(high or low) + 1))
    return numbers


def citations(root=ROOT):
    """{item number: sorted ["tests/file.py::test_name", ...]} for every test function that cites it."""
    cited = {}
    for path in sorted((root / "tests").rglob("test_*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                text = ast.get_source_segment(source, node) or ""
                for match in CITATION.finditer(text):
                    for item in _items(match.group(1)):
                        cited.setdefault(item, set()).add(f"{path.relative_to(root).as_posix()}::{node.name}")
    return {item: sorted(tests) for item, tests in cited.items()}


def render(readme, cited):
    """README text with each checklist row's Tests column replaced by what the tests cite."""
    lines = readme.split("\n")
    start = lines.index("### Checklist → tests")
    for index in range(start, len(lines)):
        match = ROW.match(lines[index])
        if match:
            number, requirement, _, notes = match.groups()
            tests = "<br>".join(f"`{t}`" for t in cited.get(int(number), [])) or "—"
            lines[index] = f"| {number} | {requirement} | {tests} | {notes} |"
        elif lines[index].startswith("## ") and index > start:
            break
    return "\n".join(lines)


def problems(readme):
    """What is wrong with the table beyond its Tests column: every item from 1 on, in order, each once, and
    each with a test or a note saying it does not apply."""
    found, rows = [], []
    lines = readme.split("\n")
    for line in lines[lines.index("### Checklist → tests"):]:
        match = ROW.match(line)
        if match:
            rows.append(int(match.group(1)))
            if match.group(3) == "—" and "Not applicable" not in match.group(4):
                found.append(f"item {match.group(1)} has no test and no note saying it does not apply")
    if rows != list(range(1, ITEMS + 1)):
        found.append(f"the rows are not the items 1 to {ITEMS} in order: {rows}")
    return found


def main(argv):
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    wanted = render(readme, citations())
    if "--check" in argv:
        if wanted != readme:
            print("README.md's checklist table differs from the tests' citations: run scripts/checklist.py")
            return 1
        found = problems(readme)
        for problem in found:
            print(f"README.md's checklist table: {problem}")
        return 1 if found else 0
    readme_path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
