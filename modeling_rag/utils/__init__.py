"""Small utilities with one home each: `atomic` (crash-safe writes), `hashing` (file digests),
`similarity` (question/passage scores), `chunk_ids` (the `doc#n` passage-id rule), `peft_adapters` (the
files of a shipped LoRA adapter)."""
