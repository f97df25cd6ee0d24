"""The lock (requirements-lock.txt): it pins every dependency the project declares, within the declared ranges,
and the venv the suite runs in is the one the lock describes (scripts/setup.sh installed it through the lock)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from runs import REPO

sys.path.insert(0, str(REPO / "scripts"))
import lock  # noqa: E402


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [spec for name, specs in project["optional-dependencies"].items() if name != "npu" for spec in specs]
    return [Requirement(spec) for spec in project["dependencies"] + extras]


def test_every_declared_dependency_but_torch_is_pinned_within_its_range():
    pins = lock.read_lock()
    for requirement in declared_requirements():
        name = lock.normalized(requirement.name)
        if name == "torch":
            assert name not in pins  # the machine's build, chosen by TORCH_SPEC
            continue
        assert name in pins, f"{name} is declared in pyproject.toml but not locked"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"


@pytest.mark.skipif(os.environ.get("LATEST") == "1", reason="the canary runs on the newest releases by design")
def test_this_venv_is_the_locked_one():
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "lock.py"), "diff"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.startswith("packages that differ from requirements-lock.txt: 0"), result.stdout


def test_diff_names_what_moved_appeared_and_went(tmp_path, monkeypatch, capsys):
    installed = lock.installed(sys.executable)
    name, version = next((n, v) for n, v in sorted(installed.items()) if lock.lockable(n))
    stale = tmp_path / "lock.txt"
    stale.write_text(f"# header\n{name}==0.0.1\nno-such-package==1.0\n")
    monkeypatch.setattr(lock, "LOCK", stale)
    moved = lock.diff(sys.executable)
    out = capsys.readouterr().out
    assert f"  {name}: 0.0.1 -> {version}" in out
    assert "  no-such-package: 1.0, no longer installed" in out
    assert moved == sum(1 for n in installed if lock.lockable(n)) + 1  # every other package counts as new
