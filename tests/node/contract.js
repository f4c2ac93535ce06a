// A client in another gRPC implementation (Node's @grpc/grpc-js), built from protos/ alone:
// it drives the unary RPCs of both services, the bidirectional child-event stream and the
// WatchJob server stream, and checks the answers the contract promises.
//
// usage: node contract.js PROTOS_DIR MONITOR_ADDRESS ORCHESTRATOR_ADDRESS
// Prints one JSON summary line on success; exits non-zero with the failed check otherwise.
"use strict";

const assert = require("node:assert/strict");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [protosDir, monitorAddress, orchestratorAddress] = process.argv.slice(2);
const DEADLINE_MS = 15000;

const definition = protoLoader.loadSync(
  ["stepflow/v1/monitor_service.proto", "stepflow/v1/orchestrator_service.proto"],
  { includeDirs: [path.resolve(protosDir)], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
);
const v1 = grpc.loadPackageDefinition(definition).stepflow.v1;
const monitor = new v1.MonitorService(monitorAddress, grpc.credentials.createInsecure());
const orchestrator = new v1.OrchestratorService(orchestratorAddress, grpc.credentials.createInsecure());

// google.protobuf.Struct <-> plain objects: the few lines every non-Python client writes. The
// well-known types bundled with protobufjs keep camelCase field names even with keepCase.
function toValue(v) {
  if (v === null) return { nullValue: "NULL_VALUE" };
  if (typeof v === "number") return { numberValue: v };
  if (typeof v === "string") return { stringValue: v };
  if (typeof v === "boolean") return { boolValue: v };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  return { structValue: toStruct(v) };
}
function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}
function fromValue(v) {
  switch (v.kind) {
    case "nullValue": return null;
    case "numberValue": return v.numberValue;
    case "stringValue": return v.stringValue;
    case "boolValue": return v.boolValue;
    case "listValue": return (v.listValue.values || []).map(fromValue);
    case "structValue": return fromStruct(v.structValue);
    default: throw new Error(`unknown Value kind ${v.kind}`);
  }
}
function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = fromValue(v);
  return out;
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + DEADLINE_MS);
    client[method](request, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function expectCode(promise, code, what) {
  try {
    await promise;
  } catch (err) {
    assert.equal(err.code, code, `${what}: expected ${code}, got ${err.code} (${err.details})`);
    return err;
  }
  throw new Error(`${what}: expected gRPC code ${code}, the call succeeded`);
}

// Follows WatchJob until the job is terminal; returns every state seen.
function watchToEnd(jobId) {
  return new Promise((resolve, reject) => {
    const seen = [];
    const stream = monitor.WatchJob(
      { job_id: jobId, after_change_seq: 0 },
      { deadline: new Date(Date.now() + 60000) },
    );
    stream.on("data", (msg) => seen.push(msg.job));
    stream.on("error", reject);
    stream.on("end", () => resolve(seen));
  });
}

// One batch through StreamChildEvents; resolves with the ack.
function sendBatch(batchId, events) {
  return new Promise((resolve, reject) => {
    const stream = monitor.StreamChildEvents({ deadline: new Date(Date.now() + DEADLINE_MS) });
    let ack = null;
    stream.on("data", (msg) => {
      ack = msg;
      stream.end();
    });
    stream.on("error", reject);
    stream.on("end", () => (ack ? resolve(ack) : reject(new Error("stream ended without an ack"))));
    stream.write({ batch_id: batchId, events });
  });
}

const TERMINAL = new Set([
  "JOB_STATUS_COMPLETED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED", "JOB_STATUS_SKIPPED",
]);

async function monitorContract() {
  const { job: manager } = await call(monitor, "CreateJob", {
    kind: "JOB_KIND_MANAGER", name: "node-contract", request_id: `node-${process.pid}`,
    metadata: toStruct({ total_steps: 1, owner_team: "node" }),
  });
  assert.equal(manager.kind, "JOB_KIND_MANAGER");
  assert.equal(manager.status, "JOB_STATUS_PENDING");
  // request_id makes CreateJob idempotent.
  const { job: again } = await call(monitor, "CreateJob", {
    kind: "JOB_KIND_MANAGER", name: "node-contract", request_id: `node-${process.pid}`,
  });
  assert.equal(again.id, manager.id);

  const { job: step } = await call(monitor, "CreateJob", {
    kind: "JOB_KIND_STEP", parent_id: manager.id, name: "crawl", type: "external",
    metadata: toStruct({ step_index: 0 }),
  });
  assert.equal(step.manager_id, manager.id);

  const entry = {
    step_index: 0, step_id: step.id, step_name: "crawl", step_type: "external",
    child_count: 0, document_count: 0, status: "running", error: "",
  };
  const { job: withStats } = await call(monitor, "UpdateJobMetadata", {
    job_id: manager.id, expected_version: manager.version,
    metadata: toStruct({
      step_stats: [entry], current_step: 1, current_step_id: step.id, current_step_name: "crawl",
      current_step_type: "external", current_step_status: "running",
    }),
  });
  assert.equal(Number(withStats.version), Number(manager.version) + 1);
  assert.equal(fromStruct(withStats.metadata).owner_team, "node");
  // A stale expected_version is ABORTED: optimistic concurrency across languages.
  await expectCode(
    call(monitor, "UpdateJobMetadata", {
      job_id: manager.id, expected_version: manager.version, metadata: toStruct({ x: 1 }),
    }),
    grpc.status.ABORTED, "stale expected_version",
  );

  await call(monitor, "UpdateJobStatus", { job_id: manager.id, status: "JOB_STATUS_RUNNING" });
  await call(monitor, "UpdateJobStatus", { job_id: step.id, status: "JOB_STATUS_RUNNING" });
  const stat = await call(monitor, "UpdateStepStatInManager", {
    manager_id: manager.id, step_id: step.id, status: "JOB_STATUS_RUNNING",
  });
  assert.equal(stat.step_stat.step_id, step.id);
  // Backwards is FAILED_PRECONDITION, UNSPECIFIED is INVALID_ARGUMENT, unknown is NOT_FOUND.
  await expectCode(
    call(monitor, "UpdateJobStatus", { job_id: step.id, status: "JOB_STATUS_PENDING" }),
    grpc.status.FAILED_PRECONDITION, "backwards move",
  );
  await expectCode(
    call(monitor, "UpdateJobStatus", { job_id: step.id, status: "JOB_STATUS_UNSPECIFIED" }),
    grpc.status.INVALID_ARGUMENT, "unspecified status",
  );
  await expectCode(
    call(monitor, "GetJob", { job_id: "no-such-job" }), grpc.status.NOT_FOUND, "unknown job",
  );

  // The manager's watcher sees every committed change until the job ends.
  const watched = watchToEnd(manager.id);

  // Three children through the bidirectional stream, the step handed to the monitor:
  // two complete, one fails, so the monitor ends the step `completed` (failed count kept).
  const ev = (n, kind, child, extra = {}) => ({
    event_id: `node-${process.pid}-${n}`, step_id: step.id, child_id: child, kind, ...extra,
  });
  const children = ["a", "b", "c"].map((c) => `${step.id}-${c}`);
  const ack = await sendBatch(1, [
    ...children.map((c, i) => ev(i, "CHILD_EVENT_KIND_CREATED", c)),
    ev(3, "CHILD_EVENT_KIND_COMPLETED", children[0]),
    ev(4, "CHILD_EVENT_KIND_COMPLETED", children[1]),
    ev(5, "CHILD_EVENT_KIND_FAILED", children[2], { error: "boom" }),
    ev(6, "CHILD_EVENT_KIND_SEALED", "", { child_count: 3, handed_to_monitor: true }),
    ev(7, "CHILD_EVENT_KIND_CREATED", "", {}), // no child_id: rejected, the rest still applied
  ]);
  assert.equal(String(ack.batch_id), "1");
  assert.deepEqual(ack.rejected.map((r) => r.event_id), [`node-${process.pid}-7`]);

  const { job: ended } = await call(monitor, "GetJob", { job_id: step.id });
  assert.equal(ended.status, "JOB_STATUS_COMPLETED");
  assert.equal(ended.end_reason, "children_terminal");
  const { job: view } = await call(monitor, "GetJob", { job_id: manager.id });
  const typed = view.step_stats[0];
  assert.equal(typed.status, "JOB_STATUS_COMPLETED");
  assert.deepEqual(
    [typed.children.completed, typed.children.failed, typed.children.running].map(Number),
    [2, 1, 0],
  );
  assert.equal(fromStruct(view.metadata).step_stats[0].status, "completed");
  const { jobs } = await call(monitor, "ListJobs", { parent_id: step.id, page_size: 10 });
  assert.equal(jobs.length, 3);

  await call(monitor, "UpdateJobStatus", { job_id: manager.id, status: "JOB_STATUS_COMPLETED" });
  const states = await watched;
  const seqs = states.map((j) => Number(j.change_seq));
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `change_seq ${seqs}`);
  assert.equal(states[states.length - 1].status, "JOB_STATUS_COMPLETED");
  return { watch_messages: states.length, children: jobs.length };
}

