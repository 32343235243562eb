"""The Terraform deployment: offline checks, the resolved plan, and a full
apply -> re-plan -> destroy cycle against moto running as a local AWS.

Everything runs on a temporary copy of terraform/. Without terraform the tests
skip, under CI=true they fail. Set TF_PROVIDER_MIRROR on an air-gapped machine.
"""

import base64
import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from terraform_emulator import (
    assert_api_goes_through_the_proxy,
    assert_api_invokes_the_snapstart_alias,
    assert_api_role_connects_as_exactly_the_app_user,
    assert_function_wired_to_private_network_and_database,
    assert_gateway_authorizer,
    assert_job_events_deployed,
    assert_migration_function_reads_the_secret_by_arn,
    assert_monitoring_deployed,
    assert_network_isolation,
    assert_no_password_in_state_or_environment,
    assert_only_the_migration_role_reads_the_secret,
    assert_sweep_schedule_invokes_the_function,
    emulator_client,
    leftovers,
    monitoring_leftovers,
    state_values,
    unexpected_changes,
    unexpected_changes_under_snapstart,
)
from terraform_helpers import (
    CLI_CONFIG_SCRIPT,
    Terraform,
    copy_module,
    moto_server,
    of_type,
    planned_resources,
    references,
    require_terraform,
    write_emulator_override,
    write_lambda_zip,
    write_tfvars,
)

