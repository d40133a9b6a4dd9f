"""Tests of lorakit.train: data reading, tokenising, batching, metrics."""
