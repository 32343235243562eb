"""What the apply cycle checks in moto after `terraform apply` and `destroy`:
the deployed state as the emulator holds it, not as Terraform planned it.
"""

import json

import boto3
from sqlalchemy import make_url
from terraform_helpers import EMULATOR_REGION

NAME = "extraction-jobs"  # var.name's default


def emulator_client(endpoint: str, service: str):
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=EMULATOR_REGION,
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def state_values(state: dict) -> dict[str, dict]:
    return {
        res["address"]: res["values"]
        for res in state["values"]["root_module"]["resources"]
    }


def assert_function_wired_to_private_network_and_database(
    endpoint: str, deployed: dict, variables: dict
) -> None:
    """Subnets, security group and environment of the deployed function;
    DATABASE_URL is parsed back to prove the password survived URL-encoding."""
    config = emulator_client(endpoint, "lambda").get_function_configuration(
        FunctionName=NAME
    )
    private = {deployed[f"aws_subnet.private[{i}]"]["id"] for i in range(2)}
    assert set(config["VpcConfig"]["SubnetIds"]) == private
    assert config["VpcConfig"]["SecurityGroupIds"] == [
        deployed["aws_security_group.lambda"]["id"]
    ]

    env = config["Environment"]["Variables"]
    assert set(env) == {
        "DATABASE_URL",
        "AUTH0_DOMAIN",
        "AUTH0_AUDIENCE",
        "AUTH_DISABLED",
    }
    assert env["AUTH_DISABLED"] == "0"
    assert (env["AUTH0_DOMAIN"], env["AUTH0_AUDIENCE"]) == (
        variables["auth0_domain"],
        variables["auth0_audience"],
    )
    assert variables["db_password"] not in env["DATABASE_URL"], (
        "the password must be URL-encoded"
    )
    url = make_url(env["DATABASE_URL"])
    db = deployed["aws_db_instance.main"]
    assert (url.drivername, url.username, url.password) == (
        "postgresql",
        "extraction_app",
        variables["db_password"],
    )
    assert (url.host, url.port, url.database) == (
        db["address"],
        5432,
        "extraction_jobs",
    )
    assert url.query == {"sslmode": "require"}


def assert_network_isolation(endpoint: str, deployed: dict) -> None:
    ec2 = emulator_client(endpoint, "ec2")

    def routes_of(tier: str) -> list[dict]:
        subnet_ids = [deployed[f"aws_subnet.{tier}[{i}]"]["id"] for i in range(2)]
        tables = ec2.describe_route_tables(
            Filters=[{"Name": "association.subnet-id", "Values": subnet_ids}]
        )
        return [route for table in tables["RouteTables"] for route in table["Routes"]]

    assert all(route.get("GatewayId") == "local" for route in routes_of("database"))
    default_routes = [
        r for r in routes_of("private") if r.get("DestinationCidrBlock") == "0.0.0.0/0"
    ]
    assert [r.get("NatGatewayId") for r in default_routes] == [
        deployed["aws_nat_gateway.main[0]"]["id"]
    ]

    lambda_sg = deployed["aws_security_group.lambda"]["id"]
    database_sg = deployed["aws_security_group.database"]["id"]
    groups = {
        group["GroupId"]: group
        for group in ec2.describe_security_groups(
            GroupIds=[
                lambda_sg,
                database_sg,
                deployed["aws_default_security_group.default"]["id"],
            ]
        )["SecurityGroups"]
    }

    def summary(permissions: list[dict]) -> set[tuple]:
        return {
            (
                p["IpProtocol"],
                p["FromPort"],
                p["ToPort"],
                r.get("CidrIp") or r.get("GroupId"),
            )
            for p in permissions
            for r in p["IpRanges"] + p["UserIdGroupPairs"]
        }

    assert groups[lambda_sg]["IpPermissions"] == []
    assert summary(groups[lambda_sg]["IpPermissionsEgress"]) == {
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("tcp", 5432, 5432, database_sg),
    }
    assert summary(groups[database_sg]["IpPermissions"]) == {
        ("tcp", 5432, 5432, lambda_sg)
    }
    assert groups[database_sg]["IpPermissionsEgress"] == []
    default_group = groups[deployed["aws_default_security_group.default"]["id"]]
    assert (default_group["IpPermissions"], default_group["IpPermissionsEgress"]) == (
        [],
        [],
    )


def unexpected_changes(plan: dict) -> list[tuple[str, list[str]]]:
    """Planned changes other than moto's one known gap: it does not report a
    parameter's source, so the provider re-adds the parameter group's
    parameters (the same values) on every plan."""
    unexpected = []
    for resource in plan.get("resource_changes", []):
        change = resource["change"]
        if change["actions"] in (["no-op"], ["read"]):
            continue
        if resource["address"] == "aws_db_parameter_group.main" and change[
            "actions"
        ] == ["update"]:
            before = {
                key: value
                for key, value in change["before"].items()
                if key != "parameter"
            }
            after = {
                key: value
                for key, value in change["after"].items()
                if key != "parameter"
            }
            readded = [
                {"apply_method": "immediate", "name": "rds.force_ssl", "value": "1"}
            ]
            if before == after and change["after"]["parameter"] == readded:
                continue
        unexpected.append((resource["address"], change["actions"]))
    unexpected += [
        (f"output.{name}", output["actions"])
        for name, output in plan.get("output_changes", {}).items()
        if output["actions"] != ["no-op"]
    ]
    return unexpected


