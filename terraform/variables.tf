# --- General -----------------------------------------------------------------

variable "aws_region" {
  type        = string
  description = "AWS region to deploy to."
  default     = "us-east-1"

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.aws_region))
    error_message = "aws_region must be a region name such as us-east-1."
  }
}

variable "name" {
  type        = string
  description = "Name of the deployment; prefixes every resource name (RDS identifier, function, API, roles, groups)."
  default     = "extraction-jobs"

  validation {
    condition     = can(regex("^[a-z]([a-z0-9]|-[a-z0-9]){1,31}$", var.name))
    error_message = "name must be 2-32 lower-case letters, digits and single hyphens, starting with a letter and not ending with a hyphen."
  }
}

variable "tags" {
  type        = map(string)
  description = "Extra tags for every resource (added to Project and ManagedBy)."
  default     = {}
}

# --- Network -----------------------------------------------------------------

variable "vpc_cidr" {
  type        = string
  description = "CIDR block of the VPC, /16 to /20; the subnets are /24-equivalent slices (8 bits longer) of it."
  default     = "10.0.0.0/16"

  validation {
    condition = (
      can(cidrsubnet(var.vpc_cidr, 0, 0)) &&
      try(cidrsubnet(var.vpc_cidr, 0, 0) == var.vpc_cidr, false) &&
      try(tonumber(split("/", var.vpc_cidr)[1]) >= 16 && tonumber(split("/", var.vpc_cidr)[1]) <= 20, false)
    )
    error_message = "vpc_cidr must be an IPv4 network address with a prefix from /16 to /20, such as 10.0.0.0/16."
  }
}

variable "enable_nat_gateway" {
  type        = bool
  description = "Create one NAT gateway (about $32 a month) for the Lambda's outbound HTTPS. A Lambda in a VPC never gets a public address, so without it the function cannot fetch Auth0's signing keys (JWKS) and authentication cannot work; turn it off only together with auth_disabled or for a network-only test. Without it, an interface VPC endpoint for Secrets Manager (about $15 a month) lets the migration function read the master secret."
  default     = true
}

# --- Database ----------------------------------------------------------------

variable "engine_version" {
  type        = string
  description = "PostgreSQL version: a major version (\"16\", minor upgrades applied automatically) or major.minor (\"16.4\"). The parameter group family follows the major version."
  default     = "16"

  validation {
    condition     = can(regex("^1[3-9](\\.[0-9]+)?$", var.engine_version))
    error_message = "engine_version must be a PostgreSQL major version from 13 to 19, optionally with a minor version, such as 16 or 16.4."
  }
}

variable "db_instance_class" {
  type        = string
  description = "RDS instance class. db.t4g.micro (2 vCPU burstable, 1 GiB) costs about $12-15 a month."
  default     = "db.t4g.micro"

  validation {
    condition     = can(regex("^db\\.[a-z0-9-]+\\.[a-z0-9]+$", var.db_instance_class))
    error_message = "db_instance_class must be an RDS instance class such as db.t4g.micro."
  }
}

variable "db_allocated_storage" {
  type        = number
  description = "Storage of the database in GiB (gp3, fixed: storage autoscaling is off)."
  default     = 20

  validation {
    condition     = var.db_allocated_storage >= 20 && var.db_allocated_storage <= 65536 && floor(var.db_allocated_storage) == var.db_allocated_storage
    error_message = "db_allocated_storage must be a whole number of GiB from 20 (the gp3 minimum) to 65536."
  }
}

variable "db_name" {
  type        = string
  description = "Name of the application database created in the instance."
  default     = "extraction_jobs"

  validation {
    condition     = can(regex("^[a-zA-Z][a-zA-Z0-9_]{0,62}$", var.db_name))
    error_message = "db_name must be 1-63 letters, digits or underscores, starting with a letter."
  }
}

variable "db_master_username" {
  type        = string
  description = "Master user name of the database. RDS keeps its password in Secrets Manager (manage_master_user_password) and only the migration function reads it; the API connects as db_app_username."
  default     = "extraction_admin"

  validation {
    condition     = can(regex("^[a-zA-Z][a-zA-Z0-9_]{0,62}$", var.db_master_username)) && !contains(["rdsadmin", "postgres"], lower(var.db_master_username))
    error_message = "db_master_username must be 1-63 letters, digits or underscores, starting with a letter, and not a reserved name (rdsadmin, postgres)."
  }
}

variable "multi_az" {
  type        = bool
  description = "Run a standby instance in the second zone (doubles the database cost)."
  default     = false
}

