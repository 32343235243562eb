# The sweep: EventBridge Scheduler invokes the API function with a non-HTTP
# event that lambda_handler routes to the sweep (expired leases released or
# failed, finished jobs past job_retention_days deleted), then publishes the
# queue gauges (PendingJobs, ProcessingJobs, OldestPendingAgeSeconds) the
# alarms and dashboard in monitoring.tf read. Claims sweep too, but only this
# schedule publishes the gauges. The one scheduler role of the deployment.

data "aws_iam_policy_document" "sweep_scheduler_assume_role" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["scheduler.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "sweep_scheduler" {
  name               = "${var.name}-sweep-scheduler"
  description        = "Lets EventBridge Scheduler invoke the ${var.name} function for the sweep"
  assume_role_policy = data.aws_iam_policy_document.sweep_scheduler_assume_role.json
}

data "aws_iam_policy_document" "sweep_invoke" {
  statement {
    actions = ["lambda:InvokeFunction"]
    # The function's ARN built from its name, not read from the function: a
    # document that waits for the function would be re-planned whenever the
    # function changes (e.g. turning SnapStart on).
    resources = [format(
      "arn:%s:lambda:%s:%s:function:%s",
      data.aws_partition.current.partition,
      data.aws_region.current.name,
      data.aws_caller_identity.current.account_id,
      local.function_name,
    )]
  }
}

resource "aws_iam_role_policy" "sweep_invoke" {
  name   = "invoke-${var.name}"
  role   = aws_iam_role.sweep_scheduler.id
  policy = data.aws_iam_policy_document.sweep_invoke.json
}

resource "aws_scheduler_schedule" "sweep" {
  #checkov:skip=CKV_AWS_297:The schedule holds no data but the constant input {"task":"sweep"}; a customer-managed key adds cost and key administration for nothing
  name        = "${var.name}-sweep"
  description = "Sweep expired job leases and finished jobs past retention; publish the queue gauges"

  schedule_expression = var.sweep_schedule

  flexible_time_window {
    mode = "OFF"
  }

  target {
    arn      = aws_lambda_function.api.arn
    role_arn = aws_iam_role.sweep_scheduler.arn
    # lambda_handler.SWEEP_EVENT
    input = jsonencode({ task = "sweep" })

    retry_policy {
      # A missed sweep (and its gauges) is made up by the next one.
      maximum_retry_attempts       = 0
      maximum_event_age_in_seconds = 60
    }
  }
}
