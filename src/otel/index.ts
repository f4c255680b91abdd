export { type Instrumentation, type InstrumentOptions, instrumentPgcoord, type KeyAttribute } from './instrument.js';
