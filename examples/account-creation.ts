// Account creation across three systems: an auth provider, a SaaS tool (CRM, billing, support
// desk) and our database. No transaction spans them, so a crash between two calls leaves a user in
// one system and not the others, and a naive retry creates a second one: a phantom account. Here the
// signup runs under `idempotent()` in phased mode, keyed by the client's request id: each system is
// one phase, committed with a recovery point, and a retry after a crash at any point resumes after
// the last committed phase. The auth provider deduplicates by an idempotency key (we give it the
// phase's stable key); the SaaS tool has none, so its phase looks the user up before creating it.
// The account row comes last and names both users. A repeat after success replays the stored answer.
//
//   DATABASE_URL=postgres://... npx tsx examples/account-creation.ts   # a crash, a retry, a repeat

import { randomUUID } from 'node:crypto';
import { pathToFileURL } from 'node:url';
import postgres from 'postgres';
import { type IdempotentResult, idempotent, migrateIdempotency } from '../src/index.js';

/** The auth provider: deduplicates by idempotency key (the same key returns the same user). */
export interface AuthProvider {
  createUser(email: string, options: { idempotencyKey: string }): Promise<{ id: string }>;
}
/** The SaaS tool: no idempotency key, every `createUser` creates a user; it can be searched. */
export interface SaasTool {
  findUserByEmail(email: string): Promise<{ id: string } | undefined>;
  createUser(email: string): Promise<{ id: string }>;
}
export interface Systems {
  auth: AuthProvider;
  saas: SaasTool;
}

/** In-memory stand-ins for the two services, recording every call. */
export class FakeAuthProvider implements AuthProvider {
  readonly users = new Map<string, { id: string; email: string }>();
  readonly calls: string[] = [];
  private readonly byKey = new Map<string, string>();
  async createUser(email: string, { idempotencyKey }: { idempotencyKey: string }) {
    this.calls.push(`createUser ${email}`);
    let id = this.byKey.get(idempotencyKey);
    if (id === undefined) {
      id = `auth_${this.users.size + 1}`;
      this.users.set(id, { id, email });
      this.byKey.set(idempotencyKey, id);
    }
    return { id };
  }
}
export class FakeSaasTool implements SaasTool {
  readonly users: { id: string; email: string }[] = [];
  readonly calls: string[] = [];
  async findUserByEmail(email: string) {
    this.calls.push(`findUserByEmail ${email}`);
    const user = this.users.find((u) => u.email === email);
    return user && { id: user.id };
  }
  async createUser(email: string) {
    this.calls.push(`createUser ${email}`);
    const user = { id: `saas_${this.users.length + 1}`, email };
    this.users.push(user);
    return { id: user.id };
  }
}

/** pgcoord's table (a deploy step in a real app) and ours. */
export async function setUp(sql: postgres.Sql): Promise<void> {
  await migrateIdempotency(sql);
  await sql.unsafe(`create table if not exists accounts (
    id serial primary key, email text not null unique, auth_user_id text not null unique, saas_user_id text not null)`);
}

export interface Account {
  accountId: number;
  authUserId: string;
  saasUserId: string;
}

/**
 * Create the account once per `requestId` (the client's idempotency key, the same on every retry).
 * `afterPhase` runs after each phase commits: the tests crash there. `leaseMs`: how long a crashed
 * attempt keeps the key before a retry may take it over (10 s by default).
 */
export function createAccount(
  sql: postgres.Sql,
  { auth, saas }: Systems,
  { email, requestId }: { email: string; requestId: string },
  options: { leaseMs?: number; afterPhase?: (phase: string) => void | Promise<void> } = {},
): Promise<IdempotentResult<Account>> {
  const after = async (phase: string) => options.afterPhase?.(phase);
  const request = { email }; // the same key with another email is refused (IdempotencyMismatchError)
  return idempotent(sql, { scope: 'signup', key: requestId, request, mode: 'phased', leaseMs: options.leaseMs }, async (ctx) => {
    // 1. The phase's key is the same in every attempt of this request: a retry after a crash between
    //    the provider's answer and this phase's commit gets the same user back, not a second one.
    const authUserId = await ctx.phase('auth', async (_tx, { key }) => (await auth.createUser(email, { idempotencyKey: key })).id);
    await after('auth');
    // 2. No key to give: look before creating. Only the attempt holding the request's lease runs
    //    this (one at a time per key), so a retry finds the user an attempt created and then lost.
    const saasUserId = await ctx.phase('saas', async () => ((await saas.findUserByEmail(email)) ?? (await saas.createUser(email))).id);
    await after('saas');
    // 3. Our row last, naming both users: it exists only once they do, and its insert commits with
    //    the phase's recovery point (a crash before that commit rolls the insert back).
    const accountId = await ctx.phase('account', async (tx) => {
      const [row] = await tx`insert into accounts (email, auth_user_id, saas_user_id)
        values (${email}, ${authUserId}, ${saasUserId}) returning id`;
      return Number(row?.id);
    });
    await after('account');
    return { accountId, authUserId, saasUserId }; // stored: every later call with this key replays it
  });
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const sql = postgres(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres', { max: 4, onnotice: () => {} });
  const systems = { auth: new FakeAuthProvider(), saas: new FakeSaasTool() };
  const signup = { email: `ada+${Date.now()}@example.com`, requestId: randomUUID() };
  try {
    await setUp(sql);
    const crash = (phase: string) => {
      if (phase === 'saas') throw new Error('crashed after the saas phase');
    };
    await createAccount(sql, systems, signup, { afterPhase: crash }).catch((e: Error) => console.log(`attempt 1: ${e.message}`));
    console.log('attempt 2:', await createAccount(sql, systems, signup)); // resumes at the account phase
    console.log('attempt 3:', await createAccount(sql, systems, signup)); // replayed: true
    console.log(`auth users: ${systems.auth.users.size} (${systems.auth.calls.length} calls), saas users: ${systems.saas.users.length}`);
  } finally {
    await sql.end({ timeout: 5 });
  }
}
