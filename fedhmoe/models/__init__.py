"""The model layer (torch): backbones (``backbone``, ``tiny``, ``smollm2``), the adapter modules (``lora``,
``amole/``, ``moe/``), what travels (``payload``), the adapter kinds and their registry (``adapters``), and what
strategies may know of a backbone (``facts``). Import from the defining module; this package imports nothing, so
that importing one module does not load the others.
"""
