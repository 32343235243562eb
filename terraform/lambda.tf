locals {
  function_name = var.name

  # With RDS Proxy the instances share its connections, so more may run.
  lambda_concurrency = coalesce(var.lambda_reserved_concurrency, var.enable_rds_proxy ? 100 : 10)

  # No password: DB_IAM_AUTH=1 makes the app sign an IAM token per connection
  # for the host it dials, the proxy's endpoint when there is one.
  database_url = format(
    "postgresql://%s@%s:%d/%s?sslmode=require",
    var.db_app_username,
    var.enable_rds_proxy ? aws_db_proxy.main[0].endpoint : aws_db_instance.main.address,
    local.db_port,
    var.db_name,
  )

  # sslmode=verify-full against the packaged bundle (the app's
  # DB_SSL_ROOT_CERT wins over the URL's require), for both functions.
  database_tls_env = var.db_ssl_root_cert == "" ? {} : { DB_SSL_ROOT_CERT = var.db_ssl_root_cert }
}

data "aws_iam_policy_document" "lambda_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "lambda" {
  name               = "${var.name}-lambda"
  description        = "Execution role of the ${var.name} Lambda"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume_role.json
}

# Logs and the VPC network interfaces: everything the function needs, nothing more.
resource "aws_iam_role_policy_attachment" "lambda_vpc_access" {
  role       = aws_iam_role.lambda.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

# IAM database authentication: connect as the application role, and only as it.
data "aws_caller_identity" "current" {}

data "aws_region" "current" {}

# With RDS Proxy, the proxy's resource id: the function may reach the
# database only through it.
data "aws_iam_policy_document" "lambda_rds_connect" {
  statement {
    actions = ["rds-db:connect"]
    resources = [format(
      "arn:%s:rds-db:%s:%s:dbuser:%s/%s",
      data.aws_partition.current.partition,
      data.aws_region.current.name,
      data.aws_caller_identity.current.account_id,
      var.enable_rds_proxy ? local.proxy_resource_id : aws_db_instance.main.resource_id,
      var.db_app_username,
    )]
  }
}

resource "aws_iam_role_policy" "lambda_rds_connect" {
  name   = "rds-db-connect"
  role   = aws_iam_role.lambda.id
  policy = data.aws_iam_policy_document.lambda_rds_connect.json
}

# Created before the function so that Lambda does not create it without a retention.
resource "aws_cloudwatch_log_group" "lambda" {
  #checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs' own keys; a customer-managed KMS key adds cost and a key policy to administer
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (default 30 days to bound cost); set it to 365 or more where a year is required
  name              = "/aws/lambda/${local.function_name}"
  retention_in_days = var.log_retention_days
}

resource "aws_lambda_function" "api" {
  #checkov:skip=CKV_AWS_116:Invoked synchronously by API Gateway; the caller gets the error, a dead-letter queue only applies to asynchronous invocations
  #checkov:skip=CKV_AWS_50:X-Ray tracing is opt-in (enable_tracing, default off): traces cost money per request and the request log already carries the ids
  #checkov:skip=CKV_AWS_272:The package is built locally by make build; there is no signing profile in this deployment
  #checkov:skip=CKV_AWS_173:Environment variables are encrypted at rest with the AWS-managed Lambda key; a customer-managed key adds cost and key administration
  function_name = local.function_name
  description   = "Extraction Job API (FastAPI behind Mangum)"
  role          = aws_iam_role.lambda.arn

  filename         = var.lambda_zip_path
  source_code_hash = filebase64sha256(var.lambda_zip_path)
  handler          = "lambda_handler.handler"
  runtime          = var.lambda_runtime
  architectures    = [var.lambda_architecture]
  memory_size      = 512
  timeout          = 30

  reserved_concurrent_executions = local.lambda_concurrency

  # SnapStart restores published versions from a snapshot of the initialised
  # environment; the API is then served by the `live` alias (below).
  publish = var.enable_snapstart

  dynamic "snap_start" {
    for_each = var.enable_snapstart ? [1] : []

    content {
      apply_on = "PublishedVersions"
    }
  }

  vpc_config {
    subnet_ids         = aws_subnet.private[*].id
    security_group_ids = [aws_security_group.lambda.id]
  }

  environment {
    variables = merge(
      {
        DATABASE_URL   = local.database_url
        DB_IAM_AUTH    = "1"
        AUTH0_DOMAIN   = var.auth0_domain
        AUTH0_AUDIENCE = var.auth0_audience
        AUTH_DISABLED  = var.auth_disabled ? "1" : "0"
        # monitoring.tf: the app's logs and EMF metrics
        LOG_LEVEL         = var.log_level
        METRICS_ENABLED   = "1"
        METRICS_NAMESPACE = var.metrics_namespace
        # events.tf: job outcomes to EventBridge
        EVENT_BUS_NAME = local.event_bus_name
      },
      var.job_retention_days == null ? {} : { RETENTION_DAYS = tostring(var.job_retention_days) },
      # Behind RDS Proxy: no session state, which would pin the proxy's connections.
      var.enable_rds_proxy ? { DB_POOLER = "1" } : {},
      local.database_tls_env,
      var.auth0_console_client_id == null ? {} : { AUTH0_CONSOLE_CLIENT_ID = var.auth0_console_client_id },
    )
  }

  tracing_config {
    mode = var.enable_tracing ? "Active" : "PassThrough"
  }

  depends_on = [
    aws_cloudwatch_log_group.lambda,
    aws_iam_role_policy_attachment.lambda_vpc_access,
    aws_iam_role_policy.lambda_rds_connect,
    aws_iam_role_policy.lambda_put_events,
    # The schema is migrated before the function gets the code that needs it.
    aws_lambda_invocation.migrate,
    aws_db_proxy_target.main,
  ]

  lifecycle {
    # python3.11 runs on Amazon Linux 2 (glibc 2.26); psycopg2-binary's arm64
    # wheels need glibc 2.28, so that function could never reach the database.
    precondition {
      condition     = !(var.lambda_architecture == "arm64" && var.lambda_runtime == "python3.11")
      error_message = "arm64 needs lambda_runtime python3.12 or newer (build with LAMBDA_PYTHON=3.12 LAMBDA_ARCH=arm64): on python3.11 the PostgreSQL driver cannot load."
    }

    # Lambda offers SnapStart for Python from python3.12 on.
    precondition {
      condition     = !(var.enable_snapstart && var.lambda_runtime == "python3.11")
      error_message = "enable_snapstart needs lambda_runtime python3.12 or newer (build with LAMBDA_PYTHON=3.12): Lambda has no SnapStart for python3.11."
    }
  }
}

# With SnapStart, the API invokes this alias, which always points at the
# version published by the last apply (and so at its snapshot).
resource "aws_lambda_alias" "live" {
  count = var.enable_snapstart ? 1 : 0

  name             = "live"
  description      = "The published version the HTTP API invokes (SnapStart)"
  function_name    = aws_lambda_function.api.function_name
  function_version = aws_lambda_function.api.version
}

# A warning in every plan: without RDS Proxy, every instance's pool is held
# on the database itself.
check "connections_fit_without_a_proxy" {
  assert {
    condition     = var.enable_rds_proxy || local.db_connection_cap <= 80
    error_message = "lambda_reserved_concurrency x a pool of 2 = ${local.db_connection_cap} connections, more than db.t4g.micro's max_connections leaves (about 80): set enable_rds_proxy = true, or lower the concurrency."
  }
}