variable "backup_retention_period" {
  type        = number
  description = "Days of automated backups to keep (1-35)."
  default     = 7

  validation {
    condition     = var.backup_retention_period >= 1 && var.backup_retention_period <= 35 && floor(var.backup_retention_period) == var.backup_retention_period
    error_message = "backup_retention_period must be a whole number of days from 1 to 35 (0 would turn backups off)."
  }
}

variable "db_deletion_protection" {
  type        = bool
  description = "Refuse to delete the database instance. Set it to false and apply before make destroy."
  default     = true
}

variable "db_skip_final_snapshot" {
  type        = bool
  description = "Delete the database without taking a final snapshot (named <name>-final otherwise)."
  default     = false
}

# --- Function ----------------------------------------------------------------

variable "lambda_zip_path" {
  type        = string
  description = "Path of the deployment package written by make build, relative to terraform/ or absolute."
  default     = "../lambda.zip"

  validation {
    condition     = endswith(var.lambda_zip_path, ".zip")
    error_message = "lambda_zip_path must name a .zip file."
  }
}

variable "lambda_runtime" {
  type        = string
  description = "Lambda runtime; must match the Python version make build packaged for (LAMBDA_PYTHON, default 3.11)."
  default     = "python3.11"

  validation {
    condition     = contains(["python3.11", "python3.12", "python3.13"], var.lambda_runtime)
    error_message = "lambda_runtime must be python3.11, python3.12 or python3.13."
  }
}

variable "lambda_architecture" {
  type        = string
  description = "Lambda instruction set; must match the architecture make build packaged for (LAMBDA_ARCH, default x86_64)."
  default     = "x86_64"

  validation {
    condition     = contains(["x86_64", "arm64"], var.lambda_architecture)
    error_message = "lambda_architecture must be x86_64 or arm64."
  }
}

variable "lambda_reserved_concurrency" {
  type        = number
  description = "Maximum number of concurrent function instances. Each instance keeps its own connection pool (DB_POOL_SIZE + DB_MAX_OVERFLOW, 2 + 0 by default). Without RDS Proxy, concurrency x pool size must stay below the database's max_connections (LEAST(DBInstanceClassMemory/9531392, 5000): roughly 80-110 on db.t4g.micro, a few of them reserved for RDS); with enable_rds_proxy the proxy multiplexes them onto at most rds_proxy_max_connections_percent of it. null (the default): 10 without the proxy (10 x 2 = 20 connections, room left for migrations and a psql session), 100 with it."
  default     = null

  validation {
    condition     = var.lambda_reserved_concurrency == null || try(var.lambda_reserved_concurrency >= 1 && var.lambda_reserved_concurrency <= 1000 && floor(var.lambda_reserved_concurrency) == var.lambda_reserved_concurrency, false)
    error_message = "lambda_reserved_concurrency must be null or a whole number from 1 to 1000 (a cap is required to protect the database)."
  }
}

variable "log_retention_days" {
  type        = number
  description = "Days to keep the Lambda, API access and PostgreSQL logs in CloudWatch."
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch accepts: 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653."
  }
}

# --- Authentication ----------------------------------------------------------

variable "auth0_domain" {
  type        = string
  description = "Auth0 tenant domain the tokens come from, without scheme or path (for example your-tenant.eu.auth0.com)."

  validation {
    condition     = can(regex("^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$", var.auth0_domain))
    error_message = "auth0_domain must be a host name such as your-tenant.eu.auth0.com, without https:// or a path."
  }
}

variable "auth0_audience" {
  type        = string
  description = "Auth0 API identifier (audience) the tokens must be issued for."

  validation {
    condition     = can(regex("^\\S+$", var.auth0_audience))
    error_message = "auth0_audience must be a non-empty identifier without spaces."
  }
}

variable "auth0_console_client_id" {
  type        = string
  description = "Client ID of an Auth0 Single Page Application for the console's \"Sign in with Auth0\" (AUTH0_CONSOLE_CLIENT_ID; Authorization Code with PKCE, no secret). null (the default): the console takes a pasted access token only."
  default     = null

  validation {
    condition     = var.auth0_console_client_id == null || can(regex("^[A-Za-z0-9_.-]{1,128}$", var.auth0_console_client_id))
    error_message = "auth0_console_client_id must be null or 1-128 letters, digits, '_', '.' or '-'."
  }
}

variable "auth_disabled" {
  type        = bool
  description = "Turn authentication off (AUTH_DISABLED=1): anyone who knows the URL can read and change jobs. For short-lived test deployments only."
  default     = false
}

# --- API ---------------------------------------------------------------------

