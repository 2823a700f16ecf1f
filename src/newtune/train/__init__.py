"""Training: config -> TrainingArguments, the Trainer and the run that saves outputs."""
