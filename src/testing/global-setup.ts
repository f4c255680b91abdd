import { setupTestServer } from './index.js';

/** vitest `globalSetup` entry: one real PostgreSQL for the whole run. */
export default setupTestServer;
