// Strict validation of the custom kinds in deploy/ (GKE, Gateway API, Knative
// as Cloud Run reads it) against their published schemas: the npm packages
// @kubernetes-models/{gke,gateway-api,knative}, generated from each kind's
// CustomResourceDefinition. scripts/test installs them (npm ci, from
// package-lock.json) into ./node_modules; tests/deploy_support.py runs this.
//
// Each document passes two checks, both from the package of its kind:
// - the package's validator (the CRD's OpenAPI schema compiled by ajv):
//   types, enums, required fields, patterns, bounds;
// - TypeScript's excess-property check against the package's declared type
//   (the same schema as a TypeScript interface): a field the schema does not
//   name is an error. The validator alone lets unknown fields through, as a
//   CRD's schema does not close its objects; the API server drops them
//   silently, so a misspelled field would be lost without a word.
//
//   node tests/crd_validate.cjs < documents.json   -> {"errors": [[index, message], ...]}
//   node tests/crd_validate.cjs --kinds            -> ["apiVersion kind", ...]
// Exit status 0 when every document passes, 1 when one fails, 2 on bad input
// (a kind not in KINDS included).
"use strict";

const fs = require("fs");
const path = require("path");

// "apiVersion kind" -> the package module declaring it (its model class and
// its interface I<kind>).
const KINDS = {
  "cloud.google.com/v1 BackendConfig": "@kubernetes-models/gke/cloud.google.com/v1/BackendConfig",
  "networking.gke.io/v1 HealthCheckPolicy": "@kubernetes-models/gke/networking.gke.io/v1/HealthCheckPolicy",
  "networking.gke.io/v1 ManagedCertificate": "@kubernetes-models/gke/networking.gke.io/v1/ManagedCertificate",
  "gateway.networking.k8s.io/v1 Gateway": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/Gateway",
  "gateway.networking.k8s.io/v1 HTTPRoute": "@kubernetes-models/gateway-api/gateway.networking.k8s.io/v1/HTTPRoute",
  "serving.knative.dev/v1 Service": "@kubernetes-models/knative/serving.knative.dev/v1/Service",
};

function keyOf(doc) {
  return `${doc && doc.apiVersion} ${doc && doc.kind}`;
}

// The package's own validator; a list of messages (empty: valid). Loaded
// by import(): some of the packages are ES modules only.
async function schemaErrors(doc) {
  const Model = (await import(KINDS[keyOf(doc)]))[doc.kind];
  try {
    new Model(doc).validate();
    return [];
  } catch (error) {
    return [String(error.message || error)];
  }
}

// TypeScript's check of every document as a literal of its declared type, in
// one program (one compiler start for all); messages by document index.
function typeErrors(docs) {
  const ts = require("typescript");
  // A file that does not exist, beside node_modules so that imports resolve.
  const file = path.join(__dirname, "..", "crd_validate_documents.ts");
  const lines = [];
  const firstLine = [];
  docs.forEach((doc, index) => {
    firstLine.push(lines.length);
    lines.push(`import type { I${doc.kind} as T${index} } from "${KINDS[keyOf(doc)]}";`);
    lines.push(...`export const d${index}: T${index} = ${JSON.stringify(doc, null, 1)};`.split("\n"));
  });
  const text = lines.join("\n") + "\n";
  const options = {
    strict: true, noEmit: true, skipLibCheck: true, types: [],
    module: ts.ModuleKind.NodeNext, moduleResolution: ts.ModuleResolutionKind.NodeNext,
  };
  const host = ts.createCompilerHost(options);
  const getSourceFile = host.getSourceFile;
  host.getSourceFile = (name, language, ...rest) =>
    name === file ? ts.createSourceFile(name, text, language) : getSourceFile(name, language, ...rest);
  const fileExists = host.fileExists;
  host.fileExists = (name) => name === file || fileExists(name);
  const program = ts.createProgram([file], options, host);
  const byDocument = docs.map(() => []);
  for (const diagnostic of ts.getPreEmitDiagnostics(program)) {
    const message = ts.flattenDiagnosticMessageText(diagnostic.messageText, "\n");
    if (!diagnostic.file || diagnostic.file.fileName !== file) {
      throw new Error(`TypeScript: ${message}`);
    }
    const line = diagnostic.file.getLineAndCharacterOfPosition(diagnostic.start).line;
    let index = 0;
    while (index + 1 < firstLine.length && firstLine[index + 1] <= line) index++;
    byDocument[index].push(`${lines[line].trim()}: ${message}`);
  }
  return byDocument;
}

async function main() {
  if (process.argv.includes("--kinds")) {
    process.stdout.write(JSON.stringify(Object.keys(KINDS)) + "\n");
    return 0;
  }
  const docs = JSON.parse(fs.readFileSync(0, "utf8"));
  const unknown = docs.filter((doc) => !(keyOf(doc) in KINDS)).map(keyOf);
  if (unknown.length) {
    process.stderr.write(`no schema here for ${[...new Set(unknown)].join(", ")}\n`);
    return 2;
  }
  const errors = [];
  const typed = typeErrors(docs);
  for (const [index, doc] of docs.entries()) {
    for (const message of [...await schemaErrors(doc), ...typed[index]]) errors.push([index, message]);
  }
  process.stdout.write(JSON.stringify({ errors }) + "\n");
  return errors.length ? 1 : 0;
}

main().then((status) => { process.exitCode = status; });
