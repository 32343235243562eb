output "api_url" {
  description = "Base URL of the HTTP API ($default stage)."
  value       = aws_apigatewayv2_api.main.api_endpoint
}

output "rds_endpoint" {
  description = "Host name of the PostgreSQL instance (reachable from inside the VPC only)."
  value       = aws_db_instance.main.address
}

output "rds_port" {
  description = "Port of the PostgreSQL instance."
  value       = aws_db_instance.main.port
}

output "rds_proxy_endpoint" {
  description = "Host name of RDS Proxy, which the API function connects to (null without enable_rds_proxy)."
  value       = var.enable_rds_proxy ? aws_db_proxy.main[0].endpoint : null
}

output "lambda_function_name" {
  description = "Name of the Lambda function serving the API."
  value       = aws_lambda_function.api.function_name
}

output "lambda_log_group_name" {
  description = "CloudWatch log group of the Lambda function."
  value       = aws_cloudwatch_log_group.lambda.name
}

output "api_access_log_group_name" {
  description = "CloudWatch log group of the HTTP API access logs."
  value       = aws_cloudwatch_log_group.api_access.name
}

output "rds_log_group_names" {
  description = "CloudWatch log groups receiving the PostgreSQL logs."
  value       = [for group in aws_cloudwatch_log_group.rds : group.name]
}

output "migration_function_name" {
  description = "Name of the migration function (alembic upgrade head and the application role); invoke it to migrate by hand."
  value       = aws_lambda_function.migration.function_name
}

output "db_master_user_secret_arn" {
  description = "ARN (not the value) of the Secrets Manager secret in which RDS keeps the master password; only the migration function's role may read it."
  value       = aws_db_instance.main.master_user_secret[0].secret_arn
}

output "alarm_topic_arn" {
  description = "SNS topic the CloudWatch alarms notify (created, or alarm_topic_arn)."
  value       = local.alarm_topic_arn
}

output "dashboard_name" {
  description = "Name of the CloudWatch dashboard of the API, the function, the job queue and the database."
  value       = aws_cloudwatch_dashboard.main.dashboard_name
}

output "auth_disabled_warning" {
  description = "Set only when auth_disabled = true, which is a test-only setting."
  value       = var.auth_disabled ? "WARNING: auth_disabled = true is a TEST-ONLY setting: the API Gateway has no JWT authorizer and the function accepts requests without a token, so anyone who knows api_url can read and change jobs. Never use it for real data." : null
}

# Also a warning in every plan and apply output while authentication is off.
check "auth_enabled" {
  assert {
    condition     = !var.auth_disabled
    error_message = "auth_disabled = true is a test-only setting: no JWT authorizer at the gateway and no token check in the function."
  }
}

output "event_bus_name" {
  description = "The EventBridge bus the job events go to (source extraction-jobs, detail-type job.<type>)."
  value       = local.event_bus_name
}

output "downstream_queue_url" {
  description = "The example consumer's SQS queue, with downstream_queue_enabled; else null."
  value       = var.downstream_queue_enabled ? aws_sqs_queue.downstream[0].url : null
}
