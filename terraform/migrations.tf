# The migration function: the same lambda.zip as the API, handler
# lambda_handler.migrate (migration.py). It reads the RDS-managed master
# secret, runs `alembic upgrade head` as the master user, and creates or
# updates the application role the API connects as (var.db_app_username).
#
# Terraform invokes it on every apply whose package changed, before the API
# function gets the new code; a failed migration fails the apply with the
# function's error text. Its role is the only one that may read the secret.

locals {
  migration_function_name = "${var.name}-migrate"
  db_master_secret_arn    = aws_db_instance.main.master_user_secret[0].secret_arn
  package_hash            = filebase64sha256(var.lambda_zip_path)

  # Host and database only: the user and password come from the secret.
  migration_database_url = format(
    "postgresql://%s:%d/%s?sslmode=require",
    aws_db_instance.main.address,
    aws_db_instance.main.port,
    var.db_name,
  )
}

resource "aws_iam_role" "migration" {
  name               = "${var.name}-migrate"
  description        = "Execution role of the ${var.name} migration function; the only role that may read the database master secret"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume_role.json
}

resource "aws_iam_role_policy_attachment" "migration_vpc_access" {
  role       = aws_iam_role.migration.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"
}

# The secret is encrypted with the AWS-managed aws/secretsmanager key, whose
# key policy already lets Secrets Manager decrypt for this account's callers.
data "aws_iam_policy_document" "migration_read_master_secret" {
  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [local.db_master_secret_arn]
  }

  # With RDS Proxy: the proxy's login, which this function makes and keeps.
  dynamic "statement" {
    for_each = aws_secretsmanager_secret.app_db[*].arn

    content {
      actions   = ["secretsmanager:GetSecretValue", "secretsmanager:PutSecretValue"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "migration_read_master_secret" {
  name   = "read-db-master-secret"
  role   = aws_iam_role.migration.id
  policy = data.aws_iam_policy_document.migration_read_master_secret.json
}

resource "aws_cloudwatch_log_group" "migration" {
  #checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs' own keys; a customer-managed KMS key adds cost and a key policy to administer
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (default 30 days to bound cost); set it to 365 or more where a year is required
  name              = "/aws/lambda/${local.migration_function_name}"
  retention_in_days = var.log_retention_days
}

resource "aws_lambda_function" "migration" {
  #checkov:skip=CKV_AWS_116:Invoked synchronously by Terraform (aws_lambda_invocation), which gets the error; a dead-letter queue only applies to asynchronous invocations
  #checkov:skip=CKV_AWS_50:X-Ray tracing adds nothing to a function run once per deploy
  #checkov:skip=CKV_AWS_272:The package is built locally by make build; there is no signing profile in this deployment
  #checkov:skip=CKV_AWS_173:Environment variables are encrypted at rest with the AWS-managed Lambda key, and hold no secret (the master secret's ARN, not its value)
  function_name = local.migration_function_name
  description   = "Extraction Job API migrations: alembic upgrade head and the application role's grants"
  role          = aws_iam_role.migration.arn

  filename         = var.lambda_zip_path
  source_code_hash = local.package_hash
  handler          = "lambda_handler.migrate"
  runtime          = var.lambda_runtime
  architectures    = [var.lambda_architecture]
  memory_size      = 512
  timeout          = 300

  # One migration at a time (the migration also takes an advisory lock).
  reserved_concurrent_executions = 1

  # A group of its own (vpc.tf): it holds the master password, so it reaches
  # the database and Secrets Manager, nothing else.
  vpc_config {
    subnet_ids         = aws_subnet.private[*].id
    security_group_ids = [aws_security_group.migration.id]
  }

  environment {
    variables = merge(
      {
        DATABASE_URL         = local.migration_database_url
        DB_MASTER_SECRET_ARN = local.db_master_secret_arn
        DB_APP_USER          = var.db_app_username
        # lambda_handler builds the API app on import, which checks its auth
        # settings: the same (public) values as the API function.
        AUTH0_DOMAIN   = var.auth0_domain
        AUTH0_AUDIENCE = var.auth0_audience
        AUTH_DISABLED  = var.auth_disabled ? "1" : "0"
      },
      var.enable_rds_proxy ? { DB_APP_SECRET_ARN = aws_secretsmanager_secret.app_db[0].arn } : {},
      local.database_tls_env,
    )
  }

  depends_on = [
    aws_cloudwatch_log_group.migration,
    aws_iam_role_policy_attachment.migration_vpc_access,
    aws_iam_role_policy.migration_read_master_secret,
    aws_vpc_endpoint.secretsmanager,
  ]

  lifecycle {
    precondition {
      condition     = var.db_app_username != lower(var.db_master_username)
      error_message = "db_app_username must differ from db_master_username: the application role gets data access only."
    }
    precondition {
      condition     = !(var.lambda_architecture == "arm64" && var.lambda_runtime == "python3.11")
      error_message = "arm64 needs lambda_runtime python3.12 or newer (build with LAMBDA_PYTHON=3.12 LAMBDA_ARCH=arm64): on python3.11 the PostgreSQL driver cannot load."
    }
  }
}

# Runs the migration when the package changes (and on the first apply). The
# API function depends on this, so it only gets new code on a migrated schema.
resource "aws_lambda_invocation" "migrate" {
  count = var.run_migrations_on_apply ? 1 : 0

  function_name = aws_lambda_function.migration.function_name
  input         = jsonencode(local.migration_triggers)

  triggers = local.migration_triggers
}

locals {
  # A new package, or the role's login changing hands (IAM tokens, or RDS
  # Proxy's password): the role must be made to match before the API uses it.
  migration_triggers = {
    package_sha256 = local.package_hash
    app_login      = var.enable_rds_proxy ? "rds-proxy" : "iam"
  }
}
