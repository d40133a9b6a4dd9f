"""Training libraries that drive a lorakit `PeftModel`: transformers' `Trainer` and TRL.

Each module imports its library only when one of its trainer classes is first used, so
`import lorakit.integrations.transformers` works without transformers installed.
"""
