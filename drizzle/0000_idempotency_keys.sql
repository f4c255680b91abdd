CREATE SCHEMA "pgcoord";
--> statement-breakpoint
CREATE TABLE "pgcoord"."idempotency_keys" (
	"scope" text NOT NULL,
	"key" text NOT NULL,
	"fingerprint" "bytea" NOT NULL,
	"fingerprint_version" smallint NOT NULL,
	"state" text NOT NULL,
	"lease_token" uuid,
	"lease_expires_at" timestamp with time zone,
	"recovery_point" text DEFAULT 'started' NOT NULL,
	"recovery_data" jsonb DEFAULT '{}'::jsonb NOT NULL,
	"response_status" smallint,
	"response_headers" jsonb,
	"response_body" "bytea",
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	"expires_at" timestamp with time zone NOT NULL,
	"attempts" integer DEFAULT 1 NOT NULL,
	CONSTRAINT "idempotency_keys_pkey" PRIMARY KEY("scope","key"),
	CONSTRAINT "idempotency_keys_state_check" CHECK ("pgcoord"."idempotency_keys"."state" in ('running', 'completed', 'failed_retryable')),
	CONSTRAINT "idempotency_keys_running_lease_check" CHECK ("pgcoord"."idempotency_keys"."state" <> 'running' or ("pgcoord"."idempotency_keys"."lease_token" is not null and "pgcoord"."idempotency_keys"."lease_expires_at" is not null)),
	CONSTRAINT "idempotency_keys_completed_response_check" CHECK ("pgcoord"."idempotency_keys"."state" <> 'completed' or ("pgcoord"."idempotency_keys"."response_status" is not null and "pgcoord"."idempotency_keys"."response_body" is not null)),
	CONSTRAINT "idempotency_keys_status_check" CHECK ("pgcoord"."idempotency_keys"."response_status" is null or "pgcoord"."idempotency_keys"."response_status" between 100 and 599),
	CONSTRAINT "idempotency_keys_attempts_check" CHECK ("pgcoord"."idempotency_keys"."attempts" >= 1),
	CONSTRAINT "idempotency_keys_key_check" CHECK (length("pgcoord"."idempotency_keys"."key") between 1 and 255)
);
--> statement-breakpoint
CREATE INDEX "idempotency_keys_running_lease_idx" ON "pgcoord"."idempotency_keys" USING btree ("lease_expires_at") WHERE "pgcoord"."idempotency_keys"."state" = 'running';--> statement-breakpoint
CREATE INDEX "idempotency_keys_expires_idx" ON "pgcoord"."idempotency_keys" USING btree ("expires_at");