# Test-only values. No database password: RDS keeps it in Secrets Manager.
REQUIRED_VARS = {
    "auth0_domain": "tenant.example.com",
    "auth0_audience": "https://api.example.com",
}
NAME = "extraction-jobs"  # var.name's default
JOB_ROUTES = {"ANY /extraction-jobs", "ANY /extraction-jobs/{proxy+}"}
PUBLIC_ROUTES = {
    "GET /health",
    "GET /docs",
    "GET /openapi.json",
    "GET /redoc",
    "GET /docs-assets/{proxy+}",
    "GET /console",
    "GET /console/{proxy+}",
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("terraform")


@pytest.fixture(scope="module")
def lambda_zip(workspace: Path) -> Path:
    return write_lambda_zip(workspace / "lambda.zip")


@pytest.fixture(scope="module")
def moto_endpoint(workspace: Path):
    require_terraform()  # no emulator to start when nothing can use it
    with moto_server(workspace / "moto.log") as endpoint:
        yield endpoint


def emulated_copy(
    workspace: Path, name: str, endpoint: str, variables: dict
) -> Terraform:
    module = copy_module(workspace / name)
    write_emulator_override(module, endpoint)
    write_tfvars(module, variables)
    terraform = Terraform(module)
    terraform.run("init", "-input=false")
    return terraform


@pytest.fixture(scope="module")
def planner(workspace: Path, moto_endpoint: str, lambda_zip: Path) -> Terraform:
    """A copy planned with the defaults: only the required variables are set."""
    return emulated_copy(
        workspace,
        "plan",
        moto_endpoint,
        {**REQUIRED_VARS, "lambda_zip_path": str(lambda_zip)},
    )


@pytest.fixture(scope="module")
def plan(planner: Terraform) -> dict:
    planner.run("plan", "-out=default.tfplan")
    return planner.show_json("default.tfplan")


@pytest.fixture(scope="module")
def resources(plan: dict) -> dict[str, dict]:
    return planned_resources(plan)


# --- The CLI configuration shared with scripts/terraform.sh -----------------


def write_cli_config(out: Path, mirror: str | None) -> subprocess.CompletedProcess:
    env = {
        key: value for key, value in os.environ.items() if key != "TF_PROVIDER_MIRROR"
    }
    if mirror is not None:
        env["TF_PROVIDER_MIRROR"] = mirror
    else:
        env["TF_PROVIDER_MIRROR_SEARCH"] = ""  # nor one found on this machine
    return subprocess.run(
        ["bash", str(CLI_CONFIG_SCRIPT), str(out)],
        check=False,
        env=env,
        capture_output=True,
        text=True,
    )


def test_cli_config_installs_providers_from_the_mirror_only(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "registry.terraform.io").mkdir(parents=True)
    out = tmp_path / "cli.tfrc"
    assert write_cli_config(out, str(mirror)).returncode == 0
    config = out.read_text()
    assert "filesystem_mirror" in config
    assert f'path = "{mirror}"' in config
    assert "direct" not in config


def test_cli_config_without_mirror_is_empty(tmp_path: Path) -> None:
    out = tmp_path / "cli.tfrc"
    assert write_cli_config(out, None).returncode == 0
    assert out.read_text() == ""


def test_cli_config_refuses_a_folder_that_is_not_a_mirror(tmp_path: Path) -> None:
    result = write_cli_config(tmp_path / "cli.tfrc", str(tmp_path))
    assert result.returncode == 2
    assert "no registry.terraform.io folder" in result.stderr


# --- Offline ------------------------------------------------------------------


def test_configuration_is_formatted_initialises_and_validates(workspace: Path) -> None:
    terraform = Terraform(copy_module(workspace / "offline"))
    terraform.run("fmt", "-check", "-diff", "-recursive")
    terraform.run("init", "-backend=false", "-input=false")
    terraform.run("validate")


# --- The resolved plan (defaults) ------------------------------------------------


def test_database_is_private_encrypted_backed_up_and_protected(resources: dict) -> None:
    db = resources["aws_db_instance.main"]
    assert (db["engine"], db["engine_version"], db["instance_class"]) == (
        "postgres",
        "16",
        "db.t4g.micro",
    )
    assert (
        db["allocated_storage"],
        db["max_allocated_storage"],
        db["storage_type"],
    ) == (20, 0, "gp3")
    assert db["storage_encrypted"] is True
    assert db["publicly_accessible"] is False
    assert db["backup_retention_period"] == 7
    assert db["deletion_protection"] is True
    assert db["skip_final_snapshot"] is False
    assert db["final_snapshot_identifier"] == f"{NAME}-final"
    assert db["multi_az"] is False
    assert db["auto_minor_version_upgrade"] is True
    assert "postgresql" in db["enabled_cloudwatch_logs_exports"]
    assert db["username"] == "extraction_admin"
    assert db["manage_master_user_password"] is True
    assert db["iam_database_authentication_enabled"] is True
    assert db.get("password") is None


def test_database_requires_tls(plan: dict, resources: dict) -> None:
    group = resources["aws_db_parameter_group.main"]
    assert group["family"] == "postgres16"
    assert {p["name"]: p["value"] for p in group["parameter"]} == {
        "rds.force_ssl": "1",
        # no job data in the PostgreSQL log group (statement text, DETAIL)
        "log_min_error_statement": "panic",
        "log_error_verbosity": "terse",
    }
    assert "aws_db_parameter_group.main" in references(
        plan, "aws_db_instance.main", "parameter_group_name"
    )


def test_database_subnets_have_no_route_out(plan: dict, resources: dict) -> None:
    assert "aws_subnet.database" in references(
        plan, "aws_db_subnet_group.main", "subnet_ids"
    )
    assert "aws_route_table.database" in references(
        plan, "aws_route_table_association.database", "route_table_id"
    )
    route_tables = {
        address: references(plan, address, "route_table_id")
        for address in {addr.split("[")[0] for addr in of_type(resources, "aws_route")}
    }
    assert route_tables, "the public and private tiers need routes"
    assert not any("aws_route_table.database" in refs for refs in route_tables.values())


def test_subnets_span_two_zones_and_never_assign_public_addresses(
    resources: dict,
) -> None:
    subnets = of_type(resources, "aws_subnet")
    assert len(subnets) == 6
    assert len({subnet["availability_zone"] for subnet in subnets.values()}) == 2
    assert all(
        subnet["map_public_ip_on_launch"] is False for subnet in subnets.values()
    )


def test_lambda_runs_in_the_private_subnets_behind_one_nat_gateway(
    plan: dict, resources: dict
) -> None:
    assert "aws_subnet.private" in references(
        plan, "aws_lambda_function.api", "vpc_config", 0, "subnet_ids"
    )
    assert references(
        plan, "aws_lambda_function.api", "vpc_config", 0, "security_group_ids"
    ) == [
        "aws_security_group.lambda.id",
        "aws_security_group.lambda",
    ]
    assert len(of_type(resources, "aws_nat_gateway")) == 1
    assert "aws_subnet.public" in references(plan, "aws_nat_gateway.main", "subnet_id")
    assert "aws_route_table.private" in references(
        plan, "aws_route.private_nat", "route_table_id"
    )
    assert "aws_nat_gateway.main" in references(
        plan, "aws_route.private_nat", "nat_gateway_id"
    )
    assert "aws_internet_gateway.main" in references(
        plan, "aws_route.public_internet", "gateway_id"
    )


def security_group_of(plan: dict, rule_address: str, argument: str) -> str | None:
    refs = references(plan, rule_address.split("[")[0], argument)
    return next((ref for ref in refs if ref.count(".") == 1), None)


def test_security_group_rules_are_exactly_the_needed_ones(
    plan: dict, resources: dict
) -> None:
    rules = {
        (
            security_group_of(plan, address, "security_group_id"),
            rule["type"],
            rule["protocol"],
            rule["from_port"],
            rule["to_port"],
            tuple(rule.get("cidr_blocks") or ()),
            security_group_of(plan, address, "source_security_group_id"),
        )
        for address, rule in of_type(resources, "aws_security_group_rule").items()
    }
    lambda_, database, migration = (
        f"aws_security_group.{name}" for name in ("lambda", "database", "migration")
    )
    anywhere = ("0.0.0.0/0",)
    assert rules == {
        (lambda_, "egress", "tcp", 443, 443, anywhere, None),  # JWKS
        (lambda_, "egress", "tcp", 5432, 5432, (), database),
        (database, "ingress", "tcp", 5432, 5432, (), lambda_),
        # The migration function's own group: the database, and Secrets
        # Manager through the NAT gateway (no fixed addresses to name).
        (migration, "egress", "tcp", 5432, 5432, (), database),
        (database, "ingress", "tcp", 5432, 5432, (), migration),
        (migration, "egress", "tcp", 443, 443, anywhere, None),
    }
    inline = [
        key
        for res in plan["configuration"]["root_module"]["resources"]
        if res["type"] in ("aws_security_group", "aws_default_security_group")
        for key in ("ingress", "egress")
        if key in res["expressions"]
    ]
    assert inline == [], (
        "rules belong in aws_security_group_rule; the default group stays empty"
    )
    assert "aws_default_security_group.default" in resources


def test_function_settings(resources: dict, lambda_zip: Path) -> None:
    function = resources["aws_lambda_function.api"]
    assert function["handler"] == "lambda_handler.handler"
    assert (function["runtime"], function["architectures"]) == (
        "python3.11",
        ["x86_64"],
    )
    assert (function["memory_size"], function["timeout"]) == (512, 30)
    assert function["reserved_concurrent_executions"] == 10
    digest = base64.b64encode(hashlib.sha256(lambda_zip.read_bytes()).digest()).decode()
    assert function["source_code_hash"] == digest


def test_function_role_has_only_vpc_access_and_logs_exist_first(
    plan: dict, resources: dict
) -> None:
    attachments = of_type(resources, "aws_iam_role_policy_attachment")
    assert {
        address: attachment["policy_arn"] for address, attachment in attachments.items()
    } == {
        "aws_iam_role_policy_attachment.lambda_vpc_access": "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
        "aws_iam_role_policy_attachment.migration_vpc_access": "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole",
    }
    # Inline: rds-db:connect for the API, the secret for the migration only.
    assert set(of_type(resources, "aws_iam_role_policy")) == {
        "aws_iam_role_policy.lambda_rds_connect",
        "aws_iam_role_policy.lambda_put_events",
        "aws_iam_role_policy.migration_read_master_secret",
        # The one scheduler role's (schedule.tf), not the function's.
        "aws_iam_role_policy.sweep_invoke",
    }
    assert "aws_iam_role.lambda" in references(
        plan, "aws_iam_role_policy.lambda_rds_connect", "role"
    )
    assert "aws_iam_role.migration" in references(
        plan, "aws_iam_role_policy.migration_read_master_secret", "role"
    )
    assume = json.loads(resources["aws_iam_role.lambda"]["assume_role_policy"])
    assert [s["Principal"] for s in assume["Statement"]] == [
        {"Service": "lambda.amazonaws.com"}
    ]
    function = next(
        r
        for r in plan["configuration"]["root_module"]["resources"]
        if r["address"] == "aws_lambda_function.api"
    )
    assert "aws_cloudwatch_log_group.lambda" in function["depends_on"]
    assert resources["aws_cloudwatch_log_group.lambda"]["name"] == f"/aws/lambda/{NAME}"


def test_api_sends_every_route_to_the_function_with_payload_2(resources: dict) -> None:
    api = resources["aws_apigatewayv2_api.main"]
    assert api["protocol_type"] == "HTTP"
    assert api["cors_configuration"] == [], "no CORS unless origins are configured"
    integration = resources["aws_apigatewayv2_integration.lambda"]
    assert (integration["integration_type"], integration["payload_format_version"]) == (
        "AWS_PROXY",
        "2.0",
    )
    routes = of_type(resources, "aws_apigatewayv2_route")
    assert {
        route["route_key"] for route in routes.values()
    } == JOB_ROUTES | PUBLIC_ROUTES


def test_api_stage_throttles_and_writes_json_access_logs(
    plan: dict, resources: dict
) -> None:
    stage = resources["aws_apigatewayv2_stage.default"]
    assert (stage["name"], stage["auto_deploy"]) == ("$default", True)
    throttling = stage["default_route_settings"][0]
    assert (
        throttling["throttling_burst_limit"],
        throttling["throttling_rate_limit"],
    ) == (100, 50)
    log_format = json.loads(stage["access_log_settings"][0]["format"])
    assert {"requestId", "status", "routeKey", "integrationError"} <= set(log_format)
    destination = references(
        plan,
        "aws_apigatewayv2_stage.default",
        "access_log_settings",
        0,
        "destination_arn",
    )
    assert "aws_cloudwatch_log_group.api_access" in destination


def test_invoke_permission_is_scoped_to_this_api(plan: dict, resources: dict) -> None:
    permission = resources["aws_lambda_permission.api_gateway"]
    assert (permission["action"], permission["principal"]) == (
        "lambda:InvokeFunction",
        "apigateway.amazonaws.com",
    )
    source = references(plan, "aws_lambda_permission.api_gateway", "source_arn")
    assert "aws_apigatewayv2_api.main.execution_arn" in source


def test_every_log_group_has_a_retention(resources: dict) -> None:
    groups = of_type(resources, "aws_cloudwatch_log_group")
    assert len(groups) == 5  # API, migration, API access, PostgreSQL, upgrade
    assert {group["retention_in_days"] for group in groups.values()} == {30}


def test_outputs(plan: dict) -> None:
    assert set(plan["output_changes"]) == {
        "api_url",
        "rds_endpoint",
        "rds_port",
        "lambda_function_name",
        "lambda_log_group_name",
        "api_access_log_group_name",
        "rds_log_group_names",
        "alarm_topic_arn",
        "dashboard_name",
        "auth_disabled_warning",
        "migration_function_name",
        "db_master_user_secret_arn",
        "rds_proxy_endpoint",
        "event_bus_name",
        "downstream_queue_url",
    }
    assert plan["output_changes"]["rds_proxy_endpoint"]["after"] is None
    assert plan["output_changes"]["downstream_queue_url"]["after"] is None
    assert plan["output_changes"]["auth_disabled_warning"]["after"] is None


def test_bad_variable_values_are_refused(planner: Terraform) -> None:
    bad_values = {
        "db_app_username": "Extraction-App",
        "auth0_domain": "https://tenant.example.com",
        "lambda_reserved_concurrency": "0",
        "log_retention_days": "10",
        "vpc_cidr": "10.0.0.1/16",
        "lambda_architecture": "arm",
        "backup_retention_period": "0",
        "cors_allow_origins": '["*"]',
        "db_ssl_root_cert": "../rds-ca-bundle.pem",
        "rds_proxy_max_connections_percent": "5",
        "public_throttling_burst_limit": "0",
        "public_throttling_rate_limit": "0",
    }
    args = [
        arg for name, value in bad_values.items() for arg in ("-var", f"{name}={value}")
    ]
    result = planner.run("plan", *args, expect_success=False)
    assert result.returncode == 1
    errors = " ".join(result.stderr.split())
    for message in (
        "db_app_username must be 1-63 lower-case letters",
        "without https:// or a path",
        "a cap is required",
        "a value CloudWatch accepts",
        "IPv4 network address",
        "x86_64 or arm64",
        "would turn backups off",
        "no wildcard",
        "a .pem file name at the package's top level",
        "rds_proxy_max_connections_percent must be a whole number from 10 to 100",
        "public_throttling_burst_limit must be a whole number",
        "public_throttling_rate_limit must be greater than 0",
    ):
        assert message in errors


def test_arm64_on_python311_is_refused(planner: Terraform) -> None:
    result = planner.run(
        "plan", "-var", "lambda_architecture=arm64", expect_success=False
    )
    assert result.returncode == 1
    assert "arm64 needs lambda_runtime python3.12 or newer" in " ".join(
        result.stderr.split()
    )


def test_snapstart_on_python311_is_refused(planner: Terraform) -> None:
    result = planner.run("plan", "-var", "enable_snapstart=true", expect_success=False)
    assert result.returncode == 1
    assert "enable_snapstart needs lambda_runtime python3.12 or newer" in " ".join(
        result.stderr.split()
    )


def test_snapstart_publishes_a_version_and_the_api_invokes_its_alias(
    planner: Terraform, resources: dict
) -> None:
    assert resources["aws_lambda_function.api"]["publish"] is False
    assert resources["aws_lambda_function.api"]["snap_start"] == []
    assert "aws_lambda_alias.live[0]" not in resources
    assert resources["aws_lambda_permission.api_gateway"].get("qualifier") is None

    planner.run(
        "plan",
        "-var",
        "enable_snapstart=true",
        "-var",
        "lambda_runtime=python3.12",
        "-out=snapstart.tfplan",
    )
    plan = planner.show_json("snapstart.tfplan")
    snapstart = planned_resources(plan)
    function = snapstart["aws_lambda_function.api"]
    assert function["publish"] is True
    assert function["snap_start"] == [{"apply_on": "PublishedVersions"}]
    assert snapstart["aws_lambda_alias.live[0]"]["name"] == "live"
    assert "aws_lambda_function.api.version" in references(
        plan, "aws_lambda_alias.live", "function_version"
    )
    assert "aws_lambda_alias.live" in " ".join(
        references(plan, "aws_apigatewayv2_integration.lambda", "integration_uri")
    )
    assert snapstart["aws_lambda_permission.api_gateway"]["qualifier"] == "live"


# --- The gateway's JWT authorizer -------------------------------------------


def route_authorization(resources: dict) -> dict[str, str | None]:
    routes = of_type(resources, "aws_apigatewayv2_route")
    return {r["route_key"]: r["authorization_type"] for r in routes.values()}


def test_job_routes_need_a_jwt_at_the_gateway_and_public_routes_do_not(
    plan: dict, resources: dict
) -> None:
    (authorizer,) = of_type(resources, "aws_apigatewayv2_authorizer").values()
    assert authorizer["authorizer_type"] == "JWT"
    assert authorizer["identity_sources"] == ["$request.header.Authorization"]
    assert authorizer["jwt_configuration"] == [
        {
            "issuer": f"https://{REQUIRED_VARS['auth0_domain']}/",
            "audience": [REQUIRED_VARS["auth0_audience"]],
        }
    ]
    assert route_authorization(resources) == {
        **dict.fromkeys(JOB_ROUTES, "JWT"),
        **dict.fromkeys(PUBLIC_ROUTES, "NONE"),
    }
    assert "aws_apigatewayv2_authorizer.auth0" in references(
        plan, "aws_apigatewayv2_route.jobs", "authorizer_id"
    )
    assert references(plan, "aws_apigatewayv2_route.public", "authorizer_id") == []
    # The route keys above are all there is: no catch-all ("ANY /{proxy+}",
    # "$default"), so an unknown path is the gateway's 404, not an invocation.


def test_auth_disabled_drops_the_authorizer_and_warns(planner: Terraform) -> None:
    result = planner.run(
        "plan", "-var", "auth_disabled=true", "-out=auth-disabled.tfplan"
    )
    plan = planner.show_json("auth-disabled.tfplan")
    resources = planned_resources(plan)
    assert of_type(resources, "aws_apigatewayv2_authorizer") == {}
    assert set(route_authorization(resources).values()) == {"NONE"}
    warning = plan["output_changes"]["auth_disabled_warning"]["after"]
    assert "auth_disabled = true is a TEST-ONLY setting" in warning
    assert "test-only setting" in " ".join(result.stdout.split())


# --- Migrations and database credentials ----------------------------------------


def configured(plan: dict, address: str) -> dict:
    return next(
        r
        for r in plan["configuration"]["root_module"]["resources"]
        if r["address"] == address
    )


def policy_statements(plan: dict) -> dict[str, list[dict]]:
    return {
        r["address"]: r["expressions"]["statement"]
        for r in plan["configuration"]["root_module"]["resources"]
        if r["type"] == "aws_iam_policy_document"
    }


def test_api_connects_as_the_app_user_with_iam_auth_and_no_password(
    plan: dict,
) -> None:
    assert "db_password" not in plan["variables"]
    assert "db_password" not in plan["configuration"]["root_module"]["variables"]
    assert plan["variables"]["db_app_username"] == {"value": "extraction_app"}
    (connect,) = policy_statements(plan)[
        "data.aws_iam_policy_document.lambda_rds_connect"
    ]
    assert connect["actions"] == {"constant_value": ["rds-db:connect"]}
    assert {"aws_db_instance.main.resource_id", "var.db_app_username"} <= set(
        connect["resources"]["references"]
    )
    assert "aws_iam_role.lambda" in references(
        plan, "aws_iam_role_policy.lambda_rds_connect", "role"
    )
    assert "local.database_url" in references(
        plan, "aws_lambda_function.api", "environment", 0, "variables"
    )


def test_only_the_migration_role_may_read_the_master_secret(plan: dict) -> None:
    readers = {
        address
        for address, statements in policy_statements(plan).items()
        for statement in statements
        if any(
            action.startswith(("secretsmanager:", "*"))
            for action in statement.get("actions", {}).get("constant_value", [])
        )
    }
    # The master secret: the migration function; RDS Proxy's (made only with
    # enable_rds_proxy): the proxy reads it, the migration function fills it.
    assert readers == {
        "data.aws_iam_policy_document.migration_read_master_secret",
        "data.aws_iam_policy_document.proxy_read_app_secret",
    }
    (read,) = policy_statements(plan)[
        "data.aws_iam_policy_document.migration_read_master_secret"
    ]
    assert read["actions"] == {"constant_value": ["secretsmanager:GetSecretValue"]}
    assert read["resources"]["references"] == ["local.db_master_secret_arn"]
    (proxy_read,) = policy_statements(plan)[
        "data.aws_iam_policy_document.proxy_read_app_secret"
    ]
    assert proxy_read["actions"] == {
        "constant_value": ["secretsmanager:GetSecretValue"]
    }
    assert "aws_secretsmanager_secret.app_db" in proxy_read["resources"]["references"]
    assert "aws_iam_role.migration" in references(
        plan, "aws_iam_role_policy.migration_read_master_secret", "role"
    )


def test_migration_function_runs_the_same_package_before_the_api_switches(
    plan: dict, resources: dict, lambda_zip: Path
) -> None:
    function = resources["aws_lambda_function.migration"]
    digest = base64.b64encode(hashlib.sha256(lambda_zip.read_bytes()).digest()).decode()
    assert function["handler"] == "lambda_handler.migrate"
    assert function["source_code_hash"] == digest
    assert function["reserved_concurrent_executions"] == 1
    assert function["timeout"] == 300
    assert {"local.db_master_secret_arn", "local.migration_database_url"} <= set(
        references(plan, "aws_lambda_function.migration", "environment", 0, "variables")
    )
    assert "aws_iam_role.migration" in references(
        plan, "aws_lambda_function.migration", "role"
    )
    assert "aws_subnet.private" in references(
        plan, "aws_lambda_function.migration", "vpc_config", 0, "subnet_ids"
    )

    # Invoked on every apply whose package changed, before the API function.
    invocation = resources["aws_lambda_invocation.migrate[0]"]
    assert invocation["triggers"] == {"package_sha256": digest, "app_login": "iam"}
    assert "aws_lambda_function.migration" in references(
        plan, "aws_lambda_invocation.migrate", "function_name"
    )
    api = configured(plan, "aws_lambda_function.api")
    assert "aws_lambda_invocation.migrate" in api["depends_on"]


@pytest.fixture(scope="module")
def no_nat_resources(planner: Terraform) -> dict[str, dict]:
    """A plan without NAT gateway and without the invocation."""
    planner.run(
        "plan",
        "-var",
        "enable_nat_gateway=false",
        "-var",
        "run_migrations_on_apply=false",
        "-out=no-nat.tfplan",
    )
    return planned_resources(planner.show_json("no-nat.tfplan"))


def test_without_nat_eventbridge_gets_an_interface_endpoint_for_the_api_only(
    no_nat_resources: dict,
) -> None:
    endpoint = no_nat_resources["aws_vpc_endpoint.events[0]"]
    assert endpoint["service_name"] == "com.amazonaws.us-east-1.events"
    assert (endpoint["vpc_endpoint_type"], endpoint["private_dns_enabled"]) == (
        "Interface",
        True,
    )
    out = no_nat_resources["aws_security_group_rule.lambda_https_to_endpoints[0]"]
    into = no_nat_resources["aws_security_group_rule.endpoints_https_from_lambda[0]"]
    for rule, kind in ((out, "egress"), (into, "ingress")):
        assert (rule["type"], rule["from_port"], rule["to_port"]) == (kind, 443, 443)
        assert rule.get("cidr_blocks") in (None, [])


def test_without_nat_secrets_manager_gets_an_interface_endpoint(
    no_nat_resources: dict, resources: dict
) -> None:
    assert of_type(resources, "aws_vpc_endpoint") == {}, "NAT on: no endpoint"
    assert of_type(no_nat_resources, "aws_nat_gateway") == {}
    endpoint = no_nat_resources["aws_vpc_endpoint.secretsmanager[0]"]
    assert endpoint["service_name"] == "com.amazonaws.us-east-1.secretsmanager"
    assert endpoint["vpc_endpoint_type"] == "Interface"
    assert endpoint["private_dns_enabled"] is True
    rule = no_nat_resources["aws_security_group_rule.endpoints_https_in[0]"]
    assert (rule["type"], rule["protocol"], rule["from_port"], rule["to_port"]) == (
        "ingress",
        "tcp",
        443,
        443,
    )
    assert rule.get("cidr_blocks") in (None, [])
    # run_migrations_on_apply = false: no invocation at all.
    assert of_type(no_nat_resources, "aws_lambda_invocation") == {}
    assert "aws_lambda_invocation.migrate[0]" in resources


def test_app_user_must_differ_from_the_master(planner: Terraform) -> None:
    result = planner.run(
        "plan",
        "-var",
        "db_master_username=extraction_app",
        expect_success=False,
    )
    assert result.returncode == 1
    assert "db_app_username must differ from db_master_username" in " ".join(
        result.stderr.split()
    )


# --- apply -> re-plan -> destroy -------------------------------------------------


@pytest.mark.slow
def test_apply_then_replan_shows_no_changes_and_destroy_leaves_nothing(
    workspace: Path, moto_endpoint: str, lambda_zip: Path
) -> None:
    variables = {
        **REQUIRED_VARS,
        "lambda_zip_path": str(lambda_zip),
        "db_deletion_protection": False,
        "db_skip_final_snapshot": True,
        "alarm_email": "oncall@example.com",
        "pending_jobs_alarm_threshold": 500,
        "downstream_queue_enabled": True,
        "auth0_console_client_id": "ConsoleSpaClientId123",
        # moto stores a function but cannot run it, so the migration cannot be
        # invoked here; everything else about it is deployed and checked.
        "run_migrations_on_apply": False,
    }
    terraform = emulated_copy(workspace, "cycle", moto_endpoint, variables)
    # First with RDS Proxy (and TLS verified), then, SnapStart on, without it
    # again as by default: both ways and the switch between them, in two
    # applies.
    bundle = "rds-ca-bundle.pem"
    proxy = ("-var", "enable_rds_proxy=true", "-var", f"db_ssl_root_cert={bundle}")
    snapstart = ("-var", "enable_snapstart=true", "-var", "lambda_runtime=python3.12")
    try:
        terraform.run("apply", "-auto-approve", *proxy)
        state = terraform.show_json()
        deployed = state_values(state)
        assert_api_goes_through_the_proxy(moto_endpoint, deployed, bundle)
        assert_sweep_schedule_invokes_the_function(moto_endpoint, deployed)
        assert_gateway_authorizer(moto_endpoint, deployed, variables)
        raw_state = (terraform.workdir / "terraform.tfstate").read_text()
        assert_no_password_in_state_or_environment(moto_endpoint, state, raw_state)
        assert_migration_function_reads_the_secret_by_arn(moto_endpoint)
        assert_only_the_migration_role_reads_the_secret(moto_endpoint)
        assert_monitoring_deployed(moto_endpoint, deployed, variables, proxy=True)
        assert_job_events_deployed(moto_endpoint)

        terraform.run("plan", "-out=replan.tfplan", *proxy)
        assert unexpected_changes(terraform.show_json("replan.tfplan")) == []

        # The SnapStart toggle, on the running deployment; the proxy goes.
        terraform.run("apply", "-auto-approve", *snapstart)
        deployed = state_values(terraform.show_json())
        assert_api_invokes_the_snapstart_alias(moto_endpoint, deployed)
        assert_function_wired_to_private_network_and_database(
            moto_endpoint, deployed, variables
        )
        assert_network_isolation(moto_endpoint, deployed)
        assert_api_role_connects_as_exactly_the_app_user(moto_endpoint)
        assert_monitoring_deployed(moto_endpoint, deployed, variables, proxy=False)
        terraform.run("plan", "-out=snapstart-replan.tfplan", *snapstart)
        replan = terraform.show_json("snapstart-replan.tfplan")
        assert unexpected_changes_under_snapstart(replan) == []
    finally:
        terraform.run("destroy", "-auto-approve")

    assert terraform.run("state", "list").stdout.split() == []
    assert leftovers(moto_endpoint) == {}
    assert monitoring_leftovers(moto_endpoint) == {}


# --- Monitoring: alarms, topic, dashboard, the gauges' schedule, tracing ------

GIB = 1024**3


def alarms_by_name(resources: dict) -> dict[str, dict]:
    return {
        alarm["alarm_name"].removeprefix(f"{NAME}-"): alarm
        for alarm in of_type(resources, "aws_cloudwatch_metric_alarm").values()
    }


def test_alarms_have_deliberate_thresholds_and_missing_data(resources: dict) -> None:
    alarms = alarms_by_name(resources)
    summary = {
        name: (
            alarm["namespace"],
            alarm["metric_name"],
            alarm["comparison_operator"].removesuffix("Threshold"),
            alarm["threshold"],
            alarm["treat_missing_data"],
        )
        for name, alarm in alarms.items()
    }
    assert summary == {
        "lambda-errors": ("AWS/Lambda", "Errors", "GreaterThanOrEqualTo", 1, "notBreaching"),
        "lambda-throttles": ("AWS/Lambda", "Throttles", "GreaterThanOrEqualTo", 1, "notBreaching"),
        # 80% of the 30 s timeout
        "lambda-duration-p99": ("AWS/Lambda", "Duration", "GreaterThan", 24000, "notBreaching"),
        "api-5xx-rate": (None, None, "GreaterThan", 5, "notBreaching"),
        "db-cpu": ("AWS/RDS", "CPUUtilization", "GreaterThan", 80, "missing"),
        # 20% of the 20 GiB allocated
        "db-free-storage": ("AWS/RDS", "FreeStorageSpace", "LessThan", 4 * GIB, "missing"),
        # 80% of 10 instances x a pool of 2
        "db-connections": ("AWS/RDS", "DatabaseConnections", "GreaterThan", 16, "missing"),
        "db-freeable-memory": ("AWS/RDS", "FreeableMemory", "LessThan", 64 * 2**20, "missing"),
        # a silent gauge is an unwatched queue
        "oldest-pending-job": ("ExtractionJobs", "OldestPendingAgeSeconds", "GreaterThan", 900, "breaching"),
        # events waiting in the outbox for the next sweep
        "events-publish-failed": ("ExtractionJobs", "EventsPublishFailed", "GreaterThanOrEqualTo", 1, "notBreaching"),
    }  # fmt: skip
    assert alarms["lambda-duration-p99"]["extended_statistic"] == "p99"
    rate = {q["id"]: q for q in alarms["api-5xx-rate"]["metric_query"]}
    assert (
        rate["rate"]["expression"] == "IF(requests >= 10, 100 * errors / requests, 0)"
    )
    assert {
        (rate[i]["metric"][0]["namespace"], rate[i]["metric"][0]["metric_name"])
        for i in ("errors", "requests")
    } == {("AWS/ApiGateway", "5xx"), ("AWS/ApiGateway", "Count")}


def test_every_alarm_notifies_the_created_topic(plan: dict, resources: dict) -> None:
    assert resources["aws_sns_topic.alarms[0]"]["name"] == f"{NAME}-alarms"
    assert of_type(resources, "aws_sns_topic_subscription") == {}  # no alarm_email
    alarms = of_type(resources, "aws_cloudwatch_metric_alarm")
    assert len(alarms) == 10
    for address in alarms:
        config_address = address.split("[")[0]
        for actions in ("alarm_actions", "ok_actions"):
            assert references(plan, config_address, actions) == [
                "local.alarm_topic_arn"
            ]


def test_one_schedule_the_sweep_publishes_the_gauges_through_one_role(
    plan: dict, resources: dict
) -> None:
    """The gauges the alarms read come with the sweep (lambda_handler's sweep
    task): one schedule, one scheduler role and policy, no stats schedule."""
    assert list(of_type(resources, "aws_scheduler_schedule")) == [
        "aws_scheduler_schedule.sweep"
    ]
    schedule = resources["aws_scheduler_schedule.sweep"]
    assert schedule["schedule_expression"] == "rate(1 minute)"
    (target,) = schedule["target"]
    assert json.loads(target["input"]) == {"task": "sweep"}
    assert target["retry_policy"][0]["maximum_retry_attempts"] == 0
    assert "aws_lambda_function.api.arn" in references(
        plan, "aws_scheduler_schedule.sweep", "target", 0, "arn"
    )
    assert "aws_iam_role.sweep_scheduler.arn" in references(
        plan, "aws_scheduler_schedule.sweep", "target", 0, "role_arn"
    )
    scheduler_roles = [
        address
        for address, role in of_type(resources, "aws_iam_role").items()
        if "scheduler.amazonaws.com" in role.get("assume_role_policy", "")
    ]
    assert scheduler_roles == ["aws_iam_role.sweep_scheduler"]
    assert "data.aws_iam_policy_document.sweep_invoke" in references(
        plan, "aws_iam_role_policy.sweep_invoke", "policy"
    )
    variables = plan["configuration"]["root_module"]["variables"]
    assert "stats_schedule_expression" not in variables
    assert "sweep_schedule" in variables


def test_function_environment_and_tracing_default(plan: dict, resources: dict) -> None:
    """The values are checked on the deployed function (the map is unknown
    until apply, as it holds the database address)."""
    env = references(plan, "aws_lambda_function.api", "environment", 0, "variables")
    assert {"var.log_level", "var.metrics_namespace"} <= set(env)
    function = resources["aws_lambda_function.api"]
    assert function["tracing_config"] == [{"mode": "PassThrough"}]


def test_monitoring_options_existing_topic_email_backlog_and_tracing(
    planner: Terraform,
) -> None:
    topic = "arn:aws:sns:us-east-1:123456789012:oncall"
    planner.run(
        "plan",
        "-out=options.tfplan",
        *("-var", f"alarm_topic_arn={topic}"),
        *("-var", "alarm_email=oncall@example.com"),
        *("-var", "pending_jobs_alarm_threshold=250"),
        *("-var", "enable_tracing=true"),
        *("-var", "metrics_namespace=Team/Jobs"),
        *("-var", "oldest_pending_alarm_seconds=600"),
    )
    resources = planned_resources(planner.show_json("options.tfplan"))
    assert of_type(resources, "aws_sns_topic") == {}
    subscription = resources["aws_sns_topic_subscription.alarm_email[0]"]
    assert (subscription["topic_arn"], subscription["protocol"]) == (topic, "email")
    alarms = alarms_by_name(resources)
    assert all(alarm["alarm_actions"] == [topic] for alarm in alarms.values())
    backlog = alarms["pending-jobs"]
    assert (backlog["namespace"], backlog["threshold"]) == ("Team/Jobs", 250)
    assert alarms["oldest-pending-job"]["threshold"] == 600
    function = resources["aws_lambda_function.api"]
    assert function["tracing_config"] == [{"mode": "Active"}]
    xray = resources["aws_iam_role_policy_attachment.lambda_xray[0]"]
    assert xray["policy_arn"].endswith(":policy/AWSXRayDaemonWriteAccess")


def test_bad_monitoring_values_are_refused(planner: Terraform) -> None:
    bad_values = {
        "log_level": "LOUD",
        "metrics_namespace": "AWS/Lambda",
        "alarm_email": "not-an-address",
        "alarm_topic_arn": "oncall",
        "alarm_duration_p99_percent_of_timeout": "100",
        "alarm_db_free_storage_percent": "0",
        "oldest_pending_alarm_seconds": "10",
        "pending_jobs_alarm_threshold": "-1",
    }
    args = [
        arg for name, value in bad_values.items() for arg in ("-var", f"{name}={value}")
    ]
    result = planner.run("plan", *args, expect_success=False)
    assert result.returncode == 1
    errors = " ".join(result.stderr.split())
    for name in bad_values:
        assert f"{name} must" in errors, name


# --- Resilience: CORS, public throttles, RDS Proxy, TLS verification ----------


def test_public_routes_have_a_throttle_of_their_own(resources: dict) -> None:
    stage = resources["aws_apigatewayv2_stage.default"]
    throttles = {
        setting["route_key"]: (
            setting["throttling_burst_limit"],
            setting["throttling_rate_limit"],
        )
        for setting in stage["route_settings"]
    }
    assert throttles == dict.fromkeys(PUBLIC_ROUTES, (20, 10))
    default = stage["default_route_settings"][0]
    assert (default["throttling_burst_limit"], default["throttling_rate_limit"]) == (
        100,
        50,
    )


def test_the_migration_function_has_a_security_group_of_its_own(
    plan: dict, no_nat_resources: dict
) -> None:
    assert references(
        plan, "aws_lambda_function.migration", "vpc_config", 0, "security_group_ids"
    ) == ["aws_security_group.migration.id", "aws_security_group.migration"]
    # Without NAT: HTTPS to the Secrets Manager endpoint only, which admits
    # the migration function only.
    assert "aws_security_group_rule.migration_https_out[0]" not in no_nat_resources
    assert "aws_security_group_rule.migration_https_to_endpoints[0]" in (
        no_nat_resources
    )
    assert (
        security_group_of(
            plan,
            "aws_security_group_rule.migration_https_to_endpoints",
            "source_security_group_id",
        )
        == "aws_security_group.endpoints[0]"
    )
    assert (
        security_group_of(
            plan,
            "aws_security_group_rule.endpoints_https_in",
            "source_security_group_id",
        )
        == "aws_security_group.migration"
    )


CORS_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def proxy_plan(planner: Terraform) -> dict:
    """One plan with the options of this section (each plan costs seconds)."""
    planner.run(
        "plan",
        *("-var", "enable_rds_proxy=true"),
        *("-var", "db_ssl_root_cert=rds-ca-bundle.pem"),
        *("-var", f'cors_allow_origins=["{CORS_ORIGIN}"]'),
        "-out=proxy.tfplan",
    )
    return planner.show_json("proxy.tfplan")


def test_cors_lets_browsers_send_and_read_the_apis_own_headers(
    proxy_plan: dict,
) -> None:
    (cors,) = planned_resources(proxy_plan)["aws_apigatewayv2_api.main"][
        "cors_configuration"
    ]
    assert cors["allow_origins"] == [CORS_ORIGIN]
    assert set(cors["allow_headers"]) == {
        "authorization",
        "content-type",
        "if-match",
        "idempotency-key",
        "x-request-id",
    }
    assert set(cors["expose_headers"]) == {
        "etag",
        "location",
        "link",
        "idempotent-replayed",
        "retry-after",
        "x-request-id",
    }


def test_rds_proxy_requires_tls_and_iam_and_reads_one_secret(proxy_plan: dict) -> None:
    resources = planned_resources(proxy_plan)
    proxy = resources["aws_db_proxy.main[0]"]
    assert (proxy["engine_family"], proxy["require_tls"], proxy["debug_logging"]) == (
        "POSTGRESQL",
        True,
        False,
    )
    (auth,) = proxy["auth"]
    assert (auth["auth_scheme"], auth["iam_auth"]) == ("SECRETS", "REQUIRED")
    assert "aws_secretsmanager_secret.app_db" in references(
        proxy_plan, "aws_db_proxy.main", "auth", 0, "secret_arn"
    )
    assert "aws_subnet.database" in references(
        proxy_plan, "aws_db_proxy.main", "vpc_subnet_ids"
    )
    secret = resources["aws_secretsmanager_secret.app_db[0]"]
    assert "secret_string" not in secret, "the password is never Terraform's"
    assume = json.loads(resources["aws_iam_role.proxy[0]"]["assume_role_policy"])
    assert [s["Principal"] for s in assume["Statement"]] == [
        {"Service": "rds.amazonaws.com"}
    ]
    pool = resources["aws_db_proxy_default_target_group.main[0]"]
    (config,) = pool["connection_pool_config"]
    assert (config["max_connections_percent"], config["connection_borrow_timeout"]) == (
        80,
        5,
    )
    assert "aws_db_proxy_target.main[0]" in resources
    assert "aws_db_instance.main" in references(
        proxy_plan, "aws_db_proxy_target.main", "db_instance_identifier"
    )


def test_with_rds_proxy_the_api_reaches_the_database_only_through_it(
    proxy_plan: dict,
) -> None:
    resources = planned_resources(proxy_plan)
    function = resources["aws_lambda_function.api"]
    assert function["reserved_concurrent_executions"] == 100
    rules = {
        (
            security_group_of(proxy_plan, address, "security_group_id"),
            rule["type"],
            rule["from_port"],
            security_group_of(proxy_plan, address, "source_security_group_id"),
        )
        for address, rule in of_type(resources, "aws_security_group_rule").items()
        if rule["from_port"] == 5432
    }
    lambda_, database, migration, proxy = (
        f"aws_security_group.{name}"
        for name in ("lambda", "database", "migration", "proxy[0]")
    )
    assert rules == {
        (lambda_, "egress", 5432, proxy),
        (proxy, "ingress", 5432, lambda_),
        (proxy, "egress", 5432, database),
        (database, "ingress", 5432, proxy),
        (migration, "egress", 5432, database),  # migrations: directly
        (database, "ingress", 5432, migration),
    }
    (connect,) = policy_statements(proxy_plan)[
        "data.aws_iam_policy_document.lambda_rds_connect"
    ]
    assert "local.proxy_resource_id" in connect["resources"]["references"]
    # The role's login changes hands: the migration runs again first.
    invocation = resources["aws_lambda_invocation.migrate[0]"]
    assert invocation["triggers"]["app_login"] == "rds-proxy"
    alarms = alarms_by_name(resources)
    assert "db-connections" not in alarms
    pinned = alarms["rds-proxy-pinned"]
    assert (pinned["metric_name"], pinned["threshold"]) == (
        "DatabaseConnectionsCurrentlySessionPinned",
        0,
    )
    assert alarms["rds-proxy-borrow-latency"]["metric_name"] == (
        "DatabaseConnectionsBorrowLatency"
    )


# --- Job events on EventBridge ---------------------------------------------------


def test_job_events_go_to_a_custom_bus_the_function_alone_may_put_to(
    plan: dict, resources: dict
) -> None:
    bus = resources["aws_cloudwatch_event_bus.jobs[0]"]
    assert bus["name"] == NAME
    (put,) = policy_statements(plan)["data.aws_iam_policy_document.lambda_put_events"]
    assert put["actions"] == {"constant_value": ["events:PutEvents"]}
    assert put["resources"]["references"] == ["local.event_bus_arn"]
    assert "aws_iam_role.lambda" in references(
        plan, "aws_iam_role_policy.lambda_put_events", "role"
    )
    # (The function's environment is checked deployed: it is unknown until
    # apply, as it holds the database address.)
    env = references(plan, "aws_lambda_function.api", "environment", 0, "variables")
    assert "local.event_bus_name" in env
    # The example consumer is off by default.
    assert of_type(resources, "aws_sqs_queue") == {}
    assert of_type(resources, "aws_cloudwatch_event_rule") == {}


def test_an_existing_bus_is_used_by_name_and_not_created(
    planner: Terraform, moto_endpoint: str
) -> None:
    events = emulator_client(moto_endpoint, "events")
    events.create_event_bus(Name="shared-bus")
    try:
        planner.run("plan", "-var", "event_bus_name=shared-bus", "-out=bus.tfplan")
        plan = planner.show_json("bus.tfplan")
    finally:
        events.delete_event_bus(Name="shared-bus")
    resources = planned_resources(plan)
    assert of_type(resources, "aws_cloudwatch_event_bus") == {}
    (statement,) = json.loads(
        resources["aws_iam_role_policy.lambda_put_events"]["policy"]
    )["Statement"]
    assert statement["Resource"].endswith(":event-bus/shared-bus")


def test_the_example_queue_takes_this_deployments_job_events_only(
    planner: Terraform,
) -> None:
    planner.run("plan", "-var", "downstream_queue_enabled=true", "-out=queue.tfplan")
    plan = planner.show_json("queue.tfplan")
    resources = planned_resources(plan)
    queue = resources["aws_sqs_queue.downstream[0]"]
    assert queue["sqs_managed_sse_enabled"] is True
    rule = resources["aws_cloudwatch_event_rule.downstream[0]"]
    assert json.loads(rule["event_pattern"]) == {"source": ["extraction-jobs"]}
    assert rule["event_bus_name"] == NAME
    assert "aws_sqs_queue.downstream[0].arn" in references(
        plan, "aws_cloudwatch_event_target.downstream", "arn"
    )
    (statement,) = policy_statements(plan)[
        "data.aws_iam_policy_document.downstream_queue"
    ]
    assert statement["actions"]["constant_value"] == ["sqs:SendMessage"]
    assert statement["principals"][0]["identifiers"]["constant_value"] == [
        "events.amazonaws.com"
    ]
    (condition,) = statement["condition"]
    assert condition["variable"]["constant_value"] == "aws:SourceArn"
    assert condition["values"]["references"][0].startswith(
        "aws_cloudwatch_event_rule.downstream[0]"
    )


def test_bad_event_bus_values_are_refused(planner: Terraform) -> None:
    for value, says in (
        ("arn:aws:events:us-east-1:1:event-bus/x", "a bus name, not an ARN"),
        ("default", "custom bus"),
    ):
        refused = planner.run(
            "plan", "-var", f"event_bus_name={value}", expect_success=False
        )
        assert refused.returncode != 0
        assert says in " ".join(refused.stderr.split())
