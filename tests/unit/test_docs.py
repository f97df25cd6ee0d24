"""The README's recipe reference is the schema's, and the commands it shows exist."""


from launcher.recipe.reference import BEGIN, END, render
from runs import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_readme_reference_matches_the_schema():
    start, stop = README.index(BEGIN), README.index(END) + len(END)
    assert README[start:stop] == render(), "regenerate with: python -m launcher.recipe.reference"


def test_readme_names_only_files_that_exist():
    for name in ("scripts/demo.sh", "scripts/test.sh", "scripts/canary.sh", "scripts/lock.py", "requirements-lock.txt",
                 "launcher/run.py", ".ci/run"):
        assert name in README and (REPO / name).exists(), name
    for recipe in (REPO / "recipes").glob("*.yaml"):
        assert f"recipes/{recipe.name}" in README, f"{recipe.name} is not documented in README.md"