variable "api_throttling_burst_limit" {
  type        = number
  description = "Requests the API accepts in a burst before throttling (default route)."
  default     = 100

  validation {
    condition     = var.api_throttling_burst_limit >= 1 && var.api_throttling_burst_limit <= 5000 && floor(var.api_throttling_burst_limit) == var.api_throttling_burst_limit
    error_message = "api_throttling_burst_limit must be a whole number from 1 to 5000."
  }
}

variable "api_throttling_rate_limit" {
  type        = number
  description = "Steady-state requests per second the API accepts (default route)."
  default     = 50

  validation {
    condition     = var.api_throttling_rate_limit > 0 && var.api_throttling_rate_limit <= 10000
    error_message = "api_throttling_rate_limit must be greater than 0 and at most 10000."
  }
}

variable "public_throttling_burst_limit" {
  type        = number
  description = "Requests the public routes (/health, /docs, /redoc, /openapi.json, /docs-assets) each accept in a burst: anonymous callers get their own, small budget, apart from the job routes'."
  default     = 20

  validation {
    condition     = var.public_throttling_burst_limit >= 1 && var.public_throttling_burst_limit <= 5000 && floor(var.public_throttling_burst_limit) == var.public_throttling_burst_limit
    error_message = "public_throttling_burst_limit must be a whole number from 1 to 5000."
  }
}

variable "public_throttling_rate_limit" {
  type        = number
  description = "Steady-state requests per second each public route accepts."
  default     = 10

  validation {
    condition     = var.public_throttling_rate_limit > 0 && var.public_throttling_rate_limit <= 10000
    error_message = "public_throttling_rate_limit must be greater than 0 and at most 10000."
  }
}

variable "cors_allow_origins" {
  type        = list(string)
  description = "Browser origins allowed to call the API (for example https://app.example.com). Empty (the default): no CORS headers, so only same-origin and non-browser clients."
  default     = []

  validation {
    condition     = alltrue([for origin in var.cors_allow_origins : can(regex("^https?://[^/\\s]+$", origin))])
    error_message = "cors_allow_origins must be origins such as https://app.example.com: a scheme and a host, no path, no wildcard."
  }
}

# --- Job lifecycle (sweep, retention) ------------------------------------------

variable "sweep_schedule" {
  type        = string
  description = "How often EventBridge Scheduler runs the sweep (expired leases, retention), which also publishes the queue gauges: a rate() or cron() expression. Slower than every 5 minutes leaves gaps the oldest-pending alarm treats as breaching."
  default     = "rate(1 minute)"

  validation {
    condition     = can(regex("^(rate\\(\\d+ (minute|minutes|hour|hours|day|days)\\)|cron\\([^()]+\\))$", var.sweep_schedule))
    error_message = "sweep_schedule must be a rate() or cron() expression, e.g. rate(1 minute) or cron(0/5 * * * ? *)."
  }
}

variable "job_retention_days" {
  type        = number
  description = "Days after which the sweep deletes finished jobs (completed, failed or cancelled) and their events (RETENTION_DAYS). null (the default) keeps them forever."
  default     = null

  validation {
    condition     = var.job_retention_days == null || try(var.job_retention_days >= 1 && var.job_retention_days <= 36500 && floor(var.job_retention_days) == var.job_retention_days, false)
    error_message = "job_retention_days must be null or a whole number of days from 1 to 36500."
  }
}

# --- Job events on EventBridge --------------------------------------------------

variable "event_bus_name" {
  type        = string
  description = "An existing EventBridge bus to publish job events to. null (the default): a custom bus named after var.name is created."
  default     = null

  validation {
    condition     = var.event_bus_name == null || can(regex("^[A-Za-z0-9._-]{1,256}$", var.event_bus_name))
    error_message = "event_bus_name must be null or 1-256 letters, digits, '.', '_' or '-' (a bus name, not an ARN)."
  }

  validation {
    condition     = var.event_bus_name != "default"
    error_message = "event_bus_name must not be the account's default bus: job events go to a custom bus."
  }
}

variable "downstream_queue_enabled" {
  type        = bool
  description = "Also create an example consumer: a rule sending every job event to an SQS queue (output downstream_queue_url)."
  default     = false
}

variable "alarm_events_publish_failed_threshold" {
  type        = number
  description = "The publishing alarm fires when at least this many job events failed to publish in each of two 5-minute periods (EventsPublishFailed)."
  default     = 1

  validation {
    condition     = var.alarm_events_publish_failed_threshold >= 1 && floor(var.alarm_events_publish_failed_threshold) == var.alarm_events_publish_failed_threshold
    error_message = "alarm_events_publish_failed_threshold must be a whole number of at least 1."
  }
}

# --- Migrations and database credentials ---------------------------------------

