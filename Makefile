# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run

# `make run` serves on 127.0.0.1:$(PORT).
PORT ?= 8000

# Lambda target platform; terraform's runtime/architectures must match.
LAMBDA_PYTHON ?= 3.11
LAMBDA_ARCH ?= x86_64
# ...so deploy what was built: scripts/terraform.sh passes these to terraform.
export TF_VAR_lambda_runtime := python$(LAMBDA_PYTHON)
export TF_VAR_lambda_architecture := $(LAMBDA_ARCH)

.PHONY: install install-run run test test-deployed lint migrate sweep build ca-bundle plan deploy destroy clean docs-check console-screenshots

# `make run` installs what serving needs (requirements-run.txt); `make test`
# and the other targets add the test and lint tools (requirements-dev.txt).
install: $(STAMP)
install-run: $(RUN_STAMP)

$(RUN_STAMP): requirements.txt requirements-run.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-run.txt
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# uvicorn through scripts/serve.py: JSON lines only (the first two name the
# database in use, password hidden, and say that auth is off), and a reload on
# a change of the project's own .py files (watchfiles: no polling).
run: install-run
	@AUTH_DISABLED=1 exec $(BIN)/python scripts/serve.py --host 127.0.0.1 --port $(PORT)

# /docs and /redoc in headless Chromium with no network but loopback
# (needs Debian's chromium: apt-get install chromium). Not part of `make test`.
docs-check: install-run
	$(BIN)/python scripts/docs_check.py

# The console's browser tests (tests/test_console_browser.py) are part of it:
# they need Debian's chromium (apt-get install -y chromium; .ci/run installs it).
# Three processes, one test file each (conftest gives each its own PostgreSQL
# database): the suite is mostly waiting (timeouts, browsers), not CPU.
test: install
	$(BIN)/pytest -n 3 --dist loadfile

# docs/images/console-*.png, from a live app on a scratch SQLite file.
console-screenshots: install
	$(BIN)/python scripts/console_screenshots.py

# Contract tests over the network against a deployed API (the token is read,
# never typed on a command line; no-token cases accept the gateway's or the app's 401):
#   read -rs API_TOKEN && export API_TOKEN; API_URL=https://... make test-deployed
test-deployed: install
	@test -n "$$API_URL" || { echo "API_URL is required (and API_TOKEN when auth is on)"; exit 2; }
	$(BIN)/pytest tests/test_api.py

# Throughput as ratios to floors measured in the same run (PostgreSQL only):
#   TEST_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test make bench
.PHONY: bench
bench: install
	$(BIN)/python scripts/bench.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# alembic upgrade head against DATABASE_URL (or the default SQLite file),
# saying which database and from which revision to which.
migrate: install-run
	@$(BIN)/python scripts/migrate.py

# One sweep now (expired leases, retention) against DATABASE_URL or the SQLite file.
sweep: install-run
	AUTH_DISABLED=1 $(BIN)/python scripts/sweep.py

build:
	LAMBDA_PYTHON=$(LAMBDA_PYTHON) LAMBDA_ARCH=$(LAMBDA_ARCH) scripts/build_lambda.sh

# The CA bundle `make build` packages when present (Terraform's
# db_ssl_root_cert): RDS's global bundle, and Amazon Root CA 1, which signs
# RDS Proxy's certificate. Fetch it again when AWS rotates its CAs.
RDS_CA_BUNDLE_URL ?= https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
PROXY_CA_URL ?= https://www.amazontrust.com/repository/AmazonRootCA1.pem
ca-bundle:
	curl -fsSL --proto =https "$(RDS_CA_BUNDLE_URL)" -o rds-ca-bundle.pem.partial
	curl -fsSL --proto =https "$(PROXY_CA_URL)" >> rds-ca-bundle.pem.partial
	mv rds-ca-bundle.pem.partial rds-ca-bundle.pem

# Planning needs terraform, the provider (scripts/tf_mirror.sh) and lambda.zip:
# no Python packages.
plan:
	@scripts/terraform.sh plan

deploy: build
	scripts/terraform.sh apply

destroy:
	scripts/terraform.sh destroy

clean:
	rm -rf build lambda.zip .pytest_cache .ruff_cache
