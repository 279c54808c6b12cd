// Command verispec-go calls a verispec server through the generated Go stubs and prints each answer as
// JSON: the Go side of the verispec.v1 contract, as a Go service would use it.
//
//	verispec-go -target dns:///verispec-grpc.verispec.svc.cluster.local:50051 generate "The capital of France is"
//	verispec-go -target 127.0.0.1:50051 tokenize "Hello there"
//	verispec-go -target 127.0.0.1:50051 health
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	pb "verispec/clients/go/gen/verispec/v1"
)

// serviceConfig is the Python and TypeScript clients' default: round_robin over every resolved address,
// UNAVAILABLE retried on another one.
const serviceConfig = `{
  "loadBalancingConfig": [{"round_robin": {}}],
  "methodConfig": [{
    "name": [{"service": "verispec.v1.GenerationService"}],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.05s", "maxBackoff": "1s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
  }]
}`

func main() {
	target := flag.String("target", "localhost:50051", "gRPC target: host:port, dns:///name:port, ipv4:a:port,b:port")
	timeout := flag.Duration("timeout", 60*time.Second, "deadline of the call")
	maxNewTokens := flag.Uint("max-new-tokens", 16, "generate: tokens to generate at most")
	stream := flag.Bool("stream", false, "generate: call StreamGenerate and print one JSON line per message")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: verispec-go [flags] generate PROMPT | tokenize TEXT | health | info")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 1 {
		flag.Usage()
		os.Exit(2)
	}
	conn, err := grpc.Dial(*target, grpc.WithInsecure(), grpc.WithDefaultServiceConfig(serviceConfig))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	if token := os.Getenv("VERISPEC_TOKEN"); token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	client := pb.NewGenerationServiceClient(conn)
	arg := ""
	if flag.NArg() > 1 {
		arg = flag.Arg(1)
	}
	switch flag.Arg(0) {
	case "generate":
		if *stream {
			call, err := client.StreamGenerate(ctx, &pb.StreamGenerateRequest{Prompt: arg, MaxNewTokens: uint32(*maxNewTokens)})
			if err != nil {
				fail(err)
			}
			for {
				message, err := call.Recv()
				if err == io.EOF {
					return
				}
				if err != nil {
					fail(err)
				}
				print(message)
			}
		}
		response, err := client.Generate(ctx, &pb.GenerateRequest{Prompt: arg, MaxNewTokens: uint32(*maxNewTokens)})
		printOrFail(response, err)
	case "tokenize":
		response, err := client.Tokenize(ctx, &pb.TokenizeRequest{Text: arg, ReturnTokens: true})
		printOrFail(response, err)
	case "health":
		response, err := client.Health(ctx, &pb.HealthRequest{})
		printOrFail(response, err)
	case "info":
		response, err := client.ModelInfo(ctx, &pb.ModelInfoRequest{})
		printOrFail(response, err)
	default:
		flag.Usage()
		os.Exit(2)
	}
}

func print(message proto.Message) {
	text, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(message)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(text))
}

func printOrFail(message proto.Message, err error) {
	if err != nil {
		fail(err)
	}
	print(message)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "verispec-go:", err)
	os.Exit(1)
}
