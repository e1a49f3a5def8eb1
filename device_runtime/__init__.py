"""fedmoe device runtime: what runs on a phone, a Raspberry Pi or a laptop.

Imports neither torch, transformers, nor another fedmoe package (a Pi runs it with
onnxruntime-training, numpy, tokenizers, safetensors and websockets only); ``tests/test_import_rule.py``
checks this.
"""
