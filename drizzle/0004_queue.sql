CREATE SEQUENCE "pgcoord"."queue_fence" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;--> statement-breakpoint
CREATE SEQUENCE "pgcoord"."queue_job_id" INCREMENT BY 1 MINVALUE 1 MAXVALUE 9223372036854775807 START WITH 1 CACHE 1;--> statement-breakpoint
CREATE TABLE "pgcoord"."queue_jobs" (
	"id" bigint PRIMARY KEY NOT NULL,
	"queue" text NOT NULL,
	"key" text NOT NULL,
	"payload" jsonb NOT NULL,
	"run_at" timestamp with time zone NOT NULL,
	"enqueued_at" timestamp with time zone NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"state" text DEFAULT 'ready' NOT NULL,
	"last_error" text,
	"dedupe_key" text,
	CONSTRAINT "queue_jobs_state_check" CHECK ("pgcoord"."queue_jobs"."state" in ('ready', 'dead'))
);
--> statement-breakpoint
CREATE TABLE "pgcoord"."queue_keys" (
	"queue" text NOT NULL,
	"key" text NOT NULL,
	"ready_at" timestamp with time zone,
	"holder" uuid,
	"holder_label" text,
	"fence" bigint,
	CONSTRAINT "queue_keys_queue_key_pk" PRIMARY KEY("queue","key")
);
--> statement-breakpoint
CREATE TABLE "pgcoord"."queue_order" (
	"queue" text NOT NULL,
	"key" text NOT NULL,
	"last_id" bigint NOT NULL,
	CONSTRAINT "queue_order_queue_key_pk" PRIMARY KEY("queue","key")
);
--> statement-breakpoint
CREATE UNIQUE INDEX "queue_jobs_key_idx" ON "pgcoord"."queue_jobs" USING btree ("queue","key","id");--> statement-breakpoint
CREATE UNIQUE INDEX "queue_jobs_dedupe_idx" ON "pgcoord"."queue_jobs" USING btree ("queue","dedupe_key") WHERE "pgcoord"."queue_jobs"."dedupe_key" is not null;--> statement-breakpoint
CREATE INDEX "queue_keys_ready_idx" ON "pgcoord"."queue_keys" USING btree ("queue","ready_at");--> statement-breakpoint
CREATE FUNCTION "pgcoord"."queue_settle"(q text, k text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
-- Move a key along once its head changed (completed, failed, skipped, or found missing). The caller
-- holds the key's queue_keys row. A VOLATILE function takes a fresh snapshot for each statement, so
-- every job committed before a statement starts is seen by it; and a job not yet committed can only
-- have a greater id than every committed one of its key (ids are drawn under the queue_order row
-- lock, so in commit order): the smallest id seen is the true head.
DECLARE
  head record;
BEGIN
  SELECT j.state, j.run_at INTO head FROM "pgcoord"."queue_jobs" j WHERE j.queue = q AND j.key = k ORDER BY j.id LIMIT 1;
  IF NOT FOUND THEN
    -- Empty as far as committed jobs go. An enqueue in flight holds the key's queue_order row until
    -- its transaction ends: if we can lock that row, no enqueue is in flight nor can start, and a
    -- second look is final; if we cannot, its job is on the way: look again shortly.
    PERFORM 1 FROM "pgcoord"."queue_order" o WHERE o.queue = q AND o.key = k FOR UPDATE SKIP LOCKED;
    IF NOT FOUND AND EXISTS (SELECT 1 FROM "pgcoord"."queue_order" o WHERE o.queue = q AND o.key = k) THEN
      UPDATE "pgcoord"."queue_keys" kk SET holder = NULL, holder_label = NULL, ready_at = clock_timestamp() + interval '200 milliseconds'
        WHERE kk.queue = q AND kk.key = k;
      RETURN;
    END IF;
    SELECT j.state, j.run_at INTO head FROM "pgcoord"."queue_jobs" j WHERE j.queue = q AND j.key = k ORDER BY j.id LIMIT 1;
    IF NOT FOUND THEN
      DELETE FROM "pgcoord"."queue_order" o WHERE o.queue = q AND o.key = k;
      DELETE FROM "pgcoord"."queue_keys" kk WHERE kk.queue = q AND kk.key = k;
      RETURN;
    END IF;
  END IF;
  -- a dead head stops its key (ready_at null: no claim sees it) until a retry or a skip
  UPDATE "pgcoord"."queue_keys" kk SET holder = NULL, holder_label = NULL,
      ready_at = CASE WHEN head.state = 'dead' THEN NULL ELSE head.run_at END
    WHERE kk.queue = q AND kk.key = k;
END $$;
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."queue_claim"(q text, h uuid, label text, n int, ttl_ms int)
RETURNS TABLE (claimed_key text, claim_fence bigint, job_id bigint, job_payload jsonb, job_attempts int, job_enqueued_at timestamptz, next_in_ms float8)
LANGUAGE plpgsql VOLATILE AS $$
-- Claim up to n keys whose head can run now, oldest ready first, and return each key's head. A key
-- is free when its ready_at has passed: a held key's ready_at is the end of its claim, so a claim
-- that ran out (its worker died) is taken over by the same scan, with a new, greater fence.
-- SKIP LOCKED passes over keys another worker is claiming, renewing or completing right now; a
-- locked row is rechecked on its latest version, so a key renewed since our snapshot is not taken.
-- The last row (claimed_key null) says in how many ms the next key becomes ready (null: none).
DECLARE
  r record;
  head record;
  f bigint;
BEGIN
  FOR r IN
    SELECT kk.key FROM "pgcoord"."queue_keys" kk
      WHERE kk.queue = q AND kk.ready_at <= clock_timestamp()
      ORDER BY kk.ready_at LIMIT n
      FOR NO KEY UPDATE SKIP LOCKED
  LOOP
    SELECT j.id, j.state, j.run_at INTO head FROM "pgcoord"."queue_jobs" j WHERE j.queue = q AND j.key = r.key ORDER BY j.id LIMIT 1;
    IF NOT FOUND OR head.state <> 'ready' OR head.run_at > clock_timestamp() THEN
      PERFORM "pgcoord"."queue_settle"(q, r.key);
      CONTINUE;
    END IF;
    f := nextval('"pgcoord"."queue_fence"');
    UPDATE "pgcoord"."queue_keys" kk SET holder = h, holder_label = label, fence = f,
        ready_at = clock_timestamp() + ttl_ms * interval '1 millisecond'
      WHERE kk.queue = q AND kk.key = r.key;
    -- the attempt counts when it starts: a job whose worker keeps dying still runs out of attempts
    RETURN QUERY UPDATE "pgcoord"."queue_jobs" j SET attempts = j.attempts + 1 WHERE j.id = head.id
      RETURNING r.key, f, j.id, j.payload, j.attempts, j.enqueued_at, NULL::float8;
  END LOOP;
  RETURN QUERY SELECT NULL::text, NULL::bigint, NULL::bigint, NULL::jsonb, NULL::int, NULL::timestamptz,
    (SELECT greatest(0, extract(epoch FROM min(kk.ready_at) - clock_timestamp()) * 1000)::float8
       FROM "pgcoord"."queue_keys" kk WHERE kk.queue = q AND kk.ready_at IS NOT NULL);
END $$;
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."queue_hold"(q text, k text, f bigint) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
-- Lock the key's row if claim f is still current, else refuse (SQLSTATE PGF01): a worker whose claim
-- was taken over can neither complete nor fail the job, nor move the key.
BEGIN
  PERFORM 1 FROM "pgcoord"."queue_keys" kk WHERE kk.queue = q AND kk.key = k AND kk.fence = f AND kk.holder IS NOT NULL
    FOR NO KEY UPDATE;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PGF01',
      MESSAGE = format('pgcoord: queue %s key %s claim %s is not current', q, k, f);
  END IF;
END $$;
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."queue_complete"(q text, k text, job bigint, f bigint, keep boolean, take_next boolean, h uuid, label text, ttl_ms int)
RETURNS TABLE (claimed_key text, claim_fence bigint, job_id bigint, job_payload jsonb, job_attempts int, job_enqueued_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $$
-- Delete the finished job under claim f. With keep, keep the key for its next job if that one can
-- run now (the claim goes on, extended by ttl_ms, and the job is returned): a busy key needs no
-- claim between its jobs. Otherwise the key is released to its next head, or removed if empty, and
-- with take_next the worker's freed slot claims the oldest ready key in the same statement (for
-- worker h, for ttl_ms): one statement per job also over many small keys.
BEGIN
  PERFORM "pgcoord"."queue_hold"(q, k, f);
  DELETE FROM "pgcoord"."queue_jobs" j WHERE j.id = job AND j.queue = q AND j.key = k;
  IF keep THEN
    RETURN QUERY UPDATE "pgcoord"."queue_jobs" j SET attempts = j.attempts + 1
      WHERE j.id = (SELECT j2.id FROM "pgcoord"."queue_jobs" j2 WHERE j2.queue = q AND j2.key = k ORDER BY j2.id LIMIT 1)
        AND j.state = 'ready' AND j.run_at <= clock_timestamp()
      RETURNING k, f, j.id, j.payload, j.attempts, j.enqueued_at;
    IF FOUND THEN
      UPDATE "pgcoord"."queue_keys" kk SET ready_at = clock_timestamp() + ttl_ms * interval '1 millisecond'
        WHERE kk.queue = q AND kk.key = k;
      RETURN;
    END IF;
  END IF;
  PERFORM "pgcoord"."queue_settle"(q, k);
  IF take_next THEN
    RETURN QUERY SELECT c.claimed_key, c.claim_fence, c.job_id, c.job_payload, c.job_attempts, c.job_enqueued_at
      FROM "pgcoord"."queue_claim"(q, h, label, 1, ttl_ms) c WHERE c.claimed_key IS NOT NULL;
  END IF;
END $$;
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."queue_fail"(q text, k text, job bigint, f bigint, error text, retry_in_ms int) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
-- A failed attempt under claim f: the job stays its key's head (order is kept) and runs again after
-- retry_in_ms, or (retry_in_ms null) it is dead and its key stops until a retry or a skip.
BEGIN
  PERFORM "pgcoord"."queue_hold"(q, k, f);
  UPDATE "pgcoord"."queue_jobs" j SET last_error = error,
      state = CASE WHEN retry_in_ms IS NULL THEN 'dead' ELSE 'ready' END,
      run_at = CASE WHEN retry_in_ms IS NULL THEN j.run_at ELSE clock_timestamp() + retry_in_ms * interval '1 millisecond' END
    WHERE j.id = job AND j.queue = q AND j.key = k;
  PERFORM "pgcoord"."queue_settle"(q, k);
END $$;
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."queue_skip"(q text, k text) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
-- Drop a key's dead head and move the key on to its next job. Returns the dropped job's id, or null
-- when the key's head is not dead.
DECLARE
  dropped bigint;
BEGIN
  PERFORM 1 FROM "pgcoord"."queue_keys" kk WHERE kk.queue = q AND kk.key = k FOR NO KEY UPDATE;
  DELETE FROM "pgcoord"."queue_jobs" j
    WHERE j.id = (SELECT j2.id FROM "pgcoord"."queue_jobs" j2 WHERE j2.queue = q AND j2.key = k ORDER BY j2.id LIMIT 1)
      AND j.state = 'dead'
    RETURNING j.id INTO dropped;
  IF dropped IS NOT NULL THEN
    PERFORM "pgcoord"."queue_settle"(q, k);
  END IF;
  RETURN dropped;
END $$;
--> statement-breakpoint
CREATE FUNCTION "pgcoord"."check_queue_fence"(q text, k text, f bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
-- Refuse the calling transaction (SQLSTATE PGF01) unless claim f of the key is current. FOR SHARE:
-- a takeover (an UPDATE of the row) waits for the calling transaction to end, so a fenced write
-- commits before any other worker can run the key's job again.
BEGIN
  PERFORM 1 FROM "pgcoord"."queue_keys" kk WHERE kk.queue = q AND kk.key = k AND kk.fence = f AND kk.holder IS NOT NULL
    FOR SHARE;
  IF NOT FOUND THEN
    RAISE EXCEPTION USING ERRCODE = 'PGF01',
      MESSAGE = format('pgcoord: queue %s key %s claim %s is not current', q, k, f);
  END IF;
  RETURN true;
END $$;
