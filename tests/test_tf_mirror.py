"""One provider-mirror discovery (scripts/tf_mirror.sh) for `make test`,
`make plan` and .ci/run, and what each does with no mirror and no registry.

"No registry" is made certain and kept on loopback: HTTPS_PROXY points at a
closed port on 127.0.0.1, so Terraform cannot reach the registry, and no
lookup of its name leaves the machine.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from conftest import require
from terraform_helpers import NO_PROVIDERS, require_terraform

ROOT = Path(__file__).resolve().parent.parent
MIRROR_SCRIPT = ROOT / "scripts" / "tf_mirror.sh"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is


def environment(**changes: str | None) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("TF_PROVIDER_MIRROR", "TF_PROVIDER_MIRROR_SEARCH", "CI")
        and not key.startswith("PYTEST_")
    }
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def offline(**changes: str | None) -> dict[str, str]:
    """No mirror to find, and a registry that cannot be reached."""
    proxy = f"http://127.0.0.1:{closed_port()}"
    return environment(
        TF_PROVIDER_MIRROR_SEARCH="",
        HTTPS_PROXY=proxy,
        HTTP_PROXY=proxy,
        https_proxy=proxy,
        http_proxy=proxy,
        NO_PROXY="",
        no_proxy="",
        **changes,
    )


def find_mirror(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MIRROR_SCRIPT)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )


def test_a_mirror_on_the_machine_is_found_without_any_variable(tmp_path: Path):
    mirror = tmp_path / "opt" / "tf-plugins"
    (mirror / "registry.terraform.io" / "hashicorp").mkdir(parents=True)
    found = find_mirror(
        environment(TF_PROVIDER_MIRROR_SEARCH=f"/nonexistent:{tmp_path}")
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(mirror)


def test_tf_provider_mirror_wins_over_discovery(tmp_path: Path):
    chosen, other = tmp_path / "chosen", tmp_path / "search" / "other"
    for mirror in (chosen, other):
        (mirror / "registry.terraform.io").mkdir(parents=True)
    env = environment(
        TF_PROVIDER_MIRROR=str(chosen), TF_PROVIDER_MIRROR_SEARCH=str(other.parent)
    )
    assert find_mirror(env).stdout.strip() == str(chosen)


def test_nothing_found_prints_nothing(tmp_path: Path):
    found = find_mirror(environment(TF_PROVIDER_MIRROR_SEARCH=str(tmp_path)))
    assert (found.returncode, found.stdout) == (0, "")


def run_terraform_test(env: dict[str, str]) -> subprocess.CompletedProcess:
    """One Terraform test of the suite, in its own pytest run."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-rsf",
            "-q",
            "tests/test_terraform.py::test_configuration_is_formatted_initialises_and_validates",
        ],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_mirror_no_registry_skips_terraform_tests_with_one_line():
    require_terraform()
    result = run_terraform_test(offline())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    skip_lines = [line for line in result.stdout.splitlines() if "SKIPPED" in line]
    assert len(skip_lines) == 1 and NO_PROVIDERS in skip_lines[0], result.stdout
    assert f"1 skipped: {NO_PROVIDERS}" in result.stdout  # conftest's closing line


def test_no_mirror_no_registry_fails_terraform_tests_under_ci():
    require_terraform()
    result = run_terraform_test(offline(CI="true"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 failed" in result.stdout
    assert f"cannot run under CI=true: {NO_PROVIDERS}" in result.stdout


def module_copy(tmp_path: Path) -> Path:
    """scripts/ and terraform/ side by side, as scripts/terraform.sh expects."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    shutil.copytree(
        ROOT / "terraform",
        tmp_path / "terraform",
        ignore=shutil.ignore_patterns(".terraform", "*.tfstate*", "*.tfvars"),
    )
    return tmp_path


def test_make_plan_offline_says_in_one_line_what_to_set(tmp_path: Path):
    require_terraform()
    copy = module_copy(tmp_path)
    result = subprocess.run(
        ["bash", "scripts/terraform.sh", "plan"],
        check=False,
        cwd=copy,
        env=offline(TF_CLI_CONFIG_FILE=None),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert "set TF_PROVIDER_MIRROR" in result.stderr


def test_make_plan_uses_the_mirror_it_finds_with_no_registry(tmp_path: Path):
    require_terraform()
    mirror = find_mirror(environment())
    require(mirror.stdout.strip() != "", "no Terraform provider mirror on this machine")
    copy = module_copy(tmp_path)
    env = offline(TF_CLI_CONFIG_FILE=None)
    del env["TF_PROVIDER_MIRROR_SEARCH"]  # the default search, as `make plan` does
    result = subprocess.run(
        ["bash", "scripts/terraform.sh", "validate", "-no-color"],
        check=False,
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The configuration is valid" in result.stdout
