"""ttc-vllm: test-time compute scaling for vLLM serving."""
__version__ = "0.1.0"
