"""What the apply cycle checks in moto after `terraform apply` and `destroy`:
the deployed state as the emulator holds it, not as Terraform planned it.
"""

import fnmatch
import json
import re
from collections.abc import Iterator

import boto3
from sqlalchemy import make_url
from terraform_helpers import EMULATOR_REGION

import observability

NAME = "extraction-jobs"  # var.name's default
# The parameter group's parameters, as terraform/rds.tf sets them.
DB_PARAMETERS = {
    "rds.force_ssl": "1",
    "log_min_error_statement": "panic",
    "log_error_verbosity": "terse",
}


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
        "DB_IAM_AUTH",
        "AUTH0_DOMAIN",
        "AUTH0_AUDIENCE",
        "AUTH_DISABLED",
        "LOG_LEVEL",
        "METRICS_ENABLED",
        "METRICS_NAMESPACE",
        "EVENT_BUS_NAME",
        *(
            ["AUTH0_CONSOLE_CLIENT_ID"]
            if "auth0_console_client_id" in variables
            else []
        ),
    }
    if "auth0_console_client_id" in variables:
        assert env["AUTH0_CONSOLE_CLIENT_ID"] == variables["auth0_console_client_id"]
    assert env["AUTH_DISABLED"] == "0"
    assert (env["LOG_LEVEL"], env["METRICS_ENABLED"], env["METRICS_NAMESPACE"]) == (
        "INFO",
        "1",
        "ExtractionJobs",
    )
    assert (env["AUTH0_DOMAIN"], env["AUTH0_AUDIENCE"]) == (
        variables["auth0_domain"],
        variables["auth0_audience"],
    )
    # IAM database authentication: the URL holds no password.
    assert env["DB_IAM_AUTH"] == "1"
    url = make_url(env["DATABASE_URL"])
    db = deployed["aws_db_instance.main"]
    assert (url.drivername, url.username, url.password) == (
        "postgresql",
        "extraction_app",
        None,
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
    migration_sg = deployed["aws_security_group.migration"]["id"]
    groups = security_groups(
        endpoint,
        lambda_sg,
        database_sg,
        migration_sg,
        deployed["aws_default_security_group.default"]["id"],
    )
    assert groups[lambda_sg]["IpPermissions"] == []
    assert summary(groups[lambda_sg]["IpPermissionsEgress"]) == {
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("tcp", 5432, 5432, database_sg),
    }
    assert summary(groups[database_sg]["IpPermissions"]) == {
        ("tcp", 5432, 5432, lambda_sg),
        ("tcp", 5432, 5432, migration_sg),
    }
    assert groups[database_sg]["IpPermissionsEgress"] == []
    # The migration function's own: the database, and HTTPS through the NAT.
    assert groups[migration_sg]["IpPermissions"] == []
    assert summary(groups[migration_sg]["IpPermissionsEgress"]) == {
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("tcp", 5432, 5432, database_sg),
    }
    default_group = groups[deployed["aws_default_security_group.default"]["id"]]
    assert (default_group["IpPermissions"], default_group["IpPermissionsEgress"]) == (
        [],
        [],
    )


def security_groups(endpoint: str, *group_ids: str) -> dict[str, dict]:
    ec2 = emulator_client(endpoint, "ec2")
    return {
        group["GroupId"]: group
        for group in ec2.describe_security_groups(GroupIds=list(group_ids))[
            "SecurityGroups"
        ]
    }


def summary(permissions: list[dict]) -> set[tuple]:
    """(protocol, from port, to port, CIDR or group) of each rule."""
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
            readded = sorted(
                (
                    {"apply_method": "immediate", "name": name, "value": value}
                    for name, value in DB_PARAMETERS.items()
                ),
                key=lambda parameter: parameter["name"],
            )
            parameters = sorted(
                change["after"]["parameter"], key=lambda parameter: parameter["name"]
            )
            if before == after and parameters == readded:
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
        "db_proxies": [
            p["DBProxyName"] for p in rds.describe_db_proxies()["DBProxies"]
        ],
        "event_buses": [
            bus["Name"]
            for bus in emulator_client(endpoint, "events").list_event_buses()[
                "EventBuses"
            ]
            if bus["Name"] != "default"
        ],
        "queues": emulator_client(endpoint, "sqs").list_queues().get("QueueUrls", []),
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


def assert_gateway_authorizer(endpoint: str, deployed: dict, variables: dict) -> None:
    """The HTTP API as the emulator holds it: an Auth0 JWT authorizer on the
    job routes, the public routes without one, and no other route."""
    gateway = emulator_client(endpoint, "apigatewayv2")
    api_id = deployed["aws_apigatewayv2_api.main"]["id"]
    authorizer = gateway.get_authorizer(
        ApiId=api_id,
        AuthorizerId=deployed["aws_apigatewayv2_authorizer.auth0[0]"]["id"],
    )
    assert authorizer["AuthorizerType"] == "JWT"
    assert authorizer["IdentitySource"] == ["$request.header.Authorization"]
    assert authorizer["JwtConfiguration"] == {
        "Issuer": f"https://{variables['auth0_domain']}/",
        "Audience": [variables["auth0_audience"]],
    }
    routes = gateway.get_routes(ApiId=api_id)["Items"]
    integration = deployed["aws_apigatewayv2_integration.lambda"]["id"]
    assert {route["Target"] for route in routes} == {f"integrations/{integration}"}
    jwt = ("JWT", authorizer["AuthorizerId"])
    public = ("NONE", None)
    assert {
        route["RouteKey"]: (route.get("AuthorizationType"), route.get("AuthorizerId"))
        for route in routes
    } == {
        "ANY /extraction-jobs": jwt,
        "ANY /extraction-jobs/{proxy+}": jwt,
        "GET /health": public,
        "GET /docs": public,
        "GET /openapi.json": public,
        "GET /redoc": public,
        "GET /docs-assets/{proxy+}": public,
        "GET /console": public,
        "GET /console/{proxy+}": public,
    }


MIGRATION_FUNCTION = f"{NAME}-migrate"


def master_secret(endpoint: str) -> tuple[str, str]:
    """The ARN and the password RDS keeps for the master user (the emulator's)."""
    (instance,) = emulator_client(endpoint, "rds").describe_db_instances(
        DBInstanceIdentifier=NAME
    )["DBInstances"]
    arn = instance["MasterUserSecret"]["SecretArn"]
    secret = emulator_client(endpoint, "secretsmanager").get_secret_value(SecretId=arn)
    password = json.loads(secret["SecretString"])["password"]
    assert len(password) >= 8, "RDS made a password"
    return arn, password


def _strings(value) -> Iterator[tuple[str, str]]:
    """Every (key, string) in a JSON document, at any depth."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                yield key, item
            else:
                yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def assert_no_password_in_state_or_environment(
    endpoint: str, state: dict, raw_state: str
) -> None:
    """No value in `terraform show -json`, the state file, or either function's
    environment holds the master password (or any password at all)."""
    _, password = master_secret(endpoint)
    assert password not in json.dumps(state)
    assert password not in raw_state
    holding = [
        (key, value)
        for key, value in _strings(state)
        if "password" in key.lower() and value
    ]
    assert holding == [], "a password attribute holds a value"
    lambdas = emulator_client(endpoint, "lambda")
    for function in (NAME, MIGRATION_FUNCTION):
        env = lambdas.get_function_configuration(FunctionName=function)["Environment"]
        for key, value in env["Variables"].items():
            assert password not in value, (function, key)
            assert "password" not in key.lower(), (function, key)
            if key == "DATABASE_URL":
                assert make_url(value).password is None, (function, key)


def assert_migration_function_reads_the_secret_by_arn(endpoint: str) -> None:
    arn, _ = master_secret(endpoint)
    config = emulator_client(endpoint, "lambda").get_function_configuration(
        FunctionName=MIGRATION_FUNCTION
    )
    assert config["Handler"] == "lambda_handler.migrate"
    env = config["Environment"]["Variables"]
    assert env["DB_MASTER_SECRET_ARN"] == arn
    assert env["DB_APP_USER"] == "extraction_app"
    url = make_url(env["DATABASE_URL"])
    assert (url.username, url.password, url.query) == (
        None,
        None,
        {"sslmode": "require"},
    )
    assert config["VpcConfig"]["SubnetIds"], "inside the VPC, next to the database"
    assert (
        config["VpcConfig"]["SecurityGroupIds"]
        != (
            emulator_client(endpoint, "lambda").get_function_configuration(
                FunctionName=NAME
            )["VpcConfig"]["SecurityGroupIds"]
        )
    ), "a security group of its own, not the API function's"


def _role_statements(iam, role: str) -> list[dict]:
    documents = [
        iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"]
        for name in iam.list_role_policies(RoleName=role)["PolicyNames"]
    ]
    for attached in iam.list_attached_role_policies(RoleName=role)["AttachedPolicies"]:
        policy = iam.get_policy(PolicyArn=attached["PolicyArn"])["Policy"]
        documents.append(
            iam.get_policy_version(
                PolicyArn=attached["PolicyArn"], VersionId=policy["DefaultVersionId"]
            )["PolicyVersion"]["Document"]
        )
    statements = []
    for document in documents:
        if isinstance(document, str):
            document = json.loads(document)
        found = document["Statement"]
        statements += found if isinstance(found, list) else [found]
    return statements


def _as_list(value) -> list[str]:
    return value if isinstance(value, list) else [value]


def _allows(statements: list[dict], action: str, resource: str) -> list[dict]:
    return [
        statement
        for statement in statements
        if statement.get("Effect") == "Allow"
        and any(
            fnmatch.fnmatchcase(action, pattern)
            for pattern in _as_list(statement.get("Action", []))
        )
        and any(
            fnmatch.fnmatchcase(resource, pattern)
            for pattern in _as_list(statement.get("Resource", []))
        )
    ]


def assert_only_the_migration_role_reads_the_secret(endpoint: str) -> None:
    arn, _ = master_secret(endpoint)
    iam = emulator_client(endpoint, "iam")
    roles = [r["RoleName"] for r in iam.list_roles()["Roles"]]
    readers = {
        role
        for role in roles
        if _allows(_role_statements(iam, role), "secretsmanager:GetSecretValue", arn)
    }
    assert readers == {MIGRATION_FUNCTION}


def assert_job_events_deployed(endpoint: str) -> None:
    """The bus, the function's right to put to it (and to nothing else), its
    EVENT_BUS_NAME, and the example rule delivering an event to the queue."""
    events = emulator_client(endpoint, "events")
    bus = events.describe_event_bus(Name=NAME)
    function = emulator_client(endpoint, "lambda").get_function_configuration(
        FunctionName=NAME
    )
    assert function["Environment"]["Variables"]["EVENT_BUS_NAME"] == NAME
    iam = emulator_client(endpoint, "iam")
    putters = {
        role["RoleName"]
        for role in iam.list_roles()["Roles"]
        if _allows(
            _role_statements(iam, role["RoleName"]), "events:PutEvents", bus["Arn"]
        )
    }
    assert putters == {f"{NAME}-lambda"}
    assert not _allows(
        _role_statements(iam, f"{NAME}-lambda"),
        "events:PutEvents",
        "*:event-bus/default",
    )
    (rule,) = events.list_rules(EventBusName=NAME)["Rules"]
    assert json.loads(rule["EventPattern"]) == {"source": ["extraction-jobs"]}
    (target,) = events.list_targets_by_rule(Rule=rule["Name"], EventBusName=NAME)[
        "Targets"
    ]
    sqs = emulator_client(endpoint, "sqs")
    queue = sqs.get_queue_url(QueueName=f"{NAME}-job-events")["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])[
        "Attributes"
    ]
    assert target["Arn"] == attributes["QueueArn"]
    (allowed,) = json.loads(attributes["Policy"])["Statement"]
    assert allowed["Principal"] == {"Service": "events.amazonaws.com"}
    assert allowed["Condition"]["ArnEquals"]["aws:SourceArn"] == rule["Arn"]
    sent = events.put_events(
        Entries=[
            {
                "Source": "extraction-jobs",
                "DetailType": "job.completed",
                "Detail": json.dumps({"job_id": "deployed"}),
                "EventBusName": NAME,
            }
        ]
    )
    assert sent["FailedEntryCount"] == 0
    received = sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=2)["Messages"]
    assert json.loads(received[0]["Body"])["detail"] == {"job_id": "deployed"}


def assert_api_role_connects_as_exactly_the_app_user(endpoint: str) -> None:
    """rds-db:connect on one dbuser resource: this instance, extraction_app."""
    (instance,) = emulator_client(endpoint, "rds").describe_db_instances(
        DBInstanceIdentifier=NAME
    )["DBInstances"]
    assert instance["IAMDatabaseAuthenticationEnabled"] is True
    role_arn = emulator_client(endpoint, "lambda").get_function_configuration(
        FunctionName=NAME
    )["Role"]
    iam = emulator_client(endpoint, "iam")
    statements = _role_statements(iam, role_arn.split("/")[-1])
    account = role_arn.split(":")[4]
    expected = (
        f"arn:aws:rds-db:{EMULATOR_REGION}:{account}:dbuser:"
        f"{instance['DbiResourceId']}/extraction_app"
    )
    dbusers = [
        resource
        for statement in statements
        for resource in _as_list(statement.get("Resource", []))
        if ":dbuser" in resource
    ]
    assert dbusers == [expected]
    (connect,) = _allows(statements, "rds-db:connect", expected)
    assert _as_list(connect["Action"]) == ["rds-db:connect"]
    master = expected.replace("/extraction_app", "/extraction_admin")
    assert _allows(statements, "rds-db:connect", master) == []


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


def assert_monitoring_deployed(
    endpoint: str, deployed: dict, variables: dict, *, proxy: bool
) -> None:
    """Alarms on the topic, the e-mail subscription, the dashboard and the one
    schedule (the sweep's, which publishes the gauges), as the emulator holds
    them."""
    topic = deployed["aws_sns_topic.alarms[0]"]["arn"]
    cloudwatch = emulator_client(endpoint, "cloudwatch")
    alarms = {
        alarm["AlarmName"].removeprefix(f"{NAME}-"): alarm
        for alarm in cloudwatch.describe_alarms(AlarmNamePrefix=f"{NAME}-")[
            "MetricAlarms"
        ]
    }
    # With RDS Proxy, the proxy caps the database's connections: its own
    # alarms instead of the connection count's.
    connections = (
        {"rds-proxy-pinned", "rds-proxy-borrow-latency"}
        if proxy
        else {"db-connections"}
    )
    assert set(alarms) == {
        "lambda-errors",
        "lambda-throttles",
        "lambda-duration-p99",
        "api-5xx-rate",
        "db-cpu",
        "db-free-storage",
        "db-freeable-memory",
        "oldest-pending-job",
        "pending-jobs",
        "events-publish-failed",
        *connections,
    }
    assert all(alarm["AlarmActions"] == [topic] for alarm in alarms.values())
    assert alarms["oldest-pending-job"]["TreatMissingData"] == "breaching"
    assert (
        alarms["pending-jobs"]["Threshold"] == variables["pending_jobs_alarm_threshold"]
    )
    assert {m["Id"] for m in alarms["api-5xx-rate"]["Metrics"]} == {
        "rate",
        "errors",
        "requests",
    }

    subscriptions = emulator_client(endpoint, "sns").list_subscriptions_by_topic(
        TopicArn=topic
    )["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subscriptions] == [
        ("email", variables["alarm_email"])
    ]

    widgets = json.loads(cloudwatch.get_dashboard(DashboardName=NAME)["DashboardBody"])[
        "widgets"
    ]
    entries = [
        metric
        for widget in widgets
        if widget["type"] == "metric"
        for metric in widget["properties"]["metrics"]
    ]
    metrics = [entry for entry in entries if isinstance(entry[0], str)]
    searches = [entry[0]["expression"] for entry in entries if entry not in metrics]
    # Every metric the app emits, and no other in its namespace; by route
    # ones through a SEARCH of the namespace.
    by_route = re.compile(r'\{"ExtractionJobs",route\} MetricName="(\w+)"')
    shown = [m[1] for m in metrics if m[0] == "ExtractionJobs"] + [
        name for search in searches for name in by_route.findall(search)
    ]
    assert sorted(shown) == sorted(observability.METRICS)
    assert {
        ("AWS/ApiGateway", "Count"),
        ("AWS/ApiGateway", "5xx"),
        ("AWS/ApiGateway", "Latency"),
        ("AWS/Lambda", "ConcurrentExecutions"),
        ("ExtractionJobs", "PendingJobs"),
        ("ExtractionJobs", "ProcessingJobs"),
        ("ExtractionJobs", "OldestPendingAgeSeconds"),
        ("ExtractionJobs", "JobsCreated"),
        ("AWS/RDS", "CPUUtilization"),
        ("AWS/RDS", "DatabaseConnections"),
        ("AWS/RDS", "FreeStorageSpace"),
    } <= {(metric[0], metric[1]) for metric in metrics}
    latency = {m[-1]["stat"] for m in metrics if m[:2] == ["AWS/ApiGateway", "Latency"]}
    assert latency == {"p50", "p90", "p99"}
    api_id = deployed["aws_apigatewayv2_api.main"]["id"]
    assert all(m[2:4] == ["ApiId", api_id] for m in metrics if m[0] == "AWS/ApiGateway")
    (cold_starts,) = [w for w in widgets if w["type"] == "log"]
    assert "@initDuration" in cold_starts["properties"]["query"]

    # The gauges come with the sweep: its schedule is the only one, and its
    # role the only one EventBridge Scheduler may assume.
    scheduler = emulator_client(endpoint, "scheduler")
    schedules = scheduler.list_schedules()["Schedules"]
    assert [s["Name"] for s in schedules if s["Name"].startswith(NAME)] == [
        f"{NAME}-sweep"
    ]
    assert [
        address
        for address, resource in deployed.items()
        if address.startswith("aws_iam_role.")
        and "scheduler.amazonaws.com" in resource["assume_role_policy"]
    ] == ["aws_iam_role.sweep_scheduler"]


def monitoring_leftovers(endpoint: str) -> dict[str, list]:
    """Whatever of this deployment's monitoring is still in the emulator."""
    cloudwatch = emulator_client(endpoint, "cloudwatch")
    found = {
        "alarms": [
            a["AlarmName"]
            for a in cloudwatch.describe_alarms(AlarmNamePrefix=f"{NAME}-")[
                "MetricAlarms"
            ]
        ],
        "dashboards": [
            d["DashboardName"]
            for d in cloudwatch.list_dashboards(DashboardNamePrefix=NAME)[
                "DashboardEntries"
            ]
        ],
        "topics": [
            t["TopicArn"]
            for t in emulator_client(endpoint, "sns").list_topics()["Topics"]
        ],
        "schedules": [
            s["Name"]
            for s in emulator_client(endpoint, "scheduler").list_schedules()[
                "Schedules"
            ]
        ],
    }
    return {kind: names for kind, names in found.items() if names}


def assert_api_goes_through_the_proxy(
    endpoint: str, deployed: dict, ca_bundle: str
) -> None:
    """With enable_rds_proxy: the proxy as the emulator holds it (TLS
    required, IAM auth, its one secret, the instance as its target), the API
    function pointed at it with DB_POOLER=1 and allowed to reach it only, the
    proxy's role reading that secret only, both functions verifying TLS."""
    rds = emulator_client(endpoint, "rds")
    (proxy,) = rds.describe_db_proxies(DBProxyName=NAME)["DBProxies"]
    secret_arn = deployed["aws_secretsmanager_secret.app_db[0]"]["arn"]
    assert (proxy["EngineFamily"], proxy["RequireTLS"]) == ("POSTGRESQL", True)
    [auth] = proxy["Auth"]
    assert (auth["AuthScheme"], auth["IAMAuth"], auth["SecretArn"]) == (
        "SECRETS",
        "REQUIRED",
        secret_arn,
    )
    assert proxy["RoleArn"] == deployed["aws_iam_role.proxy[0]"]["arn"]
    targets = rds.describe_db_proxy_targets(DBProxyName=NAME)["Targets"]
    assert [target["Type"] for target in targets] == ["RDS_INSTANCE"]
    # Never a value from Terraform: the migration function makes it.
    secrets = emulator_client(endpoint, "secretsmanager")
    assert "VersionIdsToStages" not in secrets.describe_secret(SecretId=secret_arn)

    lambdas = emulator_client(endpoint, "lambda")
    api = lambdas.get_function_configuration(FunctionName=NAME)
    env = api["Environment"]["Variables"]
    assert (env["DB_POOLER"], env["DB_IAM_AUTH"], env["DB_SSL_ROOT_CERT"]) == (
        "1",
        "1",
        ca_bundle,
    )
    assert make_url(env["DATABASE_URL"]).host == proxy["Endpoint"]
    concurrency = lambdas.get_function_concurrency(FunctionName=NAME)
    assert concurrency["ReservedConcurrentExecutions"] == 100
    migrate = lambdas.get_function_configuration(FunctionName=MIGRATION_FUNCTION)
    migrate_env = migrate["Environment"]["Variables"]
    assert migrate_env["DB_APP_SECRET_ARN"] == secret_arn
    assert migrate_env["DB_SSL_ROOT_CERT"] == ca_bundle
    db = deployed["aws_db_instance.main"]
    assert make_url(migrate_env["DATABASE_URL"]).host == db["address"], "directly"

    lambda_sg = deployed["aws_security_group.lambda"]["id"]
    proxy_sg = deployed["aws_security_group.proxy[0]"]["id"]
    database_sg = deployed["aws_security_group.database"]["id"]
    migration_sg = deployed["aws_security_group.migration"]["id"]
    assert proxy["VpcSecurityGroupIds"] == [proxy_sg]
    groups = security_groups(endpoint, lambda_sg, proxy_sg, database_sg)
    assert summary(groups[lambda_sg]["IpPermissionsEgress"]) == {
        ("tcp", 443, 443, "0.0.0.0/0"),
        ("tcp", 5432, 5432, proxy_sg),
    }
    assert summary(groups[proxy_sg]["IpPermissions"]) == {
        ("tcp", 5432, 5432, lambda_sg)
    }
    assert summary(groups[proxy_sg]["IpPermissionsEgress"]) == {
        ("tcp", 5432, 5432, database_sg)
    }
    assert summary(groups[database_sg]["IpPermissions"]) == {
        ("tcp", 5432, 5432, proxy_sg),
        ("tcp", 5432, 5432, migration_sg),
    }

    iam = emulator_client(endpoint, "iam")
    master_arn, _ = master_secret(endpoint)
    proxy_role = _role_statements(iam, f"{NAME}-rds-proxy")
    assert _allows(proxy_role, "secretsmanager:GetSecretValue", secret_arn)
    assert not _allows(proxy_role, "secretsmanager:GetSecretValue", master_arn)
    assert not _allows(proxy_role, "secretsmanager:PutSecretValue", secret_arn)
    migration_role = _role_statements(iam, MIGRATION_FUNCTION)
    assert _allows(migration_role, "secretsmanager:PutSecretValue", secret_arn)
    api_role = _role_statements(iam, api["Role"].split("/")[-1])
    account, proxy_id = api["Role"].split(":")[4], proxy["DBProxyArn"].split(":")[-1]
    through_proxy = (
        f"arn:aws:rds-db:{EMULATOR_REGION}:{account}:dbuser:{proxy_id}/extraction_app"
    )
    assert [
        resource
        for statement in api_role
        for resource in _as_list(statement.get("Resource", []))
        if ":dbuser" in resource
    ] == [through_proxy]
