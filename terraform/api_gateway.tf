resource "aws_apigatewayv2_api" "main" {
  name          = var.name
  description   = "Extraction Job API"
  protocol_type = "HTTP"

  # No CORS unless origins are given: browsers on other origins are refused.
  dynamic "cors_configuration" {
    for_each = length(var.cors_allow_origins) > 0 ? [1] : []

    # What the API reads from a request and sends back, so a browser page
    # can use conditional updates, idempotent creates and the list's pages.
    content {
      allow_origins  = var.cors_allow_origins
      allow_methods  = ["GET", "POST", "PATCH", "OPTIONS"]
      allow_headers  = ["authorization", "content-type", "if-match", "idempotency-key", "x-request-id"]
      expose_headers = ["etag", "location", "link", "idempotent-replayed", "retry-after", "x-request-id"]
      max_age        = 3600
    }
  }
}

resource "aws_apigatewayv2_integration" "lambda" {
  api_id             = aws_apigatewayv2_api.main.id
  integration_type   = "AWS_PROXY"
  integration_method = "POST"
  # Under SnapStart the `live` alias (a published version), else $LATEST.
  integration_uri        = var.enable_snapstart ? aws_lambda_alias.live[0].invoke_arn : aws_lambda_function.api.invoke_arn
  payload_format_version = "2.0"
}

# Only these routes exist; any other path is answered 404 by the gateway
# itself. The job routes need a valid Auth0 token at the gateway (unless
# auth_disabled), so a request without one never invokes the function and
# cannot spend its reserved concurrency. The application still validates the
# token and its permissions itself: the gateway does not read `permissions`.
locals {
  job_routes = toset(["ANY /extraction-jobs", "ANY /extraction-jobs/{proxy+}"])
  # The docs pages load their JavaScript and CSS from the app (/docs-assets);
  # the console its page, assets and config.json (its API calls carry the
  # user's token to the job routes).
  public_routes = toset([
    "GET /health",
    "GET /docs",
    "GET /openapi.json",
    "GET /redoc",
    "GET /docs-assets/{proxy+}",
    "GET /console",
    "GET /console/{proxy+}",
  ])
  auth0_issuer = "https://${var.auth0_domain}/"
}

resource "aws_apigatewayv2_authorizer" "auth0" {
  count = var.auth_disabled ? 0 : 1

  api_id           = aws_apigatewayv2_api.main.id
  name             = "${var.name}-auth0"
  authorizer_type  = "JWT"
  identity_sources = ["$request.header.Authorization"]

  jwt_configuration {
    issuer   = local.auth0_issuer
    audience = [var.auth0_audience]
  }
}

resource "aws_apigatewayv2_route" "jobs" {
  for_each = local.job_routes

  api_id             = aws_apigatewayv2_api.main.id
  route_key          = each.key
  target             = "integrations/${aws_apigatewayv2_integration.lambda.id}"
  authorization_type = var.auth_disabled ? "NONE" : "JWT"
  authorizer_id      = var.auth_disabled ? null : aws_apigatewayv2_authorizer.auth0[0].id
}

resource "aws_apigatewayv2_route" "public" {
  #checkov:skip=CKV_AWS_309:Public by design and read-only: the health check, the API docs pages with their static assets and the OpenAPI document hold no job data; every job route has the JWT authorizer
  for_each = local.public_routes

  api_id    = aws_apigatewayv2_api.main.id
  route_key = each.key
  target    = "integrations/${aws_apigatewayv2_integration.lambda.id}"
}

resource "aws_cloudwatch_log_group" "api_access" {
  #checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs' own keys; a customer-managed KMS key adds cost and a key policy to administer
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (default 30 days to bound cost); set it to 365 or more where a year is required
  name              = "/aws/apigateway/${var.name}/access"
  retention_in_days = var.log_retention_days
}

resource "aws_apigatewayv2_stage" "default" {
  api_id      = aws_apigatewayv2_api.main.id
  name        = "$default"
  auto_deploy = true

  default_route_settings {
    throttling_burst_limit = var.api_throttling_burst_limit
    throttling_rate_limit  = var.api_throttling_rate_limit
  }

  # Anonymous callers get a small budget of their own on the public routes,
  # so they cannot spend the job routes' (nor, /health answering without the
  # database, much of the function's reserved concurrency).
  dynamic "route_settings" {
    for_each = local.public_routes

    content {
      route_key              = route_settings.value
      throttling_burst_limit = var.public_throttling_burst_limit
      throttling_rate_limit  = var.public_throttling_rate_limit
    }
  }

  access_log_settings {
    destination_arn = aws_cloudwatch_log_group.api_access.arn
    format = jsonencode({
      requestId         = "$context.requestId"
      requestTime       = "$context.requestTime"
      ip                = "$context.identity.sourceIp"
      httpMethod        = "$context.httpMethod"
      path              = "$context.path"
      routeKey          = "$context.routeKey"
      status            = "$context.status"
      responseLength    = "$context.responseLength"
      integrationStatus = "$context.integrationStatus"
      integrationError  = "$context.integrationErrorMessage"
      latencyMs         = "$context.responseLatency"
    })
  }

  # Route settings name routes, which must exist first.
  depends_on = [aws_apigatewayv2_route.public]
}

# Only this API may invoke the function (any stage, method and path of it).
resource "aws_lambda_permission" "api_gateway" {
  statement_id  = "AllowInvokeFromHttpApi"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.api.function_name
  qualifier     = var.enable_snapstart ? aws_lambda_alias.live[0].name : null
  principal     = "apigateway.amazonaws.com"
  source_arn    = "${aws_apigatewayv2_api.main.execution_arn}/*/*"
}
