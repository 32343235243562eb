# Alarms, a dashboard and (optionally) tracing. The queue gauges come from the
# sweep schedule (schedule.tf).
#
# The application writes its own metrics (observability.METRICS: per request
# by route, the domain counters, the queue gauges) to its log as CloudWatch
# Embedded Metric Format, in the namespace var.metrics_namespace: nothing here
# calls the CloudWatch API from the function. Every one of them is on the
# dashboard, and every one named here is one of them
# (tests/test_metric_names.py).

locals {
  alarm_topic_arn = var.alarm_topic_arn != "" ? var.alarm_topic_arn : aws_sns_topic.alarms[0].arn

  # Connections one function instance may hold: DB_POOL_SIZE + DB_MAX_OVERFLOW
  # (database.py's defaults, 2 + 0; the function does not override them).
  # With RDS Proxy they are the proxy's, and the proxy caps the database's.
  db_connections_per_instance = 2
  db_connection_cap           = local.lambda_concurrency * local.db_connections_per_instance
  # The proxy's wait for a database connection (µs) that means its pool is used up.
  proxy_borrow_latency_alarm_us = 100000

  lambda_timeout_ms = aws_lambda_function.api.timeout * 1000
}

# --- Where alarms go -----------------------------------------------------------

resource "aws_sns_topic" "alarms" {
  #checkov:skip=CKV_AWS_26:CloudWatch alarms cannot publish to a topic encrypted with the AWS-managed SNS key, and a customer-managed key adds cost and a key policy; alarm messages carry no data
  count = var.alarm_topic_arn == "" ? 1 : 0
  name  = "${var.name}-alarms"
}

