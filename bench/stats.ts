// Latency histograms (HdrHistogram, microsecond resolution) and their summary in milliseconds.
import * as hdr from 'hdr-histogram-js';

/** HdrHistogram in microseconds, 3 significant digits, auto-resizing. */
export type Histogram = ReturnType<typeof hdr.build>;

/** A fresh latency histogram (values recorded in µs). */
export function histogram(): Histogram {
  return hdr.build({ lowestDiscernibleValue: 1, numberOfSignificantValueDigits: 3, autoResize: true, useWebAssembly: false });
}

/** Latency percentiles in milliseconds. */
export interface Latency {
  p50: number;
  p95: number;
  p99: number;
  max: number;
  mean: number;
  count: number;
}

/** Summarise a µs histogram into ms percentiles. */
export function latency(h: Histogram): Latency {
  const ms = (us: number) => Math.round(us) / 1000;
  return {
    p50: ms(h.getValueAtPercentile(50)),
    p95: ms(h.getValueAtPercentile(95)),
    p99: ms(h.getValueAtPercentile(99)),
    max: ms(h.maxValue),
    mean: ms(h.mean),
    count: h.totalCount,
  };
}
