# RDS Proxy (enable_rds_proxy, off by default): the API function's instances
# share the proxy's pool of database connections instead of each holding its
# own, so concurrency is no longer capped by max_connections.
#
# The function connects to the proxy over TLS (required) with an IAM token
# for the application role, and runs with DB_POOLER=1: no prepared
# statements, no SET, no startup options, only transaction-scoped advisory
# locks, so the proxy never has to pin a session. The proxy logs in to the
# database as the same role with a password kept in its own secret, which the
# migration function makes and fills (Terraform never sees it, so it is in no
# state file); the role then has no IAM login of its own, as RDS refuses
# passwords to members of rds_iam. The migration function keeps connecting
# to the database directly.

locals {
  proxy_count = var.enable_rds_proxy ? 1 : 0
  # The proxy's resource id (prx-...), which IAM's rds-db:connect names.
  proxy_resource_id = var.enable_rds_proxy ? element(split(":", aws_db_proxy.main[0].arn), 6) : null
  # A transaction waiting longer than this for a database connection gets an
  # error (503) well before the function's statement deadline (11 s).
  proxy_borrow_timeout_s = 5
}

# Created empty: the migration function puts the role's name and password in.
resource "aws_secretsmanager_secret" "app_db" {
  #checkov:skip=CKV_AWS_149:Encrypted with the AWS-managed aws/secretsmanager key; a customer-managed key adds cost and a key policy to administer
  #checkov:skip=CKV2_AWS_57:Rotated by the migration function on demand (a new password when the secret holds none); RDS Proxy reads the current value at each new database connection
  count = local.proxy_count

  name_prefix             = "${var.name}-app-db-"
  description             = "RDS Proxy's login as ${var.db_app_username}; filled by the ${var.name}-migrate function, read by the proxy only"
  recovery_window_in_days = 7
}

data "aws_iam_policy_document" "proxy_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "proxy" {
  count = local.proxy_count

  name               = "${var.name}-rds-proxy"
  description        = "RDS Proxy of ${var.name}: reads its one secret"
  assume_role_policy = data.aws_iam_policy_document.proxy_assume_role.json
}

# The secret is encrypted with the AWS-managed aws/secretsmanager key, whose
# key policy already lets Secrets Manager decrypt for this account's callers.
data "aws_iam_policy_document" "proxy_read_app_secret" {
  count = local.proxy_count

  statement {
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.app_db[0].arn]
  }
}

resource "aws_iam_role_policy" "proxy_read_app_secret" {
  count = local.proxy_count

  name   = "read-app-db-secret"
  role   = aws_iam_role.proxy[0].id
  policy = data.aws_iam_policy_document.proxy_read_app_secret[0].json
}

resource "aws_db_proxy" "main" {
  count = local.proxy_count

  name                   = var.name
  engine_family          = "POSTGRESQL"
  role_arn               = aws_iam_role.proxy[0].arn
  vpc_subnet_ids         = aws_subnet.database[*].id
  vpc_security_group_ids = [aws_security_group.proxy[0].id]
  require_tls            = true
  idle_client_timeout    = 1800
  debug_logging          = false # it would log statements, and with them job data

  auth {
    auth_scheme = "SECRETS"
    description = "The application role; clients sign IAM tokens"
    iam_auth    = "REQUIRED"
    secret_arn  = aws_secretsmanager_secret.app_db[0].arn
  }

  depends_on = [aws_iam_role_policy.proxy_read_app_secret]
}

resource "aws_db_proxy_default_target_group" "main" {
  count = local.proxy_count

  db_proxy_name = aws_db_proxy.main[0].name

  connection_pool_config {
    max_connections_percent      = var.rds_proxy_max_connections_percent
    max_idle_connections_percent = floor(var.rds_proxy_max_connections_percent / 2)
    connection_borrow_timeout    = local.proxy_borrow_timeout_s
  }
}

resource "aws_db_proxy_target" "main" {
  count = local.proxy_count

  db_proxy_name          = aws_db_proxy.main[0].name
  target_group_name      = aws_db_proxy_default_target_group.main[0].name
  db_instance_identifier = aws_db_instance.main.identifier
}
