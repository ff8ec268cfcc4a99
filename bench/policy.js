// The Node.js baseline for bench/policy.lua: the same composition with
// cockatiel (retry + circuit breaker) and bottleneck (concurrency and rate)
// around a no-op function whose output is validated.
// Prints "policy N seconds calls_per_s us_per_call".
// 2nd argument "cockatiel": bottleneck replaced by cockatiel's own bulkhead
// (a stronger baseline: bottleneck schedules every job through a timer).
const { retry, circuitBreaker, bulkhead, handleAll, wrap, ExponentialBackoff, SamplingBreaker } = require("cockatiel");
const Bottleneck = require("bottleneck");

const n = Number(process.argv[2] || 200000);
const variant = process.argv[3] || "bottleneck";
const output = { text: "hello" };
const noop = async () => output;
function validate(out) {
  if (typeof out.text !== "string" || out.text === "") throw new Error("empty output");
  return out;
}

const resilience = wrap(
  retry(handleAll, { maxAttempts: 3, backoff: new ExponentialBackoff({ initialDelay: 500, maxDelay: 20000 }) }),
  circuitBreaker(handleAll, { halfOpenAfter: 30000,
                              breaker: new SamplingBreaker({ threshold: 0.5, duration: 30000, minimumRps: 1 }) }),
);
let call;
if (variant === "cockatiel") {
  const policy = wrap(resilience, bulkhead(64, 1000));
  call = () => policy.execute(() => noop().then(validate));
} else {
  const limiter = new Bottleneck({ maxConcurrent: 64, highWater: 1000, reservoir: 1e9 });
  call = () => resilience.execute(() => limiter.schedule(() => noop().then(validate)));
}

(async () => {
  for (let i = 0; i < Math.min(1000, n / 10); i++) await call();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await call();
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(`policy ${n} ${s.toFixed(3)} ${(n / s).toFixed(0)} ${(s / n * 1e6).toFixed(3)}`);
})();