resource "aws_sns_topic_subscription" "alarm_email" {
  count     = var.alarm_email == "" ? 0 : 1
  topic_arn = local.alarm_topic_arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

# --- Lambda --------------------------------------------------------------------

# Function errors are crashes, timeouts and out-of-memory: the app answers its
# own exceptions with a JSON 500. No invocations means no errors.
resource "aws_cloudwatch_metric_alarm" "lambda_errors" {
  alarm_name          = "${var.name}-lambda-errors"
  alarm_description   = "The function crashed, timed out or ran out of memory. First check: the function's log for 'Task timed out' or 'Runtime exited'."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.api.function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = var.alarm_lambda_errors_threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "lambda_throttles" {
  alarm_name          = "${var.name}-lambda-throttles"
  alarm_description   = "Requests were refused because lambda_reserved_concurrency was reached. First check: the dashboard's concurrency widget and who sends the traffic."
  namespace           = "AWS/Lambda"
  metric_name         = "Throttles"
  dimensions          = { FunctionName = aws_lambda_function.api.function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = var.alarm_lambda_throttles_threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "lambda_duration_p99" {
  alarm_name          = "${var.name}-lambda-duration-p99"
  alarm_description   = "p99 duration is above ${var.alarm_duration_p99_percent_of_timeout}% of the function timeout. First check: the database's CPU and connections, then slow routes in the request log."
  namespace           = "AWS/Lambda"
  metric_name         = "Duration"
  dimensions          = { FunctionName = aws_lambda_function.api.function_name }
  extended_statistic  = "p99"
  period              = 300
  evaluation_periods  = 3
  datapoints_to_alarm = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = local.lambda_timeout_ms * var.alarm_duration_p99_percent_of_timeout / 100
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

# --- API Gateway ---------------------------------------------------------------

# The share of requests answered 5xx, over 5 minutes with at least 10 requests
# (one failure in two requests at night is not a rate worth waking for).
resource "aws_cloudwatch_metric_alarm" "api_5xx_rate" {
  alarm_name          = "${var.name}-api-5xx-rate"
  alarm_description   = "More than ${var.alarm_api_5xx_rate_percent}% of API requests got a 5xx. First check: the Logs Insights 'errors by route' query, then the database alarms."
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_api_5xx_rate_percent
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]

  metric_query {
    id          = "rate"
    expression  = "IF(requests >= 10, 100 * errors / requests, 0)"
    label       = "5xx rate (%)"
    return_data = true
  }

  metric_query {
    id = "errors"
    metric {
      namespace   = "AWS/ApiGateway"
      metric_name = "5xx"
      dimensions  = { ApiId = aws_apigatewayv2_api.main.id }
      stat        = "Sum"
      period      = 300
    }
  }

  metric_query {
    id = "requests"
    metric {
      namespace   = "AWS/ApiGateway"
      metric_name = "Count"
      dimensions  = { ApiId = aws_apigatewayv2_api.main.id }
      stat        = "Sum"
      period      = 300
    }
  }
}

# --- RDS -------------------------------------------------------------------------
# RDS reports every minute while the instance runs; a gap says nothing about
# CPU, storage or memory, so missing data keeps the alarm's current state.

resource "aws_cloudwatch_metric_alarm" "db_cpu" {
  alarm_name          = "${var.name}-db-cpu"
  alarm_description   = "Database CPU above ${var.alarm_db_cpu_percent}% for 15 minutes. First check: Performance Insights or pg_stat_statements for the heaviest queries; then the request rate."
  namespace           = "AWS/RDS"
  metric_name         = "CPUUtilization"
  dimensions          = { DBInstanceIdentifier = aws_db_instance.main.identifier }
  statistic           = "Average"
  period              = 300
  evaluation_periods  = 3
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.alarm_db_cpu_percent
  treat_missing_data  = "missing"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "db_free_storage" {
  alarm_name          = "${var.name}-db-free-storage"
  alarm_description   = "Less than ${var.alarm_db_free_storage_percent}% of the database's ${var.db_allocated_storage} GiB is free. First check: the table's size and old finished jobs; raise db_allocated_storage."
  namespace           = "AWS/RDS"
  metric_name         = "FreeStorageSpace"
  dimensions          = { DBInstanceIdentifier = aws_db_instance.main.identifier }
  statistic           = "Minimum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "LessThanThreshold"
  threshold           = var.db_allocated_storage * 1073741824 * var.alarm_db_free_storage_percent / 100
  treat_missing_data  = "missing"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

# Without RDS Proxy (with it, the proxy caps the database's connections, and
# the alarms after this one watch the proxy).
resource "aws_cloudwatch_metric_alarm" "db_connections" {
  count = var.enable_rds_proxy ? 0 : 1

  alarm_name          = "${var.name}-db-connections"
  alarm_description   = "More than ${var.alarm_db_connections_percent}% of the ${local.db_connection_cap} connections the function may open (reserved concurrency x pool) are in use. First check: other clients of the database (psql, migrations), then lambda_reserved_concurrency."
  namespace           = "AWS/RDS"
  metric_name         = "DatabaseConnections"
  dimensions          = { DBInstanceIdentifier = aws_db_instance.main.identifier }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = ceil(local.db_connection_cap * var.alarm_db_connections_percent / 100)
  treat_missing_data  = "missing"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

# DB_POOLER=1 keeps no session state, so the proxy never needs to pin a
# client to a database connection: one pinned is something else's doing.
resource "aws_cloudwatch_metric_alarm" "proxy_pinned" {
  count = local.proxy_count

  alarm_name          = "${var.name}-rds-proxy-pinned"
  alarm_description   = "RDS Proxy pinned a client session to a database connection, which it then cannot share. First check: that the API function runs with DB_POOLER=1 (a package or configuration from before it), then other clients of the proxy."
  namespace           = "AWS/RDS"
  metric_name         = "DatabaseConnectionsCurrentlySessionPinned"
  dimensions          = { ProxyName = aws_db_proxy.main[0].name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "proxy_borrow_latency" {
  count = local.proxy_count

  alarm_name          = "${var.name}-rds-proxy-borrow-latency"
  alarm_description   = "Transactions wait at RDS Proxy for a database connection (over ${local.proxy_borrow_latency_alarm_us / 1000} ms on average): its ${var.rds_proxy_max_connections_percent}% of max_connections is used up, and waits past ${local.proxy_borrow_timeout_s} s answer 503. First check: the database's CPU and slow queries, then rds_proxy_max_connections_percent or db_instance_class."
  namespace           = "AWS/RDS"
  metric_name         = "DatabaseConnectionsBorrowLatency"
  dimensions          = { ProxyName = aws_db_proxy.main[0].name }
  statistic           = "Average"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = local.proxy_borrow_latency_alarm_us
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

resource "aws_cloudwatch_metric_alarm" "db_freeable_memory" {
  alarm_name          = "${var.name}-db-freeable-memory"
  alarm_description   = "Less than ${var.alarm_db_freeable_memory_mb} MiB of database memory is free. First check: the connection count (each connection costs memory), then db_instance_class."
  namespace           = "AWS/RDS"
  metric_name         = "FreeableMemory"
  dimensions          = { DBInstanceIdentifier = aws_db_instance.main.identifier }
  statistic           = "Minimum"
  period              = 300
  evaluation_periods  = 3
  comparison_operator = "LessThanThreshold"
  threshold           = var.alarm_db_freeable_memory_mb * 1048576
  treat_missing_data  = "missing"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

# --- The job queue (the app's own metrics) ------------------------------------------

# The gauge arrives with every scheduled sweep (schedule.tf); when it stops
# arriving, the queue is unwatched (schedule, function or database broken),
# which is an alarm too.
resource "aws_cloudwatch_metric_alarm" "oldest_pending" {
  alarm_name          = "${var.name}-oldest-pending-job"
  alarm_description   = "A job has waited more than ${var.oldest_pending_alarm_seconds} s for a worker, or the queue gauges stopped arriving. First check: are workers running and claiming (JobsClaimed)? Then the sweep schedule's invocations."
  namespace           = var.metrics_namespace
  metric_name         = "OldestPendingAgeSeconds"
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.oldest_pending_alarm_seconds
  treat_missing_data  = "breaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

# Off by default (0): a healthy backlog size depends on the workers. A missing
# gauge is already the oldest-pending alarm's business.
resource "aws_cloudwatch_metric_alarm" "pending_jobs" {
  count               = var.pending_jobs_alarm_threshold > 0 ? 1 : 0
  alarm_name          = "${var.name}-pending-jobs"
  alarm_description   = "More than ${var.pending_jobs_alarm_threshold} jobs wait for a worker. First check: the worker fleet's size and JobsClaimed against JobsCreated."
  namespace           = var.metrics_namespace
  metric_name         = "PendingJobs"
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 2
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.pending_jobs_alarm_threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}

# --- Tracing ------------------------------------------------------------------------------

resource "aws_iam_role_policy_attachment" "lambda_xray" {
  count      = var.enable_tracing ? 1 : 0
  role       = aws_iam_role.lambda.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/AWSXRayDaemonWriteAccess"
}

# --- Dashboard -------------------------------------------------------------------------------

locals {
  function_dimension = ["FunctionName", aws_lambda_function.api.function_name]
  db_dimension       = ["DBInstanceIdentifier", aws_db_instance.main.identifier]
  api_dimension      = ["ApiId", aws_apigatewayv2_api.main.id]

  dashboard_widgets = concat(local.base_widgets, var.enable_rds_proxy ? [local.proxy_widget] : [])
  proxy_widget = {
    title   = "RDS Proxy connections: clients, database, pinned"
    metrics = [for name in ["ClientConnections", "DatabaseConnections", "DatabaseConnectionsCurrentlySessionPinned"] : ["AWS/RDS", name, "ProxyName", var.name, { stat = "Maximum" }]]
  }
  base_widgets = [
    {
      title   = "API requests and errors (per 5 min)"
      metrics = [for name in ["Count", "4xx", "5xx"] : concat(["AWS/ApiGateway", name], local.api_dimension, [{ stat = "Sum" }])]
    },
    {
      title   = "API latency (ms)"
      metrics = [for p in ["p50", "p90", "p99"] : concat(["AWS/ApiGateway", "Latency"], local.api_dimension, [{ stat = p, label = "Latency ${p}" }])]
    },
    {
      title   = "Lambda duration (ms)"
      metrics = [for p in ["p50", "p99", "Maximum"] : concat(["AWS/Lambda", "Duration"], local.function_dimension, [{ stat = p }])]
    },
    {
      title = "Lambda concurrency, errors and throttles"
      metrics = [
        concat(["AWS/Lambda", "ConcurrentExecutions"], local.function_dimension, [{ stat = "Maximum" }]),
        concat(["AWS/Lambda", "Errors"], local.function_dimension, [{ stat = "Sum" }]),
        concat(["AWS/Lambda", "Throttles"], local.function_dimension, [{ stat = "Sum" }]),
      ]
    },
    {
      title   = "App requests and 5xx by route (per 5 min)"
      metrics = [for name in ["Requests", "Errors5xx"] : [{ id = lower(name), expression = "SEARCH('{\"${var.metrics_namespace}\",route} MetricName=\"${name}\"', 'Sum', 300)" }]]
    },
    {
      title   = "App latency by route (ms, p99)"
      metrics = [for name in ["Latency"] : [{ id = lower(name), expression = "SEARCH('{\"${var.metrics_namespace}\",route} MetricName=\"${name}\"', 'p99', 300)" }]]
    },
    {
      title   = "Job queue"
      metrics = [for name in ["PendingJobs", "ProcessingJobs"] : [var.metrics_namespace, name, { stat = "Maximum" }]]
    },
    {
      title   = "Oldest pending job (s)"
      metrics = [[var.metrics_namespace, "OldestPendingAgeSeconds", { stat = "Maximum" }]]
    },
    {
      title   = "Jobs created, claimed, completed, failed, cancelled; leases expired (per 5 min)"
      metrics = [for name in ["JobsCreated", "JobsClaimed", "JobsCompleted", "JobsFailed", "JobsCancelled", "LeasesExpired"] : [var.metrics_namespace, name, { stat = "Sum" }]]
    },
    {
      title   = "Job events published to EventBridge, and those that failed (left for the sweep; per 5 min)"
      metrics = [for name in ["EventsPublished", "EventsPublishFailed"] : [var.metrics_namespace, name, { stat = "Sum" }]]
    },
    {
      title = "Database CPU (%) and connections"
      metrics = [
        concat(["AWS/RDS", "CPUUtilization"], local.db_dimension, [{ stat = "Average" }]),
        concat(["AWS/RDS", "DatabaseConnections"], local.db_dimension, [{ stat = "Maximum", yAxis = "right" }]),
      ]
    },
    {
      title = "Database free storage and memory (bytes)"
      metrics = [
        concat(["AWS/RDS", "FreeStorageSpace"], local.db_dimension, [{ stat = "Minimum" }]),
        concat(["AWS/RDS", "FreeableMemory"], local.db_dimension, [{ stat = "Minimum" }]),
      ]
    },
  ]
}

resource "aws_cloudwatch_dashboard" "main" {
  dashboard_name = var.name
  dashboard_body = jsonencode({
    widgets = concat(
      [
        for index, widget in local.dashboard_widgets : {
          type   = "metric"
          x      = (index % 2) * 12
          y      = floor(index / 2) * 6
          width  = 12
          height = 6
          properties = {
            title   = widget.title
            metrics = widget.metrics
            region  = var.aws_region
            period  = 300
            view    = "timeSeries"
            stacked = false
          }
        }
      ],
      [
        {
          type   = "log"
          x      = 12
          y      = floor(length(local.dashboard_widgets) / 2) * 6
          width  = 12
          height = 6
          properties = {
            title  = "Lambda cold starts (per 5 min)"
            region = var.aws_region
            view   = "timeSeries"
            query  = "SOURCE '${aws_cloudwatch_log_group.lambda.name}' | filter @type = 'REPORT' and ispresent(@initDuration) | stats count(*) as cold_starts by bin(5m)"
          }
        }
      ]
    )
  })
}
