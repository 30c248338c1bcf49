"""The model and its weights: checkpoints (bf16 / GPTQ int8 / int4), quantized linears, and
what turns a picture and a question into model inputs."""