def leftovers(endpoint: str) -> dict[str, list]:
    """Whatever of this deployment is still in the emulator."""
    ec2 = emulator_client(endpoint, "ec2")
    rds = emulator_client(endpoint, "rds")
    found = {
        "vpcs": [v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"] if not v["IsDefault"]],
        "addresses": [a["AllocationId"] for a in ec2.describe_addresses()["Addresses"]],
        "nat_gateways": [
            n["NatGatewayId"]
            for n in ec2.describe_nat_gateways()["NatGateways"]
            if n["State"] != "deleted"
        ],
        "db_instances": [
            d["DBInstanceIdentifier"]
            for d in rds.describe_db_instances()["DBInstances"]
        ],
        "db_subnet_groups": [
            g["DBSubnetGroupName"]
            for g in rds.describe_db_subnet_groups()["DBSubnetGroups"]
        ],
        "db_parameter_groups": [
            g["DBParameterGroupName"]
            for g in rds.describe_db_parameter_groups()["DBParameterGroups"]
            if g["DBParameterGroupName"].startswith(NAME)
        ],
        "functions": [
            f["FunctionName"]
            for f in emulator_client(endpoint, "lambda").list_functions()["Functions"]
        ],
        "apis": [
            a["ApiId"]
            for a in emulator_client(endpoint, "apigatewayv2").get_apis()["Items"]
        ],
        "log_groups": [
            g["logGroupName"]
            for g in emulator_client(endpoint, "logs").describe_log_groups()[
                "logGroups"
            ]
        ],
        "roles": [
            r["RoleName"]
            for r in emulator_client(endpoint, "iam").list_roles()["Roles"]
            if r["RoleName"].startswith(NAME)
        ],
    }
    return {kind: names for kind, names in found.items() if names}


def assert_sweep_schedule_invokes_the_function(endpoint: str, deployed: dict) -> None:
    """The EventBridge Scheduler schedule targets the API function with the
    sweep event lambda_handler routes, through a role that may invoke it."""
    schedule = emulator_client(endpoint, "scheduler").get_schedule(Name=f"{NAME}-sweep")
    assert schedule["ScheduleExpression"] == "rate(1 minute)"
    assert schedule["Target"]["Arn"] == deployed["aws_lambda_function.api"]["arn"]
    assert json.loads(schedule["Target"]["Input"]) == {"task": "sweep"}
    role = deployed["aws_iam_role.sweep_scheduler"]
    assert schedule["Target"]["RoleArn"] == role["arn"]
    assert "scheduler.amazonaws.com" in role["assume_role_policy"]
    policy = json.loads(deployed["aws_iam_role_policy.sweep_invoke"]["policy"])
    [statement] = policy["Statement"]
    assert statement["Action"] == "lambda:InvokeFunction"
    assert statement["Resource"] == deployed["aws_lambda_function.api"]["arn"]


def assert_api_invokes_the_snapstart_alias(endpoint: str, deployed: dict) -> None:
    """With enable_snapstart: a published version, the `live` alias on it, and
    the HTTP API's integration and invoke permission on that alias. Whether
    Lambda really snapshots and restores is beyond the emulator."""
    lambda_ = emulator_client(endpoint, "lambda")
    alias = lambda_.get_alias(FunctionName=NAME, Name="live")
    assert alias["FunctionVersion"].isdigit(), alias  # published, not $LATEST
    assert alias["FunctionVersion"] == deployed["aws_lambda_function.api"]["version"]
    api_id = deployed["aws_apigatewayv2_api.main"]["id"]
    integrations = emulator_client(endpoint, "apigatewayv2").get_integrations(
        ApiId=api_id
    )["Items"]
    assert [item["IntegrationUri"] for item in integrations] == [
        deployed["aws_lambda_alias.live[0]"]["invoke_arn"]
    ]
    assert integrations[0]["IntegrationUri"].endswith(
        f":function:{NAME}:live/invocations"
    )
    assert deployed["aws_lambda_permission.api_gateway"]["qualifier"] == "live"


def unexpected_changes_under_snapstart(plan: dict) -> list[tuple[str, list[str]]]:
    """`unexpected_changes`, less moto's gap with SnapStart: it does not keep a
    function's SnapStart setting, so every plan re-adds it to the function,
    which would publish a new version and move the alias onto it."""
    gaps = []
    for resource in plan.get("resource_changes", []):
        change = resource["change"]
        if change["actions"] != ["update"]:
            continue
        before, after = change["before"], change["after"]
        changed = {
            key
            for key in before.keys() | after.keys()
            if before.get(key) != after.get(key)
        }
        if resource["address"] == "aws_lambda_function.api":
            readded = after["snap_start"][0]["apply_on"] == "PublishedVersions"
            republished = {
                "snap_start",
                "version",
                "qualified_arn",
                "qualified_invoke_arn",
            }
            if before["snap_start"] == [] and readded and changed <= republished:
                gaps.append(resource["address"])
        elif (
            resource["address"] == "aws_lambda_alias.live[0]"
            and changed == {"function_version"}  # onto the version above
        ):
            gaps.append(resource["address"])
    return [change for change in unexpected_changes(plan) if change[0] not in gaps]
