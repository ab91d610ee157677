"""Streaming-KV support for the LLM service: a vLLM KV connector that saves the KV of
prompt segments into a store of ours and loads them back into later requests, with keys
re-rotated (RoPE) to the positions the segments take in the new prompt.

See docs/kv_connector.md. Nothing here imports vLLM at module import time except
`connector.py`, which vLLM itself imports through `kv_connector_module_path`.
"""
