"""Files that hold secrets or account values are never committed by accident."""

import shutil
import subprocess

import pytest
from conftest import ROOT, require

IGNORED = [
    "terraform/terraform.tfvars",
    "terraform/prod.tfvars",
    "terraform/secrets.tfvars.json",
    "terraform/ci.auto.tfvars",
    "terraform/override.tf",
    "terraform/backend_override.tf",
    "terraform/default.tfplan",
    "plan.tfplan",
    ".env",
    ".env.production",
]
KEPT = ["terraform/terraform.tfvars.example", ".env.example", "terraform/main.tf"]


def ignored(path: str) -> bool:
    require(shutil.which("git") is not None, "git is not installed")
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path],
        cwd=ROOT,
        check=False,
        capture_output=True,
    )
    require(result.returncode != 128, f"not a git checkout: {result.stderr!r}")
    assert result.returncode in (0, 1), result
    return result.returncode == 0


@pytest.mark.parametrize("path", IGNORED)
def test_secret_and_local_files_are_ignored(path):
    assert ignored(path)


@pytest.mark.parametrize("path", KEPT)
def test_the_examples_are_not_ignored(path):
    assert not ignored(path)
