CREATE TABLE "pgcoord"."flight_values" (
	"key" text PRIMARY KEY NOT NULL,
	"value" jsonb NOT NULL,
	"fence" bigint NOT NULL,
	"computed_at" timestamp with time zone NOT NULL,
	"fresh_until" timestamp with time zone NOT NULL
);
