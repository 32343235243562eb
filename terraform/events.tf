# Job events on EventBridge (publisher.py): each job's outcomes
# (job.completed, job.failed, job.cancelled, job.retried) go to a custom bus,
# at least once. Rules route them on: to SQS, Lambda, Step Functions or API
# destinations. The function publishes after each write and from the sweep
# schedule, with events:PutEvents on this bus only.

locals {
  # A bus created here, named after the deployment, or an existing one.
  create_event_bus = var.event_bus_name == null
  event_bus_name   = local.create_event_bus ? aws_cloudwatch_event_bus.jobs[0].name : data.aws_cloudwatch_event_bus.existing[0].name
  event_bus_arn    = local.create_event_bus ? aws_cloudwatch_event_bus.jobs[0].arn : data.aws_cloudwatch_event_bus.existing[0].arn
  # The event source the app writes (publisher.SOURCE).
  event_source = "extraction-jobs"
}

resource "aws_cloudwatch_event_bus" "jobs" {
  count = local.create_event_bus ? 1 : 0

  name = var.name
}

data "aws_cloudwatch_event_bus" "existing" {
  count = local.create_event_bus ? 0 : 1

  name = var.event_bus_name
}

data "aws_iam_policy_document" "lambda_put_events" {
  statement {
    actions   = ["events:PutEvents"]
    resources = [local.event_bus_arn]
  }
}

resource "aws_iam_role_policy" "lambda_put_events" {
  name   = "events-put-events"
  role   = aws_iam_role.lambda.id
  policy = data.aws_iam_policy_document.lambda_put_events.json
}

# Without a NAT gateway the function reaches EventBridge through an interface
# endpoint (private DNS: the usual host name resolves to it).
resource "aws_vpc_endpoint" "events" {
  count = var.enable_nat_gateway ? 0 : 1

  vpc_id              = aws_vpc.main.id
  service_name        = "com.amazonaws.${data.aws_region.current.name}.events"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = aws_subnet.private[*].id
  security_group_ids  = [aws_security_group.endpoints[0].id]

  tags = { Name = "${var.name}-events" }
}

resource "aws_security_group_rule" "lambda_https_to_endpoints" {
  count = var.enable_nat_gateway ? 0 : 1

  type                     = "egress"
  security_group_id        = aws_security_group.lambda.id
  description              = "HTTPS to the EventBridge endpoint"
  protocol                 = "tcp"
  from_port                = 443
  to_port                  = 443
  source_security_group_id = aws_security_group.endpoints[0].id
}

resource "aws_security_group_rule" "endpoints_https_from_lambda" {
  count = var.enable_nat_gateway ? 0 : 1

  type                     = "ingress"
  security_group_id        = aws_security_group.endpoints[0].id
  description              = "HTTPS from the API function (EventBridge)"
  protocol                 = "tcp"
  from_port                = 443
  to_port                  = 443
  source_security_group_id = aws_security_group.lambda.id
}

# --- An example consumer: every job event to an SQS queue ----------------------

resource "aws_sqs_queue" "downstream" {
  #checkov:skip=CKV2_AWS_73:Encrypted with SQS-managed keys (sqs_managed_sse_enabled); a customer-managed KMS key adds cost and a key policy for an example queue
  count = var.downstream_queue_enabled ? 1 : 0

  name                      = "${var.name}-job-events"
  sqs_managed_sse_enabled   = true
  message_retention_seconds = 1209600 # 14 days, SQS's most
}

resource "aws_cloudwatch_event_rule" "downstream" {
  count = var.downstream_queue_enabled ? 1 : 0

  name           = "${var.name}-job-events-to-sqs"
  description    = "Every job event of this deployment to the example queue"
  event_bus_name = local.event_bus_name
  event_pattern  = jsonencode({ source = [local.event_source] })
}

resource "aws_cloudwatch_event_target" "downstream" {
  count = var.downstream_queue_enabled ? 1 : 0

  rule           = aws_cloudwatch_event_rule.downstream[0].name
  event_bus_name = local.event_bus_name
  arn            = aws_sqs_queue.downstream[0].arn
}

# Only this rule may send to the queue.
data "aws_iam_policy_document" "downstream_queue" {
  count = var.downstream_queue_enabled ? 1 : 0

  statement {
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.downstream[0].arn]

    principals {
      type        = "Service"
      identifiers = ["events.amazonaws.com"]
    }

    condition {
      test     = "ArnEquals"
      variable = "aws:SourceArn"
      values   = [aws_cloudwatch_event_rule.downstream[0].arn]
    }
  }
}

resource "aws_sqs_queue_policy" "downstream" {
  count = var.downstream_queue_enabled ? 1 : 0

  queue_url = aws_sqs_queue.downstream[0].id
  policy    = data.aws_iam_policy_document.downstream_queue[0].json
}

# --- Publishing that fails ------------------------------------------------------

# Events EventBridge did not take are kept in the outbox and published by the
# next sweep; failures that go on mean downstream systems are falling behind.
resource "aws_cloudwatch_metric_alarm" "events_publish_failed" {
  alarm_name          = "${var.name}-events-publish-failed"
  alarm_description   = "Job events could not be published to EventBridge (${local.event_bus_name}); they wait in the outbox for the next sweep. First check: the function's log for 'EventBridge publish failed', then its IAM policy and the network path (NAT or the events endpoint)."
  namespace           = var.metrics_namespace
  metric_name         = "EventsPublishFailed"
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 2
  comparison_operator = "GreaterThanOrEqualToThreshold"
  threshold           = var.alarm_events_publish_failed_threshold
  treat_missing_data  = "notBreaching"
  alarm_actions       = [local.alarm_topic_arn]
  ok_actions          = [local.alarm_topic_arn]
}
