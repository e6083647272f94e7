"""slim2gguf: SliM-LLM mixed-precision quantization, exported to llama.cpp GGUF files."""

__version__ = "0.1.0"
