#!/usr/bin/env node
// A small Tessera client in Node.js (@grpc/grpc-js + @grpc/proto-loader), used by
// tests/interop/test_node_client.py to prove that a non-Python gRPC stack interoperates
// with the node over mTLS.
//
// Usage:
//   node client.js --address HOST:PORT --ca CA.crt --cert CLIENT.crt --key CLIENT.key \
//     --proto-dir /path/to/proto --rpc-include-dir /path/containing/google/rpc \
//     --workspace WS --id ID [--server-name localhost]
//
// It puts a resource with CommandService/Execute, reads it back with
// QueryService/GetResource, lists it with QueryService/ListResources, sends one bad request,
// and prints one JSON object with the results on stdout. Exit code 0 means every call
// completed (the bad request is expected to fail; its status is part of the output).

"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");

const DEADLINE_MS = 15000;

function parseArgs(argv) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i];
    if (!name.startsWith("--") || i + 1 >= argv.length) {
      throw new Error(`bad argument list near ${JSON.stringify(name)}`);
    }
    args[name.slice(2)] = argv[i + 1];
  }
  for (const required of ["address", "ca", "cert", "key", "proto-dir", "rpc-include-dir",
                          "workspace", "id"]) {
    if (!args[required]) throw new Error(`missing --${required}`);
  }
  return args;
}

function deadline() {
  return new Date(Date.now() + DEADLINE_MS);
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline() }, (err, response) => {
      if (err) reject(err);
      else resolve(response);
    });
  });
}

// google.rpc.Status details of an error, decoded with protobufjs from the same .proto files.
function statusDetails(err, rpcRoot) {
  const raw = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
  if (!raw || raw.length === 0) return null;
  const Status = rpcRoot.lookupType("google.rpc.Status");
  const BadRequest = rpcRoot.lookupType("google.rpc.BadRequest");
  const status = Status.decode(raw[0]);
  const fieldViolations = [];
  const detailTypes = [];
  for (const any of status.details) {
    const typeUrl = any.type_url || any.typeUrl;
    detailTypes.push(typeUrl);
    if (typeUrl === "type.googleapis.com/google.rpc.BadRequest") {
      const br = BadRequest.decode(any.value);
      for (const v of br.field_violations || br.fieldViolations || []) {
        fieldViolations.push(v.field);
      }
    }
  }
  return { code: status.code, message: status.message, detail_types: detailTypes,
           field_violations: fieldViolations };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const protoDir = args["proto-dir"];
  const rpcInclude = args["rpc-include-dir"];
  const files = ["command.proto", "query.proto", "resources.proto"].map(
    (f) => path.join("tessera", "v1", f));
  const definition = protoLoader.loadSync(files, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: false,
    oneofs: true,
    includeDirs: [protoDir, rpcInclude],
  });
  const pkg = grpc.loadPackageDefinition(definition);

  const rpcRoot = new protobuf.Root();
  rpcRoot.resolvePath = (_origin, target) => path.join(rpcInclude, target);
  rpcRoot.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"],
                   { keepCase: true });

  const creds = grpc.credentials.createSsl(
    fs.readFileSync(args.ca), fs.readFileSync(args.key), fs.readFileSync(args.cert));
  // The node's certificate names "localhost" (as well as 127.0.0.1); the node's own printed
  // grpcurl command uses -servername localhost, and Node.js deprecates IP addresses as SNI.
  const serverName = args["server-name"] || "localhost";
  const options = {
    "grpc.ssl_target_name_override": serverName,
    "grpc.default_authority": serverName,
  };
  const command = new pkg.tessera.v1.CommandService(args.address, creds, options);
  const query = new pkg.tessera.v1.QueryService(args.address, creds, options);

  const ws = args.workspace;
  const id = args.id;
  const resource = {
    workspace: ws,
    kind: "task",
    id,
    title: "from node.js",
    body: "written by @grpc/grpc-js",
    // protobufjs bundles the well-known types with camelCase field names, even with keepCase.
    attributes: { fields: { priority: { numberValue: 2 }, lang: { stringValue: "js" } } },
    embedding: [0.5, -0.25, 1.0, 0.0],
    owner: "ann",
  };
  const out = { grpc_js_version: require("@grpc/grpc-js/package.json").version };
  try {
    out.execute = await call(command, "Execute", {
      idempotency_key: `js-${id}`,
      put_resource: { resource },
    });
    out.get = await call(query, "GetResource", { key: { workspace: ws, kind: "task", id } });
    out.list = await call(query, "ListResources", { workspace: ws, kind: "task" });
    try {
      await call(query, "GetResource", { key: { workspace: "", kind: "task", id } });
      out.bad_request = { code: 0, details: "unexpectedly succeeded" };
    } catch (err) {
      out.bad_request = { code: err.code, details: err.details,
                          status: statusDetails(err, rpcRoot) };
    }
  } finally {
    command.close();
    query.close();
  }
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(`client.js failed: ${err && err.stack ? err.stack : err}\n`);
  if (err && err.code !== undefined) {
    process.stderr.write(`grpc code=${err.code} details=${err.details}\n`);
  }
  process.exit(1);
});
