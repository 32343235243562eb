locals {
  db_identifier  = var.name
  db_port        = 5432
  db_log_exports = ["postgresql", "upgrade"]
  engine_major   = split(".", var.engine_version)[0]
}

resource "aws_db_subnet_group" "main" {
  name        = var.name
  description = "Database subnets of ${var.name}: no route out of the VPC"
  subnet_ids  = aws_subnet.database[*].id
}

resource "aws_db_parameter_group" "main" {
  name        = "${var.name}-postgres${local.engine_major}"
  family      = "postgres${local.engine_major}"
  description = "${var.name}: TLS required for every connection"

  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }

  # No job data in the PostgreSQL log group. psycopg2 sends statements with
  # their values filled in, and by default (error) the server logs a failing
  # statement in full, so an idempotency-key race or a statement timeout
  # would write the job's metadata there. The error itself is still logged.
  parameter {
    name  = "log_min_error_statement"
    value = "panic"
  }

  # The same for an error's DETAIL: a constraint violation logs
  # "Failing row contains (...)", the whole row with its metadata.
  parameter {
    name  = "log_error_verbosity"
    value = "terse"
  }

  lifecycle {
    create_before_destroy = true
  }
}

# RDS would create these groups itself, with no expiry; creating them first
# puts them under Terraform with a retention.
resource "aws_cloudwatch_log_group" "rds" {
  #checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs' own keys; a customer-managed KMS key adds cost and a key policy to administer
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (default 30 days to bound cost); set it to 365 or more where a year is required
  for_each = toset(local.db_log_exports)

  name              = "/aws/rds/instance/${local.db_identifier}/${each.key}"
  retention_in_days = var.log_retention_days
}

resource "aws_db_instance" "main" {
  #checkov:skip=CKV_AWS_157:Multi-AZ doubles the database cost; it is the variable multi_az (default false) so production can turn it on
  #checkov:skip=CKV_AWS_353:Performance Insights is not needed at this scale; the PostgreSQL logs go to CloudWatch
  #checkov:skip=CKV_AWS_118:Enhanced monitoring needs a monitoring role and adds cost; CloudWatch's standard RDS metrics are enough here
  identifier     = local.db_identifier
  engine         = "postgres"
  engine_version = var.engine_version
  instance_class = var.db_instance_class

  allocated_storage     = var.db_allocated_storage
  max_allocated_storage = 0 # storage autoscaling off: the bill stays predictable
  storage_type          = "gp3"
  storage_encrypted     = true

  db_name  = var.db_name
  username = var.db_master_username
  port     = local.db_port

  # No password in Terraform: RDS makes one, keeps it in Secrets Manager and
  # rotates it; only the migration function may read it (migrations.tf). The
  # API connects as var.db_app_username with IAM tokens.
  manage_master_user_password         = true
  iam_database_authentication_enabled = true

  db_subnet_group_name   = aws_db_subnet_group.main.name
  vpc_security_group_ids = [aws_security_group.database.id]
  publicly_accessible    = false
  parameter_group_name   = aws_db_parameter_group.main.name
  multi_az               = var.multi_az

  backup_retention_period    = var.backup_retention_period
  copy_tags_to_snapshot      = true
  deletion_protection        = var.db_deletion_protection
  skip_final_snapshot        = var.db_skip_final_snapshot
  final_snapshot_identifier  = var.db_skip_final_snapshot ? null : "${local.db_identifier}-final"
  auto_minor_version_upgrade = true

  enabled_cloudwatch_logs_exports = local.db_log_exports

  depends_on = [aws_cloudwatch_log_group.rds]
}
