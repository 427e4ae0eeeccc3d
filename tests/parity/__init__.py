"""Parity: NNsight tutorial experiments written twice, with nnsight and with torchsurgeon.

Each module of :mod:`parity.experiments` holds one experiment as two functions,
``nnsight_version`` and ``ts_version``, that return the same numbers; ``test_parity.py``
runs both on seeded random GPT-2 and Llama models, compares them, and runs the torchsurgeon
version again on a loopback host as one request.
"""
