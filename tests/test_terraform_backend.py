"""Remote state: terraform/backend.tf.example is a valid S3 backend with
encryption and S3 locking, and `make plan BACKEND_CONFIG=...` hands the
settings to `terraform init` (scripts/terraform.sh), while local state stays
the default.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from terraform_helpers import MODULE_DIR, REPO_ROOT, Terraform, copy_module

SCRIPT = REPO_ROOT / "scripts" / "terraform.sh"


def test_backend_example_is_s3_encrypted_and_locked(tmp_path: Path) -> None:
    example = (MODULE_DIR / "backend.tf.example").read_text()
    settings = re.sub(r"#.*", "", example)
    assert re.search(r'backend\s+"s3"', settings)
    assert re.search(r"encrypt\s*=\s*true", settings)
    assert re.search(r"use_lockfile\s*=\s*true", settings)
    assert not re.search(r"\b(access_key|secret_key|token)\b", settings)

    module = copy_module(tmp_path / "module")
    assert not (module / "backend.tf").exists(), "local state is the default"
    shutil.copy(module / "backend.tf.example", module / "backend.tf")
    terraform = Terraform(module)
    terraform.run("init", "-backend=false", "-input=false")
    terraform.run("validate")


def run_script(tmp_path: Path, backend_config: str | None) -> list[str]:
    """scripts/terraform.sh with a stand-in terraform that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    fake = bin_dir / "terraform"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> "{calls}"\n')
    fake.chmod(0o755)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("BACKEND_CONFIG", "TF_PROVIDER_MIRROR", "TF_CLI_CONFIG_FILE")
    }
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    # What plan needs besides init (scripts/terraform.sh checks): variables, a package.
    (tmp_path / "lambda.zip").write_bytes(b"")
    env.update(
        TF_VAR_auth0_domain="tenant.example.com",
        TF_VAR_auth0_audience="https://api",
        TF_VAR_lambda_zip_path=str(tmp_path / "lambda.zip"),
    )
    if backend_config is not None:
        env["BACKEND_CONFIG"] = backend_config
    subprocess.run(["bash", str(SCRIPT), "plan"], cwd=tmp_path, env=env, check=True)
    return calls.read_text().splitlines()


def test_backend_config_reaches_terraform_init(tmp_path: Path) -> None:
    (tmp_path / "backend.hcl").write_text('bucket = "state"\n')
    calls = run_script(tmp_path, "backend.hcl")  # relative to the caller
    assert calls == [
        f"init -input=false -backend-config={tmp_path / 'backend.hcl'}",
        "plan -input=false",
    ]


def test_without_backend_config_init_is_unchanged(tmp_path: Path) -> None:
    assert run_script(tmp_path, None) == ["init -input=false", "plan -input=false"]
