CREATE SEQUENCE "pgcoord"."lease_fence" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;--> statement-breakpoint
CREATE TABLE "pgcoord"."leases" (
	"name" text PRIMARY KEY NOT NULL,
	"fence" bigint NOT NULL,
	"holder" uuid,
	"holder_label" text,
	"acquired_at" timestamp with time zone NOT NULL,
	"renewed_at" timestamp with time zone NOT NULL,
	"expires_at" timestamp with time zone NOT NULL,
	CONSTRAINT "leases_name_check" CHECK (length("pgcoord"."leases"."name") between 1 and 255)
);
--> statement-breakpoint
CREATE TABLE "pgcoord"."singleton_runs" (
	"job" text NOT NULL,
	"slot" text NOT NULL,
	"state" text NOT NULL,
	"fence" bigint NOT NULL,
	"result" jsonb,
	"started_at" timestamp with time zone NOT NULL,
	"finished_at" timestamp with time zone,
	CONSTRAINT "singleton_runs_pkey" PRIMARY KEY("job","slot"),
	CONSTRAINT "singleton_runs_state_check" CHECK ("pgcoord"."singleton_runs"."state" in ('running', 'done'))
);
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."check_fence"(lease text, fence bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  -- FOR SHARE: a takeover (an UPDATE of this row) waits for the calling transaction to end.
  PERFORM 1 FROM "pgcoord"."leases" l
    WHERE l.name = check_fence.lease AND l.fence = check_fence.fence AND l.expires_at > clock_timestamp()
    FOR SHARE;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PGF01',
      MESSAGE = format('pgcoord: lease %s fence %s is not the current term', check_fence.lease, check_fence.fence);
  END IF;
  RETURN true;
END $$;