variable "db_app_username" {
  type        = string
  description = "Database role the API connects as, with IAM database authentication (no password). The migration function creates it and grants it data access only; the API's IAM role may connect as exactly this user."
  default     = "extraction_app"

  validation {
    condition     = can(regex("^[a-z_][a-z0-9_]{0,62}$", var.db_app_username)) && !contains(["rdsadmin", "postgres", "rds_iam"], var.db_app_username)
    error_message = "db_app_username must be 1-63 lower-case letters, digits or underscores, not starting with a digit, and not a reserved name (rdsadmin, postgres, rds_iam)."
  }
}

variable "enable_rds_proxy" {
  type        = bool
  description = "Put RDS Proxy between the API function and the database (TLS required, IAM authentication, DB_POOLER=1): instances then share the proxy's connections instead of holding their own, so lambda_reserved_concurrency can rise past what max_connections allows. Costs per vCPU-hour of the database instance (about $0.015, and at least 2 vCPUs' worth: about $22 a month) and a little latency per transaction. The migration function still connects directly."
  default     = false
  nullable    = false
}

variable "rds_proxy_max_connections_percent" {
  type        = number
  description = "Share of the database's max_connections RDS Proxy may open (the rest stays for the migration function and psql)."
  default     = 80

  validation {
    condition     = var.rds_proxy_max_connections_percent >= 10 && var.rds_proxy_max_connections_percent <= 100 && floor(var.rds_proxy_max_connections_percent) == var.rds_proxy_max_connections_percent
    error_message = "rds_proxy_max_connections_percent must be a whole number from 10 to 100."
  }
}

variable "db_ssl_root_cert" {
  type        = string
  description = "File name, inside lambda.zip, of the CA bundle both functions check the database's (or the proxy's) certificate and host name against (DB_SSL_ROOT_CERT, sslmode=verify-full): run make ca-bundle before make build, then set rds-ca-bundle.pem. Empty (the default): sslmode=require, encrypted but the server not authenticated. A name the package lacks stops the functions at start."
  default     = ""

  validation {
    condition     = can(regex("^([A-Za-z0-9][A-Za-z0-9._-]*\\.pem)?$", var.db_ssl_root_cert))
    error_message = "db_ssl_root_cert must be empty or a .pem file name at the package's top level, such as rds-ca-bundle.pem."
  }
}

variable "run_migrations_on_apply" {
  type        = bool
  description = "Invoke the migration function (alembic upgrade head, application role grants) during apply whenever the package changes, before the API function gets the new code. Turn off only where no function can run (an emulator); the API then answers 503 until the migration function runs."
  default     = true
}

variable "enable_snapstart" {
  type        = bool
  description = "Lambda SnapStart: publish a version on every apply, snapshot its initialised environment, and point the HTTP API at the `live` alias of it. Needs lambda_runtime python3.12 or newer (refused at plan time on python3.11). Cold starts then restore the snapshot instead of importing the app."
  default     = false
  nullable    = false

  validation {
    condition     = contains([true, false], var.enable_snapstart)
    error_message = "enable_snapstart must be true or false."
  }
}

# --- Monitoring (monitoring.tf) ------------------------------------------------

variable "log_level" {
  type        = string
  description = "LOG_LEVEL of the function: DEBUG, INFO (one line per request), WARNING, ERROR or CRITICAL."
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL."
  }
}

variable "metrics_namespace" {
  type        = string
  description = "CloudWatch namespace of the app's own metrics (METRICS_NAMESPACE). Give each deployment in one account and region its own."
  default     = "ExtractionJobs"

  validation {
    condition     = can(regex("^[A-Za-z0-9.\\-_/#: ]{1,255}$", var.metrics_namespace)) && !startswith(var.metrics_namespace, "AWS/")
    error_message = "metrics_namespace must be 1-255 letters, digits or . - _ / # : and must not start with AWS/."
  }
}

variable "alarm_email" {
  type        = string
  description = "E-mail address subscribed to the alarm topic (AWS sends a confirmation mail first). Empty (the default): no subscription."
  default     = ""

  validation {
    condition     = var.alarm_email == "" || can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.alarm_email))
    error_message = "alarm_email must be empty or an e-mail address."
  }
}

variable "alarm_topic_arn" {
  type        = string
  description = "ARN of an existing SNS topic for the alarms (e.g. your on-call integration). Empty (the default): a topic named <name>-alarms is created."
  default     = ""

  validation {
    condition     = var.alarm_topic_arn == "" || can(regex("^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}$", var.alarm_topic_arn))
    error_message = "alarm_topic_arn must be empty or an SNS topic ARN."
  }
}

