/**
 * A typed Node client for verispec.v1: promise and async-iterator wrappers over the generated
 * @grpc/grpc-js stubs, with bearer-token and TLS options.
 */
import {
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  credentials,
  Metadata,
  type ServiceError,
} from "@grpc/grpc-js";

import {
  type DeepPartial,
  GenerateRequest,
  type GenerateResponse,
  GenerationServiceClient,
  HealthRequest,
  type HealthResponse,
  ModelInfoRequest,
  type ModelInfoResponse,
  StreamGenerateRequest,
  type StreamGenerateResponse,
  TokenizeRequest,
  type TokenizeResponse,
} from "./gen/verispec/v1/generation";

export * from "./gen/verispec/v1/generation";

/**
 * Calls are balanced one by one over every address the target resolves to (a headless Service's pods behind
 * `dns:///name:port`, or an `ipv4:a:port,b:port` list), not pinned to one connection; a call refused with
 * UNAVAILABLE (a replica draining or restarting, refused before any work) is retried on another address.
 * The same service config as the Python client's DEFAULT_SERVICE_CONFIG.
 */
export const DEFAULT_SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [{ service: "verispec.v1.GenerationService" }],
      retryPolicy: {
        maxAttempts: 5,
        initialBackoff: "0.05s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
};

/** How to reach a server: plaintext by default, TLS credentials and a bearer token when it asks for them. */
export interface ConnectOptions {
  credentials?: ChannelCredentials;
  token?: string;
  /** Deadline of each call, in milliseconds (default 120 s). */
  timeoutMs?: number;
  /** Balancing and retries (default DEFAULT_SERVICE_CONFIG); null leaves gRPC's own (pick_first, one connection). */
  serviceConfig?: object | null;
  /** Extra channel options; they win over the service config. */
  channelOptions?: ChannelOptions;
}

/** The channel options of `options`: the service config, then any extra channel options. */
export function channelOptions(options: ConnectOptions = {}): ChannelOptions {
  const config = options.serviceConfig === undefined ? DEFAULT_SERVICE_CONFIG : options.serviceConfig;
  return {
    ...(config === null ? {} : { "grpc.service_config": JSON.stringify(config) }),
    ...options.channelOptions,
  };
}

type Callback<T> = (error: ServiceError | null, response: T) => void;

export class VerispecClient {
  readonly stub: GenerationServiceClient;
  private readonly token?: string;
  private readonly timeoutMs: number;

  /** `address` is any gRPC target: `host:port`, `dns:///name:port`, `ipv4:a:port,b:port`. */
  constructor(address: string, options: ConnectOptions = {}) {
    this.stub = new GenerationServiceClient(
      address,
      options.credentials ?? credentials.createInsecure(),
      channelOptions(options),
    );
    this.token = options.token;
    this.timeoutMs = options.timeoutMs ?? 120_000;
  }

  /** One request, one answer. Rejects with the server's ServiceError (code, details) on failure. */
  generate(request: DeepPartial<GenerateRequest>): Promise<GenerateResponse> {
    return this.unary((...args: CallArgs<GenerateResponse>) =>
      this.stub.generate(GenerateRequest.fromPartial(request), ...args),
    );
  }

  /** One message per engine step; the last one carries finishReason, usage and speculation stats. */
  async *streamGenerate(request: DeepPartial<StreamGenerateRequest>): AsyncGenerator<StreamGenerateResponse> {
    const call = this.stub.streamGenerate(StreamGenerateRequest.fromPartial(request), this.metadata(), this.options());
    for await (const message of call) {
      yield message as StreamGenerateResponse;
    }
  }

  /** Token ids (and, with returnTokens, their text) of a prompt or chat, as the model sees it. */
  tokenize(request: DeepPartial<TokenizeRequest>): Promise<TokenizeResponse> {
    return this.unary((...args: CallArgs<TokenizeResponse>) =>
      this.stub.tokenize(TokenizeRequest.fromPartial(request), ...args),
    );
  }

  health(): Promise<HealthResponse> {
    return this.unary((...args: CallArgs<HealthResponse>) => this.stub.health(HealthRequest.fromPartial({}), ...args));
  }

  modelInfo(): Promise<ModelInfoResponse> {
    return this.unary((...args: CallArgs<ModelInfoResponse>) =>
      this.stub.modelInfo(ModelInfoRequest.fromPartial({}), ...args),
    );
  }

  close(): void {
    this.stub.close();
  }

  private unary<T>(call: (...args: CallArgs<T>) => unknown): Promise<T> {
    return new Promise((resolve, reject) => {
      call(this.metadata(), this.options(), (error, response) => (error ? reject(error) : resolve(response)));
    });
  }

  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.token) {
      metadata.set("authorization", `Bearer ${this.token}`);
    }
    return metadata;
  }

  private options(): CallOptions {
    return { deadline: new Date(Date.now() + this.timeoutMs) };
  }
}

type CallArgs<T> = [Metadata, CallOptions, Callback<T>];
