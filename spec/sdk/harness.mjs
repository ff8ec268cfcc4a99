// The checks' shared harness: one line per check, "ok <name>" or
// "not ok <name> -- <why>" (spec/helpers.lua sdk_results reads them).
export const tally = { failed: 0 };

export async function check(name, fn) {
  try {
    await fn();
    console.log(`ok ${name}`);
  } catch (e) {
    tally.failed++;
    console.log(`not ok ${name} -- ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}`);
  }
}

export function expect(cond, what) { if (!cond) throw new Error(what); }

// the promise must reject with an error of class cls: -> the error
export async function rejects(promise, cls, what) {
  try {
    await promise;
  } catch (e) {
    expect(e instanceof cls, `${what}: got ${e && e.constructor && e.constructor.name}: ${e && e.message}`);
    return e;
  }
  throw new Error(`${what}: no error`);
}