variable "enable_tracing" {
  type        = bool
  description = "X-Ray active tracing of the function (and the IAM permission for it). Billed per trace recorded beyond the free tier; see docs/operations.md."
  default     = false
}

variable "alarm_lambda_errors_threshold" {
  type        = number
  description = "Function errors (crashes, timeouts, out of memory) in 5 minutes that raise the alarm."
  default     = 1

  validation {
    condition     = var.alarm_lambda_errors_threshold >= 1 && floor(var.alarm_lambda_errors_threshold) == var.alarm_lambda_errors_threshold
    error_message = "alarm_lambda_errors_threshold must be a whole number of at least 1."
  }
}

variable "alarm_lambda_throttles_threshold" {
  type        = number
  description = "Throttled invocations in 5 minutes that raise the alarm."
  default     = 1

  validation {
    condition     = var.alarm_lambda_throttles_threshold >= 1 && floor(var.alarm_lambda_throttles_threshold) == var.alarm_lambda_throttles_threshold
    error_message = "alarm_lambda_throttles_threshold must be a whole number of at least 1."
  }
}

variable "alarm_duration_p99_percent_of_timeout" {
  type        = number
  description = "The duration alarm fires when the p99 duration exceeds this percentage of the function timeout."
  default     = 80

  validation {
    condition     = var.alarm_duration_p99_percent_of_timeout > 0 && var.alarm_duration_p99_percent_of_timeout < 100
    error_message = "alarm_duration_p99_percent_of_timeout must be between 0 and 100 (exclusive)."
  }
}

variable "alarm_api_5xx_rate_percent" {
  type        = number
  description = "Percentage of API requests answered 5xx over 5 minutes (with at least 10 requests) that raises the alarm."
  default     = 5

  validation {
    condition     = var.alarm_api_5xx_rate_percent > 0 && var.alarm_api_5xx_rate_percent <= 100
    error_message = "alarm_api_5xx_rate_percent must be greater than 0 and at most 100."
  }
}

variable "alarm_db_cpu_percent" {
  type        = number
  description = "Average database CPU percentage over 15 minutes that raises the alarm."
  default     = 80

  validation {
    condition     = var.alarm_db_cpu_percent > 0 && var.alarm_db_cpu_percent < 100
    error_message = "alarm_db_cpu_percent must be between 0 and 100 (exclusive)."
  }
}

variable "alarm_db_free_storage_percent" {
  type        = number
  description = "The storage alarm fires when free space falls under this percentage of db_allocated_storage."
  default     = 20

  validation {
    condition     = var.alarm_db_free_storage_percent > 0 && var.alarm_db_free_storage_percent < 100
    error_message = "alarm_db_free_storage_percent must be between 0 and 100 (exclusive)."
  }
}

variable "alarm_db_connections_percent" {
  type        = number
  description = "The connections alarm fires above this percentage of what the function may open (lambda_reserved_concurrency x pool of 2), or with RDS Proxy of the connections the proxy may open."
  default     = 80

  validation {
    condition     = var.alarm_db_connections_percent > 0 && var.alarm_db_connections_percent <= 100
    error_message = "alarm_db_connections_percent must be greater than 0 and at most 100."
  }
}

variable "alarm_db_freeable_memory_mb" {
  type        = number
  description = "The memory alarm fires when the database's freeable memory stays under this many MiB for 15 minutes."
  default     = 64

  validation {
    condition     = var.alarm_db_freeable_memory_mb >= 1 && floor(var.alarm_db_freeable_memory_mb) == var.alarm_db_freeable_memory_mb
    error_message = "alarm_db_freeable_memory_mb must be a whole number of at least 1."
  }
}

variable "oldest_pending_alarm_seconds" {
  type        = number
  description = "The queue alarm fires when the oldest pending job has waited longer than this (or the queue gauges stop arriving)."
  default     = 900

  validation {
    condition     = var.oldest_pending_alarm_seconds >= 60 && floor(var.oldest_pending_alarm_seconds) == var.oldest_pending_alarm_seconds
    error_message = "oldest_pending_alarm_seconds must be a whole number of at least 60."
  }
}

variable "pending_jobs_alarm_threshold" {
  type        = number
  description = "The backlog alarm fires when more than this many jobs are pending for 10 minutes. 0 (the default): no backlog alarm."
  default     = 0

  validation {
    condition     = var.pending_jobs_alarm_threshold >= 0 && floor(var.pending_jobs_alarm_threshold) == var.pending_jobs_alarm_threshold
    error_message = "pending_jobs_alarm_threshold must be a whole number, 0 to turn the alarm off."
  }
}
