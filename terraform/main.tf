terraform {
  required_version = ">= 1.5"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = var.aws_region

  default_tags {
    tags = merge(
      {
        Project   = var.name
        ManagedBy = "terraform"
      },
      var.tags,
    )
  }
}

data "aws_availability_zones" "available" {
  #checkov:skip=CKV_AWS_394:Only the first two zones by name are used (local.azs); a zone AWS adds later sorts after them, so the set in use does not change
  state = "available"
}

data "aws_partition" "current" {}

locals {
  # Two zones: enough for the RDS subnet group (which requires two) and for
  # spreading the Lambda, without tripling the subnet count.
  azs = slice(data.aws_availability_zones.available.names, 0, 2)
}
