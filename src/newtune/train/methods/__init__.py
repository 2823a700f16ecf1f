"""Training methods: each owns its row schema, collator, loss and metrics (SFT, DPO, ORPO, KTO, reward)."""
