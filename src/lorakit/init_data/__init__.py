"""The data-driven initialisations: EVA (`initialize_lora_eva_weights`, `get_eva_state_dict`)
and CorDA (`preprocess_corda`), which run batches through the model to set the adapters."""
