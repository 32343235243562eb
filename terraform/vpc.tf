# A VPC of its own over two zones with three subnet tiers:
#   public   (internet gateway, the NAT gateway)
#   private  (the Lambda; out to the internet through the NAT gateway only)
#   database (RDS; no route out at all)

resource "aws_vpc" "main" {
  #checkov:skip=CKV2_AWS_11:Flow logs are billed per GB ingested and nothing here consumes them; the only ingress path is API Gateway, whose access logs are kept
  cidr_block           = var.vpc_cidr
  enable_dns_support   = true
  enable_dns_hostnames = true

  tags = { Name = var.name }
}

# Take every rule off the VPC's default security group so nothing can use it
# by accident.
resource "aws_default_security_group" "default" {
  vpc_id = aws_vpc.main.id

  tags = { Name = "${var.name}-default-unused" }
}

resource "aws_subnet" "public" {
  count = length(local.azs)

  vpc_id            = aws_vpc.main.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, count.index)

  tags = { Name = "${var.name}-public-${local.azs[count.index]}", Tier = "public" }
}

resource "aws_subnet" "private" {
  count = length(local.azs)

  vpc_id            = aws_vpc.main.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, 10 + count.index)

  tags = { Name = "${var.name}-private-${local.azs[count.index]}", Tier = "private" }
}

resource "aws_subnet" "database" {
  count = length(local.azs)

  vpc_id            = aws_vpc.main.id
  availability_zone = local.azs[count.index]
  cidr_block        = cidrsubnet(var.vpc_cidr, 8, 20 + count.index)

  tags = { Name = "${var.name}-database-${local.azs[count.index]}", Tier = "database" }
}

resource "aws_internet_gateway" "main" {
  vpc_id = aws_vpc.main.id

  tags = { Name = var.name }
}

resource "aws_route_table" "public" {
  vpc_id = aws_vpc.main.id

  tags = { Name = "${var.name}-public" }
}

resource "aws_route" "public_internet" {
  route_table_id         = aws_route_table.public.id
  destination_cidr_block = "0.0.0.0/0"
  gateway_id             = aws_internet_gateway.main.id
}

resource "aws_route_table_association" "public" {
  count = length(aws_subnet.public)

  subnet_id      = aws_subnet.public[count.index].id
  route_table_id = aws_route_table.public.id
}

# One NAT gateway (in the first zone) to keep the cost down; the Lambda needs
# it to reach Auth0's JWKS endpoint.
resource "aws_eip" "nat" {
  count = var.enable_nat_gateway ? 1 : 0

  domain = "vpc"

  tags = { Name = "${var.name}-nat" }
}

resource "aws_nat_gateway" "main" {
  count = var.enable_nat_gateway ? 1 : 0

  allocation_id = aws_eip.nat[0].id
  subnet_id     = aws_subnet.public[0].id

  tags = { Name = var.name }

  depends_on = [aws_internet_gateway.main]
}

resource "aws_route_table" "private" {
  vpc_id = aws_vpc.main.id

  tags = { Name = "${var.name}-private" }
}

resource "aws_route" "private_nat" {
  count = var.enable_nat_gateway ? 1 : 0

  route_table_id         = aws_route_table.private.id
  destination_cidr_block = "0.0.0.0/0"
  nat_gateway_id         = aws_nat_gateway.main[0].id
}

resource "aws_route_table_association" "private" {
  count = length(aws_subnet.private)

  subnet_id      = aws_subnet.private[count.index].id
  route_table_id = aws_route_table.private.id
}

# Database subnets get a route table with no routes beyond the VPC's own.
resource "aws_route_table" "database" {
  vpc_id = aws_vpc.main.id

  tags = { Name = "${var.name}-database" }
}

resource "aws_route_table_association" "database" {
  count = length(aws_subnet.database)

  subnet_id      = aws_subnet.database[count.index].id
  route_table_id = aws_route_table.database.id
}

# Security groups. Terraform removes the default allow-all egress rule of a
# new group, so only the rules below exist. PostgreSQL flows:
#   API function -> database, or with RDS Proxy API function -> proxy -> database
#   migration function -> database (always directly)

resource "aws_security_group" "lambda" {
  name        = "${var.name}-lambda"
  description = "Extraction Job API Lambda: no ingress; egress HTTPS and PostgreSQL only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-lambda" }
}

resource "aws_security_group" "migration" {
  name        = "${var.name}-migrate"
  description = "Migration function: no ingress; egress PostgreSQL to the database and HTTPS to Secrets Manager only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-migrate" }
}

resource "aws_security_group" "database" {
  name        = "${var.name}-database"
  description = "Extraction Job API database: PostgreSQL from the functions (or RDS Proxy) only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-database" }
}

resource "aws_security_group" "proxy" {
  #checkov:skip=CKV2_AWS_5:Attached to aws_db_proxy.main (vpc_security_group_ids, proxy.tf), which exists exactly when this group does
  count = local.proxy_count

  name        = "${var.name}-rds-proxy"
  description = "RDS Proxy: PostgreSQL from the API Lambda, to the database only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-rds-proxy" }
}

