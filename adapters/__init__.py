"""flexkv.adapters: engine adapters (vLLM, SGLang, TensorRT-LLM), each importing its engine lazily."""
