"""fedmoe device runtime: what runs on a phone, a Raspberry Pi or a laptop.

Imports only the standard library, onnxruntime (training or plain build), numpy, tokenizers, safetensors,
websockets, cryptography and msgspec: never torch, transformers or another fedmoe package. click and rich
appear only in the command line (``cli.py``, ``cli_errors.py``) and in the optional training progress bar;
``tests/test_import_rule.py`` checks this allowlist.
"""
