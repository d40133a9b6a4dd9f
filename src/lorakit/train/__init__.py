"""Fine-tuning workflow: data reading, tokenisation, batching, metrics and the trainer.

Import the pieces from their modules (``lorakit.train.data``, ``lorakit.train.metrics``, ...);
this file only re-exports the public API once the trainer lands.
"""
