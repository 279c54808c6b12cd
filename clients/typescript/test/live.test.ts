/**
 * The generated TypeScript stubs against a live verispec server (address in VERISPEC_ADDRESS):
 * Generate, StreamGenerate, Health, ModelInfo and a validation error, as a Node service would call them.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { status } from "@grpc/grpc-js";

import { channelOptions, FinishReason, ServingStatus, SpeculationMode, VerispecClient } from "../src";

const address = process.env.VERISPEC_ADDRESS;
let client: VerispecClient;

before(() => {
  assert.ok(address, "set VERISPEC_ADDRESS to a running server, e.g. 127.0.0.1:50051");
  client = new VerispecClient(address, { token: process.env.VERISPEC_TOKEN });
});

after(() => client.close());

const request = {
  messages: [{ role: "user", content: "What is the capital of France?" }],
  maxNewTokens: 12,
  speculation: { mode: SpeculationMode.SPECULATION_MODE_NGRAM, numDraftTokens: 4 },
};

test("Generate answers with text, token ids, usage and a finish reason", async () => {
  const response = await client.generate(request);
  assert.ok(response.text.length > 0);
  assert.equal(response.usage?.completionTokens, response.tokenIds.length);
  assert.ok(response.usage!.promptTokens > 0);
  assert.ok(
    [FinishReason.FINISH_REASON_LENGTH, FinishReason.FINISH_REASON_EOS].includes(response.finishReason),
    `finish reason ${response.finishReason}`,
  );
  assert.ok(response.requestId.length > 0);
  assert.equal(typeof response.seed, "bigint", "uint64 fields are bigint, exact beyond 2^53");
});

test("a seeded sampled request replays exactly", async () => {
  const sampled = { ...request, sampling: { temperature: 0.9, topP: 0.95, seed: 2n ** 60n + 7n } };
  const [first, second] = [await client.generate(sampled), await client.generate(sampled)];
  assert.equal(first.seed, 2n ** 60n + 7n);
  assert.deepEqual(first.tokenIds, second.tokenIds);
});

test("StreamGenerate's deltas add up to Generate's greedy text, with one final message", async () => {
  const unary = await client.generate(request);
  const messages = [];
  for await (const message of client.streamGenerate(request)) {
    messages.push(message);
  }
  const finals = messages.filter((m) => m.finishReason !== FinishReason.FINISH_REASON_UNSPECIFIED);
  assert.equal(finals.length, 1);
  assert.equal(messages.at(-1), finals[0]);
  assert.equal(messages.map((m) => m.text).join(""), unary.text);
  assert.deepEqual(
    messages.flatMap((m) => m.tokenIds),
    unary.tokenIds,
  );
  assert.ok(finals[0].speculation!.numSteps > 0);
});

test("Tokenize counts the tokens Generate reports as the prompt", async () => {
  const tokenized = await client.tokenize({ messages: request.messages, returnTokens: true });
  const response = await client.generate(request);
  assert.equal(tokenized.count, response.usage!.promptTokens);
  assert.equal(tokenized.tokens.length, tokenized.tokenIds.length);
});

test("Health and ModelInfo describe the server", async () => {
  const health = await client.health();
  assert.equal(health.status, ServingStatus.SERVING_STATUS_SERVING);
  assert.ok(health.modelLoaded);
  const info = await client.modelInfo();
  assert.ok(info.modelId.length > 0 && info.vocabSize > 0 && info.maxContextLength > 0);
});

test("a bad field is INVALID_ARGUMENT with the field named", async () => {
  await assert.rejects(client.generate({ ...request, sampling: { temperature: -1 } }), (error: any) => {
    assert.equal(error.code, status.INVALID_ARGUMENT);
    assert.match(error.details, /sampling\.temperature/);
    return true;
  });
});

test("the default service config balances per call and retries UNAVAILABLE, over dns:/// and ipv4: targets", async () => {
  const config = JSON.parse(channelOptions()["grpc.service_config"] as string);
  assert.deepEqual(config.loadBalancingConfig, [{ round_robin: {} }]);
  assert.deepEqual(config.methodConfig[0].retryPolicy.retryableStatusCodes, ["UNAVAILABLE"]);
  assert.equal(channelOptions({ serviceConfig: null })["grpc.service_config"], undefined);
  // grpc-js parses the service config when the channel is made, and resolves both target schemes.
  for (const target of [`dns:///${address}`, `ipv4:${address},${address}`]) {
    const balanced = new VerispecClient(target, { token: process.env.VERISPEC_TOKEN });
    try {
      const response = await balanced.tokenize({ text: "Hello there" });
      assert.ok(response.count > 0, target);
    } finally {
      balanced.close();
    }
  }
});
