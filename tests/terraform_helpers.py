"""Terraform in a throw-away copy of terraform/, and moto as the AWS it talks to.

The CLI configuration (provider mirror) is written by scripts/tf_cli_config.sh,
the same script `make plan/deploy/destroy` use, so the tests exercise it too;
it finds a local mirror with scripts/tf_mirror.sh. With no mirror and no
reachable registry the Terraform tests skip with one line (and fail under CI=true).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO_ROOT / "terraform"
CLI_CONFIG_SCRIPT = REPO_ROOT / "scripts" / "tf_cli_config.sh"

# Every service the configuration calls; anything missing here would go to real AWS.
EMULATED_SERVICES = (
    "apigatewayv2",
    "cloudwatch",
    "ec2",
    "events",
    "iam",
    "lambda",
    "logs",
    "rds",
    "scheduler",
    "secretsmanager",
    "sns",
    "sqs",
    "sts",
)
EMULATOR_REGION = "us-east-1"
COMMAND_TIMEOUT_S = 900
NO_PROVIDERS = (
    "Terraform providers cannot be installed: no provider mirror found and the "
    "registry is unreachable; set TF_PROVIDER_MIRROR to a folder holding "
    "registry.terraform.io/ (docs/deploy.md: Prerequisites)"
)
_providers_unavailable = False  # learnt once per run: later tests skip at once


def _cannot_run(reason: str) -> None:
    """Skip on a developer machine, fail under CI=true (as conftest.require)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run under CI=true: {reason}")
    pytest.skip(reason)


def require_terraform() -> str:
    """Path of the terraform binary; skip without it, but fail under CI=true."""
    path = shutil.which("terraform")
    if path is None:
        _cannot_run("terraform is not installed (docs/deploy.md: Prerequisites)")
    if _providers_unavailable:
        _cannot_run(NO_PROVIDERS)
    return path


def copy_module(dest: Path) -> Path:
    """Copy terraform/ without local state, caches, or a user's variables and overrides."""
    ignored = shutil.ignore_patterns(
        ".terraform",
        ".terraform.tfstate.lock.info",
        "*.tfstate*",
        "*.tfplan",
        "*.tfvars",
        "*.tfvars.json",
        "*override.tf",
        "*override.tf.json",
        "backend.tf",  # a user's remote state settings (backend.tf.example)
    )
    shutil.copytree(MODULE_DIR, dest, ignore=ignored)
    return dest


class Terraform:
    """Runs terraform commands in one working directory with a controlled environment."""

    def __init__(self, workdir: Path) -> None:
        self.binary = require_terraform()
        self.workdir = workdir
        cli_config = workdir.parent / f"{workdir.name}.tfrc"
        subprocess.run(["bash", str(CLI_CONFIG_SCRIPT), str(cli_config)], check=True)
        self.has_mirror = cli_config.read_text() != ""
        # No AWS_* or TF_VAR_* from the caller: a developer's real credentials
        # or variables must never reach these runs.
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "TF_VAR_", "TF_CLI_ARGS"))
        }
        self.env.update(
            TF_CLI_CONFIG_FILE=str(cli_config),
            TF_IN_AUTOMATION="1",
            TF_INPUT="0",
            CHECKPOINT_DISABLE="1",
            AWS_EC2_METADATA_DISABLED="true",
            # Plain text in the error messages the tests match and print.
            **{
                f"TF_CLI_ARGS_{command}": "-no-color"
                for command in ("init", "validate", "plan", "apply", "destroy")
            },
        )

    def run(
        self, *args: str, expect_success: bool = True
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [self.binary, *args],
            check=False,  # the exit code is checked below, with the output
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        if proc.returncode != 0 and args[0] == "init" and self._registry_failed(proc):
            global _providers_unavailable
            _providers_unavailable = True
            _cannot_run(NO_PROVIDERS)
        if expect_success and proc.returncode != 0:
            raise AssertionError(
                f"terraform {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def _registry_failed(self, proc: subprocess.CompletedProcess) -> bool:
        """init could not reach the registry, and no mirror was there to use."""
        return not self.has_mirror and "registry.terraform.io" in proc.stderr

    def show_json(self, plan_file: str | None = None) -> dict:
        """The resolved plan (with a plan file) or the current state, as JSON."""
        args = ["show", "-json", *([plan_file] if plan_file else [])]
        return json.loads(self.run(*args).stdout)


def write_emulator_override(module: Path, endpoint: str) -> None:
    """Point the provider at the emulator with test credentials."""
    endpoints = "\n".join(
        f'    {service} = "{endpoint}"' for service in EMULATED_SERVICES
    )
    (module / "emulator_override.tf").write_text(
        f"""provider "aws" {{
  region                      = "{EMULATOR_REGION}"
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_metadata_api_check     = true
  skip_requesting_account_id  = true

  endpoints {{
{endpoints}
  }}
}}
"""
    )


def write_tfvars(module: Path, values: dict) -> None:
    (module / "test.auto.tfvars.json").write_text(json.dumps(values))


def write_lambda_zip(path: Path) -> Path:
    """A minimal valid package: the plan and apply need a zip, not the app."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "lambda_handler.py",
            "def handler(event, context):\n    return {'statusCode': 200, 'body': 'ok'}\n",
        )
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    """Run moto's server on a free local port; yield its endpoint URL."""
    port = _free_port()
    # Without the managed policies, attaching AWSLambdaVPCAccessExecutionRole fails.
    env = {**os.environ, "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(proc, endpoint, log_path)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(proc: subprocess.Popen, endpoint: str, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"moto server exited {proc.returncode}:\n{log_path.read_text()}"
            )
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(
        f"moto server did not answer within 30 s:\n{log_path.read_text()}"
    )


def planned_resources(plan: dict) -> dict[str, dict]:
    """Planned values of every resource, by address (aws_subnet.private[0], ...)."""
    return {
        res["address"]: res["values"]
        for res in plan["planned_values"]["root_module"]["resources"]
        # A data source that reads what only apply makes has none yet.
        if "values" in res
    }


def of_type(resources: dict[str, dict], resource_type: str) -> dict[str, dict]:
    return {
        addr: vals
        for addr, vals in resources.items()
        if addr.split(".")[0] == resource_type
    }


def references(plan: dict, config_address: str, *path: str | int) -> list[str]:
    """What an argument refers to in the configuration, for values unknown until apply.

    An argument that is not set refers to nothing: [].
    """
    resource = next(
        res
        for res in plan["configuration"]["root_module"]["resources"]
        if res["address"] == config_address
    )
    node = resource["expressions"]
    for key in path:
        try:
            node = node[key]
        except (KeyError, IndexError):
            return []
    return node.get("references", [])
