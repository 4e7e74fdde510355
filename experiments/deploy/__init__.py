"""A trained model in the formats it is served in: merged 16-bit, bitsandbytes, GPTQ, GGUF (our writer).
Imports neither the harness nor evaluation or distribution: the harness evaluates each export."""
