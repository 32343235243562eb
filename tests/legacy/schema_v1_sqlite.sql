-- The schema that release 1 (before Alembic) made with create_all.
CREATE TABLE extraction_job (
	seq INTEGER NOT NULL, 
	id CHAR(32) NOT NULL, 
	document_id VARCHAR(255) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	priority INTEGER NOT NULL, 
	metadata JSON, 
	error_message TEXT, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	created_by VARCHAR(255), 
	attempts INTEGER NOT NULL, 
	worker_id VARCHAR(255), 
	started_at DATETIME, 
	finished_at DATETIME, 
	version INTEGER NOT NULL, 
	idempotency_key VARCHAR(255), 
	PRIMARY KEY (seq), 
	CONSTRAINT ck_extraction_job_status CHECK (status IN ('pending', 'processing', 'completed', 'failed')), 
	CONSTRAINT ck_extraction_job_priority CHECK (priority BETWEEN 0 AND 10), 
	CONSTRAINT ck_extraction_job_attempts CHECK (attempts >= 0), 
	UNIQUE (id)
);

CREATE INDEX ix_extraction_job_document_id ON extraction_job (document_id, seq);

CREATE INDEX ix_extraction_job_pending_claim ON extraction_job (priority DESC, seq) WHERE status = 'pending';

CREATE INDEX ix_extraction_job_status ON extraction_job (status, seq);

CREATE UNIQUE INDEX uq_extraction_job_idempotency ON extraction_job (coalesce(created_by, ''), idempotency_key);
