"""The user's pages: every relative link resolves (file and heading), the README stays short,
and the README's results are the linked study's numbers."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted(
    [REPO / "README.md", REPO / "datasets" / "README.md"]
    + [p for d in ("docs", "studies", "benchmarks") for p in (REPO / d).glob("*.md")]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page):
    with open(page) as f:
        lines = f.read().split("\n")
    inside_code = False
    found = set()
    for line in lines:
        if line.startswith("```"):
            inside_code = not inside_code
        elif not inside_code and line.startswith("#"):
            found.add(slug(line.lstrip("#")))
    return found


def test_slug_is_githubs():
    assert slug(" BCCD (the demo's data, shipped in `datasets/bccd/`)") == (
        "bccd-the-demos-data-shipped-in-datasetsbccd"
    )
    assert slug(" M and M+B: 5 scales") == "m-and-mb-5-scales"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_readme_is_at_most_200_lines():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def test_readme_results_are_the_studys_numbers():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Results on BCCD", 1)[1].split("\n## ", 1)[0]
    study_link = "studies/bccd_score_floor.md"
    assert study_link in section
    study = (REPO / study_link).read_text()
    rows = [line for line in section.splitlines() if line.startswith("| ") and "%" in line]
    numbers = [n for row in rows for n in re.findall(r"\d+\.\d+(?: \(\d+\.\d+\))?", row)]
    assert len(numbers) == 15
    missing = [n for n in numbers if n not in study]
    assert not missing, f"README numbers not on {study_link}: {missing}"


def test_no_page_names_the_development_process():
    words = re.compile(
        r"\b(issue \d+|this session|the issue's|this 2-core machine|main job|this VM|final code)\b",
        re.I,
    )
    hits = [
        f"{p.relative_to(REPO)}: {m.group(0)}" for p in PAGES for m in words.finditer(p.read_text())
    ]
    assert not hits, hits


def test_the_pages_name_no_missing_module():
    """`python -m X` in a page names a module of the project, or of its dependencies."""
    import importlib.util

    missing = set()
    for page in PAGES:
        for module in re.findall(r"python -m ([\w.]+)", page.read_text()):
            if module.split(".")[0] in ("ohem_d2", "benchmarks", "studies") and module.islower():
                cwd = os.getcwd()
                try:
                    os.chdir(REPO)
                    if importlib.util.find_spec(module) is None:
                        missing.add(f"{page.relative_to(REPO)}: {module}")
                finally:
                    os.chdir(cwd)
    assert not missing, sorted(missing)


def test_the_package_cites_no_missing_page():
    """The package's code and configs (also in the wheel, where no page is) cite the paper by
    section or table, not a PAPER.md the repository never had; an upper-case page they name
    (README.md, ...) is one of the repository's."""
    sources = [p for p in (REPO / "ohem_d2").rglob("*") if p.suffix in (".py", ".yaml")]
    sources += [REPO / "train_net.py", *PAGES]
    assert len(sources) > 50
    pages = {p.name for p in REPO.rglob("*.md") if ".git" not in p.parts}
    missing = sorted(
        f"{p.relative_to(REPO)}: {name}"
        for p in sources
        for name in set(re.findall(r"\b[A-Z][A-Z_]*\.md\b", p.read_text()))
        if name == "PAPER.md" or name not in pages
    )
    assert not missing, missing


def test_m_and_b_keys_say_they_are_yaml_only():
    """The LazyConfig path (ohem_d2/engine/lazy.py) evaluates with the model's own inference:
    the page that documents M's and B's keys says so, where the keys are listed."""
    section = (REPO / "docs" / "options.md").read_text().split("## The paper's bells", 1)[1]
    section = section.split("\n## ", 1)[0]
    text = " ".join(section.split())
    assert "apply to YAML configs only" in text
    assert "a LazyConfig" in text and "without M or B at test time" in text
    lazy = (REPO / "ohem_d2" / "engine" / "lazy.py").read_text()
    assert "MultiScaleRCNN" not in lazy and "IterativeBoxRegressionWithVoting" not in lazy, (
        "lazy.py applies M or B now: update docs/options.md and this test"
    )
