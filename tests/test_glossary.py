"""tutorials/GLOSSARY.md: every term is defined at its first use, in the lesson the glossary names.

Mechanically, over the lessons' prose (comment lines and each lesson's opening docstring), in reading order
(01, 02, 03, 03b, 04, ...): the first mention of each glossary term (whole words, plural allowed;
case-insensitive except for acronyms) must be in the lesson the glossary names, and it must be the defining one,
written *term* (or *terms*).
A lesson's opening docstring previews it, and a section heading (`# ## ...`) names what its section defines, so
both may name the terms that same lesson defines before their definition; a term of a LATER lesson named there
(or anywhere earlier) fails. No lesson runs: this is text only.
"""
import ast
import re
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
LESSONS = sorted(TUTORIALS.glob("[0-9][0-9]*_*.py"))


def glossary():
    """[(term, lesson prefix)] from the table of GLOSSARY.md."""
    rows = []
    for line in (TUTORIALS / "GLOSSARY.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"\|\s*([^|]+?)\s*\|\s*\[(\w+)\]\((\w+\.py)\)\s*\|", line)
        if m:
            rows.append((m.group(1), m.group(2), m.group(3)))
    return rows


def prose(lesson):
    """[(line number, text, in the opening docstring)] of a lesson's comments and opening docstring."""
    source = lesson.read_text(encoding="utf-8")
    first = ast.parse(source).body[0]
    doc = (first.lineno, first.end_lineno) if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        else (0, -1)
    out = []
    for n, line in enumerate(source.splitlines(), 1):
        if doc[0] <= n <= doc[1] or line.startswith("# #"):
            out.append((n, line, True))
        elif "#" in line and not line.lstrip().startswith(("'", '"')):
            comment = line[line.index("#"):] if line.lstrip().startswith("#") else line[line.index("  #"):] \
                if "  #" in line else ""
            if comment:
                out.append((n, comment, False))
    return out


def test_the_glossary_lists_terms_of_existing_lessons():
    rows = glossary()
    assert len(rows) >= 40, f"GLOSSARY.md lists only {len(rows)} terms"
    names = {p.name for p in LESSONS}
    assert not [r for r in rows if r[2] not in names], "GLOSSARY.md links a lesson that does not exist"
    assert len({r[0].lower() for r in rows}) == len(rows), "a term is listed twice"
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    assert "GLOSSARY.md" in readme, "tutorials/README.md must link the glossary"


@pytest.mark.parametrize("term, prefix, path", glossary(), ids=[r[0] for r in glossary()])
def test_each_term_is_defined_at_its_first_use(term, prefix, path):
    flags = 0 if term.isupper() else re.I      # an acronym (GGUF) is not the package of the same name (gguf)
    pattern = re.compile(r"(?<![\w-])" + re.escape(term) + r"(s|es)?(?![\w-])", flags)
    defining = re.compile(r"\*" + re.escape(term) + r"(s|es)?\*", flags)
    for lesson in LESSONS:
        for n, text, preview in prose(lesson):
            if not pattern.search(text):
                continue
            if preview and lesson.name == path:
                continue                        # the lesson's own preview of what it defines
            where = f"{lesson.name}:{n}: {text.strip()[:120]}"
            assert lesson.name == path, f"{term!r} is used before its definition in {path}, first at {where}"
            assert defining.search(text), f"{term!r}: its first use in {path} is not its definition *{term}*: {where}"
            return
    pytest.fail(f"{term!r} never appears in {path}'s prose")
