"""The docs' references to the code: every test docs/reliability.md (and the other docs) name as proof exists."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def named_tests(text: str) -> list[tuple[str, str]]:
    """(test file, test name) for each `tests/x.py::test_y` in text; a bare `::test_z` is in the file named last, as
    the docs' tables abbreviate a second test of the same file."""
    found, current = [], None
    for match in re.finditer(r"(tests/\w+\.py)?::(test_\w+)|(tests/\w+\.py)", text):
        file, name, file_alone = match.groups()
        current = file or file_alone or current
        if name is not None:
            found.append((current, name))
    return found


def test_every_test_the_docs_name_exists():
    missing, checked = [], 0
    for doc in DOCS:
        for file, name in named_tests((REPO / doc).read_text()):
            checked += 1
            source = (REPO / file).read_text() if file and (REPO / file).exists() else ""
            if not re.search(rf"^def {name}\b", source, re.MULTILINE):
                missing.append(f"{doc}: {file}::{name}")
    assert checked >= 20, f"found only {checked} tests named in the docs: does named_tests still read them?"
    assert not missing, "tests named in the docs that are not there:\n" + "\n".join(missing)