async function orchestratorContract() {
  const { workers } = await call(orchestrator, "ListWorkers", {});
  const types = workers.map((w) => w.type);
  for (const t of ["command", "fanout", "simulate", "python"]) assert.ok(types.includes(t), t);

  const { manager_id: managerId } = await call(orchestrator, "SubmitJob", {
    request_id: `node-submit-${process.pid}`,
    definition: {
      name: "node-submitted",
      steps: [
        {
          name: "sim", type: "simulate", on_error: "ON_ERROR_CONTINUE",
          config: toStruct({ children: 12, duration_ms: 1, fail_every: 4 }),
        },
        { name: "after", type: "command", config: toStruct({ command: "true" }) },
      ],
    },
  });
  const states = await watchToEnd(managerId);
  const last = states[states.length - 1];
  assert.ok(TERMINAL.has(last.status));
  assert.equal(last.status, "JOB_STATUS_COMPLETED");
  const sim = last.step_stats.find((s) => s.step_name === "sim");
  assert.deepEqual([sim.children.completed, sim.children.failed].map(Number), [9, 3]);
  assert.equal(fromStruct(last.metadata).completed_steps, 2);

  await expectCode(
    call(orchestrator, "CancelJob", { job_id: managerId }),
    grpc.status.FAILED_PRECONDITION, "cancel of a completed job",
  );
  return { watch_messages: states.length, sim_children: Number(sim.child_count) };
}

(async () => {
  const summary = { monitor: await monitorContract(), orchestrator: await orchestratorContract() };
  process.stdout.write(JSON.stringify(summary) + "\n");
  monitor.close();
  orchestrator.close();
})().catch((err) => {
  process.stderr.write(`node contract check failed: ${err.stack || err}\n`);
  process.exit(1);
});