resource "aws_security_group_rule" "lambda_https_out" {
  type              = "egress"
  security_group_id = aws_security_group.lambda.id
  description       = "HTTPS out (Auth0 JWKS) through the NAT gateway"
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

# The API function reaches the database directly, or only through the proxy.
resource "aws_security_group_rule" "lambda_postgres_out" {
  count = var.enable_rds_proxy ? 0 : 1

  type                     = "egress"
  security_group_id        = aws_security_group.lambda.id
  description              = "PostgreSQL to the database group"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.database.id
}

resource "aws_security_group_rule" "database_postgres_in" {
  count = var.enable_rds_proxy ? 0 : 1

  type                     = "ingress"
  security_group_id        = aws_security_group.database.id
  description              = "PostgreSQL from the Lambda group only"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.lambda.id
}

moved {
  from = aws_security_group_rule.lambda_postgres_out
  to   = aws_security_group_rule.lambda_postgres_out[0]
}

moved {
  from = aws_security_group_rule.database_postgres_in
  to   = aws_security_group_rule.database_postgres_in[0]
}

resource "aws_security_group_rule" "lambda_postgres_to_proxy" {
  count = local.proxy_count

  type                     = "egress"
  security_group_id        = aws_security_group.lambda.id
  description              = "PostgreSQL to RDS Proxy"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.proxy[0].id
}

resource "aws_security_group_rule" "proxy_postgres_in" {
  count = local.proxy_count

  type                     = "ingress"
  security_group_id        = aws_security_group.proxy[0].id
  description              = "PostgreSQL from the Lambda group"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.lambda.id
}

resource "aws_security_group_rule" "proxy_postgres_out" {
  count = local.proxy_count

  type                     = "egress"
  security_group_id        = aws_security_group.proxy[0].id
  description              = "PostgreSQL to the database group"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.database.id
}

resource "aws_security_group_rule" "database_postgres_from_proxy" {
  count = local.proxy_count

  type                     = "ingress"
  security_group_id        = aws_security_group.database.id
  description              = "PostgreSQL from RDS Proxy"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.proxy[0].id
}

# The migration function holds the master password: it reaches the database
# and Secrets Manager, nothing else.
resource "aws_security_group_rule" "migration_postgres_out" {
  type                     = "egress"
  security_group_id        = aws_security_group.migration.id
  description              = "PostgreSQL to the database group"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.database.id
}

resource "aws_security_group_rule" "database_postgres_from_migration" {
  type                     = "ingress"
  security_group_id        = aws_security_group.database.id
  description              = "PostgreSQL from the migration function"
  protocol                 = "tcp"
  from_port                = 5432
  to_port                  = 5432
  source_security_group_id = aws_security_group.migration.id
}

# Secrets Manager has no fixed addresses: through the NAT gateway its HTTPS
# can only be allowed to any address (the function calls nothing else);
# without NAT, only to the endpoint below.
resource "aws_security_group_rule" "migration_https_out" {
  count = var.enable_nat_gateway ? 1 : 0

  type              = "egress"
  security_group_id = aws_security_group.migration.id
  description       = "HTTPS out (Secrets Manager) through the NAT gateway"
  protocol          = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_blocks       = ["0.0.0.0/0"]
}

resource "aws_security_group_rule" "migration_https_to_endpoints" {
  count = var.enable_nat_gateway ? 0 : 1

  type                     = "egress"
  security_group_id        = aws_security_group.migration.id
  description              = "HTTPS to the Secrets Manager endpoint"
  protocol                 = "tcp"
  from_port                = 443
  to_port                  = 443
  source_security_group_id = aws_security_group.endpoints[0].id
}

# Without a NAT gateway nothing in the private subnets reaches AWS APIs; the
# migration function still has to read the master secret, so Secrets Manager
# gets an interface endpoint there (private DNS: the usual host name resolves
# to it). IAM database tokens are signed locally and need no endpoint.
resource "aws_security_group" "endpoints" {
  count = var.enable_nat_gateway ? 0 : 1

  name        = "${var.name}-endpoints"
  description = "Interface VPC endpoints: HTTPS from the migration function only"
  vpc_id      = aws_vpc.main.id

  tags = { Name = "${var.name}-endpoints" }
}

resource "aws_security_group_rule" "endpoints_https_in" {
  count = var.enable_nat_gateway ? 0 : 1

  type                     = "ingress"
  security_group_id        = aws_security_group.endpoints[0].id
  description              = "HTTPS from the migration function only"
  protocol                 = "tcp"
  from_port                = 443
  to_port                  = 443
  source_security_group_id = aws_security_group.migration.id
}

resource "aws_vpc_endpoint" "secretsmanager" {
  count = var.enable_nat_gateway ? 0 : 1

  vpc_id              = aws_vpc.main.id
  service_name        = "com.amazonaws.${data.aws_region.current.name}.secretsmanager"
  vpc_endpoint_type   = "Interface"
  private_dns_enabled = true
  subnet_ids          = aws_subnet.private[*].id
  security_group_ids  = [aws_security_group.endpoints[0].id]

  tags = { Name = "${var.name}-secretsmanager" }
}
